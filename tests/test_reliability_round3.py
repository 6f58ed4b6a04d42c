"""Reliability, round three (issue 21): rows of infer / select / export / evaluate / prepare /
cache. Indexed from :mod:`test_reliability`; each test names the row it covers.

The checkpoints are built in this process (a width-4 UNet, :func:`test_infer._checkpoint`), the
slides are the 1024 x 768 pyramids of :func:`test_infer._slide`: every test runs in seconds.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from script_tools import cli_env
from test_infer import _checkpoint, _slide

from lymphnode.core import validate
from lymphnode.core.boundary import EXIT_USER_ERROR
from lymphnode.core.errors import CacheError, CheckpointError, ConfigError, EvaluationError
from lymphnode.evaluation.camelyon16 import evaluate
from lymphnode.evaluation.export import export
from lymphnode.infer import run_inference
from lymphnode.inference.heatmap import read_heatmap
from lymphnode.inference.predict import scratch_dir
from lymphnode.inference.settings import InferenceSettings
from lymphnode.models.checkpoint import check_task, load_inference_model
from lymphnode.patches.format import sha256
from lymphnode.patches.importer import import_patches
from lymphnode.tasks import MultiTaskModule
from lymphnode.wsi.pyramid import write_pyramid

ENV = cli_env()
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def cli(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m <module> <args>`` in ``cwd``."""
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=ENV, capture_output=True, text=True,
        timeout=300, check=False,
    )  # fmt: skip


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The single ``error:`` line of a refused command (exit 1, no traceback)."""
    output = result.stdout + result.stderr
    assert result.returncode == EXIT_USER_ERROR, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, output[-4000:]
    return lines[0]


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with one tiny tissue slide (tumor_009.tif, 1024 x 768, levels 0..2)."""
    root = tmp_path_factory.mktemp("slides")
    _slide(root / "tumor_009.tif", tissue=True)
    return root


def _edited(source: Path, out: Path, edit: Any) -> Path:
    """``source`` (a checkpoint) after ``edit(ckpt)``: a file that torch.load(weights_only=True)
    reads, as a hostile one would be."""
    ckpt = torch.load(source, map_location="cpu", weights_only=True)
    edit(ckpt)
    torch.save(ckpt, out)
    torch.load(out, map_location="cpu", weights_only=True)  # passes the safe loader
    return out


# --- row 1 (bad): a checkpoint's _target_s choose what runs ---------------------------------------
def _payloads(marker: Path) -> dict[str, tuple[Any, str]]:
    """Edits of a checkpoint that would write ``marker`` (or run os.system) if its settings were
    instantiated, and the part of the error that names them."""
    opener = {"_target_": "builtins.open", "_args_": [str(marker), "w"]}

    def set_hparam(key: str, value: Any) -> Any:
        def edit(ckpt: dict) -> None:
            holder = ckpt["hyper_parameters"]
            *parents, last = key.split(".")
            for p in parents:
                holder = holder[p]
            holder[last] = value

        return edit

    def set_task(ckpt: dict) -> None:
        ckpt["lymphnode"]["task_target"] = "pathlib.Path.touch"

    return {
        "lr": (set_hparam("optimizer.lr", opener), "hyper_parameters.optimizer.lr names "
               "_target_='builtins.open'"),
        "optimizer": (set_hparam("optimizer", opener), "names the optimizer 'builtins.open'"),
        "scheduler": (set_hparam("scheduler", {"_target_": "os.system", "command": f"touch "
                      f"{marker}"}), "names the scheduler 'os.system'"),
        "net": (set_hparam("net._target_", "lymphnode.models.unet.torch.load"),
                "which is torch.serialization.load"),
        "net_arg": (set_hparam("net.base_width", opener), "hyper_parameters.net.base_width names"),
        "seg_loss": (set_hparam("seg_loss", opener), "hyper_parameters.seg_loss names"),
        "partial": (set_hparam("optimizer._partial_", False), "optimizer._partial_=False"),
        "task": (set_task, "names the task module 'pathlib.Path.touch'"),
    }  # fmt: skip


