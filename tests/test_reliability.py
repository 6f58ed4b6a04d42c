"""Reliability (issue 11): what a misconfigured or hostile input gets from the CLIs.

Each test names the row of issue 11 it covers. Bad input ends in one ``error:`` line on stderr and
exit code 1 (:data:`lymphnode.core.boundary.EXIT_USER_ERROR`), leaves no run directory behind when
the run never started, and never runs code from a checkpoint, whatever
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says. The training runs are the tiny ones of
:mod:`tiny_runs` (32 px patches, a width-4 UNet, two optimizer steps).

This file is the index of the reliability tests. Round three (issue 21) lives beside it:
:mod:`test_reliability_round3` (checkpoints naming classes off the allow-list, self-contained
smp_unet checkpoints, heatmaps that record their checkpoint, annotation hashes in the cache
record, export names, and the weak rows of infer / evaluate / export / cache / prepare).
"""

from __future__ import annotations

import json
import logging
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from script_tools import cli_env
from tiny_runs import TINY, compose_train, run, write_caches

from lymphnode.core.boundary import EXIT_USER_ERROR, check_added_keys, closest_keys, config_dir
from lymphnode.core.errors import AnnotationError, CacheError, CheckpointError, ConfigError
from lymphnode.evaluation.camelyon16 import EvaluationSettings
from lymphnode.evaluation.runs import collect_runs, expected_missing
from lymphnode.infer import check_segmentation_task, run_inference
from lymphnode.inference.settings import InferenceSettings
from lymphnode.models.checkpoint import load_inference_model, read_checkpoint
from lymphnode.patches.importer import import_patches
from lymphnode.train import read_results, write_results
from lymphnode.wsi.annotations import AsapGroups, read_asap

PROJECT_ROOT = Path(__file__).resolve().parents[1]
ENV = cli_env()
FORCE_UNSAFE = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
STEPS = ("trainer.max_steps=2", "trainer.max_epochs=-1", "trainer.val_check_interval=2")


# --- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny caches: 48 unlabeled, 24 labeled (12 tumour), 8 test patches."""
    return write_caches(tmp_path_factory.mktemp("caches"))


@pytest.fixture(scope="module")
def scratch_run(tmp_path_factory: pytest.TempPathFactory, caches: Path) -> Path:
    """A completed two-step scratch fine-tuning run; returns its run dir (checkpoints/last.ckpt)."""
    root = tmp_path_factory.mktemp("scratch")
    _outcome, results = run(root, caches, *STEPS)
    assert results["status"] == "completed", results["error"]
    return Path(results["checkpoints"]["last"]).parents[1]


@pytest.fixture(scope="module")
def pretrain_ckpt(tmp_path_factory: pytest.TempPathFactory, caches: Path) -> Path:
    """The last.ckpt of a two-step reconstruction pretraining."""
    root = tmp_path_factory.mktemp("pretrain")
    _outcome, results = run(root, caches, *STEPS, experiment="pretrain")
    assert results["status"] == "completed", results["error"]
    return Path(results["checkpoints"]["last"])


def cli(module: str, *args: str, cwd: Path, env: dict[str, str] | None = None):
    """``python -m <module> <args>`` in ``cwd``."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env={**ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The single ``error:`` line of a refused command (exit 1, no traceback)."""
    output = result.stdout + result.stderr
    assert result.returncode == EXIT_USER_ERROR, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, output[-4000:]
    return lines[0]


def train_cli(root: Path, caches: Path, *overrides: str, env: dict[str, str] | None = None):
    """The train CLI on the tiny caches (scratch, 10 labels in 5 folds) under ``root``."""
    args = ("experiment=scratch", f"paths.root={root}", f"paths.cache_dir={caches}", *TINY,
            "data.labeled_size=10", "data.folds=5", *STEPS, *overrides)  # fmt: skip
    return cli("lymphnode.train", *args, cwd=root, env=env)


