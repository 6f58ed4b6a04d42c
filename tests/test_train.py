"""End to end: the real ``python -m lymphnode.train`` CLI on tiny patch caches.

A session fixture writes three tiny caches (unlabeled, labeled, test; 32 px patches at "level 1",
pink tissue with dark tumour blobs) with :class:`lymphnode.patches.cache.CacheWriter`, as
``python -m lymphnode.prepare`` lays them out under ``<root>/caches``. Pretraining runs once per
session; fine-tuning from its checkpoint, scratch, reruns, resume and failures build on it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tiny_runs import PATCH, write_caches

from lymphnode.train import read_results, write_results

# A tiny network and a short schedule: every run takes a few seconds on one CPU core.
TINY = (
    "trainer=cpu",
    "trainer.max_epochs=2",
    "trainer.num_sanity_val_steps=0",
    "trainer.log_every_n_steps=1",
    "trainer.enable_model_summary=false",
    "model.base_width=4",
    "model.depth=2",
    "data.batch_size=4",
    "data.num_workers=0",
    "task.log_images_every_n_epochs=0",
    "callbacks.progress_bar.refresh_rate=0",
)
FINETUNE = ("data.labeled_size=10", "data.folds=5")
SEG_KEYS = ("test/seg_precision", "test/seg_recall", "test/seg_f1", "test/seg_dice", "test/seg_iou")


@pytest.fixture(scope="session")
def caches(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<dir>/{unlabeled,labeled,test}``: 48 unlabeled, 24 labeled, 8 test patches."""
    return write_caches(tmp_path_factory.mktemp("caches"))