@pytest.mark.parametrize(
    "kind", ["lr", "optimizer", "scheduler", "net", "net_arg", "seg_loss", "partial", "task"]
)
def test_a_checkpoint_naming_a_class_off_the_allow_list_is_refused_and_runs_nothing(
    tmp_path: Path, kind: str
) -> None:
    marker = tmp_path / "pwned.txt"
    good = _checkpoint(tmp_path / "good.ckpt", seg_bias=3.0)
    edit, expected = _payloads(marker)[kind]
    evil = _edited(good, tmp_path / "evil.ckpt", edit)
    with pytest.raises(CheckpointError) as info:
        load_inference_model(evil)
    assert str(evil) in str(info.value) and expected in str(info.value)
    assert not marker.exists()
    assert load_inference_model(good).task is not None  # the untouched checkpoint still loads


def test_infer_and_select_refuse_a_target_chain_in_one_line_and_the_payload_never_runs(
    tmp_path: Path, slides: Path
) -> None:
    marker = tmp_path / "pwned.txt"
    good = _checkpoint(tmp_path / "good.ckpt", seg_bias=3.0)
    # what issue 21 found: torch.load(weights_only=False) of bytes built by builtins.bytes
    chain = {"_target_": "torch.load", "weights_only": False, "f": {"_target_": "io.BytesIO",
             "_args_": [{"_target_": "builtins.open", "_args_": [str(marker), "w"]}]}}  # fmt: skip
    evil = _edited(good, tmp_path / "evil.ckpt",
                   lambda c: c["hyper_parameters"]["optimizer"].__setitem__("lr", chain))  # fmt: skip
    out = tmp_path / "heatmaps"
    result = cli("lymphnode.infer", f"checkpoint={evil}", f"slides={slides}", f"out_dir={out}",
                 "num_workers=0", "progress=false", "device=cpu", cwd=tmp_path)  # fmt: skip
    line = one_error_line(result)
    assert str(evil) in line and "'torch.load'" in line and "optimizer.lr" in line
    assert not out.exists()
    selected = tmp_path / "selected"
    result = cli("lymphnode.select", f"checkpoint={evil}", f"slides={slides}",
                 f"out_dir={selected}", "k=1", "num_workers=0", "progress=false", "device=cpu",
                 cwd=tmp_path)  # fmt: skip
    line = one_error_line(result)
    assert str(evil) in line and "'torch.load'" in line
    assert not selected.exists() and not marker.exists()


def test_a_class_of_a_trusted_module_may_be_named_and_check_task_trusts_the_configs_module(
    tmp_path: Path,
) -> None:
    good = _checkpoint(tmp_path / "good.ckpt", seg_bias=3.0)
    own = _edited(good, tmp_path / "own.ckpt", lambda c: c["lymphnode"].__setitem__(
        "task_target", "test_infer.MultiTaskModule"))  # fmt: skip
    with pytest.raises(CheckpointError, match=r"names the task module 'test_infer.MultiTaskModule"
                       r"', which a checkpoint may not name .*trusted_modules=\["):  # fmt: skip
        load_inference_model(own)
    assert load_inference_model(own, trusted_modules=["test_infer"]).task is not None
    # a path through a module's attributes: the class found is checked, not only the string
    walk = _edited(good, tmp_path / "walk.ckpt", lambda c: c["lymphnode"].__setitem__(
        "task_target", "lymphnode.tasks.base.nn.Linear"))  # fmt: skip
    with pytest.raises(CheckpointError, match=r"which is torch.nn.modules.linear.Linear, not a "
                       r"class of lymphnode.tasks.\*"):  # fmt: skip
        load_inference_model(walk)
    assert check_task(good, "lymphnode.tasks.MultiTaskModule", key="ckpt_path", needed_by="x")
    with pytest.raises(CheckpointError, match=r"ckpt_path='.*own.ckpt': .*'test_infer.Multi"):
        check_task(own, "lymphnode.tasks.MultiTaskModule", key="ckpt_path", needed_by="x")


