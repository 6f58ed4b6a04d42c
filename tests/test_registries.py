"""A new network and a new pretext task are one module + one YAML each, outside lymphnode/.

tests/toy/ holds both (toy_lymphnode.py: ``ToyNet``, ``DenoisePretext``; conf/model/toy.yaml, conf/task/toy.yaml,
conf/pretext/toy.yaml). The real CLIs pretrain with them, fine-tune from that checkpoint and infer
with the fine-tuned one, with the toy configs reached through ``hydra.searchpath`` and the module
through PYTHONPATH only.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_infer import _slide
from tiny_runs import _write_cache

from lymphnode.inference.heatmap import read_heatmap

TOY = Path(__file__).resolve().parent / "toy"
SEARCHPATH = f"hydra.searchpath=[file://{TOY / 'conf'}]"
RUN = (
    "trainer=cpu",
    "trainer.max_epochs=2",
    "trainer.num_sanity_val_steps=0",
    "trainer.log_every_n_steps=1",
    "trainer.enable_model_summary=false",
    "model=toy",
    "data.batch_size=4",
    "data.num_workers=0",
    "logger=csv",
    "callbacks.progress_bar.refresh_rate=0",
)


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    path = os.pathsep.join([str(TOY), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                            timeout=300, env=env, check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.mark.slow
def test_toy_network_and_pretext_pretrain_finetune_and_infer(tmp_path: Path) -> None:
    caches = tmp_path / "caches"
    _write_cache(caches / "unlabeled", ["normal_001"], 24, masks=False, seed=1)
    _write_cache(caches / "labeled", ["tumor_001", "tumor_002"], 12, masks=True, seed=2)
    _write_cache(caches / "test", ["tumor_003"], 8, masks=True, seed=3)
    paths = (f"paths.root={tmp_path}", f"paths.cache_dir={caches}")

    _cli("lymphnode.train", "experiment=pretrain", "pretext=toy", SEARCHPATH, *paths, *RUN)
    # the pretext's and the network's folder (a network other than the paper's UNet: @<class>)
    pretrain = tmp_path / "runs" / "pretrain-toy@toynet" / "checkpoints" / "best.ckpt"
    ckpt = torch.load(pretrain, map_location="cpu", weights_only=True)
    assert ckpt["lymphnode"]["task_target"] == "toy_lymphnode.DenoisePretext"
    assert ckpt["hyper_parameters"]["net"] == {"_target_": "toy_lymphnode.ToyNet", "width": 4}
    assert (
        "val/denoise_mse"
        in (tmp_path / "runs" / "pretrain-toy@toynet" / "csv" / "metrics.csv").read_text()
    )

    result = _cli("lymphnode.train", "experiment=finetune", "pretext=toy", SEARCHPATH, *paths, *RUN,
                  "data.labeled_size=10", "data.folds=5")  # fmt: skip
    output = result.stdout + result.stderr
    assert "initialised from pretrained" in output and "loaded 6 tensors" in output
    finetuned = tmp_path / "runs" / "pretrained-toy@toynet" / "size10" / "fold0" / "seed0"
    best = finetuned / "checkpoints" / "best.ckpt"
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    assert ckpt["lymphnode"]["task_target"] == "lymphnode.tasks.multitask.MultiTaskModule"
    assert ckpt["hyper_parameters"]["net"]["_target_"] == "toy_lymphnode.ToyNet"

    slides = tmp_path / "slides"
    slides.mkdir()
    _slide(slides / "tumor_009.tif", tissue=True)  # has a level 1, the caches' level
    out = tmp_path / "heatmaps"
    _cli("lymphnode.infer", f"checkpoint={best}", f"slides={slides}", f"out_dir={out}",
         "num_workers=0", "progress=false", "trusted_modules=[toy_lymphnode]")  # fmt: skip
    heatmap = read_heatmap(out / "tumor_009.heatmap.tif")
    assert heatmap.probabilities.shape == (768 // 32, 1024 // 32)
    assert float(heatmap.probabilities.max()) > 0.0  # tissue tiles were predicted
