"""Reliability, round three (issue 21): rows of infer / select / export / evaluate / prepare /
cache. Indexed from :mod:`test_reliability`; each test names the row it covers.

The checkpoints are built in this process (a width-4 UNet, :func:`test_infer._checkpoint`), the
slides are the 1024 x 768 pyramids of :func:`test_infer._slide`: every test runs in seconds.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from script_tools import cli_env
from test_infer import _checkpoint, _slide

from lymphnode.core.boundary import EXIT_USER_ERROR
from lymphnode.core.errors import CheckpointError
from lymphnode.models.checkpoint import check_task, load_inference_model
from lymphnode.tasks import MultiTaskModule

ENV = cli_env()


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