# --- row 6 (bad): an smp_unet checkpoint needs its encoder weights file ---------------------------
def test_an_smp_unet_checkpoint_infers_without_its_encoder_weights_file(tmp_path: Path) -> None:
    import torchvision

    from lymphnode.models.preprocess import Preprocess

    weights = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    net = {"_target_": "lymphnode.models.SmpUNet", "encoder": "resnet18", "encoder_depth": 3,
           "decoder_channels": [16, 8, 8], "encoder_weights": str(weights)}  # fmt: skip
    module = MultiTaskModule(net=net, preprocess=Preprocess(level=0, patch_size=64))
    ckpt = {"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    path = tmp_path / "smp.ckpt"
    torch.save(ckpt, path)
    weights.unlink()  # another machine: the file the encoder started from is not there
    model = load_inference_model(path)
    assert model.net.config["encoder_weights"] is None
    for name, value in model.net.state_dict().items():
        assert torch.equal(value, module.net.state_dict()[name]), name
    assert model.hparams["net"]["encoder_weights"] == str(weights)  # the record is kept


# --- row 4 (bad): infer keeps another model's heatmaps --------------------------------------------
CPU = InferenceSettings(num_workers=0, device="cpu", batch_size=8)


def test_a_rerun_with_another_checkpoint_or_downsample_recomputes_and_evaluate_names_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "slides").mkdir()
    slide = _slide(tmp_path / "slides" / "normal_009.tif", tissue=True)
    sure = _checkpoint(tmp_path / "sure.ckpt", seg_bias=6.0)  # p ~ 1 on tissue
    unsure = _checkpoint(tmp_path / "unsure.ckpt", seg_bias=-6.0)  # p ~ 0 everywhere
    out = tmp_path / "heatmaps"
    heat_file = out / "normal_009.heatmap.tif"

    def infer(ckpt: Path, settings: InferenceSettings = CPU) -> str:
        return run_inference(ckpt, [slide], out, settings=settings, progress=False)["normal_009"]

    assert infer(sure) == "done"
    first = read_heatmap(heat_file)
    assert first.probabilities.max() > 0.99
    assert first.source is not None and first.source["checkpoint_sha256"] == sha256(sure)
    assert first.source["settings"]["downsample"] == 32.0
    assert first.source["settings"]["patch_size"] == 64  # the checkpoint's, recorded
    assert infer(sure) == "skipped"  # the same checkpoint and settings: kept
    with caplog.at_level(logging.WARNING, logger="lymphnode.infer"):
        assert infer(unsure) == "done"  # another checkpoint: recomputed, not kept
    second = read_heatmap(heat_file)
    assert second.probabilities.max() < 0.01
    assert second.source is not None and second.source["checkpoint_sha256"] == sha256(unsure)
    warned = [r.getMessage() for r in caplog.records if "recomputed" in r.getMessage()]
    assert warned and "sure.ckpt" in warned[0] and "unsure.ckpt" in warned[0]
    assert infer(unsure, dataclasses.replace(CPU, downsample=16.0)) == "done"
    third = read_heatmap(heat_file)
    assert third.downsample == 16.0 and third.probabilities.shape == (48, 64)
    # evaluate says which checkpoint made each heatmap
    annotations = tmp_path / "annotations"
    annotations.mkdir()
    summary = evaluate(out, annotations, tmp_path / "eval")
    assert summary["slides"][0]["checkpoint_sha256"] == sha256(unsure)
    assert summary["checkpoints"] == [{"checkpoint": str(unsure.resolve()),
                                       "checkpoint_sha256": sha256(unsure),
                                       "slides": ["normal_009"]}]  # fmt: skip