class _Payload:
    """Unpickling it writes ``marker``: the hostile part of a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def hostile_copy(ckpt: Path, out: Path, marker: Path) -> Path:
    """``ckpt`` with a pickle payload added (a real checkpoint otherwise)."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    state["payload"] = _Payload(marker)
    torch.save(state, out)
    return out


# --- row: resume of a hostile checkpoint ----------------------------------------------------------
def test_hostile_resume_checkpoint_runs_no_code_even_with_force_no_weights_only(
    tmp_path: Path, caches: Path, scratch_run: Path
) -> None:
    marker = tmp_path / "pwned.txt"
    evil = hostile_copy(scratch_run / "checkpoints" / "last.ckpt", tmp_path / "evil.ckpt", marker)
    result = train_cli(tmp_path, caches, f"ckpt_path={evil}", env={FORCE_UNSAFE: "1"})
    line = one_error_line(result)
    assert f"ckpt_path='{evil}'" in line and "weights_only=True" in line
    assert not marker.exists()  # Lightning's loader would have run it (weights_only forced off)


def test_read_checkpoint_ignores_force_no_weights_only(
    tmp_path: Path, scratch_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FORCE_UNSAFE, "1")
    marker = tmp_path / "pwned.txt"
    evil = hostile_copy(scratch_run / "checkpoints" / "last.ckpt", tmp_path / "evil.ckpt", marker)
    with pytest.raises(CheckpointError, match="not a torch checkpoint readable with weights_only"):
        read_checkpoint(evil)
    with pytest.raises(CheckpointError):
        load_inference_model(evil)
    assert not marker.exists()


