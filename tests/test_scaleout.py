"""Scale-out, exercised (issue 11): DDP on two CPU processes, a sweep through submitit's local
executor with a killed job resubmitted, and prepare sharded across array jobs.

Training runs are the tiny ones of :mod:`tiny_runs` (32 px patches, a width-4 UNet, a few
optimizer steps) through the real ``python -m lymphnode.train`` CLI; the test cache holds an odd
number of patches (9), which two processes cannot split evenly: Lightning's own sampler would
repeat one, and the pooled metrics would count it twice. Sharded prepare runs the real ``python -m
lymphnode.prepare`` on four tiny synthetic slides.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from script_tools import cli_env
from tiny_runs import FINETUNE, RECORDER, TINY, Recorder, _write_cache, run

from lymphnode.core import validate
from lymphnode.core.boundary import EXIT_USER_ERROR
from lymphnode.core.errors import ConfigError
from lymphnode.core.resolvers import shard_dir
from lymphnode.data.samplers import EpochSampler, epoch_seed
from lymphnode.evaluation.pixels import PixelCounts
from lymphnode.models.checkpoint import load_inference_model
from lymphnode.patches.build import settings_from_config, shard_slides
from lymphnode.patches.cache import PatchCache
from lymphnode.synth import make_slide
from lymphnode.tasks.checkpointing import checkpoint_step
from lymphnode.tasks.multitask import per_patch_dice
from lymphnode.train import read_results

PROJECT_ROOT = Path(__file__).resolve().parents[1]
ENV = cli_env(OMP_NUM_THREADS="1")
TEST_PATCHES = 9  # odd: 5 + 4 over two processes
THRESHOLD = 0.5
# A few steps that learn something (a constant prediction would make every F1 0 and prove nothing).
# No colour jitter: it goes through OpenCV, whose builds differ in the last bits, and a 4-step run
# must learn the same thing in every environment (D4 flips are exact).
LEARN = (
    "task.optimizer.lr=0.02",
    "task.seg_loss.dice_weight=1.0",
    "data.transforms.color_jitter=false",
)
DDP = ("trainer.devices=2", "trainer.strategy=ddp_spawn")  # gloo on CPU
RUN = Path("runs") / "scratch" / "size10"


# --- helpers --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """labeled/ (24 patches, 12 tumour) and test/ (9 patches, 4 tumour) tiny caches."""
    root = tmp_path_factory.mktemp("caches")
    _write_cache(root / "labeled", ["tumor_001", "tumor_002"], 12, masks=True, seed=2)
    _write_cache(root / "test", ["tumor_003"], TEST_PATCHES, masks=True, seed=3)
    return root


def cli(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m <module> <args>`` in ``cwd``; stdout and stderr together in ``.stdout``."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=540, check=False,
    )  # fmt: skip


def train_args(root: Path, caches: Path, *overrides: str) -> list[str]:
    """The train CLI's arguments for a tiny scratch run (10 labels in 5 folds) under ``root``."""
    return ["experiment=scratch", f"paths.root={root}", f"paths.cache_dir={caches}", *TINY,
            *FINETUNE, *LEARN, "task.scheduler=null", *overrides]  # fmt: skip


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout[-6000:]
    return result.stdout


def results_of(run_dir: Path) -> dict[str, Any]:
    results = read_results(run_dir / "results.json")
    assert results is not None, f"no results.json in {run_dir}"
    return results


