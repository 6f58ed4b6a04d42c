"""What a user with a foundation-model weights file types, end to end on tiny data (issue #20):
``lymphnode train experiment=scratch model=vit model.preset=uni model.weights=<file>
task.encoder_lr_scale=0`` -> ``infer`` with the checkpoint alone (the weights file deleted) ->
``select`` -> ``export``, the real CLIs in subprocesses, no network access."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_infer import _slide
from test_vit import DECODER, reference, save_in_layout
from tiny_runs import FINETUNE, TINY, write_caches

from lymphnode.inference.heatmap import read_heatmap

TESTS = Path(__file__).resolve().parent
VIT = ("model=vit", "model.preset=uni", "model.vit_kwargs={embed_dim:48,depth:2,num_heads:3}",
       f"model.decoder_channels=[{','.join(map(str, DECODER))}]")  # fmt: skip
UNET_ONLY = ("model.base_width=4", "model.depth=2")


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                            timeout=300, env=env, check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.mark.slow
def test_a_frozen_vit_from_a_weights_file_fine_tunes_infers_selects_and_exports(
    tmp_path: Path,
) -> None:
    caches = write_caches(tmp_path / "caches")  # 32 px patches at level 1: UNI's patch 16 divides
    encoder = reference("uni", seed=5).state_dict()
    weights = save_in_layout("uni", reference("uni", seed=5), tmp_path)  # timm layout, .bin
    tiny = [o for o in TINY if o not in UNET_ONLY]
    _cli("lymphnode.train", "experiment=scratch", f"paths.root={tmp_path}",
         f"paths.cache_dir={caches}", *tiny, *FINETUNE, *VIT, f"model.weights={weights}",
         "task.encoder_lr_scale=0", "trainer.max_steps=2")  # fmt: skip
    [results_file] = list((tmp_path / "runs").rglob("results.json"))
    results = json.loads(results_file.read_text())
    ckpt_path = Path(results["checkpoints"]["last"])
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    state = ckpt["state_dict"]
    assert ckpt["hyper_parameters"]["encoder_lr_scale"] == 0.0
    for name, value in encoder.items():  # frozen: the file's weights, bit for bit
        assert torch.equal(state[f"net.encoder.{name}"], value), name
    weights.unlink()  # the checkpoint alone from here on

    slides = tmp_path / "slides"
    slides.mkdir()
    _slide(slides / "tumor_009.tif", tissue=True)  # has a level 1, the caches' level
    heatmaps = tmp_path / "heatmaps"
    _cli("lymphnode.infer", f"checkpoint={ckpt_path}", f"slides={slides}",
         f"out_dir={heatmaps}", "num_workers=0", "progress=false")  # fmt: skip
    heat = read_heatmap(heatmaps / "tumor_009.heatmap.tif")
    assert heat.probabilities.shape == (768 // 32, 1024 // 32)
    assert float(heat.probabilities.max()) > 0.0  # tissue tiles were predicted

    chosen = tmp_path / "to_label"
    _cli("lymphnode.select", f"checkpoint={ckpt_path}", f"slides={slides}", f"out_dir={chosen}",
         "k=3", "num_workers=0", "progress=false", "device=cpu")  # fmt: skip
    with open(chosen / "selection.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 3
    assert (chosen / "tumor_009.geojson").is_file()

    exported = tmp_path / "qupath"
    _cli("lymphnode.export", f"heatmaps={heatmaps}", f"slides={slides}", f"out_dir={exported}",
         "thresholds=[0.5]")  # fmt: skip
    lesions = json.loads((exported / "tumor_009.lesions.geojson").read_text())
    assert lesions["type"] == "FeatureCollection"
