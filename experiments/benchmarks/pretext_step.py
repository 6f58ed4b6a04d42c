"""Pretraining throughput per pretext task: patches/s of one optimizer step, ratios to reconstruction.

Every pretext trains the same network (lymphnode.models.UNet, or ``--net smp_unet``) on the same
in-memory batches of normalised patches (random low-frequency images; the data pipeline is not
measured — the contrastive pretext's second view is a second tensor here, so its augmentation cost
is in the data benchmark, not in these figures). A step is the task's own ``training_step`` +
backward + AdamW, timed after ``--warmup`` steps; the pretexts are run ``--repeats`` times,
interleaved, and the median is reported with the ratio to ``reconstruction`` measured in the same
run. The contrastive pretext counts patches, not views (two encoder passes per patch).

    .venv/bin/python experiments/benchmarks/pretext_step.py                     # CPU, width 8, 128 px
    .venv/bin/python experiments/benchmarks/pretext_step.py --device cuda --base-width 64 \
        --patch-size 256 --batch-size 32 --steps 30                           # a GPU

Prints one line per pretext; ``--json`` writes the figures too.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lymphnode.tasks import ContrastiveModule, MaskedModule, ReconstructionModule, StainModule

PRETEXTS: dict[str, Callable[..., Any]] = {
    "reconstruction": ReconstructionModule,
    "masked": MaskedModule,
    "contrastive": ContrastiveModule,
    "dense_contrastive": functools.partial(ContrastiveModule, dense_weight=0.5),  # + DenseCL term
    "stain": StainModule,
}


def batches(n: int, batch_size: int, size: int, device: str) -> list[dict[str, torch.Tensor]]:
    """``n`` batches of low-frequency images (B, 3, size, size) in -1..1 and a second view."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        coarse = torch.rand(batch_size, 3, 8, 8, generator=g) * 2 - 1
        image = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
        out.append({"image": image.to(device), "image2": image.flip(-1).to(device)})
    return out


def time_pretext(name: str, args: argparse.Namespace) -> float:
    """Patches/s of ``args.steps`` training steps of pretext ``name`` after the warm-up."""
    if args.net == "unet":
        net = {"_target_": "lymphnode.models.UNet", "base_width": args.base_width, "depth": 4}
    else:
        net = {"_target_": "lymphnode.models.SmpUNet", "encoder": args.encoder}
    contract = {
        "level": 0,
        "patch_size": args.patch_size,
        "normalize": {"mean": [0.5] * 3, "std": [0.5] * 3},
    }
    module = PRETEXTS[name](net=net, preprocess=contract, log_images_every_n_epochs=0)
    module.log = lambda *a, **k: None  # type: ignore[method-assign]  # no trainer here
    module.to(args.device)
    if args.channels_last:
        module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    data = batches(args.warmup + args.steps, args.batch_size, args.patch_size, args.device)

    def step(batch: dict[str, torch.Tensor], i: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = module.training_step(batch, i)
        loss.backward()
        optimizer.step()

    for i in range(args.warmup):
        step(data[i], i)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(args.warmup, len(data)):
        step(data[i], i)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return args.steps * args.batch_size / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretexts", nargs="+", choices=list(PRETEXTS), default=list(PRETEXTS))
    parser.add_argument("--net", choices=["unet", "smp_unet"], default="unet")
    parser.add_argument("--encoder", default="resnet18", help="smp_unet's encoder")
    parser.add_argument("--base-width", type=int, default=8)
    parser.add_argument("--patch-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    torch.manual_seed(0)
    runs: dict[str, list[float]] = {name: [] for name in args.pretexts}
    for _ in range(args.repeats):  # interleaved: slow drifts of a shared machine hit all alike
        for name in args.pretexts:
            runs[name].append(time_pretext(name, args))
    medians = {name: statistics.median(v) for name, v in runs.items()}
    base = medians.get("reconstruction")
    print(
        f"{args.net} width {args.base_width} | {args.patch_size} px | batch {args.batch_size} | "
        f"{args.device} | torch {torch.__version__} threads {torch.get_num_threads()}"
    )
    for name, value in medians.items():
        ratio = f"  {value / base:.2f}x reconstruction" if base else ""
        spread = f"{min(runs[name]):.1f}-{max(runs[name]):.1f}"
        print(f"  {name:18s} {value:8.1f} patches/s (runs {spread}){ratio}")
    if args.json is not None:
        record = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "machine": platform.platform(),
            "patches_per_s": runs,
            "median": medians,
        }
        args.json.write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