def reference_metrics(ckpt: Path, cache_dir: Path, positions: list[int]) -> dict[str, float]:
    """Test metrics of ``ckpt`` over the test patches at ``positions`` (repeats count twice),
    computed in this process with the project's pixel counts and per-patch Dice: what the run
    must report when every test patch is scored once."""
    model = load_inference_model(ckpt)
    cache = PatchCache(cache_dir)
    images = np.stack([cache[i][0] for i in positions])  # (N, P, P, 3) uint8
    masks = np.stack([cache[i][1] for i in positions]).astype(bool)  # (N, P, P)
    with torch.no_grad():
        prob = model.probabilities(model.prepare(images))[:, 0].numpy()  # (N, P, P)
    counts = PixelCounts()
    for p, m in zip(prob, masks):
        counts = counts + PixelCounts.of(p, m, THRESHOLD)
    dice = per_patch_dice(torch.from_numpy(prob > THRESHOLD), torch.from_numpy(masks))
    return {"precision": counts.precision, "recall": counts.recall, "f1": counts.f1,
            "dice": float(dice.mean())}  # fmt: skip


def assert_metrics_over_all_test_patches(results: dict[str, Any], ckpt: Path, caches: Path) -> None:
    """``results``' test metrics are those of all 9 test patches, each once, and not those of one
    process's share or of Lightning's padded set (the check can tell them apart)."""
    everything = reference_metrics(ckpt, caches / "test", list(range(TEST_PATCHES)))
    assert 0 < everything["f1"] < 1  # a model that learned something, not a constant
    for key, value in everything.items():
        assert results["metrics"][f"test/seg_{key}"] == pytest.approx(value, abs=1e-6), key
    half = reference_metrics(ckpt, caches / "test", list(range(0, TEST_PATCHES, 2)))  # rank 0's
    padded = reference_metrics(ckpt, caches / "test", [*range(TEST_PATCHES), 0])  # 0 repeated
    assert abs(half["dice"] - everything["dice"]) > 1e-3
    assert abs(padded["dice"] - everything["dice"]) > 1e-3


