"""The preprocessing contract (lymphnode.models.preprocess): one object from the DataModule to the
checkpoint to ``infer``, and the same tensors on both sides of it."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from lymphnode.core.errors import ConfigError
from lymphnode.data import FinetuneDataModule
from lymphnode.inference.grid import TileDataset, tile_loader
from lymphnode.inference.predict import run_tiles
from lymphnode.inference.settings import InferenceSettings
from lymphnode.inference.stitch import HeatmapStitcher
from lymphnode.models.checkpoint import load_inference_model, read_preprocess
from lymphnode.models.preprocess import Preprocess
from lymphnode.models.stain import ReinhardNormalizer
from lymphnode.patches.cache import CacheWriter
from lymphnode.tasks import MultiTaskModule
from lymphnode.wsi.pyramid import write_pyramid
from lymphnode.wsi.slide import open_slide

P = 32  # patch side (px, level 0)
GRID = 8  # the slide is GRID x GRID patches
STAINS = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])


def _he_slide(size: int, seed: int) -> np.ndarray:
    """Smooth random haematoxylin/eosin concentrations on white, mixed by Beer-Lambert."""
    rng = np.random.default_rng(seed)

    def field() -> np.ndarray:
        coarse = rng.random((size // 16, size // 16)).astype(np.float32)
        return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC).clip(0, 1)

    tissue = field() > 0.25
    conc = np.stack([field() * 1.4, field() * 0.9], axis=-1) * tissue[..., None]
    od = conc @ (STAINS / np.linalg.norm(STAINS, axis=1, keepdims=True))
    return np.clip(255 * np.exp(-od) + 0.5, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def slide_and_caches(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list]:
    """A slide and labeled/test caches whose patches are the slide's pixels at known corners."""
    root = tmp_path_factory.mktemp("contract")
    slide_path = root / "tumor_001.tif"
    write_pyramid(slide_path, _he_slide(GRID * P, seed=4), mpp=0.5, tile_size=128, min_size=64)
    corners = [(x * P, y * P) for y in range(GRID) for x in range(GRID)]
    with open_slide(slide_path) as slide:
        patches = [slide.read(x, y, P, P) for x, y in corners]
    split = {"labeled": range(0, 40), "test": range(40, 64)}
    for name, positions in split.items():
        writer = CacheWriter(root / name, {"level": 0, "patch_size": P}, codec="raw",
                             patch_size=P, has_masks=True)  # fmt: skip
        with writer.slide("tumor_001", n=len(positions)) as shard:
            for i in positions:
                mask = np.zeros((P, P), np.uint8)
                label = i % 2
                mask[8:20, 8:20] = label
                x, y = corners[i]
                shard.add(patches[i], mask, x=x, y=y, level=0, label=label)
        writer.commit("tumor_001", shard.info)
        writer.finalize(["tumor_001"])
    return slide_path, root, [corners[i] for i in split["test"]]