def test_scratch_folders_left_by_a_dead_infer_are_removed_on_the_next_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    host = socket.gethostname()
    stale = out / f".tmp-normal_009-{host}-{int(dead.stdout)}-abc"
    running = out / f".tmp-normal_009-{host}-{os.getpid()}-def"  # a run still going
    other_slide = out / f".tmp-normal_0091-{host}-{int(dead.stdout)}-ghi"
    for folder in (stale, running, other_slide):
        folder.mkdir()
        (folder / "sums.npy").write_bytes(b"x" * 1024)
    with scratch_dir(out, "normal_009") as work:
        assert work.name.startswith(f".tmp-normal_009-{host}-{os.getpid()}-")
    assert not stale.exists()
    assert running.exists() and other_slide.exists()
    assert sorted(p.name for p in out.iterdir()) == sorted([running.name, other_slide.name])


# --- row 5 (bad): export writes outside out_dir; heatmaps without/zero downsample ------------------
def _fake_heatmap(path: Path, **meta: Any) -> Path:
    """A heatmap file whose description holds ``meta`` over the valid one (None: key removed)."""
    description = {"format": "lymphnode-heatmap/1", "slide": path.name.split(".")[0],
                   "downsample": 32.0, "level0_size": [1024, 768], "mpp": 0.243}  # fmt: skip
    description.update(meta)
    description = {k: v for k, v in description.items() if v is not None}
    probabilities = np.zeros((24, 32), np.uint8)
    probabilities[8:12, 10:20] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    write_pyramid(path, probabilities, mpp=None, mask=True, description=json.dumps(description))
    return path


@pytest.mark.parametrize("name", ["../slides/tumor_009", "/tmp/tumor_009", "..", "a\nb"])
def test_export_never_writes_outside_out_dir_whatever_the_heatmap_names(
    tmp_path: Path, slides: Path, name: str
) -> None:
    heatmaps = tmp_path / "heatmaps"
    _fake_heatmap(heatmaps / "tumor_009.heatmap.tif", slide=name)
    out = tmp_path / "out"
    with pytest.raises(EvaluationError, match=r"is not a slide name; expected a file stem"):
        export(heatmaps, slides, out)
    result = cli("lymphnode.export", f"heatmaps={heatmaps}", f"slides={slides}",
                 f"out_dir={out}", cwd=tmp_path)  # fmt: skip
    line = one_error_line(result)
    assert "tumor_009.heatmap.tif" in line and "is not a slide name" in line
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.rglob("*lesions*")) == []


def test_export_refuses_a_heatmap_whose_file_and_slide_names_differ(
    tmp_path: Path, slides: Path
) -> None:
    heatmaps = tmp_path / "heatmaps"
    _fake_heatmap(heatmaps / "tumor_009.heatmap.tif", slide="tumor_010")
    with pytest.raises(EvaluationError, match=r"slide 'tumor_010', not 'tumor_009'; file and"):
        export(heatmaps, slides, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    _fake_heatmap(heatmaps / "tumor_009.heatmap.tif")  # a good one exports under its stem
    (summary,) = export(heatmaps, slides, tmp_path / "out")
    assert summary["slide"] == "tumor_009"
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"tumor_009.lesions.geojson"}


@pytest.mark.parametrize(
    ("meta", "expected"),
    [
        ({"downsample": None}, "downsample=None; expected a finite number >= 1"),
        ({"downsample": 0}, "downsample=0; expected a finite number >= 1"),
        ({"downsample": "32"}, "downsample='32'; expected a finite number >= 1"),
        ({"level0_size": [1024]}, "level0_size=[1024]; expected [width, height]"),
        ({"mpp": -0.25}, "mpp=-0.25; expected null or a finite number > 0"),
    ],
)
def test_a_heatmap_with_a_missing_or_bad_field_is_one_error_line_in_export_and_evaluate(
    tmp_path: Path, slides: Path, meta: dict, expected: str
) -> None:
    heatmaps = tmp_path / "heatmaps"
    path = _fake_heatmap(heatmaps / "normal_009.heatmap.tif", **meta)
    with pytest.raises(EvaluationError, match=re.escape(expected)):
        read_heatmap(path)
    annotations = tmp_path / "annotations"
    annotations.mkdir()
    for module, args in (
        ("lymphnode.export", (f"heatmaps={heatmaps}", f"slides={slides}")),
        ("lymphnode.evaluate", (f"heatmaps={heatmaps}", f"annotations={annotations}")),
    ):
        line = one_error_line(cli(module, *args, f"out_dir={tmp_path / 'out'}", cwd=tmp_path))
        assert str(path) in line and expected in line
    assert not (tmp_path / "out").exists()