def run_cli(*overrides: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m lymphnode.train <overrides>``; its combined output is in ``.stdout``."""
    return subprocess.run(
        [sys.executable, "-m", "lymphnode.train", *overrides],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore", **(env or {})},
        check=False,
    )


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def results_of(run_dir: Path) -> dict[str, Any]:
    results = read_results(run_dir / "results.json")
    assert results is not None, f"no results.json in {run_dir}"
    return results


def _root(tmp_path: Path, caches: Path) -> tuple[str, str]:
    return f"paths.root={tmp_path}", f"paths.cache_dir={caches}"


@pytest.fixture(scope="session")
def pretrained_root(tmp_path_factory: pytest.TempPathFactory, caches: Path) -> Path:
    """A root whose runs/pretrain holds a completed pretraining run (CSV logger only)."""
    root = tmp_path_factory.mktemp("root")
    ok(run_cli("experiment=pretrain", *_root(root, caches), *TINY, "logger=csv"))
    return root


# --- pretraining ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_pretrain_writes_results_checkpoints_and_csv_log(pretrained_root: Path) -> None:
    run_dir = pretrained_root / "runs" / "pretrain"
    results = results_of(run_dir)
    assert (results["status"], results["experiment"], results["init"]) == (
        "completed",
        "pretrain",
        "pretrain",
    )
    assert results["labeled_size"] is None and results["fold"] is None and results["error"] is None
    for key in ("val/recon_mse", "val/recon_psnr"):
        assert np.isfinite(results["metrics"][key]) and np.isfinite(results["metrics_last"][key])
    assert Path(results["checkpoints"]["best"]) == (run_dir / "checkpoints" / "best.ckpt").resolve()
    assert Path(results["checkpoints"]["last"]).is_file()
    assert results["config"]["model"]["base_width"] == 4  # the resolved config
    assert results["config"]["run_dir"] == str(run_dir)
    assert set(results["timing"]) == {"fit_s", "test_s", "total_s"}
    metrics_csv = (run_dir / "csv" / "metrics.csv").read_text()
    assert "val/recon_mse" in metrics_csv.splitlines()[0]
    ckpt = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    preprocess = ckpt["hyper_parameters"]["preprocess"]  # the contract, from the DataModule
    assert (preprocess["patch_size"], preprocess["level"]) == (PATCH, 1)
    assert preprocess["normalize"] == {"mean": [0.5] * 3, "std": [0.5] * 3}  # today's default
    assert preprocess["stain"] is None
    assert ckpt["hyper_parameters"]["net"]["_target_"] == "lymphnode.models.UNet"
    assert ckpt["hyper_parameters"]["net"]["top_skip"] is False
    assert ckpt["lymphnode"]["task_target"] == "lymphnode.tasks.reconstruction.ReconstructionModule"


# --- fine-tuning ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_finetune_starts_from_the_pretrain_checkpoint(pretrained_root: Path, caches: Path) -> None:
    result = ok(
        run_cli("experiment=finetune", *_root(pretrained_root, caches), *TINY, *FINETUNE,
                "data.fold=1", "logger=csv")
    )  # fmt: skip
    run_dir = pretrained_root / "runs" / "pretrained" / "size10" / "fold1" / "seed0"
    results = results_of(run_dir)
    assert (results["status"], results["experiment"], results["init"]) == (
        "completed",
        "finetune",
        "pretrained",
    )
    assert (results["labeled_size"], results["fold"], results["seed"]) == (10, 1, 0)
    for key in SEG_KEYS:
        assert 0.0 <= results["metrics"][key] <= 1.0
        assert 0.0 <= results["metrics_last"][key] <= 1.0
    assert "val/seg_f1" in results["metrics"]
    pretrain_ckpt = pretrained_root / "runs" / "pretrain" / "checkpoints" / "best.ckpt"
    assert results["config"]["pretrained_ckpt"] == str(pretrain_ckpt)
    assert "initialised from pretrained" in result.stdout + result.stderr
    assert "initialised from pretrained" in (run_dir / "train.log").read_text()
    for name in ("best", "last"):
        assert (run_dir / "checkpoints" / f"{name}.ckpt").is_file()


@pytest.mark.slow
def test_scratch_run_and_same_seed_gives_same_metrics(pretrained_root: Path, caches: Path) -> None:
    args = ("experiment=scratch", *_root(pretrained_root, caches), *TINY, *FINETUNE,
            "data.fold=2", "logger=csv")  # fmt: skip
    ok(run_cli(*args))
    run_dir = pretrained_root / "runs" / "scratch" / "size10" / "fold2" / "seed0"
    first = results_of(run_dir)
    assert (first["experiment"], first["init"], first["status"]) == (
        "scratch",
        "scratch",
        "completed",
    )
    assert first["config"]["task"]["_target_"] == "lymphnode.tasks.MultiTaskModule"
    ok(run_cli(*args, "skip_if_done=false"))
    second = results_of(run_dir)
    assert second["metrics"] == first["metrics"]
    assert second["metrics_last"] == first["metrics_last"]


@pytest.mark.slow
def test_rerun_of_a_completed_run_is_skipped(pretrained_root: Path, caches: Path) -> None:
    run_dir = pretrained_root / "runs" / "pretrain"
    before = (run_dir / "results.json").stat().st_mtime_ns
    result = ok(
        run_cli("experiment=pretrain", *_root(pretrained_root, caches), *TINY, "logger=csv")
    )
    assert "is completed; skipping" in result.stdout + result.stderr
    assert (run_dir / "results.json").stat().st_mtime_ns == before
    assert not (run_dir / "checkpoints" / "best-v1.ckpt").exists()


@pytest.mark.slow
def test_finetune_with_a_smaller_lr_and_a_frozen_start_for_the_pretrained_weights(
    pretrained_root: Path, caches: Path, tmp_path: Path
) -> None:
    """task.pretrained_lr_scale / freeze_pretrained_steps from the command line: the log names
    the two groups, results.json records both, and the pretrained encoder's first convolution
    is the pretraining's after the frozen steps (1 of 2 epochs here: trainer.max_steps=3,
    frozen 3 = every step), while the segmentation head has trained."""
    root = tmp_path / "root"
    (root / "runs").mkdir(parents=True)
    shutil.copytree(pretrained_root / "runs" / "pretrain", root / "runs" / "pretrain")
    result = ok(
        run_cli("experiment=finetune", *_root(root, caches), *TINY, *FINETUNE, "logger=csv",
                "trainer.max_steps=3", "task.pretrained_lr_scale=0.1",
                "task.freeze_pretrained_steps=3")
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert "pretrained parameter tensors at lr x 0.1, fixed for the first 3 steps" in output
    run_dir = root / "runs" / "pretrained" / "size10" / "fold0" / "seed0"
    results = results_of(run_dir)
    task = results["config"]["task"]
    assert (task["pretrained_lr_scale"], task["freeze_pretrained_steps"]) == (0.1, 3)

    def net_state(path: Path) -> dict[str, torch.Tensor]:
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        return {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}

    before = net_state(root / "runs" / "pretrain" / "checkpoints" / "best.ckpt")
    after = net_state(run_dir / "checkpoints" / "last.ckpt")
    encoder = [k for k in after if k.startswith("encoder.") and k.endswith("weight")]
    assert encoder and all(torch.equal(after[k], before[k]) for k in encoder)
    assert not torch.equal(after["seg_head.weight"], before["seg_head.weight"])


@pytest.mark.slow
def test_resume_from_the_last_checkpoint(tmp_path: Path, caches: Path) -> None:
    args = ("experiment=scratch", *_root(tmp_path, caches), *TINY, *FINETUNE, "logger=csv")
    ok(run_cli(*args, "trainer.max_epochs=1"))
    run_dir = tmp_path / "runs" / "scratch" / "size10" / "fold0" / "seed0"
    last = run_dir / "checkpoints" / "last.ckpt"
    first = torch.load(last, map_location="cpu", weights_only=False)
    steps_one_epoch = first["global_step"]
    assert steps_one_epoch > 0
    result = ok(run_cli(*args, "trainer.max_epochs=3", "ckpt_path=last", "skip_if_done=false"))
    assert "Restoring states from the checkpoint" in result.stdout + result.stderr
    resumed = torch.load(last, map_location="cpu", weights_only=False)
    assert resumed["global_step"] == 3 * steps_one_epoch  # epochs 2 and 3 added to the first
    assert results_of(run_dir)["status"] == "completed"


@pytest.mark.slow
def test_sweep_runs_get_their_own_dirs_wandb_runs_and_csv_logs(
    tmp_path: Path, caches: Path
) -> None:
    # 4 jobs: size 10 x folds 3, 4 complete; size 995 (> the 24-patch labeled cache) fails, which
    # must neither stop the sweep's other jobs nor go unnoticed (exit code 1).
    args = ("--multirun", "experiment=scratch", *_root(tmp_path, caches), *TINY, "data.folds=5",
            "data.labeled_size=995,10", "data.fold=3,4", "trainer.max_epochs=1",
            "logger=wandb")  # fmt: skip
    result = run_cli(*args)  # logger=wandb: CSV + wandb (offline)
    assert result.returncode == 1
    for fold in (3, 4):
        run_dir = tmp_path / "runs" / "scratch" / "size10" / f"fold{fold}" / "seed0"
        assert results_of(run_dir)["status"] == "completed"
        offline = list((run_dir / "wandb").glob("offline-run-*"))
        assert len(offline) == 1 and list(offline[0].glob("*.wandb"))  # one wandb run per job
        assert "test/seg_f1" in (run_dir / "csv" / "metrics.csv").read_text()
        assert "labeled_size: 10" in (run_dir / "csv" / "hparams.yaml").read_text()  # full config
        # refused before it started (issue 11): named on stderr, no run dir left behind
        assert not (tmp_path / "runs" / "scratch" / "size995" / f"fold{fold}").exists()
    assert "labeled_size=995 is larger than the labeled cache" in result.stdout + result.stderr
    rerun = run_cli(*args)
    assert rerun.returncode == 1  # the failed runs are tried again (and fail again)
    assert (rerun.stdout + rerun.stderr).count("is completed; skipping") == 2


@pytest.mark.slow
def test_debug_trainer_smoke_run_is_recorded_as_debug_and_not_skipped(
    tmp_path: Path, caches: Path
) -> None:
    tiny = [a for a in TINY if a != "trainer=cpu"]
    args = ("experiment=scratch", *_root(tmp_path, caches), *tiny, *FINETUNE, "trainer=debug")
    ok(run_cli(*args))  # fast_dev_run: one batch of train, val and test
    run_dir = tmp_path / "runs" / "scratch" / "size10" / "fold0" / "seed0"
    results = results_of(run_dir)
    assert results["status"] == "debug" and "not a result" in results["error"]
    assert "test/seg_f1" in results["metrics"]
    assert not (run_dir / "wandb").exists()  # fast_dev_run logs nothing
    rerun = ok(run_cli(*args))
    assert "skipping" not in rerun.stdout + rerun.stderr


# --- failures ------------------------------------------------------------------------------------
def test_missing_pretrain_checkpoint_exits_non_zero_naming_it(tmp_path: Path, caches: Path) -> None:
    result = run_cli(
        "experiment=finetune", *_root(tmp_path, caches), *TINY, *FINETUNE, "logger=csv"
    )
    assert result.returncode == 1
    output = result.stdout + result.stderr
    expected = tmp_path / "runs" / "pretrain" / "checkpoints" / "best.ckpt"
    assert f"pretrained checkpoint {expected} not found" in output
    assert "experiment=pretrain" in output and "Traceback" not in output
    # refused before the run started (issue 19): no record, no run folder left behind
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*"))


@pytest.mark.slow
def test_nan_loss_stops_the_run_naming_the_step(tmp_path: Path, caches: Path) -> None:
    result = run_cli("experiment=scratch", *_root(tmp_path, caches), *TINY, *FINETUNE,
                     "logger=csv", "task.recon_weight=nan")  # fmt: skip
    assert result.returncode == 1
    assert "training loss is nan at global step 0" in result.stdout + result.stderr
    results = results_of(tmp_path / "runs" / "scratch" / "size10" / "fold0" / "seed0")
    assert results["status"] == "failed" and "NonFiniteLossError" in results["error"]


def test_profile_and_experiment_slots_compose_in_either_order_on_the_cli() -> None:
    a = ok(run_cli("profile=demo", "experiment=pretrain", "--cfg", "job", "--resolve"))
    b = ok(run_cli("experiment=pretrain", "profile=demo", "--cfg", "job", "--resolve"))
    assert a.stdout == b.stdout
    assert (
        "base_width: 8" in a.stdout and "_target_: lymphnode.tasks.ReconstructionModule" in a.stdout
    )


def test_bad_init_exits_non_zero_naming_the_value(tmp_path: Path) -> None:
    result = run_cli("experiment=finetune", "init=imagenet", f"paths.root={tmp_path}")
    assert result.returncode == 1
    assert "init='imagenet' is not supported" in result.stdout + result.stderr


# --- results.json -------------------------------------------------------------------------------
def test_results_json_is_replaced_atomically(tmp_path: Path) -> None:
    path = tmp_path / "run" / "results.json"
    write_results(path, {"status": "completed", "metrics": {"test/seg_f1": 0.5}})
    write_results(path, {"status": "failed", "metrics": {}})
    assert json.loads(path.read_text())["status"] == "failed"
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temp file left
    (tmp_path / "bad.json").write_text("{not json")
    assert read_results(tmp_path / "bad.json") is None
    assert read_results(tmp_path / "missing.json") is None


# --- run identity (issue 19 part 2; issue 21 rows 3 and 7) --------------------------------------
STEPS = ("trainer.max_steps=2", "trainer.max_epochs=-1", "trainer.val_check_interval=2",
         "logger=none", "~callbacks.lr_monitor")  # fmt: skip


def test_a_changed_config_into_a_completed_run_is_one_error_line_and_force_retrains(
    tmp_path: Path, caches: Path
) -> None:
    args = ("experiment=scratch", *_root(tmp_path, caches), *TINY, *FINETUNE, *STEPS)
    ok(run_cli(*args))
    path = tmp_path / "runs" / "scratch" / "size10" / "fold0" / "seed0" / "results.json"
    before = path.read_bytes()
    refused = run_cli(*args, "trainer.max_steps=3")
    assert refused.returncode == 1
    lines = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in refused.stderr
    assert "trainer.max_steps: 2 → 3" in lines[0] and "rerun=force" in lines[0]
    assert path.read_bytes() == before  # the completed run is untouched
    ok(run_cli(*args, "trainer.max_steps=3", "rerun=force"))
    assert results_of(path.parent)["steps"]["last"] == 3


def test_a_multirun_over_a_key_outside_the_folder_name_never_hands_job_1_job_0s_metric(
    tmp_path: Path, caches: Path
) -> None:
    """Issue 21 row 7: both jobs of `task.optimizer.lr=0.001,0.05` aim at one run folder; the
    second used to be skipped with the first's metric. Now it is refused naming the key."""
    result = run_cli("--multirun", "experiment=scratch", *_root(tmp_path, caches), *TINY,
                     *FINETUNE, *STEPS, "task.optimizer.lr=0.001,0.05")  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert "is completed; skipping" not in output
    assert "task.optimizer.lr: 0.001 → 0.05" in output
    records = list((tmp_path / "runs").rglob("results.json"))
    assert len(records) == 1
    assert read_results(records[0])["config"]["task"]["optimizer"]["lr"] == 0.001