def files_under(root: Path, skip: str | None = None) -> dict[str, bytes]:
    """Every file below ``root`` (relative path -> bytes), without those under ``skip``."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and (skip is None or skip not in p.relative_to(root).parts)
    }


def weights(ckpt: Path) -> tuple[int, dict[str, torch.Tensor]]:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    return int(state["global_step"]), state["state_dict"]


def assert_same_weights(a: Path, b: Path) -> None:
    step_a, state_a = weights(a)
    step_b, state_b = weights(b)
    assert step_a == step_b
    assert state_a.keys() == state_b.keys()
    different = [name for name in state_a if not torch.equal(state_a[name], state_b[name])]
    assert different == []  # bit-identical


# --- DDP: two CPU processes ----------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_spawn_fit_writes_one_record_with_metrics_over_every_test_patch(
    tmp_path: Path, caches: Path
) -> None:
    steps = ("trainer.max_steps=6", "trainer.max_epochs=-1", "trainer.val_check_interval=2")
    output = ok(cli("lymphnode.train", *train_args(tmp_path, caches, *DDP, *steps), cwd=tmp_path))
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in output  # the fit ran in two processes

    run_dir = tmp_path / RUN / "fold0" / "seed0"
    assert sorted(tmp_path.rglob("results.json")) == [run_dir / "results.json"]
    assert sorted(tmp_path.rglob("*.ckpt")) == [
        run_dir / "checkpoints" / "best.ckpt",
        run_dir / "checkpoints" / "last.ckpt",
    ]  # rank 1 wrote no checkpoint, no run dir and no Hydra folder of its own
    assert not [
        p for p in tmp_path.rglob("*") if p.name.startswith((".pl_hydra", "lightning_logs"))
    ]
    assert (run_dir / "train.log").read_text().count("results.json)") == 1  # one writer

    results = results_of(run_dir)
    assert results["status"] == "completed", results["error"]
    # what the fit's processes knew comes back to the one that writes results.json
    assert results["steps"]["last"] == 6 and results["budget"]["stopped_by"] == "max_steps"
    assert results["checkpoints"]["last"] == str((run_dir / "checkpoints" / "last.ckpt").resolve())
    best = Path(results["checkpoints"]["best"])
    assert results["steps"]["selected"] == checkpoint_step(best)
    assert_metrics_over_all_test_patches(results, best, caches)
    baseline = reference_metrics(best, caches / "test", list(range(TEST_PATCHES)))
    assert results["metrics"]["test/seg_recall"] == pytest.approx(baseline["recall"], abs=1e-6)


@pytest.mark.slow
def test_ddp_spawn_inside_a_multirun_sweep_gives_each_run_one_record(
    tmp_path: Path, caches: Path
) -> None:
    steps = ("trainer.max_steps=4", "trainer.max_epochs=-1", "trainer.val_check_interval=2")
    args = train_args(tmp_path, caches, *DDP, *steps, "selection=last", "data.fold=0,1")
    ok(cli("lymphnode.train", "--multirun", *args, cwd=tmp_path))
    runs = [tmp_path / RUN / f"fold{fold}" / "seed0" for fold in (0, 1)]
    assert sorted(tmp_path.rglob("results.json")) == [r / "results.json" for r in runs]
    assert sorted(tmp_path.rglob("*.ckpt")) == [
        r / "checkpoints" / name for r in runs for name in ("best.ckpt", "last.ckpt")
    ]
    assert (tmp_path / "runs" / "multirun.yaml").is_file()
    for run_dir in runs:
        results = results_of(run_dir)
        assert results["status"] == "completed", results["error"]
        assert results["steps"] == {"selected": 4, "last": 4}
        assert_metrics_over_all_test_patches(results, run_dir / "checkpoints" / "last.ckpt", caches)


# --- resume: bit-identical from an epoch boundary ------------------------------------------------
def test_the_training_order_of_an_epoch_depends_on_the_seed_and_epoch_only() -> None:
    """What a resumed run relies on: epoch 3 of a fresh sampler is epoch 3 of one that went
    through epochs 0-2; two processes split one permutation; another epoch is another order."""
    data = list(range(10))
    walked = EpochSampler(data, seed=7)
    for epoch in range(3):
        walked.set_epoch(epoch)
        list(walked)
    walked.set_epoch(3)
    fresh = EpochSampler(data, seed=7)
    fresh.set_epoch(3)
    keys = list(fresh)
    assert list(walked) == keys
    assert {key[0] for key in keys} == {epoch_seed(7, 3)} and sorted(k[1] for k in keys) == data
    fresh.set_epoch(4)
    assert [k[1] for k in fresh] != [k[1] for k in keys]
    ranks = [EpochSampler(data, seed=7, num_replicas=2, rank=r) for r in (0, 1)]
    for sampler in ranks:
        sampler.set_epoch(3)
    share0, share1 = ([k[1] for k in s] for s in ranks)
    assert share0 == [k[1] for k in keys][0::2] and share1 == [k[1] for k in keys][1::2]


def test_an_interrupted_run_started_again_resumes_to_bit_identical_weights(
    tmp_path: Path, caches: Path
) -> None:
    """SIGTERM at step 4 (an epoch boundary: 2 steps per epoch), then the same command again:
    it resumes from last.ckpt by itself and ends with the weights of an uninterrupted run."""
    steps = ("trainer.max_steps=8", "trainer.max_epochs=-1", "trainer.val_check_interval=2",
             "selection=last", *LEARN)  # fmt: skip
    _, clean = run(tmp_path / "clean", caches, *steps)
    assert clean["status"] == "completed", clean["error"]

    killed = (*steps, RECORDER, "+callbacks.recorder.sigterm_at=4")
    _, first = run(tmp_path / "killed", caches, *killed)
    assert first["status"] == "interrupted" and first["steps"]["last"] == 4
    _, again = run(tmp_path / "killed", caches, *killed)  # the same command
    assert again["status"] == "completed", again["error"]
    assert again["resumed"]["step"] == 4 and again["config"]["ckpt_path"] == "last"
    assert Recorder.steps == [5, 6, 7, 8]  # continued, not from 0
    run_dir = Path("runs") / "scratch" / "size10" / "fold0" / "seed0" / "checkpoints" / "last.ckpt"
    assert_same_weights(tmp_path / "clean" / run_dir, tmp_path / "killed" / run_dir)
    # resume_interrupted=false: the same command starts over
    _, fresh = run(tmp_path / "fresh", caches, *killed)
    assert fresh["status"] == "interrupted"
    _, restarted = run(tmp_path / "fresh", caches, *killed, "resume_interrupted=false")
    assert restarted["resumed"] is None and Recorder.steps[0] == 1


# --- submitit: the cluster launcher's local executor ---------------------------------------------
SUBMITIT = ("hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10")
# 8 training patches in batches of 8: one step per epoch, so every step ends an epoch and a job
# killed at any step resumes bit-identical.
SWEEP = ("data.batch_size=8", "trainer.max_steps=8", "trainer.max_epochs=-1",
         "trainer.val_check_interval=2", "selection=last", "data.fold=0,1")  # fmt: skip


@pytest.fixture(scope="module")
def submitit_sweep(tmp_path_factory: pytest.TempPathFactory, caches: Path) -> Path:
    """A completed two-job sweep through submitit's local executor; returns its root."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    root = tmp_path_factory.mktemp("submitit")
    ok(cli("lymphnode.train", "--multirun", *train_args(root, caches, *SUBMITIT, *SWEEP), cwd=root))
    return root