# --- row 2 (bad): corrected annotations are ignored by a rerun of prepare -------------------------
def _prepare(root: Path, cache_dir: Path, *extra: str) -> None:
    """prepare's labeled cache of tumor_001 (tumor_002 held out) under ``cache_dir``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lymphnode.prepare import run as prepare_run

    overrides = [f"paths.root={root}", f"paths.cache_dir={cache_dir}", "patch_size=64",
                 "counts.labeled=8", "codec=raw", "workers=0", "caches=[labeled]",
                 "split.test_slides=[tumor_002]", *extra]  # fmt: skip
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("prepare", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()
    prepare_run(cfg)


def _masks(cache: Path) -> np.ndarray:
    from lymphnode.patches.cache import PatchCache

    with PatchCache(cache) as patches:
        return np.stack([patches[i][1] for i in range(len(patches))])


@pytest.mark.parametrize("kind", ["xml", "geojson"])
def test_a_corrected_annotation_rebuilds_its_slide_on_a_rerun_of_prepare(
    tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    import shapely

    from lymphnode.synth import make_slide
    from lymphnode.wsi.annotations import read_asap, write_asap
    from lymphnode.wsi.geojson import polygon_feature, write_geojson

    root = tmp_path / "data"
    for i, name in enumerate(("tumor_001", "tumor_002")):
        xml = root / "annotations" / f"{name}.xml"
        make_slide(root / "slides" / f"{name}.tif", seed=400 + i, tumor=True, size=(2048, 2048),
                   annotation_path=xml)  # fmt: skip
        if kind == "geojson":
            outlines = read_asap(xml).tumor
            write_geojson(xml.with_suffix(".geojson"), [
                polygon_feature(shapely.Polygon(o), name=f"t{k}", id_seed=f"{name}/{k}")
                for k, o in enumerate(outlines)])  # fmt: skip
            xml.unlink()
    caches = tmp_path / "caches"
    _prepare(root, caches)
    before = _masks(caches / "labeled")
    assert before.any()  # tumour patches
    # the pathologist removes the tumour outline of tumor_001 (a false positive in the labels)
    ann = root / "annotations" / f"tumor_001.{kind}"
    if kind == "xml":
        write_asap(ann, tumor=[])
    else:
        write_geojson(ann, [])
    with caplog.at_level(logging.WARNING):
        _prepare(root, caches)
    messages = [r.getMessage() for r in caplog.records]
    after = _masks(caches / "labeled")
    _prepare(root, tmp_path / "fresh")
    assert np.array_equal(after, _masks(tmp_path / "fresh" / "labeled"))  # as a fresh build
    assert not after.any()  # the corrected labels reach the cache
    warned = [m for m in messages if "discarded" in m]
    assert len(warned) == 1 and "tumor_001" in warned[0] and "annotations changed" in warned[0]
    empty = [m for m in messages if "holds no tumour outline" in m]
    assert len(empty) == 1 and str(ann) in empty[0]  # an emptied file is not silent either
    manifest = json.loads((caches / "labeled" / "manifest.json").read_text())
    (record,) = manifest["slides"]
    assert record["inputs"] == {"annotations": ann.name, "annotations_sha256": sha256(ann)}


# --- weak rows: cache import ----------------------------------------------------------------------
def _png(path: Path, side: int = 16) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((side, side, 3), (230, 170, 200), np.uint8)).save(path)
    return path


def test_a_truncated_png_leaves_no_cache_and_cache_info_refuses_an_empty_one(
    tmp_path: Path,
) -> None:
    images = tmp_path / "images"
    good = _png(images / "s1_0_0.png", side=64)
    truncated = images / "s1_64_0.png"
    truncated.write_bytes(good.read_bytes()[:-40])  # the IDAT's tail and IEND cut off
    out = tmp_path / "cache"
    with pytest.raises(CacheError, match=re.escape(f"cannot read image {truncated}")):
        import_patches(images, out)
    assert not out.exists()  # not a 0-slide manifest that `cache info` calls valid
    result = cli("lymphnode.cache", "import", str(images), str(out), cwd=tmp_path)
    assert str(truncated) in one_error_line(result)
    assert not out.exists()
    # an empty cache left by an older lymphnode (or a crash before the first slide) is not valid
    from lymphnode.patches.writer import CacheWriter

    CacheWriter(tmp_path / "empty", {"source": "test"}, codec="raw", patch_size=16,
                has_masks=False)  # fmt: skip
    line = one_error_line(cli("lymphnode.cache", "info", str(tmp_path / "empty"), cwd=tmp_path))
    assert "holds no complete slide (0 patches)" in line and str(tmp_path / "empty") in line


def test_a_coordinate_beyond_int64_in_a_file_name_is_one_error_line(tmp_path: Path) -> None:
    images = tmp_path / "images"
    big = _png(images / "s1_99999999999999999999999_0.png")
    with pytest.raises(CacheError, match=r"x=99999999999999999999999, y=0 .*expected level-0 px"):
        import_patches(images, tmp_path / "cache")
    result = cli("lymphnode.cache", "import", str(images), str(tmp_path / "cli"), cwd=tmp_path)
    assert big.name in one_error_line(result)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "cli").exists()
    _png(images / "s1_99999999999999999999999_0.png").rename(images / f"s1_{2**63 - 1}_0.png")
    assert import_patches(images, tmp_path / "max").index["x"][0] == 2**63 - 1  # the largest


# --- weak row: a slide name prepare cannot use, refused before anything is written ---------------
@pytest.mark.parametrize("name", ["tumor 001", "tumör_001", "tumor\n001"])
def test_prepare_refuses_a_slide_name_before_writing_split_json_or_caches(
    tmp_path: Path, name: str
) -> None:
    root = tmp_path / "data"
    _slide(root / "slides" / "normal_001.tif", tissue=True)
    _slide(root / "slides" / f"{name}.tif", tissue=True)
    caches = tmp_path / "caches"
    result = cli("lymphnode.prepare", f"paths.root={root}", f"paths.cache_dir={caches}",
                 "patch_size=64", "codec=raw", "workers=0", "split.test_slides=[normal_001]",
                 cwd=tmp_path)  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == EXIT_USER_ERROR and "Traceback" not in output, output[-3000:]
    assert "cannot name a cache shard" in output and repr(name) in output
    assert not caches.exists() or not list(caches.rglob("*"))  # no split.json, no manifest


# --- weak rows: train settings that were tracebacks -----------------------------------------------
@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"task": {"optimizer": {"lr": float("nan")}}}, "task.optimizer.lr must be a finite "
         "number > 0, got nan"),
        ({"task": {"optimizer": {"lr": -1}}}, "task.optimizer.lr must be a finite number > 0, "
         "got -1"),
        ({"task": {"optimizer": {"lr": 1e-3, "weight_decay": -0.1}}},
         "task.optimizer.weight_decay must be a finite number >= 0, got -0.1"),
        ({"trainer": {"max_steps": -5}}, "trainer.max_steps must be an integer >= 1, or -1 (no "
         "limit), got -5"),
        ({"trainer": {"max_epochs": 0}}, "trainer.max_epochs must be an integer >= 1, or -1"),
        ({"trainer": {"val_check_interval": 0}}, "trainer.val_check_interval must be an integer "
         ">= 1 batches"),
        ({"trainer": {"val_check_interval": 1.5}}, "trainer.val_check_interval must be a finite "
         "number in (0, 1] of an epoch"),
    ],
)  # fmt: skip
def test_training_numbers_are_refused_naming_the_key(config: dict, expected: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(expected)):
        validate.training(config)


def test_the_default_training_configs_pass_the_training_check() -> None:
    from omegaconf import OmegaConf
    from tiny_runs import compose_train

    for experiment in ("pretrain", "finetune", "scratch"):
        cfg = OmegaConf.to_container(compose_train(f"experiment={experiment}"), resolve=False)
        validate.training(cfg)  # type: ignore[arg-type]
    validate.training({"trainer": {"max_steps": -1, "max_epochs": None,
                                   "val_check_interval": 0.25}})  # fmt: skip


# --- weak row: more patches than a slide has positions ---------------------------------------------
def test_sampling_never_repeats_a_position_and_names_the_cause_when_the_slide_runs_out() -> None:
    from lymphnode.core.errors import SamplingError
    from lymphnode.patches.sampling import sample_patches
    from lymphnode.wsi.tissue import TissueMask

    tissue = TissueMask(np.ones((80, 80), bool), 1.0)  # all tissue, level-0 px
    args = {"slide_size": (80, 80), "patch_size": 64, "seed": 0, "tissue": tissue,
            "annotations": None, "labeled": False, "min_tissue_fraction": 0.0}  # fmt: skip
    found = sample_patches(n=200, **args)  # 17 x 17 = 289 top-left positions fit
    positions = [(p.x, p.y) for p in found]
    assert len(positions) == 200 and len(set(positions)) == 200
    with pytest.raises(SamplingError, match=r"draws repeated a position already taken"):
        sample_patches(n=300, max_tries=20_000, **args)
    assert [(p.x, p.y) for p in sample_patches(n=200, **args)] == positions  # same seed, same


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("split.test_fraction=abc", "split.test_fraction must be a finite number in 0..1"),
        ("split.test_fraction=-0.5", "split.test_fraction must be a finite number in 0..1"),
        ("seed=abc", "seed must be an integer >= 0, got 'abc'"),
    ],
)
def test_prepare_split_settings_are_one_error_line(
    tmp_path: Path, override: str, expected: str
) -> None:
    result = cli("lymphnode.prepare", f"paths.root={tmp_path}", override, cwd=tmp_path)
    assert expected in one_error_line(result)


# --- weak row: a full disk during infer -----------------------------------------------------------
def test_a_full_disk_fails_the_slide_by_name_without_sigbus_or_scratch_left(
    tmp_path: Path, slides: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno as errno_module

    from lymphnode.inference import stitch

    calls = []

    def full(fd: int, offset: int, length: int) -> None:
        calls.append(length)
        raise OSError(errno_module.ENOSPC, "No space left on device")

    monkeypatch.setattr(stitch.os, "posix_fallocate", full)
    ckpt = _checkpoint(tmp_path / "m.ckpt", seg_bias=3.0)
    out = tmp_path / "out"
    status = run_inference(ckpt, [slides / "tumor_009.tif"], out, settings=CPU, progress=False)
    assert status["tumor_009"].startswith(f"failed: cannot write its outputs in {out}")
    assert "sum.npy (No space left on device)" in status["tumor_009"]
    assert calls and calls[0] >= 24 * 32 * 4  # the whole (24, 32) float32 map, allocated up front
    assert list(out.iterdir()) == []  # no scratch folder, no heatmap


# --- weak row: two prepares on the same caches ----------------------------------------------------
def test_a_slide_another_prepare_finished_meanwhile_is_skipped_not_an_error(
    tmp_path: Path,
) -> None:
    from lymphnode.patches.build import PatchSettings, ShardJob, SlideJob, process_slide
    from lymphnode.patches.split import SlideSource
    from lymphnode.patches.writer import CacheWriter

    slide = _slide(tmp_path / "slides" / "normal_001.tif", tissue=True)
    writer = CacheWriter(tmp_path / "unlabeled", {"source": "test"}, codec="raw", patch_size=64,
                         has_masks=False)  # fmt: skip
    source = SlideSource(name="normal_001", path=slide, annotations=None)
    job = SlideJob(source, (ShardJob(cache="unlabeled", writer=writer, n=4, labeled=False),),
                   PatchSettings(patch_size=64, level=0, sampling={"min_tissue_fraction": 0.5}),
                   seed=0)  # fmt: skip
    first = process_slide(job)  # the winner
    assert first.error is None and first.patches == 4
    writer.commit("normal_001", first.done["unlabeled"])
    second = process_slide(job)  # the loser planned the slide before the winner committed it
    assert second.error is None, second.error  # not "already complete ... force=true"
    assert second.done == {} and second.patches == 0
    assert writer.manifest_slides() == ["normal_001"]


# --- weak row: a 200000-deep nested GeoJSON -------------------------------------------------------
def test_a_deeply_nested_geojson_is_an_annotation_error_naming_the_file(tmp_path: Path) -> None:
    from lymphnode.core.errors import AnnotationError
    from lymphnode.wsi.geojson import QupathClasses, read_qupath

    path = tmp_path / "tumor_001.geojson"
    path.write_text('{"type": "FeatureCollection", "features": ' + "[" * 200_000 + "]" * 200_000
                    + "}")  # fmt: skip
    with pytest.raises(AnnotationError, match=re.escape(f"{path}: nested deeper than")):
        read_qupath(path, QupathClasses())


# --- weak row: an outline a few px past the slide's edge -------------------------------------------
def test_an_outline_5px_past_the_edge_is_refused_naming_annotation_tolerance_which_lets_it_pass(
    tmp_path: Path,
) -> None:
    from lymphnode.core.errors import AnnotationError
    from lymphnode.synth import make_slide
    from lymphnode.wsi.annotations import read_asap, write_asap

    root = tmp_path / "data"
    for i, name in enumerate(("tumor_001", "tumor_002")):
        make_slide(root / "slides" / f"{name}.tif", seed=500 + i, tumor=True, size=(2048, 2048),
                   annotation_path=root / "annotations" / f"{name}.xml")  # fmt: skip
    xml = root / "annotations" / "tumor_001.xml"
    corner = np.array([[1900, 1900], [2053, 1900], [2053, 2053], [1900, 2053]], float)
    write_asap(xml, tumor=[*read_asap(xml).tumor, corner])  # 5 px past the right and bottom
    with pytest.raises(AnnotationError) as info:
        _prepare(root, tmp_path / "strict")
    message = str(info.value)
    assert str(xml) in message and "x 1900..2053" in message
    assert "annotation_tolerance=0 level-0 px" in message
    _prepare(root, tmp_path / "tolerant", "annotation_tolerance=8")
    assert len(_masks(tmp_path / "tolerant" / "labeled")) == 8


@pytest.mark.parametrize(
    "override, key",
    [
        ("task.optimizer.lr=nan", "task.optimizer.lr"),
        ("task.optimizer.lr=-1", "task.optimizer.lr"),
        ("trainer.max_steps=-5", "trainer.max_steps"),
        ("trainer.val_check_interval=0", "trainer.val_check_interval"),
    ],
)
def test_train_refuses_bad_training_numbers_in_one_line(
    tmp_path: Path, override: str, key: str
) -> None:
    """Weak row: these gave torch/Lightning tracebacks; now one error line before any run
    folder is written (check_config calls validate.training)."""
    from tiny_runs import write_caches

    caches = write_caches(tmp_path / "caches")
    done = subprocess.run(
        [sys.executable, "-m", "lymphnode.train", "experiment=scratch", f"paths.root={tmp_path}",
         f"paths.cache_dir={caches}", "data.labeled_size=10", "data.folds=5", "logger=none",
         "~callbacks.lr_monitor", "data.num_workers=0", override],
        capture_output=True, text=True, env=cli_env(), timeout=300,
    )  # fmt: skip
    assert done.returncode == EXIT_USER_ERROR, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and key in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(p.is_file() for p in runs.rglob("*"))  # no run written