def test_resume_and_checkpoint_evaluation_pass_weights_only_explicitly(
    tmp_path: Path, caches: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch warns when TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD turns a load without an explicit
    ``weights_only`` unsafe: a resumed run (fit from last.ckpt, then validate/test of its
    checkpoints) must not trigger it once."""
    _first, results = run(tmp_path, caches, *STEPS)
    assert results["status"] == "completed", results["error"]
    monkeypatch.setenv(FORCE_UNSAFE, "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _outcome, resumed = run(
            tmp_path, caches, "trainer.max_steps=4", "trainer.max_epochs=-1",
            "trainer.val_check_interval=2", "ckpt_path=last", "skip_if_done=false",
        )  # fmt: skip
    assert resumed["status"] == "completed", resumed["error"]
    assert resumed["steps"]["last"] == 4  # resumed from step 2, not restarted
    unsafe = [str(w.message) for w in caught if FORCE_UNSAFE in str(w.message)]
    assert unsafe == []


# --- row: infer with a pretraining checkpoint -----------------------------------------------------
def test_infer_refuses_a_pretraining_checkpoint_naming_both_tasks(
    tmp_path: Path, pretrain_ckpt: Path, scratch_run: Path
) -> None:
    out = tmp_path / "heatmaps"
    with pytest.raises(CheckpointError) as info:
        run_inference(pretrain_ckpt, [tmp_path / "slide.tif"], out, progress=False)
    message = str(info.value)
    assert str(pretrain_ckpt) in message
    assert "lymphnode.tasks.reconstruction.ReconstructionModule" in message
    assert "lymphnode.tasks.MultiTaskModule" in message
    assert not out.exists()  # refused before anything is written
    finetuned = load_inference_model(scratch_run / "checkpoints" / "last.ckpt")
    check_segmentation_task(finetuned.task, "best.ckpt")  # a segmentation task passes


# --- row: ckpt_path truncated / foreign / a pretraining checkpoint -------------------------------
@pytest.mark.parametrize("kind", ["truncated", "foreign", "pretraining"])
def test_bad_resume_checkpoint_is_one_clean_line(
    tmp_path: Path, caches: Path, scratch_run: Path, pretrain_ckpt: Path, kind: str
) -> None:
    good = (scratch_run / "checkpoints" / "last.ckpt").read_bytes()
    path = tmp_path / f"{kind}.ckpt"
    if kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "foreign":
        torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}, "epoch": 3}, path)
    else:
        path = pretrain_ckpt
    result = train_cli(tmp_path, caches, f"ckpt_path={path}")
    line = one_error_line(result)
    assert f"ckpt_path='{path}'" in line
    expected = {
        "truncated": "not a torch checkpoint readable with weights_only=True",
        "foreign": "is not a lymphnode checkpoint: no 'hyper_parameters'",
        "pretraining": "is a checkpoint of the task "
        "lymphnode.tasks.reconstruction.ReconstructionModule; resuming this scratch run",
    }[kind]
    assert expected in line
    assert not list((tmp_path / "runs").rglob("results.json"))  # never started


# --- row: fold / labeled_size out of range --------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.fold=5", "folds=5: fold must be an integer in 0..4, got 5"),
        ("data.fold=-1", "folds=5: fold must be an integer in 0..4, got -1"),
        ("data.labeled_size=42", "labeled_size=42 is not a multiple of folds=5"),
        ("data.labeled_size=30", "labeled_size=30 is larger than the labeled cache"),
    ],
)
def test_bad_fold_or_labeled_size_is_one_line_and_leaves_no_run_dir(
    tmp_path: Path, caches: Path, override: str, expected: str
) -> None:
    result = train_cli(tmp_path, caches, override)
    assert expected in one_error_line(result)
    runs = tmp_path / "runs"
    assert not list(runs.rglob("*")) if runs.exists() else True  # not even empty folders


# --- row: results.json holding [] or truncated ----------------------------------------------------
@pytest.mark.parametrize("text", ["[]", '{"status": "compl'])
def test_train_names_a_corrupt_results_json_and_trains_again(
    tmp_path: Path, caches: Path, text: str, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = compose_train("experiment=scratch", f"paths.root={tmp_path}", "data.labeled_size=10")
    path = Path(cfg.run_dir) / "results.json"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with caplog.at_level(logging.WARNING, logger="lymphnode.train"):
        outcome, results = run(tmp_path, caches, *STEPS, "skip_if_done=true")
    assert results["status"] == "completed", results["error"]
    assert isinstance(outcome, float)
    corrupt = [r.getMessage() for r in caplog.records if "corrupt results.json" in r.getMessage()]
    assert corrupt and str(path) in corrupt[0]
    assert read_results(path) == results


def test_report_counts_a_corrupt_results_json_once_as_failed(tmp_path: Path) -> None:
    metrics = {f"test/seg_{m}": 0.5 for m in ("precision", "recall", "f1")}
    for fold in (0, 1, 2):
        write_results(
            tmp_path / "scratch" / "size10" / f"fold{fold}" / "seed0" / "results.json",
            {"status": "completed", "init": "scratch", "labeled_size": 10, "fold": fold,
             "seed": 0, "metrics": metrics, "metrics_last": metrics},
        )  # fmt: skip
    corrupt = tmp_path / "scratch" / "size10" / "fold1" / "seed0" / "results.json"
    corrupt.write_text("[]")
    runs = collect_runs([tmp_path])
    assert sorted((r.fold, r.status) for r in runs) == [(0, "completed"), (1, "failed"),
                                                         (2, "completed")]  # fmt: skip
    (failed,) = [r for r in runs if r.status == "failed"]
    assert failed.init == "scratch" and failed.labeled_size == 10 and failed.seed == 0
    assert str(corrupt) in (failed.error or "") and "corrupt" in (failed.error or "")
    assert expected_missing(runs) == []  # not also "missing" from the grid


# --- row: a 20000² PNG through cache import -------------------------------------------------------
def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that declares ``width`` x ``height`` 8-bit greyscale px but holds one row: what
    Pillow's ``open`` sees is the size (decoding it would fail)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
                     + chunk(b"IEND", b""))  # fmt: skip
    return path


def test_importing_a_20000_square_png_names_the_file_and_the_option(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    big = _png_header_only(images / "slide_0_0.png", 20000, 20000)
    with pytest.raises(CacheError) as info:
        import_patches(images, tmp_path / "cache")
    message = str(info.value)
    assert str(big) in message and "20000x20000 px (400,000,000 px)" in message
    assert "--max-pixels 400000000" in message
    assert not (tmp_path / "cache").exists()
    result = cli("lymphnode.cache", "import", str(images), str(tmp_path / "cli"), cwd=tmp_path)
    line = one_error_line(result)
    assert str(big) in line and "--max-pixels" in line


def test_max_pixels_bounds_the_import_and_zero_lifts_it(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    rgb = np.full((64, 64, 3), (230, 170, 200), np.uint8)
    Image.fromarray(rgb).save(images / "slide_0_0.png")
    with pytest.raises(CacheError, match=r"64x64 px \(4,096 px\), more than max_pixels=4,095"):
        import_patches(images, tmp_path / "small", max_pixels=4095)
    cache = import_patches(images, tmp_path / "ok", max_pixels=4096)  # exactly at the limit
    assert len(cache) == 1 and np.array_equal(cache[0][0], rgb)
    assert len(import_patches(images, tmp_path / "unbounded", max_pixels=0)) == 1
    with pytest.raises(ConfigError, match="max_pixels must be an integer >= 0"):
        import_patches(images, tmp_path / "bad", max_pixels=-1)


# --- row: infer and evaluate settings -------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"downsample": 0.0}, r"infer: downsample must be a finite number >= 1 level-0 px"),
        ({"batch_size": 0}, r"infer: batch_size must be an integer >= 1, got 0"),
        ({"patch_size": 100000}, r"infer: patch_size must be an integer in 1..8192 px"),
        ({"min_tissue_fraction": 2.0}, r"min_tissue_fraction must be a finite number in 0..1"),
        ({"stride": 0}, r"infer: stride must be an integer >= 1"),
        ({"blend": "max"}, r"infer: blend must be one of \['mean', 'hann'\], got 'max'"),
        ({"num_workers": -1}, r"infer: num_workers must be an integer >= 0, got -1"),
    ],
)
def test_infer_settings_are_validated_up_front(kwargs: dict, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        InferenceSettings(**kwargs)


def test_infer_refuses_cuda_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"device='cuda' but torch sees no CUDA GPU"):
        InferenceSettings(device="cuda")
    assert InferenceSettings(device="auto").device == "auto"  # auto falls back to the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"device='cuda:1' but torch sees 1 CUDA GPU\(s\)"):
        InferenceSettings(device="cuda:1")
    assert InferenceSettings(device="cuda:0").device == "cuda:0"


def test_infer_cli_refuses_a_bad_setting_before_reading_anything(tmp_path: Path) -> None:
    result = cli("lymphnode.infer", f"checkpoint={tmp_path}/none.ckpt", f"slides={tmp_path}/x.tif",
                 f"out_dir={tmp_path}/out", "downsample=0", cwd=tmp_path)  # fmt: skip
    assert "downsample must be a finite number >= 1" in one_error_line(result)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"threshold": 1.5}, r"threshold=1.5 must be a probability in \[0, 1\]"),
        ({"fp_rates": ()}, r"fp_rates=\[\] must be a non-empty list of positive"),
        ({"fp_rates": (0.25, -1.0)}, r"fp_rates=\[0.25, -1.0\] must be a non-empty list"),
    ],
)
def test_evaluation_settings_refuse_bad_threshold_and_fp_rates(kwargs: dict, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        EvaluationSettings(**kwargs)


def test_evaluate_cli_refuses_empty_fp_rates(tmp_path: Path) -> None:
    result = cli("lymphnode.evaluate", f"heatmaps={tmp_path}", f"annotations={tmp_path}",
                 "fp_rates=[]", cwd=tmp_path)  # fmt: skip
    assert "fp_rates=[] must be a non-empty list" in one_error_line(result)


# --- row: +paterh_size=64 -------------------------------------------------------------------------
def test_a_misspelt_plus_key_is_refused_with_the_closest_known_key(
    tmp_path: Path, caches: Path
) -> None:
    result = train_cli(tmp_path, caches, "+data.labled_size=10")
    line = one_error_line(result)
    assert "+data.labled_size=10 adds the key 'data.labled_size'" in line
    assert "did you mean 'data.labeled_size'" in line
    runs = tmp_path / "runs"
    assert not list(runs.rglob("*")) if runs.exists() else True
    result = cli("lymphnode.infer", "checkpoint=x.ckpt", "slides=x.tif", "out_dir=out",
                 "+paterh_size=64", cwd=tmp_path)  # fmt: skip
    line = one_error_line(result)
    assert "adds the key 'paterh_size', which the infer config does not have" in line
    assert "did you mean 'patch_size'" in line


def test_added_keys_below_open_sections_and_groups_stay_allowed() -> None:
    cfg = compose_train(
        "experiment=scratch", "+callbacks.recorder._target_=tiny_runs.Recorder",
        "+trainer.max_time=00:00:00:03", "+hydra.job.env_set.FOO=1",
    )  # fmt: skip
    allowed = ["+callbacks.recorder._target_=tiny_runs.Recorder", "+trainer.max_time=00:00:00:03",
               "+hydra.job.env_set.FOO=1", "+pretext=reconstruction", "++paterh_size=1",
               "experiment=scratch"]  # fmt: skip
    check_added_keys(cfg, allowed, "train", config_dir())  # no error
    with pytest.raises(ConfigError, match=r"did you mean 'seed'"):
        check_added_keys(compose_train("+sed=1"), ["+sed=1"], "train", config_dir())
    # a section made by `+` keys alone is not one of the config's open sections
    infer_like = {"checkpoint": "x", "patch_size": None, "callbacks": {"x": 1}}
    with pytest.raises(ConfigError, match=r"adds the key 'callbacks.x'"):
        check_added_keys(infer_like, ["+callbacks.x=1"], "infer", config_dir())


def test_closest_keys_compares_whole_keys_and_last_components() -> None:
    known = ["data.labeled_size", "data.batch_size", "seed", "patch_size", "model.depth"]
    assert closest_keys("paterh_size", known)[0] == "patch_size"
    assert closest_keys("data.labled_size", known)[0] == "data.labeled_size"
    assert closest_keys("zzzz", known) == []


# --- row: an unknown ASAP group on a tumour slide -------------------------------------------------
ASAP = """<?xml version="1.0"?>
<ASAP_Annotations><Annotations>
<Annotation Name="a" Type="Polygon" PartOfGroup="{group}"><Coordinates>
<Coordinate Order="0" X="100" Y="100"/><Coordinate Order="1" X="900" Y="100"/>
<Coordinate Order="2" X="900" Y="900"/><Coordinate Order="3" X="100" Y="900"/>
</Coordinates></Annotation>
<Annotation Name="b" Type="Polygon" PartOfGroup="_2"><Coordinates>
<Coordinate Order="0" X="200" Y="200"/><Coordinate Order="1" X="300" Y="200"/>
<Coordinate Order="2" X="300" Y="300"/>
</Coordinates></Annotation>
</Annotations></ASAP_Annotations>
"""


def test_read_asap_with_groups_refuses_an_unmapped_group(tmp_path: Path) -> None:
    xml = tmp_path / "tumor_001.xml"
    xml.write_text(ASAP.format(group="metastasis"))
    with pytest.raises(AnnotationError) as info:
        read_asap(xml, groups=AsapGroups(), slide="slides/tumor_001.tif")
    message = str(info.value)
    assert f"{xml} (slide slides/tumor_001.tif)" in message
    assert "groups found: '_2' (1), 'metastasis' (1)" in message
    for key in ("asap.tumor_groups", "asap.exclusion_groups", "asap.ignored_groups"):
        assert key in message
    mapped = read_asap(xml, groups=AsapGroups(tumor=("metastasis",)))
    assert len(mapped.tumor) == 1 and len(mapped.exclusion) == 1
    ignored = read_asap(xml, groups=AsapGroups(ignored=("metastasis",)))
    assert ignored.tumor == [] and len(ignored.exclusion) == 1
    assert len(read_asap(xml).exclusion) == 1  # without groups: the lenient reader, as before
    with pytest.raises(ConfigError, match=r"group '_0' is in both asap.tumor_groups and asap"):
        AsapGroups.from_config({"ignored_groups": ["_0"]})
    with pytest.raises(ConfigError, match=r"asap has unknown keys \['tumour_groups'\]"):
        AsapGroups.from_config({"tumour_groups": ["x"]})


@pytest.fixture(scope="module")
def tumour_slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tiny synthetic tumour slides (2048²) whose ASAP files say ``metastasis``."""
    from lymphnode.synth import make_slide

    root = tmp_path_factory.mktemp("asap")
    for i, name in enumerate(("tumor_001", "tumor_002")):
        xml = root / "annotations" / f"{name}.xml"
        make_slide(root / "slides" / f"{name}.tif", seed=300 + i, tumor=True, size=(2048, 2048),
                   annotation_path=xml)  # fmt: skip
        xml.write_text(xml.read_text().replace('PartOfGroup="_0"', 'PartOfGroup="metastasis"'))
    return root


def test_prepare_refuses_an_unknown_group_naming_slide_groups_and_keys(
    tumour_slides: Path,
) -> None:
    fast = ["patch_size=64", "counts.labeled=4", "codec=raw", "workers=0", "caches=[labeled]",
            "split.test_slides=[tumor_002]", f"paths.cache_dir={tumour_slides}/caches"]  # fmt: skip
    result = cli("lymphnode.prepare", f"paths.root={tumour_slides}", *fast, cwd=tumour_slides)
    line = one_error_line(result)
    assert "slide " in line and "tumor_001.tif" in line and "'metastasis'" in line
    assert "asap.tumor_groups" in line and "asap.ignored_groups" in line
    assert not (tumour_slides / "caches" / "labeled").exists()  # refused before writing
    mapped = cli("lymphnode.prepare", f"paths.root={tumour_slides}", *fast,
                 "asap.tumor_groups=[Tumor,_0,_1,metastasis]", cwd=tumour_slides)  # fmt: skip
    assert mapped.returncode == 0, mapped.stderr[-3000:]
    index = json.loads((tumour_slides / "caches" / "labeled" / "manifest.json").read_text())
    assert index["config"]["asap"]["tumor_groups"][-1] == "metastasis"


# --- issue 21 rows 3 and 7: run identity (the tests live beside the run lifecycle) ----------------
# row 3 (a SIGTERM exited 0; fine-tuning then started from the interrupted pretraining):
#   test_lifecycle.py::test_a_sigterm_stopped_run_raises_run_interrupted_with_exit_code_143,
#   test_train.py::test_a_sigterm_stopped_run_exits_143 (the CLI exits 143),
#   test_lifecycle.py::test_fine_tuning_refuses_an_interrupted_pretraining_unless_told.
# row 7 (`--multirun task.optimizer.lr=0.001,0.05` handed job 1 job 0's metric):
#   test_train.py::test_a_multirun_over_a_key_outside_the_folder_name_never_hands_job_1_job_0s_metric,
#   test_lifecycle.py::test_a_rerun_skips_the_same_config_and_refuses_another_naming_every_changed_key.