def job_log(job: Path) -> str:
    """What a submitit job printed (its stdout and stderr files)."""
    logs = [job / f"{job.name}_0_log.{kind}" for kind in ("out", "err")]
    return "".join(log.read_text(errors="replace") for log in logs if log.is_file())


def job_folders(root: Path) -> list[Path]:
    """submitit's job folders (named by the job id: the job's process id on the local executor)."""
    folder = root / "runs" / ".submitit"
    return sorted(p for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


@pytest.mark.slow
def test_a_submitit_local_sweep_runs_each_job_in_its_own_process(
    submitit_sweep: Path, caches: Path
) -> None:
    jobs = job_folders(submitit_sweep)
    assert len(jobs) == 2 and all((j / f"{j.name}_0_result.pkl").is_file() for j in jobs)
    assert str(os.getpid()) not in {j.name for j in jobs}
    for fold in (0, 1):
        results = results_of(submitit_sweep / RUN / f"fold{fold}" / "seed0")
        assert results["status"] == "completed", results["error"]
        assert results["steps"] == {"selected": 8, "last": 8} and results["resumed"] is None
    assert sorted(submitit_sweep.rglob("results.json")) == [
        submitit_sweep / RUN / f"fold{fold}" / "seed0" / "results.json" for fold in (0, 1)
    ]


@pytest.mark.slow
def test_a_killed_submitit_job_resubmitted_resumes_from_last_ckpt_bit_identical(
    tmp_path: Path, caches: Path, submitit_sweep: Path
) -> None:
    """SIGTERM (a cluster's time limit) to one job of the sweep after its first checkpoint; the
    same command again skips the finished job and resumes the killed one from its last.ckpt to
    the weights of the uninterrupted sweep's run."""
    pace = ("+callbacks.pace._target_=tiny_runs.Pace", "+callbacks.pace.seconds=0.4")
    args = ["--multirun", *train_args(tmp_path, caches, *SUBMITIT, *SWEEP, *pace)]
    sweep = subprocess.Popen(
        [sys.executable, "-m", "lymphnode.train", *args], cwd=tmp_path, env=ENV,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    fold0 = tmp_path / RUN / "fold0" / "seed0"
    killed = None
    deadline = time.monotonic() + 240
    try:
        while killed is None and time.monotonic() < deadline and sweep.poll() is None:
            if (fold0 / "checkpoints" / "last.ckpt").is_file():
                for job in job_folders(tmp_path):  # the job that trains fold 0
                    if re.search(rf"into {re.escape(str(fold0))}\b", job_log(job)):
                        os.kill(int(job.name), signal.SIGTERM)
                        killed = job
            time.sleep(0.05)
        output, _ = sweep.communicate(timeout=300)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert killed is not None, "fold 0's job was not seen with a checkpoint"
    assert sweep.returncode != 0, output[-4000:]  # a job of the sweep failed
    first = results_of(fold0)
    assert first["status"] == "interrupted", first["error"]
    assert first["budget"]["stopped_by"] == "sigterm" and 2 <= first["steps"]["last"] < 8
    stopped_at = first["steps"]["last"]
    assert checkpoint_step(fold0 / "checkpoints" / "last.ckpt") == stopped_at
    assert results_of(tmp_path / RUN / "fold1" / "seed0")["status"] == "completed"

    again = cli("lymphnode.train", *args, cwd=tmp_path)  # resubmitted: the same command
    ok(again)
    resumed = results_of(fold0)
    assert resumed["status"] == "completed", resumed["error"]
    assert resumed["resumed"] == {
        "checkpoint": str((fold0 / "checkpoints" / "last.ckpt").resolve()),
        "step": stopped_at,
    }
    assert resumed["steps"]["last"] == 8
    logs = "".join(job_log(job) for job in job_folders(tmp_path) if job != killed)
    assert "is completed; skipping" in logs  # fold 1 was not trained again
    assert "Restoring states from the checkpoint path at" in logs
    last = Path("checkpoints") / "last.ckpt"
    assert_same_weights(fold0 / last, submitit_sweep / RUN / "fold0" / "seed0" / last)


# --- sharded prepare -----------------------------------------------------------------------------
SLIDES = ("tumor_001", "tumor_002", "normal_001", "normal_002")
PREPARE = ("patch_size=64", "counts.unlabeled=4", "counts.labeled=4", "counts.test=4", "codec=raw",
           "workers=0", "split.test_slides=[tumor_002,normal_002]")  # fmt: skip


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 tumour (with ASAP XML) + 2 normal synthetic 1536² slides: <root>/slides, <root>/annotations."""
    root = tmp_path_factory.mktemp("slides")
    for i, name in enumerate(SLIDES):
        tumor = name.startswith("tumor")
        make_slide(
            root / "slides" / f"{name}.tif", seed=200 + i, tumor=tumor, size=(1536, 1536),
            annotation_path=root / "annotations" / f"{name}.xml" if tumor else None,
        )  # fmt: skip
    return root


def prepare_cmd(slides: Path, out: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "lymphnode.prepare", f"paths.root={slides}",
            f"paths.cache_dir={out}", *PREPARE, *overrides]  # fmt: skip


@pytest.fixture(scope="module")
def one_job(slides: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The caches of a single-process build."""
    out = tmp_path_factory.mktemp("one") / "caches"
    ok(subprocess.run(prepare_cmd(slides, out), cwd=PROJECT_ROOT, env=ENV, text=True,
                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300))  # fmt: skip
    return out


@pytest.mark.slow
def test_two_concurrent_shard_jobs_build_caches_byte_identical_to_one_job(
    slides: Path, one_job: Path, tmp_path: Path
) -> None:
    out = tmp_path / "caches"
    jobs = [
        subprocess.Popen(prepare_cmd(slides, out, f"shard={i}/2"), cwd=PROJECT_ROOT, env=ENV,
                         text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for i in (0, 1)
    ]  # fmt: skip
    outputs = [job.communicate(timeout=300)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], "\n".join(outputs)[-6000:]
    built = files_under(out, skip=".prepare")
    assert sorted(built) == sorted(files_under(one_job, skip=".prepare"))
    assert built == files_under(one_job, skip=".prepare")  # every file, byte for byte
    # each job logged into its own folder
    for i in (0, 1):
        assert (out / ".prepare" / f"shard-{i}-of-2" / "hydra" / "config.yaml").is_file()


@pytest.mark.slow
def test_a_shard_job_builds_only_its_slides_and_prepare_without_shard_finalizes(
    slides: Path, one_job: Path, tmp_path: Path
) -> None:
    out = tmp_path / "caches"
    first = ok(subprocess.run(prepare_cmd(slides, out, "shard=1/2"), cwd=PROJECT_ROOT, env=ENV,
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))  # fmt: skip
    # slides sorted by name: normal_001, normal_002, tumor_001, tumor_002; job 1 takes 1 and 3
    assert "shard 1/2: 2 of the 4 slides (normal_002, tumor_002)" in first
    assert set(PatchCache(out / "test").slides) == {"normal_002", "tumor_002"}  # complete
    assert PatchCache(out / "unlabeled").slides == ()  # its training slides are job 0's
    assert "still to come from the other jobs" in first
    assert files_under(out, skip=".prepare") != files_under(one_job, skip=".prepare")

    merged = ok(subprocess.run(prepare_cmd(slides, out), cwd=PROJECT_ROOT, env=ENV, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT))  # fmt: skip
    assert "2 slides already complete in every cache: skipped" in merged
    assert files_under(out, skip=".prepare") == files_under(one_job, skip=".prepare")


def test_shard_slides_deals_every_slide_to_exactly_one_job() -> None:
    names = ["a", "b", "c", "d", "e"]
    assert shard_slides(names, None) == names  # type: ignore[arg-type]
    assert shard_slides(names, (0, 2)) == ["a", "c", "e"]  # type: ignore[arg-type]
    assert shard_slides(names, (1, 2)) == ["b", "d"]  # type: ignore[arg-type]
    assert shard_slides(names, (4, 7)) == ["e"] and shard_slides(names, (5, 7)) == []  # type: ignore[arg-type]
    dealt = [s for i in range(3) for s in shard_slides(names, (i, 3))]  # type: ignore[arg-type]
    assert sorted(dealt) == names


@pytest.mark.parametrize(
    ("value", "parsed"), [("0/1", (0, 1)), ("3/4", (3, 4)), (" 2/10 ", (2, 10)), (None, None)]
)
def test_shard_is_parsed_as_index_and_count(value: Any, parsed: Any) -> None:
    assert validate.shard("shard", value) == parsed


@pytest.mark.parametrize("value", ["3/2", "2/2", "0/0", "-1/2", "1", "a/b", "1/2/3", "", 1, 0.5])
def test_a_bad_shard_is_refused_naming_it(value: Any) -> None:
    with pytest.raises(
        ConfigError, match=rf"shard must be 'i/n' with 0 <= i < n .*got {re.escape(repr(value))}"
    ):
        settings_from_config({"caches": ["unlabeled"], "codec": "raw", "counts": {"unlabeled": 1},
                              "patch_size": 64, "level": 0, "workers": 0, "shard": value})  # fmt: skip


def test_force_with_shard_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"force=true cannot be combined with shard='0/2'"):
        settings_from_config({"caches": ["unlabeled"], "codec": "raw", "counts": {"unlabeled": 1},
                              "patch_size": 64, "level": 0, "workers": 0, "shard": "0/2",
                              "force": True})  # fmt: skip


def test_each_shard_job_logs_into_its_own_folder() -> None:
    assert shard_dir("1/4") == "shard-1-of-4"
    assert shard_dir(None) == "" and shard_dir(None, 3) == "3"
    assert shard_dir("3/2") == ""  # refused by prepare itself, with the message


def test_the_prepare_cli_refuses_a_bad_shard_before_writing(tmp_path: Path) -> None:
    out = tmp_path / "caches"
    result = cli("lymphnode.prepare", f"paths.root={tmp_path}", f"paths.cache_dir={out}",
                 "shard=3/2", cwd=tmp_path)  # fmt: skip
    assert result.returncode == EXIT_USER_ERROR, result.stdout
    errors = [line for line in result.stdout.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "shard must be 'i/n'" in errors[0] and "'3/2'" in errors[0]
    assert "Traceback" not in result.stdout
    assert not any(p.is_file() for p in out.rglob("*"))  # nothing written (Hydra's logs aside)
