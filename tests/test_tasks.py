"""LightningModules, checkpoints and callbacks: fit on tiny random data, weight transfer, errors."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader, Dataset

from lymphnode.core.errors import CheckpointError, ConfigError, LymphnodeError
from lymphnode.models.checkpoint import (
    is_lymphnode_checkpoint,
    load_inference_model,
    load_pretrained_weights,
)
from lymphnode.models.preprocess import Preprocess
from lymphnode.tasks import (
    DepthNormLogger,
    MultiTaskModule,
    NonFiniteLossError,
    NonFiniteLossGuard,
    ReconstructionModule,
)
from lymphnode.tasks.multitask import per_patch_dice

SIZE = 33  # odd on purpose
TINY = {"base_width": 4, "depth": 2}
SEG_KEYS = ["seg_precision", "seg_recall", "seg_f1", "seg_dice", "seg_iou", "seg_loss", "recon_mse"]


class RandomPatches(Dataset):
    """Deterministic random normalised images and {0, 1} masks (a blob in the middle)."""

    def __init__(self, n: int = 8, size: int = SIZE, nan: bool = False) -> None:
        self.n, self.size, self.nan = n, size, nan

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        image = torch.randn(3, self.size, self.size, generator=g)
        if self.nan:
            image[0, 0, 0] = float("nan")
        mask = torch.zeros(1, self.size, self.size)
        if i % 2:
            mask[:, 8:20, 10:25] = 1.0
        return {"image": image, "mask": mask, "label": i % 2}


def loader(**kwargs) -> DataLoader:
    return DataLoader(RandomPatches(**kwargs), batch_size=4)


def trainer(tmp_path: Path, **kwargs) -> pl.Trainer:
    defaults = {
        "fast_dev_run": 2,
        "accelerator": "cpu",
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
    }
    return pl.Trainer(**{**defaults, **kwargs})


def contract(
    normalize: dict | None = None, patch_size: int = SIZE, level: int = 0
) -> dict[str, object]:
    """A preprocessing contract as checkpoints store it (``Preprocess.to_dict``)."""
    normalize = {"mean": [0.5] * 3, "std": [0.5] * 3} if normalize is None else normalize
    return {"level": level, "patch_size": patch_size, "normalize": normalize}


def _with_contract(kwargs: dict) -> dict:
    parts = {k: kwargs.pop(k) for k in ("normalize", "patch_size", "level") if k in kwargs}
    return {"net": TINY, "preprocess": contract(**parts), **kwargs}


def recon_module(**kwargs) -> ReconstructionModule:
    return ReconstructionModule(**_with_contract(kwargs))


def multitask_module(**kwargs) -> MultiTaskModule:
    return MultiTaskModule(**_with_contract(kwargs))


@pytest.fixture
def pretrain_ckpt(tmp_path: Path) -> Path:
    """A real Lightning checkpoint of a reconstruction pretraining (top_skip=False)."""
    pl.seed_everything(0)
    module = recon_module(normalize={"mean": [0.5, 0.6, 0.7], "std": [0.2, 0.25, 0.3]})
    t = trainer(tmp_path / "pre")
    t.fit(module, loader(), loader())
    path = tmp_path / "pretrain.ckpt"
    t.save_checkpoint(path)
    return path


def _ckpt_net_state(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}


# --- fitting ---------------------------------------------------------------------------------


def test_reconstruction_fit_logs_its_metrics_and_a_reconstruction_grid(tmp_path):
    pl.seed_everything(0)
    t = trainer(tmp_path)
    t.fit(recon_module(), loader(), loader())
    metrics = t.callback_metrics
    for key in ["train/loss", "train/recon_mse", "val/loss", "val/recon_mse", "val/recon_psnr"]:
        assert key in metrics and torch.isfinite(metrics[key]), key
    assert "train/recon_l1" not in metrics
    assert (tmp_path / "images" / "val_reconstructions_epoch0000.png").is_file()


def test_reconstruction_with_l1_logs_l1_and_mse(tmp_path):
    t = trainer(tmp_path)
    t.fit(recon_module(loss="l1", log_images_every_n_epochs=0), loader(), loader())
    assert {"train/recon_l1", "train/recon_mse", "val/recon_l1"} <= set(t.callback_metrics)
    assert not (tmp_path / "images").exists()


def test_reconstruction_pretraining_removes_the_top_skip_and_freezes_the_seg_head():
    module = recon_module()
    assert module.net.top_skip is False
    assert not any(p.requires_grad for p in module.net.seg_head.parameters())
    assert recon_module(net={**TINY, "top_skip": True}).net.top_skip is True


def test_multitask_fit_and_test_log_segmentation_metrics_and_overlays(tmp_path):
    pl.seed_everything(0)
    module = multitask_module(seg_loss={"pos_weight": 2.0, "dice_weight": 0.5})
    t = trainer(tmp_path)
    t.fit(module, loader(), loader())
    keys = set(t.callback_metrics)
    assert {"train/loss", "train/seg_loss", "train/recon_mse", "val/loss"} <= keys
    assert {f"val/{k}" for k in SEG_KEYS} <= keys
    t.test(module, loader())
    metrics = t.callback_metrics
    for key in [f"test/{k}" for k in SEG_KEYS]:
        assert key in metrics and torch.isfinite(metrics[key]), key
        if "loss" not in key and "mse" not in key:
            assert 0.0 <= float(metrics[key]) <= 1.0, key
    assert (tmp_path / "images" / "val_overlays_epoch0000.png").is_file()
    assert list((tmp_path / "images").glob("test_overlays_epoch*.png"))


def test_same_seed_gives_the_same_metrics(tmp_path):
    runs = []
    for i in range(2):
        pl.seed_everything(123)
        module = multitask_module(log_images_every_n_epochs=0)
        t = trainer(tmp_path / str(i))
        t.fit(module, loader(), loader())
        fit_metrics = {k: float(v) for k, v in t.callback_metrics.items()}
        t.test(module, loader())
        runs.append({**fit_metrics, **{k: float(v) for k, v in t.callback_metrics.items()}})
    assert "val/seg_f1" in runs[0] and "test/seg_f1" in runs[0]
    assert runs[0] == runs[1]
    pl.seed_everything(124)
    module = multitask_module(log_images_every_n_epochs=0)
    t = trainer(tmp_path / "other")
    t.fit(module, loader(), loader())
    assert float(t.callback_metrics["val/loss"]) != runs[0]["val/loss"]


def test_recon_weight_zero_trains_segmentation_only(tmp_path):
    module = multitask_module(recon_weight=0.0, log_images_every_n_epochs=0)
    assert not any(p.requires_grad for p in module.net.recon_head.parameters())
    before = module.net.recon_head.weight.detach().clone()
    t = trainer(tmp_path)
    t.fit(module, loader(), loader())
    assert torch.equal(module.net.recon_head.weight, before)
    assert "val/recon_mse" not in t.callback_metrics  # not computed at recon_weight=0
    metrics = t.callback_metrics
    assert torch.isclose(metrics["train/loss"], metrics["train/seg_loss"])


def test_channels_last_module_fits(tmp_path):
    module = multitask_module(log_images_every_n_epochs=0).to(memory_format=torch.channels_last)
    t = trainer(tmp_path)
    t.fit(module, loader(), loader())
    assert torch.isfinite(t.callback_metrics["train/loss"])


def test_fit_with_csv_logger_writes_metrics_and_png(tmp_path):
    module = recon_module()
    t = trainer(
        tmp_path,
        fast_dev_run=False,
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        logger=CSVLogger(tmp_path, name="csv"),
        log_every_n_steps=1,
    )
    t.fit(module, loader(), loader())
    log_dir = Path(t.log_dir)
    header = (log_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val/recon_mse", "val/recon_psnr", "train/loss_step"} <= set(header)
    assert (log_dir / "images" / "val_reconstructions_epoch0000.png").is_file()


# --- optimisation ---------------------------------------------------------------------------


def test_default_optimizer_is_adamw_with_cosine_over_the_runs_optimizer_steps(tmp_path):
    t = trainer(
        tmp_path, fast_dev_run=False, max_epochs=3, limit_train_batches=2, limit_val_batches=0
    )
    t.fit(multitask_module(), loader())
    assert isinstance(t.optimizers[0], torch.optim.AdamW)
    config = t.lr_scheduler_configs[0]
    assert isinstance(config.scheduler, torch.optim.lr_scheduler.CosineAnnealingLR)
    assert config.scheduler.T_max == 3 * 2 - 1  # max_epochs x steps per epoch, minus one
    assert config.interval == "step"


class _LearningRates(pl.Callback):
    """The learning rate each optimizer step trains with."""

    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize("max_steps", [5, 11])
def test_max_steps_shortens_the_cosine_to_end_at_its_minimum_on_the_last_step(tmp_path, max_steps):
    rates = _LearningRates()
    t = trainer(tmp_path, fast_dev_run=False, max_epochs=100, max_steps=max_steps,
                limit_val_batches=0, callbacks=[rates])  # fmt: skip
    t.fit(multitask_module(log_images_every_n_epochs=0), loader(n=8))  # 2 steps per epoch
    assert t.global_step == max_steps and len(rates.rates) == max_steps
    assert rates.rates[0] == pytest.approx(1e-3)  # the configured lr on the first step
    assert rates.rates[-1] == pytest.approx(0.0, abs=1e-12)  # the cosine minimum (eta_min 0)
    assert all(a > b for a, b in zip(rates.rates, rates.rates[1:]))  # decreasing every step


def test_optimizer_and_scheduler_partials_from_hydra_are_used_and_saved(tmp_path):
    cfg = OmegaConf.create(
        {
            "_target_": "lymphnode.tasks.MultiTaskModule",
            "net": TINY,
            "preprocess": contract({"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}),
            "optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1},
            "scheduler": {
                "_target_": "torch.optim.lr_scheduler.CosineAnnealingLR",
                "_partial_": True,
                "T_max": 7,
            },
        }
    )
    module = instantiate(cfg)
    assert module.hparams["optimizer"] == {"_target_": "torch.optim.sgd.SGD", "lr": 0.1}
    assert module.hparams["net"]["base_width"] == 4
    assert module.hparams["net"]["_target_"] == "lymphnode.models.UNet"  # the default network
    assert isinstance(module.hparams["net"], dict)  # plain data, not DictConfig
    t = trainer(
        tmp_path, fast_dev_run=False, max_epochs=1, limit_train_batches=1, limit_val_batches=0
    )
    t.fit(module, loader())
    assert isinstance(t.optimizers[0], torch.optim.SGD)
    assert t.optimizers[0].param_groups[0]["initial_lr"] == 0.1
    assert t.lr_scheduler_configs[0].scheduler.T_max == 7


def test_no_scheduler_gives_a_plain_optimizer(tmp_path):
    module = recon_module(scheduler=None, optimizer=functools.partial(torch.optim.Adam, lr=1e-2))
    t = trainer(tmp_path)
    t.fit(module, loader(), loader())
    assert isinstance(t.optimizers[0], torch.optim.Adam)
    assert t.lr_scheduler_configs == []


# --- checkpoints ----------------------------------------------------------------------------


def test_checkpoint_is_self_describing_and_loads_weights_only(pretrain_ckpt):
    ckpt = torch.load(pretrain_ckpt, map_location="cpu", weights_only=True)
    hparams = ckpt["hyper_parameters"]
    assert {"net", "preprocess", "optimizer", "scheduler"} <= set(hparams)
    assert hparams["net"]["top_skip"] is False
    assert hparams["preprocess"]["normalize"] == {"mean": [0.5, 0.6, 0.7], "std": [0.2, 0.25, 0.3]}
    assert (hparams["preprocess"]["patch_size"], hparams["preprocess"]["level"]) == (SIZE, 0)
    assert ckpt["lymphnode"]["task"] == "reconstruction"
    assert ckpt["lymphnode"]["task_target"] == "lymphnode.tasks.reconstruction.ReconstructionModule"
    assert ckpt["lymphnode"]["net_attribute"] == "net"
    assert is_lymphnode_checkpoint(pretrain_ckpt)
    module = ReconstructionModule.load_from_checkpoint(pretrain_ckpt)
    for name, value in _ckpt_net_state(pretrain_ckpt).items():
        assert torch.equal(module.net.state_dict()[name], value), name


class _PathDataModule(pl.LightningDataModule):
    def __init__(self, root: Path, cfg=None) -> None:
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self) -> DataLoader:
        return loader()


def test_checkpoint_stays_weights_only_loadable_with_path_and_omegaconf_datamodule_hparams(
    tmp_path,
):
    t = trainer(tmp_path, fast_dev_run=False, max_epochs=1, limit_train_batches=1)
    t.fit(recon_module(), datamodule=_PathDataModule(tmp_path, OmegaConf.create({"a": [1]})))
    path = tmp_path / "dm.ckpt"
    t.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["datamodule_hyper_parameters"] == {"root": str(tmp_path), "cfg": {"a": [1]}}
    assert is_lymphnode_checkpoint(path)


def test_pretrained_weights_transfer_into_the_finetune_model(pretrain_ckpt):
    module = multitask_module(net={**TINY, "top_skip": False}, pretrained=str(pretrain_ckpt))
    report = module.load_pretrained()
    ckpt_state = _ckpt_net_state(pretrain_ckpt)
    assert report is not None and report.reinitialized == [] and report.missing == []
    assert sorted(report.loaded) == sorted(ckpt_state)
    for name, value in module.net.state_dict().items():
        assert torch.equal(value, ckpt_state[name]), name


class _CaptureAtTrainStart(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        self.state = {k: v.clone() for k, v in pl_module.net.state_dict().items()}


def test_fit_loads_pretrained_weights_and_reinitialises_the_top_decoder_on_top_skip_change(
    pretrain_ckpt, tmp_path, caplog
):
    pl.seed_everything(1)
    module = multitask_module(pretrained=str(pretrain_ckpt))  # top_skip=True vs the ckpt's False
    fresh_top = {k: v.clone() for k, v in module.net.decoder[0].state_dict().items()}
    capture = _CaptureAtTrainStart()
    with caplog.at_level(logging.WARNING, logger="lymphnode.models.checkpoint"):
        trainer(tmp_path, callbacks=[capture]).fit(module, loader(), loader())
    assert "top_skip=False but the model has top_skip=True" in caplog.text
    assert "'decoder.0.'" in caplog.text and "re-initialised" in caplog.text
    ckpt_state = _ckpt_net_state(pretrain_ckpt)
    for name, value in capture.state.items():
        if name.startswith("decoder.0."):
            assert name in module.pretrained_report.reinitialized
            if name.endswith("weight") and value.ndim > 1:  # conv weights: freshly re-drawn
                assert not torch.equal(value, fresh_top[name.removeprefix("decoder.0.")]), name
                if ckpt_state[name].shape == value.shape:
                    assert not torch.equal(value, ckpt_state[name]), name
        else:
            assert torch.equal(value, ckpt_state[name]), name


def test_pretrained_is_not_reloaded_when_weights_come_from_a_checkpoint(pretrain_ckpt, tmp_path):
    module = multitask_module(net={**TINY, "top_skip": False}, pretrained=str(pretrain_ckpt))
    t = trainer(
        tmp_path, fast_dev_run=False, max_epochs=1, limit_train_batches=2, limit_val_batches=0
    )
    t.fit(module, loader())
    finetuned = tmp_path / "finetuned.ckpt"
    t.save_checkpoint(finetuned)
    pretrain_ckpt.unlink()  # the pretraining is gone; the fine-tuned checkpoint must suffice
    restored = MultiTaskModule.load_from_checkpoint(finetuned)
    t2 = trainer(
        tmp_path, fast_dev_run=False, max_epochs=1, limit_train_batches=1, limit_val_batches=0
    )
    capture = _CaptureAtTrainStart()
    t2.callbacks.append(capture)
    t2.fit(restored, loader())
    for name, value in _ckpt_net_state(finetuned).items():
        assert torch.equal(capture.state[name], value), name


class _ParamsEachStep(pl.Callback):
    """The network's parameters after each optimizer step, and each group's lr before it."""

    def __init__(self) -> None:
        self.after: list[dict[str, torch.Tensor]] = []
        self.lrs: list[list[float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append({k: v.detach().clone() for k, v in pl_module.net.named_parameters()})


def _fit_steps(module, tmp_path, steps: int) -> _ParamsEachStep:
    record = _ParamsEachStep()
    t = trainer(
        tmp_path,
        fast_dev_run=False,
        max_steps=steps,
        limit_val_batches=0,
        callbacks=[record],
    )
    t.fit(module, loader(n=4 * steps))
    return record


def test_pretrained_parameters_get_their_own_lr_and_can_stay_fixed_first(pretrain_ckpt, tmp_path):
    pl.seed_everything(2)
    module = multitask_module(
        net={**TINY, "top_skip": False},
        pretrained=str(pretrain_ckpt),
        pretrained_lr_scale=0.1,
        freeze_pretrained_steps=2,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1),
        scheduler=None,
        log_images_every_n_epochs=0,
    )
    ckpt_state = _ckpt_net_state(pretrain_ckpt)
    pretrained = set(module.pretrained_parameter_names())
    assert pretrained and pretrained <= set(ckpt_state)
    assert not any(n.startswith("seg_head.") for n in pretrained)  # reconstruction never trains it
    record = _fit_steps(module, tmp_path, 3)
    assert record.lrs[0] == pytest.approx([1e-3, 1e-2])  # pretrained x 0.1, the rest at lr
    for step in (0, 1):  # fixed (not even weight decay) for the first two steps ...
        for name in pretrained:
            assert torch.equal(record.after[step][name], ckpt_state[name]), (step, name)
    assert any(  # ... while the segmentation head learns from the first step
        not torch.equal(record.after[0][n], record.after[1][n])
        for n in record.after[0]
        if n.startswith("seg_head.")
    )
    moved = [n for n in pretrained if not torch.equal(record.after[2][n], ckpt_state[n])]
    assert sorted(moved) == sorted(pretrained)  # ... then every pretrained tensor trains


def test_encoder_transfer_puts_only_the_encoder_in_the_pretrained_group(tmp_path):
    pl.seed_everything(3)
    source = multitask_module(net={**TINY, "top_skip": False})
    t = trainer(tmp_path / "src")
    t.fit(source, loader(), loader())
    path = tmp_path / "encoder.ckpt"
    t.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ckpt["lymphnode"]["transfer"] = "encoder"  # as a contrastive pretraining writes it
    torch.save(ckpt, path)
    module = multitask_module(
        net={**TINY, "top_skip": False}, pretrained=str(path), pretrained_lr_scale=0.5
    )
    names = module.pretrained_parameter_names()
    prefix = module.net.encoder_prefix
    assert names and all(n.startswith(prefix) for n in names)
    groups = module.optimizer_param_groups()
    assert [g.get("lr_scale", 1.0) for g in groups] == [0.5, 1.0]
    encoder = sum(p.numel() for n, p in module.net.named_parameters() if n.startswith(prefix))
    assert sum(p.numel() for p in groups[0]["params"]) == encoder


def test_encoder_scope_leaves_a_whole_network_pretexts_decoder_at_the_full_lr(pretrain_ckpt):
    network = multitask_module(
        net={**TINY, "top_skip": False}, pretrained=str(pretrain_ckpt), pretrained_lr_scale=0.1
    )
    encoder = multitask_module(
        net={**TINY, "top_skip": False},
        pretrained=str(pretrain_ckpt),
        pretrained_lr_scale=0.1,
        pretrained_lr_scope="encoder",
    )
    prefix = encoder.net.encoder_prefix
    wide, narrow = network.pretrained_parameter_names(), encoder.pretrained_parameter_names()
    assert any(n.startswith("decoder.") for n in wide)  # reconstruction trained the decoder
    assert narrow == [n for n in wide if n.startswith(prefix)] and narrow
    groups = encoder.optimizer_param_groups()
    names = {id(p): n for n, p in encoder.net.named_parameters()}
    assert sorted(names[id(p)] for p in groups[0]["params"]) == sorted(narrow)
    assert any(names[id(p)].startswith("decoder.") for p in groups[1]["params"])


def test_scratch_and_the_default_scale_keep_one_optimizer_group(pretrain_ckpt):
    assert len(multitask_module(pretrained_lr_scale=0.1).optimizer_param_groups()) == 1
    default = multitask_module(net={**TINY, "top_skip": False}, pretrained=str(pretrain_ckpt))
    assert len(default.optimizer_param_groups()) == 1


def test_shape_mismatch_raises_listing_the_keys_and_leaves_the_model_unchanged(pretrain_ckpt):
    from lymphnode.models import UNet

    net = UNet(base_width=8, depth=2, top_skip=False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"mismatched keys") as info:
        load_pretrained_weights(net, pretrain_ckpt)
    message = str(info.value)
    assert "encoder.0.0.weight: checkpoint (4, 3, 3, 3) vs model (8, 3, 3, 3)" in message
    assert str(pretrain_ckpt) in message
    for name, value in net.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_missing_keys_are_listed_and_non_strict_loading_reports_them(pretrain_ckpt, caplog):
    from lymphnode.models import UNet

    net = UNet(base_width=4, depth=3, top_skip=False)  # one level deeper than the checkpoint
    with pytest.raises(CheckpointError, match=r"encoder\.3\.0\.weight: in the model, not in"):
        load_pretrained_weights(net, pretrain_ckpt)
    with caplog.at_level(logging.WARNING):
        report = load_pretrained_weights(net, pretrain_ckpt, strict_shapes=False)
    assert "encoder.3.0.weight" in report.missing and "up.2.weight" in report.missing
    assert "encoder.0.0.weight" in report.loaded and "decoder.1.0.weight" in report.loaded
    assert "not loaded (strict_shapes=False)" in caplog.text
    wider = UNet(base_width=8, depth=2, top_skip=False)
    report = load_pretrained_weights(wider, pretrain_ckpt, strict_shapes=False)
    assert "encoder.0.0.weight" in report.skipped
    assert "recon_head.bias" in report.loaded  # (3,) fits whatever the width
    ckpt_state = _ckpt_net_state(pretrain_ckpt)
    assert torch.equal(wider.recon_head.bias, ckpt_state["recon_head.bias"])


def test_load_inference_model_rebuilds_the_trained_net(pretrain_ckpt):
    model = load_inference_model(pretrain_ckpt)
    assert not model.net.training
    assert isinstance(model.task, ReconstructionModule)
    assert model.net.config["top_skip"] is False
    assert model.preprocess.mean == (0.5, 0.6, 0.7) and model.preprocess.std == (0.2, 0.25, 0.3)
    assert (model.patch_size, model.level) == (SIZE, 0)
    rgb = torch.full((SIZE, SIZE, 3), 128, dtype=torch.uint8).numpy()
    x = model.prepare(rgb)
    assert x.shape == (1, 3, SIZE, SIZE)
    expected = (128 / 255 - torch.tensor([0.5, 0.6, 0.7])) / torch.tensor([0.2, 0.25, 0.3])
    torch.testing.assert_close(x[0, :, 0, 0], expected)
    module = ReconstructionModule.load_from_checkpoint(pretrain_ckpt).eval()
    torch.testing.assert_close(model.net(x).recon, module.net(x).recon)
    assert module.preprocess == model.preprocess  # restored with the module too
    with pytest.raises(
        ConfigError, match=r"ReconstructionModule .* predicts no tumour probabilities"
    ):
        model.probabilities(x)  # infer refuses a pretraining checkpoint


def _as_format_1(ckpt: dict) -> dict:
    """A checkpoint as lymphnode wrote it before the preprocessing contract: UNet arguments
    under `model`, normalize/patch_size/level hyperparameters, the task by name only."""
    hparams = dict(ckpt["hyper_parameters"])
    net = {k: v for k, v in hparams.pop("net").items() if k != "_target_"}
    preprocess = hparams.pop("preprocess")
    hparams.pop("channels_last")
    hparams.update(model=net, normalize=preprocess["normalize"],
                   patch_size=preprocess["patch_size"], level=preprocess["level"])  # fmt: skip
    old = {k: v for k, v in ckpt.items() if k != "lymphnode"}
    old["hyper_parameters"] = hparams
    old["lymphnode"] = {"format": 1, "task": ckpt["lymphnode"]["task"], "version": "0.1.0"}
    return old


def test_a_checkpoint_from_before_the_contract_loads_with_no_stain_and_says_so(tmp_path, caplog):
    pl.seed_everything(0)
    module = multitask_module(normalize={"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.2, 0.2]})
    t = trainer(tmp_path)
    t.fit(module, loader(), loader())
    t.save_checkpoint(tmp_path / "new.ckpt")
    old = _as_format_1(torch.load(tmp_path / "new.ckpt", map_location="cpu", weights_only=True))
    torch.save(old, tmp_path / "old.ckpt")
    with caplog.at_level(logging.WARNING, logger="lymphnode.models.checkpoint"):
        model = load_inference_model(tmp_path / "old.ckpt")
    assert "written before the preprocessing contract" in caplog.text
    assert "NO stain normalisation" in caplog.text
    assert model.preprocess == Preprocess(0, SIZE, (0.4, 0.5, 0.6), (0.2, 0.2, 0.2), stain=None)
    assert isinstance(model.task, MultiTaskModule)
    x = model.prepare(torch.full((SIZE, SIZE, 3), 90, dtype=torch.uint8).numpy())
    new = load_inference_model(tmp_path / "new.ckpt")
    torch.testing.assert_close(model.probabilities(x), new.probabilities(x))


def test_load_inference_model_rejects_a_missing_file(tmp_path):
    path = tmp_path / "nope.ckpt"
    with pytest.raises(CheckpointError, match=r"nope\.ckpt does not exist"):
        load_inference_model(path)
    assert not is_lymphnode_checkpoint(path)


def test_load_inference_model_rejects_a_file_that_is_not_a_torch_checkpoint(tmp_path):
    path = tmp_path / "random.ckpt"
    path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(CheckpointError, match=r"random\.ckpt is not a torch checkpoint"):
        load_inference_model(path)
    assert not is_lymphnode_checkpoint(path)


def test_load_inference_model_rejects_a_torch_file_without_lymphnode_keys(tmp_path):
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"layer.weight": torch.zeros(2)}, "epoch": 3}, path)
    with pytest.raises(
        CheckpointError,
        match=r"other\.ckpt is not a lymphnode checkpoint: no 'hyper_parameters'",
    ):
        load_inference_model(path)
    torch.save([1, 2, 3], tmp_path / "list.ckpt")
    with pytest.raises(CheckpointError, match=r"list\.ckpt holds a list"):
        load_inference_model(tmp_path / "list.ckpt")
    torch.save({"hyper_parameters": {"model": {}}, "state_dict": {"net.x": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match=r"hyper_parameters lack \['normalize'"):
        load_pretrained_weights(multitask_module().net, path)
    assert not is_lymphnode_checkpoint(path)


# --- callbacks ------------------------------------------------------------------------------


def test_nan_loss_stops_training_naming_the_step(tmp_path):
    module = recon_module(log_images_every_n_epochs=0)
    with pytest.raises(NonFiniteLossError, match=r"training loss is nan at global step 0"):
        trainer(tmp_path).fit(module, loader(nan=True))
    assert issubclass(NonFiniteLossError, LymphnodeError)


def test_nan_guard_is_not_duplicated_when_configured(tmp_path):
    t = trainer(tmp_path, callbacks=[NonFiniteLossGuard(every_n_steps=2)])
    t.fit(recon_module(log_images_every_n_epochs=0), loader(), loader())
    guards = [c for c in t.callbacks if isinstance(c, NonFiniteLossGuard)]
    assert len(guards) == 1 and guards[0].every_n_steps == 2


def test_depth_norm_logger_logs_weight_and_gradient_norms_per_depth(tmp_path):
    t = trainer(tmp_path, callbacks=[DepthNormLogger(every_n_steps=1)])
    t.fit(recon_module(log_images_every_n_epochs=0), loader(), loader())
    metrics = t.callback_metrics
    for group in ["enc0", "enc1", "enc2", "dec0", "dec1", "heads"]:
        assert float(metrics[f"norms/{group}_weight"]) > 0, group
        assert float(metrics[f"norms/{group}_grad"]) > 0, group


@pytest.mark.parametrize("cls", [DepthNormLogger, NonFiniteLossGuard])
def test_callbacks_reject_a_bad_interval(cls):
    with pytest.raises(
        ConfigError, match=rf"^{cls.__name__}: every_n_steps must be an integer >= 1, got 0$"
    ):
        cls(every_n_steps=0)


# --- input checks ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loss": "huber"}, r"loss='huber'.*\['mse', 'l1'\]"),
        (
            {"normalize": {"mean": [0.5], "std": [0.2]}},
            r"normalize.mean=\[0.5\] is invalid: expected 3 finite numbers",
        ),
        ({"normalize": {"mean": [0, 0, 0]}}, r"normalize=.*'std'"),
        ({"normalize": {"mean": [0, 0, 0], "std": [1, 0, 1]}}, r"normalize.std=.*> 0"),
        ({"optimizer": "adam"}, r"optimizer='adam' is invalid"),
        ({"patch_size": 2}, r"patch_size=2 px is smaller than the network's minimum input 4 px"),
        ({"level": -1}, r"preprocess: level must be an integer >= 0, got -1"),
        ({"net": {"norm": "layer"}}, r"norm must be one of .*, got 'layer'"),
        (
            {"net": {"_target_": "torch.optim.SGD"}},
            r"model._target_='torch.optim.SGD' is .*nn.Module",
        ),
        ({"net": {"_target_": "no.such.Net"}}, r"model._target_='no.such.Net' cannot be imported"),
        ({"net": {"_target_": "lymphnode.models.UNet", "width": 3}}, r"does not take .*'width'"),
    ],
)
def test_reconstruction_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        recon_module(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seg_loss": {"focal": 1}}, r"seg_loss has unknown key\(s\) \['focal'\]; allowed keys"),
        ({"seg_loss": [1]}, r"seg_loss must be a mapping with keys among .*, got \[1\]"),
        (
            {"seg_loss": {"pos_weight": -1}},
            r"seg_loss.pos_weight must be a number >= 0, got -1",
        ),
        (
            {"seg_loss": {"dice_weight": None}},
            r"seg_loss.dice_weight must be a number >= 0, got None",
        ),
        ({"recon_weight": -0.5}, r"recon_weight must be a number >= 0, got -0.5"),
        ({"recon_weight": float("-inf")}, r"recon_weight must be a number >= 0, got -inf"),
        ({"n_log_images": 0}, r"n_log_images must be an integer >= 1, got 0"),
        ({"log_images_every_n_epochs": -1}, r"log_images_every_n_epochs must be an integer >= 0"),
        ({"recon_loss": "ssim"}, r"recon_loss='ssim' is not supported"),
        ({"threshold": 1.5}, r"threshold=1.5 is invalid; expected a number in \(0, 1\)"),
        ({"pretrained": 3}, r"pretrained=3 is invalid"),
        (
            {"pretrained_lr_scale": -0.1},
            r"pretrained_lr_scale must be a finite number >= 0, got -0.1",
        ),
        (
            {"pretrained_lr_scope": "decoder"},
            r"pretrained_lr_scope='decoder' is not supported; expected one of \['network', 'encoder'\]",
        ),
        (
            {"freeze_pretrained_steps": 1.5},
            r"freeze_pretrained_steps must be an integer >= 0, got 1.5",
        ),
    ],
)
def test_multitask_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        multitask_module(**kwargs)


def test_missing_pretrained_checkpoint_fails_when_fitting_starts(tmp_path):
    module = multitask_module(pretrained=str(tmp_path / "missing.ckpt"))
    with pytest.raises(CheckpointError, match=r"missing\.ckpt does not exist"):
        trainer(tmp_path).fit(module, loader(), loader())


def test_batches_without_a_mask_or_with_0_255_masks_are_rejected(tmp_path):
    module = multitask_module(log_images_every_n_epochs=0)
    with pytest.raises(ConfigError, match=r"batches must be dicts with keys \['image', 'mask'\]"):
        module.training_step({"image": torch.zeros(1, 3, SIZE, SIZE)}, 0)
    bad = {"image": torch.zeros(1, 3, SIZE, SIZE), "mask": torch.full((1, 1, SIZE, SIZE), 255.0)}
    with pytest.raises(ConfigError, match=r"values other than 0 and 1 \(e\.g\. 255"):
        module.training_step(bad, 0)
    wrong = {"image": torch.zeros(2, 3, SIZE, SIZE), "mask": torch.zeros(2, SIZE, SIZE)}
    with pytest.raises(ConfigError, match=r"batch\['mask'\] has shape \(2, 33, 33\)"):
        module.training_step(wrong, 1)


def test_per_patch_dice_counts_empty_agreement_as_one():
    pred = torch.tensor([[[[1, 1], [0, 0]]], [[[0, 0], [0, 0]]], [[[0, 0], [0, 0]]]]).bool()
    target = torch.tensor([[[[1, 0], [0, 0]]], [[[0, 0], [0, 0]]], [[[1, 0], [0, 0]]]])
    torch.testing.assert_close(per_patch_dice(pred, target), torch.tensor([2 / 3, 1.0, 0.0]))