class _Inputs:
    """Records every tensor the network is called with (a forward pre-hook)."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.batches: list[torch.Tensor] = []
        self.handle = net.register_forward_pre_hook(self._record)

    def _record(self, module: torch.nn.Module, args: tuple) -> None:
        self.batches.append(args[0].detach().clone().contiguous())

    def all(self) -> torch.Tensor:
        self.handle.remove()
        return torch.cat(self.batches)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["reinhard", "macenko"])
def test_infer_feeds_the_network_what_the_test_loader_fed_it(
    slide_and_caches: tuple[Path, Path, list], tmp_path: Path, method: str
) -> None:
    slide_path, caches, test_corners = slide_and_caches
    datamodule = FinetuneDataModule(
        caches / "labeled", caches / "test", labeled_size=10, folds=2, batch_size=4,
        normalize={"mean": [0.7, 0.6, 0.75], "std": [0.2, 0.25, 0.15]},
        stain_norm={"method": method, "n_patches": 16},
    )  # fmt: skip
    net = {"_target_": "lymphnode.models.UNet", "base_width": 4, "depth": 2}
    module = MultiTaskModule(net=net, log_images_every_n_epochs=0)  # contract: from the data
    pl.seed_everything(0)
    trainer = pl.Trainer(max_steps=1, limit_val_batches=1, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    assert read_preprocess(ckpt) == datamodule.preprocess
    assert read_preprocess(ckpt).stain["method"] == method  # the fitted state is in the checkpoint

    recorder = _Inputs(module.net)
    trainer.test(module, datamodule=datamodule, verbose=False)
    at_test = recorder.all()  # (24, 3, P, P), the test cache in order

    model = load_inference_model(ckpt)
    settings = InferenceSettings(batch_size=5, num_workers=0, channels_last=False, device="cpu")
    recorder = _Inputs(model.net)
    with open_slide(slide_path) as slide:
        dataset = TileDataset(slide, np.array(test_corners), model.preprocess)
        stitcher = HeatmapStitcher((8, 8), 32.0, 1.0, P, "mean", tmp_path / "stitch")
        run_tiles(model.task, tile_loader(dataset, settings), stitcher,
                  preprocess=model.preprocess, settings=settings)  # fmt: skip
    at_infer = recorder.all()
    assert at_infer.shape == at_test.shape == (len(test_corners), 3, P, P)
    assert float((at_infer - at_test).abs().max()) < 1e-5
    # the stain normalisation is applied on both sides (without it the tensors differ)
    plain = Preprocess(0, P, model.preprocess.mean, model.preprocess.std)
    with open_slide(slide_path) as slide:
        first = plain.apply(slide.read(*test_corners[0], P, P))
    assert float((first - at_test[0]).abs().max()) > 1e-2


def test_contract_round_trips_and_compares() -> None:
    image = _he_slide(64, seed=1)
    state = ReinhardNormalizer().fit(image).state()
    contract = Preprocess(level=1, patch_size=48, mean=(0.6, 0.5, 0.7), std=(0.2, 0.2, 0.3),
                          stain=state, mpp=0.25)  # fmt: skip
    again = Preprocess.from_dict(contract.to_dict())
    assert again == contract
    assert torch.equal(again.apply(image), contract.apply(image))
    other = Preprocess(level=0, patch_size=48, mean=(0.6, 0.5, 0.7), std=(0.2, 0.2, 0.3))
    assert contract.differences(other) == [
        "level: 1 vs 0",
        "mpp: 0.25 vs None",
        f"stain: reinhard {_fitted(state)} vs none",
    ]
    assert contract.differences(again) == []


def _fitted(state: dict) -> dict:
    from lymphnode.models.preprocess import _rounded

    return _rounded({k: v for k, v in state.items() if k not in ("method", "options")})


def test_normalize_is_the_documented_affine_on_any_layout() -> None:
    contract = Preprocess(level=0, patch_size=4, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 1.0))
    rgb = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    out = contract.normalize(rgb)
    expected = (torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255.0
                - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / torch.tensor(
        [0.5, 0.25, 1.0]).view(1, 3, 1, 1)  # fmt: skip
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert out.is_contiguous()
    nhwc = contract.normalize(rgb, channels_last=True)
    assert torch.equal(nhwc, out) and nhwc.is_contiguous(memory_format=torch.channels_last)
    # one numpy patch (the table lookup of DataLoader workers) = the tensor path, bit for bit
    assert torch.equal(contract.normalize(rgb[1]), out[1])
    assert torch.equal(contract.normalize(torch.from_numpy(rgb[1])), out[1])
    unit = torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255.0
    torch.testing.assert_close(contract.denormalize(out), unit, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"level": -1, "patch_size": 8}, r"preprocess: level must be an integer >= 0, got -1"),
        (
            {"level": 0, "patch_size": 0},
            r"preprocess: patch_size must be an integer >= 1 px, got 0",
        ),
        (
            {"level": 0, "patch_size": 8, "mpp": -1.0},
            r"preprocess: mpp must be a finite number > 0 µm/px \(or null\), got -1.0",
        ),
        ({"level": 0, "patch_size": 8, "mean": (0.5, 0.5)}, r"normalize.mean=.* 3 finite numbers"),
        ({"level": 0, "patch_size": 8, "stain": {"method": "x"}}, r"stain normaliser state"),
    ],
)
def test_bad_contract_values_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Preprocess(**kwargs)


def test_bad_contract_dicts_and_inputs_raise() -> None:
    with pytest.raises(ConfigError, match=r"preprocess .* lacks \['normalize'\]"):
        Preprocess.from_dict({"level": 0, "patch_size": 8})
    with pytest.raises(ConfigError, match=r"preprocess format 9 is not supported"):
        Preprocess.from_dict({**Preprocess(0, 8).to_dict(), "format": 9})
    with pytest.raises(ConfigError, match=r"preprocess takes uint8 RGB .* got \(4, 4\)"):
        Preprocess(0, 8).normalize(np.zeros((4, 4), np.uint8))