def test_a_sigterm_stopped_run_exits_143(tmp_path: Path, caches: Path) -> None:
    """Issue 21 row 3: Lightning's SIGTERMException is a SystemExit the boundary did not catch,
    so a run a cluster stopped exited 0."""
    tests = str(Path(__file__).resolve().parent)
    result = run_cli("experiment=scratch", *_root(tmp_path, caches), *TINY, *FINETUNE,
                     "trainer.max_steps=6", "trainer.max_epochs=-1", "logger=none",
                     "~callbacks.lr_monitor", "+callbacks.recorder._target_=tiny_runs.Recorder",
                     "+callbacks.recorder.sigterm_at=2",
                     env={"PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])})  # fmt: skip
    assert result.returncode == 143, result.stderr[-3000:]
    assert "interrupted: " in result.stderr and "the same command resumes it" in result.stderr
    results = results_of(tmp_path / "runs" / "scratch" / "size10" / "fold0" / "seed0")
    assert results["status"] == "interrupted" and results["budget"]["stopped_by"] == "sigterm"


def test_piped_output_gets_log_lines_not_progress_bars(tmp_path: Path, caches: Path) -> None:
    """Issue 19: logs piped to a file filled with ``\\r`` progress bars; CSV is the default
    logger (no wandb folder)."""
    result = ok(run_cli("experiment=scratch", *_root(tmp_path, caches), *TINY, *FINETUNE,
                        "trainer.max_steps=2", "trainer.max_epochs=-1",
                        "trainer.val_check_interval=2", "callbacks.progress_bar.every_n_steps=1"))  # fmt: skip
    output = result.stdout + result.stderr
    assert "\r" not in output
    assert "step 1/2 (epoch 0)" in output and "step 2/2" in output
    assert "validation at step 2, val/" in output
    run_dir = tmp_path / "runs" / "scratch" / "size10" / "fold0" / "seed0"
    assert (run_dir / "csv" / "metrics.csv").is_file() and not (run_dir / "wandb").exists()
