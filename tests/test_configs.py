"""Every training config composes, resolves and builds its objects (no training here).

Composes conf/train.yaml with each experiment (pretrain, finetune, scratch), with and without
``profile=demo``, with each trainer (debug, cpu, gpu, ddp), through Hydra's compose API, and
instantiates the task modules, callbacks, loggers and CPU trainers that ``lymphnode.train`` would.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, WandbLogger

from lymphnode.core.errors import CheckpointError, ConfigError
from lymphnode.models.preprocess import Preprocess
from lymphnode.tasks import MultiTaskModule, NonFiniteLossGuard, ReconstructionModule
from lymphnode.tasks import build as train_mod  # the objects lymphnode.train builds

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = ("pretrain", "finetune", "scratch")
TRAINERS = ("default", "debug", "cpu", "gpu", "ddp")
PREPROCESS = Preprocess(level=1, patch_size=64, mean=(0.5,) * 3, std=(0.25,) * 3)


@pytest.fixture(autouse=True)
def _hydra() -> Iterator[None]:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        yield
    GlobalHydra.instance().clear()


def compose_train(*overrides: str, hydra: bool = False) -> DictConfig:
    return compose("train", overrides=list(overrides), return_hydra_config=hydra)


class FakeData:
    """What build_task reads from a DataModule: its preprocessing contract."""

    def __init__(self, preprocess: Preprocess = PREPROCESS) -> None:
        self.preprocess = preprocess


@pytest.mark.parametrize("trainer", TRAINERS)
@pytest.mark.parametrize("profile", [(), ("profile=demo",)], ids=["full", "demo"])
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_resolves(
    experiment: str, profile: tuple[str, ...], trainer: str
) -> None:
    cfg = compose_train(f"experiment={experiment}", *profile, f"trainer={trainer}")
    resolved = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert isinstance(resolved, dict)
    train_mod.check_config(cfg)
    root = "outputs/demo" if profile else "outputs"
    expected_dir = {
        "pretrain": f"{root}/runs/pretrain",
        "finetune": f"{root}/runs/pretrained/size40/fold0/seed0",
        "scratch": f"{root}/runs/scratch/size40/fold0/seed0",
    }[experiment]
    assert cfg.run_dir == expected_dir
    assert cfg.callbacks.model_checkpoint.dirpath == f"{expected_dir}/checkpoints"
    assert train_mod.experiment_name(cfg) == experiment
    for key in ("_target_", "max_epochs", "precision"):
        assert key in cfg.trainer
    assert "channels_last" not in cfg.trainer  # every trainer key is a Trainer argument
    assert cfg.task.channels_last is True
    assert OmegaConf.to_container(cfg.task.net, resolve=True) == OmegaConf.to_container(
        cfg.model, resolve=True
    )


def test_experiments_select_their_stage_data_task_and_init() -> None:
    pretrain = compose_train("experiment=pretrain")
    finetune = compose_train("experiment=finetune")
    scratch = compose_train("experiment=scratch")
    assert (pretrain.stage, pretrain.init) == ("pretrain", None)
    assert pretrain.data._target_.endswith("PretrainDataModule")
    assert pretrain.task._target_.endswith("ReconstructionModule")
    assert pretrain.optimized_metric == "val/recon_mse"
    assert pretrain.selection == "val_loss"  # SelectionCheckpoint: lowest val/loss (recon)
    for cfg, init in ((finetune, "pretrained"), (scratch, "scratch")):
        assert (cfg.stage, cfg.init) == ("finetune", init)
        assert cfg.data._target_.endswith("FinetuneDataModule")
        assert cfg.task._target_.endswith("MultiTaskModule")
        assert cfg.optimized_metric == "test/seg_f1"
        assert cfg.selection == "val_f1"  # SelectionCheckpoint: highest val/seg_f1
        assert cfg.pretrained_ckpt == "outputs/runs/pretrain/checkpoints/best.ckpt"
    # finetune and scratch differ only in init and what follows from it (run dir, wandb job type)
    a = OmegaConf.to_container(finetune, resolve=True)
    b = OmegaConf.to_container(scratch, resolve=True)
    for key in ("callbacks", "trainer", "logger"):  # they only hold run_dir-derived paths/names
        b[key] = OmegaConf.to_container(
            OmegaConf.create(
                OmegaConf.to_yaml(scratch[key], resolve=True).replace("scratch", "pretrained")
            )
        )
    differing = sorted(k for k in a if a[k] != b[k])
    assert differing == ["init", "job_type", "run_dir", "run_name", "tags", "task"]
    assert a["task"]["pretrained"] == "outputs/runs/pretrain/checkpoints/best.ckpt"
    assert b["task"]["pretrained"] is None  # the pretrained_if resolver: init=scratch, no weights
    b["task"]["pretrained"] = a["task"]["pretrained"]
    assert a["task"] == b["task"]


def test_init_override_switches_a_finetune_run_to_scratch() -> None:
    cfg = compose_train(  # wandb is one key away (CSV alone by default): its grouping
        "experiment=finetune", "init=scratch", "data.labeled_size=80", "data.fold=3", "logger=wandb"
    )
    assert cfg.run_dir == "outputs/runs/scratch/size80/fold3/seed0"
    assert train_mod.experiment_name(cfg) == "scratch"
    assert cfg.logger.wandb.group == "labeled-80"
    assert cfg.logger.wandb.job_type == "scratch"
    assert list(cfg.logger.wandb.tags) == ["scratch", "size80", "fold3", "seed0"]


def test_demo_profile_wins_over_the_experiment_in_either_order() -> None:
    full = compose_train("experiment=pretrain")
    demo = compose_train("experiment=pretrain", "profile=demo")
    assert demo == compose_train("profile=demo", "experiment=pretrain")
    assert full.trainer.max_epochs == 20 and full.model.base_width == 64
    assert demo.trainer.max_steps == demo.demo_budget.pretrain.max_steps
    assert demo.model.base_width == 8
    assert demo.paths.cache_dir == "outputs/demo/caches"
    assert demo.pretrained_ckpt == "outputs/demo/runs/pretrain/checkpoints/best.ckpt"
    finetune = compose_train("experiment=scratch", "profile=demo")
    assert finetune.trainer.max_steps == finetune.demo_budget.finetune.max_steps


@pytest.mark.parametrize("pretext", ["reconstruction", "contrastive"])
def test_demo_profile_sizes_each_network_and_keeps_command_line_overrides(pretext: str) -> None:
    unet = compose_train("experiment=pretrain", f"pretext={pretext}", "profile=demo")
    assert (unet.model.base_width, unet.model.depth) == (8, 3)
    smp = compose_train(
        "experiment=pretrain", f"pretext={pretext}", "profile=demo", "model=smp_unet"
    )
    assert "base_width" not in smp.model and "depth" not in smp.model  # UNet-only keys
    assert list(smp.model.decoder_channels) == [64, 32, 16, 8, 8]
    net = instantiate(smp.model)  # builds: no unexpected UNet keyword
    assert net(torch.zeros(1, 3, 64, 64)).seg.shape == (1, 1, 64, 64)
    wider = compose_train("experiment=pretrain", "profile=demo", "model.base_width=16")
    assert wider.model.base_width == 16  # the command line wins over profile_model
    full = compose_train("experiment=pretrain", "model=smp_unet")
    assert full.model.decoder_channels is None  # no profile: the network's own defaults


def test_pretext_is_a_config_group_of_pretraining() -> None:
    cfg = compose_train("experiment=pretrain", "pretext=reconstruction")
    assert cfg == compose_train("experiment=pretrain")  # the default pretext
    task = cfg.task
    assert task._target_ == "lymphnode.tasks.ReconstructionModule"
    assert "pretrained" not in task and "seg_loss" not in task  # not merged with multitask
    assert cfg.model.top_skip is False


@pytest.mark.parametrize(
    ("pretext", "target", "selection", "views"),
    [
        ("masked", "lymphnode.tasks.MaskedModule", "val_loss", 1),
        ("contrastive", "lymphnode.tasks.ContrastiveModule", "last", 2),
        ("dense_contrastive", "lymphnode.tasks.ContrastiveModule", "last", 2),
        ("stain", "lymphnode.tasks.StainModule", "val_loss", 1),
    ],
)
def test_each_pretext_has_its_task_folder_and_checkpoint(
    pretext: str, target: str, selection: str, views: int
) -> None:
    pre = compose_train("experiment=pretrain", f"pretext={pretext}", "profile=demo")
    OmegaConf.to_container(pre, resolve=True)
    assert pre.task._target_ == target
    assert pre.selection == selection and pre.data.views == views
    assert pre.run_dir == f"outputs/demo/runs/pretrain-{pretext}"
    assert pre.task.optimizer.lr == pre.demo_budget.pretrain.lr  # the profile reaches it
    if "contrastive" in pretext:  # the dense variant is the contrastive task plus its local term
        assert pre.task.dense_weight == (0.5 if pretext == "dense_contrastive" else 0.0)
        assert (
            pre.pretext.view_transforms
            == compose_train(
                "experiment=pretrain", "pretext=contrastive", "profile=demo"
            ).pretext.view_transforms
        )
    fine = compose_train("experiment=finetune", f"pretext={pretext}", "data.labeled_size=80")
    assert fine.run_dir == f"outputs/runs/pretrained-{pretext}/size80/fold0/seed0"
    assert fine.task.pretrained == f"outputs/runs/pretrain-{pretext}/checkpoints/best.ckpt"
    assert fine.task._target_ == "lymphnode.tasks.MultiTaskModule"  # fine-tuning is unchanged
    scratch = compose_train("experiment=scratch", f"pretext={pretext}", "data.labeled_size=80")
    assert scratch.run_dir == "outputs/runs/scratch/size80/fold0/seed0"  # shared by every pretext


def test_hydra_run_and_sweep_dirs_are_the_run_dir() -> None:
    cfg = compose_train("experiment=scratch", "data.labeled_size=120", "seed=2", hydra=True)
    assert cfg.hydra.run.dir == cfg.run_dir == "outputs/runs/scratch/size120/fold0/seed2"
    assert f"{cfg.hydra.sweep.dir}/{cfg.hydra.sweep.subdir}" == cfg.run_dir
    assert cfg.hydra.job.chdir is False
    pretrain = compose_train("experiment=pretrain", "paths.root=/data/c16", hydra=True)
    assert pretrain.hydra.run.dir == "/data/c16/runs/pretrain"


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (("stage=evaluate",), r"stage='evaluate' is not supported; expected one of \['pretrain'"),
        (("experiment=finetune", "init=imagenet"), r"init='imagenet' is not supported"),
        (("experiment=finetune", "init=null"), r"init=None is not supported"),
        (("experiment=pretrain", "init=scratch"), r"init='scratch' only applies to fine-tuning"),
    ],
)
def test_bad_stage_or_init_is_rejected(overrides: tuple[str, ...], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        train_mod.check_config(compose_train(*overrides))


def test_missing_pretrained_checkpoint_names_the_path_and_the_fix(tmp_path: Path) -> None:
    cfg = compose_train("experiment=finetune", f"paths.root={tmp_path}")
    with pytest.raises(
        CheckpointError, match=r"pretrain/checkpoints/best.ckpt not found.*experiment=pretrain"
    ):
        train_mod.pretrained_checkpoint(cfg)
    scratch = compose_train("experiment=scratch", f"paths.root={tmp_path}")
    assert train_mod.pretrained_checkpoint(scratch) is None


def test_resume_checkpoint_last_means_this_runs_last_ckpt(tmp_path: Path) -> None:
    cfg = compose_train("experiment=scratch", "ckpt_path=last")
    with pytest.raises(CheckpointError, match=r"ckpt_path='last'.*checkpoints/last.ckpt not found"):
        train_mod.resume_checkpoint(cfg, tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")  # found, but not a checkpoint
    with pytest.raises(CheckpointError, match=r"last.ckpt is not a torch checkpoint"):
        train_mod.resume_checkpoint(cfg, tmp_path)
    assert train_mod.resume_checkpoint(compose_train(), tmp_path) is None


@pytest.mark.parametrize("profile", [(), ("profile=demo",)], ids=["full", "demo"])
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_task_module_builds_with_the_model_and_data_settings(
    experiment: str, profile: tuple[str, ...], tmp_path: Path
) -> None:
    ckpt = tmp_path / "best.ckpt"
    cfg = compose_train(
        f"experiment={experiment}", *profile, "model.base_width=4", f"pretrained_ckpt={ckpt}"
    )
    pretrained = ckpt if experiment == "finetune" else None  # what pretrained_checkpoint gives
    module = train_mod.build_task(cfg, FakeData(), pretrained)  # type: ignore[arg-type]
    expected = ReconstructionModule if experiment == "pretrain" else MultiTaskModule
    assert isinstance(module, expected)
    assert module.hparams["net"]["_target_"] == "lymphnode.models.UNet"
    assert module.hparams["net"]["base_width"] == 4
    assert module.hparams["net"]["top_skip"] is False
    assert module.hparams["net"]["depth"] == cfg.model.depth
    assert module.hparams["preprocess"] is None  # taken from the DataModule at setup
    assert module.channels_last is True
    if experiment != "pretrain":
        assert module.hparams["pretrained"] == (None if pretrained is None else str(pretrained))
    module.trainer = pl.Trainer(
        max_epochs=-1, max_steps=7, logger=False, enable_checkpointing=False
    )
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer["optimizer"], torch.optim.AdamW)
    assert optimizer["lr_scheduler"]["interval"] == "step"
    assert (
        optimizer["lr_scheduler"]["scheduler"].T_max == 6
    )  # cosine over the steps, min at the last


def _checkpoint_with(path: Path, preprocess: Preprocess) -> Path:
    torch.save(
        {
            "hyper_parameters": {
                "net": {"_target_": "lymphnode.models.UNet"},
                "preprocess": preprocess.to_dict(),
            },
            "state_dict": {"net.w": torch.zeros(1)},
            "lymphnode": {"task_target": "lymphnode.tasks.ReconstructionModule"},
        },
        path,
    )
    return path


def test_finetune_warns_with_every_contract_difference_from_the_pretraining(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt = _checkpoint_with(tmp_path / "best.ckpt", replace(PREPROCESS, level=0))
    reinhard = {"method": "reinhard", "options": {}, "mean": [60.0, 20.0, -10.0], "std": [9.0] * 3}
    data = FakeData(replace(PREPROCESS, stain=reinhard))
    cfg = compose_train("experiment=finetune", "model.base_width=4")
    with caplog.at_level("WARNING", logger="lymphnode.train"):
        train_mod.build_task(cfg, data, ckpt)  # type: ignore[arg-type]
    assert "level: 0 vs 1" in caplog.text
    assert "stain: none vs reinhard" in caplog.text  # passed silently before the contract
    assert "normalize:" not in caplog.text and "patch_size:" not in caplog.text  # equal
    caplog.clear()
    same = _checkpoint_with(tmp_path / "same.ckpt", PREPROCESS)
    assert train_mod.warn_if_data_differ(same, PREPROCESS) == []
    assert "preprocessed differently" not in caplog.text


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_datamodule_config_instantiates(experiment: str, tmp_path: Path) -> None:
    cfg = compose_train(f"experiment={experiment}", "profile=demo", f"paths.root={tmp_path}")
    datamodule = train_mod.build_datamodule(cfg)  # construction reads nothing yet
    assert isinstance(datamodule, pl.LightningDataModule)


def test_callbacks_checkpoint_into_the_run_dir() -> None:
    cfg = compose_train("experiment=pretrain")
    callbacks = train_mod.build_callbacks(cfg)
    checkpoint = next(c for c in callbacks if isinstance(c, ModelCheckpoint))
    assert Path(checkpoint.dirpath) == Path("outputs/runs/pretrain/checkpoints").resolve()
    assert (checkpoint.monitor, checkpoint.mode, checkpoint.save_last) == (
        "val/loss",
        "min",
        True,
    )
    assert any(isinstance(c, NonFiniteLossGuard) for c in callbacks)
    depth = compose_train("experiment=pretrain", "callbacks=depth_norms", "~callbacks.lr_monitor")
    names = [type(c).__name__ for c in train_mod.build_callbacks(depth)]
    assert "DepthNormLogger" in names and "LearningRateMonitor" not in names


def test_callback_without_target_is_rejected() -> None:
    cfg = compose_train("+callbacks.broken.every_n_steps=3")
    with pytest.raises(ConfigError, match=r"callbacks.broken=.* expected a dict with _target_"):
        train_mod.build_callbacks(cfg)


def test_loggers_default_csv_and_offline_wandb(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    plain = compose_train("experiment=finetune")  # CSV by default (issue 19), wandb one key away
    assert [type(lg).__name__ for lg in train_mod.build_loggers(plain)] == ["CSVLogger"]
    cfg = compose_train(
        "experiment=finetune", "data.labeled_size=80", "data.fold=2", "logger=wandb"
    )
    assert cfg.logger.wandb.mode == "offline"  # without WANDB_MODE: never online by accident
    assert (cfg.logger.wandb.group, cfg.logger.wandb.job_type) == ("labeled-80", "pretrained")
    loggers = train_mod.build_loggers(cfg)
    assert sorted(type(lg).__name__ for lg in loggers) == ["CSVLogger", "WandbLogger"]
    csv = next(lg for lg in loggers if isinstance(lg, CSVLogger))
    assert Path(csv.log_dir) == Path(cfg.run_dir) / "csv"
    assert isinstance(next(lg for lg in loggers if isinstance(lg, WandbLogger)), WandbLogger)
    monkeypatch.setenv("WANDB_MODE", "online")
    assert compose_train("logger=wandb").logger.wandb.mode == "online"
    assert train_mod.build_loggers(compose_train("logger=none")) == []
    assert [type(lg).__name__ for lg in train_mod.build_loggers(compose_train("logger=csv"))] == [
        "CSVLogger"
    ]


@pytest.mark.parametrize("trainer", ["default", "cpu", "debug"])
def test_cpu_trainers_instantiate(trainer: str) -> None:
    cfg = compose_train("experiment=scratch", f"trainer={trainer}", "trainer.accelerator=cpu")
    built = train_mod.build_trainer(cfg, [], [])
    assert isinstance(built, pl.Trainer)
    assert built.fast_dev_run == (trainer == "debug")


def test_gpu_and_ddp_trainers_use_bf16_channels_last_and_sync_batchnorm() -> None:
    gpu = compose_train("trainer=gpu")
    assert (gpu.trainer.accelerator, gpu.trainer.precision) == ("gpu", "bf16-mixed")
    assert gpu.task.channels_last is True
    ddp = compose_train("trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2").trainer
    assert (ddp.strategy, ddp.sync_batchnorm, ddp.precision) == ("ddp", True, "bf16-mixed")
    assert (ddp.devices, ddp.num_nodes) == (4, 2)


def test_table_sweep_runs_each_pretexts_scratch_right_after_its_pretrained_run() -> None:
    """The basic sweeper's order (its params, then the command line replacing a key in place):
    size, fold, pretext, init — so the shared scratch run of the second pretext comes after the
    first pretext's scratch run has been dispatched, never beside it in a 2-job launcher."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = compose_train("experiment=table", hydra=True)
    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    overrides = OverridesParser.create().parse_overrides([*params, "pretext=reconstruction,stain"])
    [jobs] = BasicSweeper.split_arguments(overrides, None)
    assert len(jobs) == 4 * 5 * 2 * 2
    first = [dict(o.split("=", 1) for o in job) for job in jobs[:4]]
    assert [(j["data.labeled_size"], j["data.fold"]) for j in first] == [("40", "0")] * 4
    assert [(j["pretext"], j["init"]) for j in first] == [
        ("reconstruction", "pretrained"),
        ("reconstruction", "scratch"),
        ("stain", "pretrained"),
        ("stain", "scratch"),
    ]
    single = OverridesParser.create().parse_overrides([*params])
    assert {
        dict(o.split("=", 1) for o in j)["pretext"]
        for j in BasicSweeper.split_arguments(single, None)[0]
    } == {"reconstruction"}


def test_logger_none_leaves_out_the_lr_monitor_instead_of_crashing() -> None:
    """Issue 21 (weak): ``logger=none`` made every run crash in Lightning's LearningRateMonitor."""
    names = [type(c).__name__ for c in train_mod.build_callbacks(compose_train("logger=none"))]
    assert "LearningRateMonitor" not in names and "SelectionCheckpoint" in names
    with_csv = [type(c).__name__ for c in train_mod.build_callbacks(compose_train())]
    assert "LearningRateMonitor" in with_csv


def test_progress_is_a_bar_on_a_terminal_and_log_lines_otherwise() -> None:
    import io

    from pytorch_lightning.callbacks import TQDMProgressBar

    from lymphnode.tasks.callbacks import LogProgress, progress_bar

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert isinstance(progress_bar(refresh_rate=5, stream=Terminal()), TQDMProgressBar)
    piped = progress_bar(every_n_steps=3, stream=io.StringIO())
    assert isinstance(piped, LogProgress) and piped.every_n_steps == 3
    cfg = compose_train()
    assert cfg.callbacks.progress_bar._target_ == "lymphnode.tasks.callbacks.progress_bar"
