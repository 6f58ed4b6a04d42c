"""The infer CLI end to end on tiny slides with a checkpoint whose answer is known."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lymphnode.core.errors import ConfigError
from lymphnode.infer import resolve_slides
from lymphnode.inference.heatmap import read_heatmap
from lymphnode.models.preprocess import Preprocess
from lymphnode.tasks import MultiTaskModule
from lymphnode.wsi.pyramid import write_pyramid

MPP = 0.243


def _slide(path: Path, tissue: bool) -> Path:
    """A 1024 × 768 slide: white, with a pink-purple tissue block at x 256..768, y 128..512."""
    rng = np.random.default_rng(0)
    img = np.full((768, 1024, 3), 245, np.uint8)
    if tissue:
        block = np.stack(
            [
                rng.integers(150, 220, (384, 512)),
                rng.integers(60, 130, (384, 512)),
                rng.integers(140, 200, (384, 512)),
            ],
            axis=-1,
        ).astype(np.uint8)
        img[128:512, 256:768] = block
    write_pyramid(path, img, mpp=MPP, tile_size=128, min_size=128)
    return path


def _checkpoint(path: Path, seg_bias: float, patch_size: int = 64) -> Path:
    """A lymphnode checkpoint of a tiny UNet whose seg logit is ~seg_bias everywhere, as a
    MultiTaskModule writes it (its own on_save_checkpoint)."""
    net = {"_target_": "lymphnode.models.UNet", "base_width": 4, "depth": 2, "top_skip": True}
    module = MultiTaskModule(net=net, preprocess=Preprocess(level=0, patch_size=patch_size))
    with torch.no_grad():
        module.net.seg_head.weight.zero_()
        module.net.seg_head.bias.fill_(seg_bias)
    ckpt = {"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return path


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline"}
    return subprocess.run(
        [sys.executable, "-m", "lymphnode.infer", *args, "num_workers=0", "progress=false"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("slides")
    _slide(root / "tumor_001.tif", tissue=True)
    _slide(root / "normal_001.tif", tissue=True)
    return root


def test_heatmap_is_high_on_tissue_zero_off_tissue_and_resumes(
    slides: Path, tmp_path: Path
) -> None:
    ckpt = _checkpoint(tmp_path / "m.ckpt", seg_bias=6.0)
    out = tmp_path / "wsi"
    done = _run(f"checkpoint={ckpt}", f"slides={slides}", f"out_dir={out}")
    assert done.returncode == 0, done.stderr
    assert "2 done, 0 skipped, 0 failed" in done.stdout
    heat = read_heatmap(out / "tumor_001.heatmap.tif")
    assert heat.probabilities.shape == (24, 32)  # ceil(768/32), ceil(1024/32)
    assert heat.mpp == pytest.approx(MPP) and heat.downsample == 32
    # tissue block: heatmap rows 4..16, cols 8..24 → p = sigmoid(6) ≈ 0.998
    assert heat.probabilities[6:14, 10:22].min() > 0.99
    assert heat.probabilities[20:, :].max() == 0.0 and heat.probabilities[:, :4].max() == 0.0
    png = out / "tumor_001.overlay.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
    again = _run(f"checkpoint={ckpt}", f"slides={slides}", f"out_dir={out}")
    assert again.returncode == 0 and "0 done, 2 skipped" in again.stdout


def test_overlapping_tiles_with_tta_give_the_same_constant_map(
    slides: Path, tmp_path: Path
) -> None:
    ckpt = _checkpoint(tmp_path / "m.ckpt", seg_bias=-6.0)
    out = tmp_path / "wsi"
    done = _run(f"checkpoint={ckpt}", f"slides=[{slides / 'tumor_001.tif'}]", f"out_dir={out}",
                "stride=32", "tta=true", "blend=hann")  # fmt: skip
    assert done.returncode == 0, done.stderr
    heat = read_heatmap(out / "tumor_001.heatmap.tif").probabilities
    assert 0.0 < heat.max() < 0.01


def test_a_file_that_is_not_a_lymphnode_checkpoint_fails_before_any_slide(
    slides: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {}}, bad)
    out = tmp_path / "wsi"
    res = _run(f"checkpoint={bad}", f"slides={slides}", f"out_dir={out}")
    assert res.returncode == 1
    assert "is not a lymphnode checkpoint" in res.stdout + res.stderr
    assert not list(out.glob("*.heatmap.tif")) if out.exists() else True


def test_slide_without_tissue_fails_and_completed_slides_are_kept(
    slides: Path, tmp_path: Path
) -> None:
    blank = _slide(tmp_path / "blank_001.tif", tissue=False)
    ckpt = _checkpoint(tmp_path / "m.ckpt", seg_bias=0.0)
    out = tmp_path / "wsi"
    res = _run(
        f"checkpoint={ckpt}", f"slides=[{slides / 'tumor_001.tif'},{blank}]", f"out_dir={out}"
    )
    assert res.returncode == 1
    assert "blank_001" in res.stdout + res.stderr and "tissue" in (res.stdout + res.stderr).lower()
    assert (out / "tumor_001.heatmap.tif").is_file()
    assert not (out / "blank_001.heatmap.tif").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no scratch left behind


def test_slides_from_a_split_file_a_folder_and_a_glob(slides: Path, tmp_path: Path) -> None:
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"test": ["tumor_001"], "slides_dir": str(slides)}))
    assert resolve_slides(f"split:{split}") == [slides / "tumor_001.tif"]
    assert [p.name for p in resolve_slides(str(slides))] == ["normal_001.tif", "tumor_001.tif"]
    assert [p.name for p in resolve_slides(str(slides / "tumor_*.tif"))] == ["tumor_001.tif"]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", r"split\.json is not a readable split file"),
        ("[1, 2]", r"split\.json is not a split file: expected a JSON object, got list"),
        ('{"train": []}', r"split\.json is not a split file: its 'test' is None, expected a list"),
    ],
)
def test_a_bad_split_file_is_refused_naming_it(tmp_path: Path, text: str, match: str) -> None:
    split = tmp_path / "split.json"
    split.write_text(text)
    with pytest.raises(ConfigError, match=match):
        resolve_slides(f"split:{split}")
    with pytest.raises(ConfigError, match=r"missing\.json does not exist \(written by"):
        resolve_slides(f"split:{tmp_path / 'missing.json'}")


def _odd_bn_checkpoint(path: Path) -> Path:
    """A tiny UNet checkpoint whose BatchNorm statistics are far from any slide's (running mean
    3, variance 0.05): its maps change when the statistics are re-estimated on the slide."""
    net = {"_target_": "lymphnode.models.UNet", "base_width": 4, "depth": 2, "top_skip": True}
    torch.manual_seed(0)
    module = MultiTaskModule(net=net, preprocess=Preprocess(level=0, patch_size=64))
    for name, buf in module.named_buffers():
        if name.endswith("running_mean"):
            buf.fill_(3.0)
        elif name.endswith("running_var"):
            buf.fill_(0.05)
    ckpt = {"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return path


def test_adapt_bn_uses_the_slides_statistics_restores_the_models_and_is_recorded(
    slides: Path, tmp_path: Path
) -> None:
    from lymphnode.inference.grid import TileDataset
    from lymphnode.inference.predict import adapted_to
    from lymphnode.inference.settings import InferenceSettings
    from lymphnode.models.checkpoint import load_inference_model
    from lymphnode.wsi.slide import open_slide

    ckpt = _odd_bn_checkpoint(tmp_path / "m.ckpt")
    model = load_inference_model(ckpt)
    before = {k: v.clone() for k, v in model.task.state_dict().items()}
    slide = open_slide(slides / "tumor_001.tif")
    corners = np.array([[x, y] for y in (128, 256, 384) for x in (256, 384, 512, 640)])
    dataset = TileDataset(slide, corners, model.preprocess, 64)
    settings = InferenceSettings(adapt_bn=True, adapt_tiles=5, num_workers=0, device="cpu")
    with adapted_to(model.task, dataset, model.preprocess, settings, "tumor_001") as record:
        assert record["statistics"] == "adapted" and record["tiles"] == 5
        bn = model.task.net.encoder[0][1]
        assert not torch.equal(bn.running_mean, before["net.encoder.0.1.running_mean"])
    after = model.task.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # the checkpoint's again
    off = InferenceSettings(adapt_bn=False, num_workers=0, device="cpu")
    with adapted_to(model.task, dataset, model.preprocess, off, "tumor_001") as record:
        assert record == {"statistics": "source"}

    out = tmp_path / "wsi"
    first = _run(f"checkpoint={ckpt}", f"slides=[{slides / 'tumor_001.tif'}]", f"out_dir={out}",
                 "adapt_bn=true", "adapt_tiles=8")  # fmt: skip
    assert first.returncode == 0, first.stderr
    adapted = read_heatmap(out / "tumor_001.heatmap.tif")
    assert adapted.source is not None and adapted.source["settings"]["adapt_bn"] is True
    second = _run(f"checkpoint={ckpt}", f"slides=[{slides / 'tumor_001.tif'}]", f"out_dir={out}")
    assert second.returncode == 0 and "1 done" in second.stdout  # other settings: recomputed
    source = read_heatmap(out / "tumor_001.heatmap.tif")
    assert not np.allclose(source.probabilities, adapted.probabilities)
    bad = _run(f"checkpoint={ckpt}", f"slides={slides}", f"out_dir={out}", "adapt_tiles=0")
    assert bad.returncode == 1 and "adapt_tiles" in bad.stderr


def test_slide_mpp_is_recorded_for_slides_without_one_and_the_files_own_wins(
    slides: Path, tmp_path: Path
) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    img = np.full((768, 1024, 3), 245, np.uint8)  # a tissue slide without mpp
    img[128:512, 256:768] = (180, 90, 170)
    write_pyramid(bare / "tumor_002.tif", img, mpp=None, tile_size=128, min_size=128)
    ckpt = _checkpoint(tmp_path / "m.ckpt", seg_bias=6.0)
    done = _run(f"checkpoint={ckpt}", f"slides=[{bare / 'tumor_002.tif'},{slides / 'tumor_001.tif'}]",
                f"out_dir={tmp_path / 'out'}", "slide_mpp=0.5")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert read_heatmap(tmp_path / "out" / "tumor_002.heatmap.tif").mpp == pytest.approx(0.5)
    assert read_heatmap(tmp_path / "out" / "tumor_001.heatmap.tif").mpp == pytest.approx(MPP)


def test_outlines_outside_the_slide_are_refused_before_the_checkpoint_is_read(
    slides: Path, tmp_path: Path
) -> None:
    from lymphnode.wsi.annotations import write_asap

    ann = tmp_path / "annotations"
    square = np.array([[8192, 4096], [16384, 4096], [16384, 8192], [8192, 8192]], float)
    write_asap(ann / "tumor_001.xml", [square])  # level-0 px of a 32x larger slide
    args = [f"checkpoint={tmp_path / 'missing.ckpt'}", f"slides={slides / 'tumor_001.tif'}",
            f"out_dir={tmp_path / 'out'}", f"annotations={ann}"]  # fmt: skip
    refused = _run(*args)
    assert refused.returncode == 1
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, refused.stderr
    assert "1024 x 768 px" in errors[0] and "annotations_downsample=16" in errors[0], errors[0]
    assert not (tmp_path / "out").exists()
    accepted = _run(*args, "annotations_downsample=16")  # now the missing checkpoint is the error
    assert accepted.returncode == 1 and "missing.ckpt" in accepted.stderr, accepted.stderr
