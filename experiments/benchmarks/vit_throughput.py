"""Throughput and peak memory of ``model=vit`` per preset (ViTUNet: encoder + decoder + heads).

For every preset, a randomly initialised ViTUNet (no weights file is needed: the cost does not
depend on the weights) runs ``--steps`` timed batches of ``--batch`` tiles of ``--size`` px after
``--warmup`` batches; the fastest batch counts (robust to other work on a shared machine). Two
modes:

- ``infer``: forward only, ``torch.inference_mode`` (what whole-slide inference costs per tile);
- ``train``: forward + backward + AdamW step on BCE (fine-tuning the whole network).

CPU (default): the full models are too slow to time here (a ViT-g block costs ~15 GFLOP per
224 px tile), so the network runs with ONE transformer block (patch embedding, one block, necks,
decoder, heads) and one block is timed alone on the tokens of the same batch (with the input
gradient and its AdamW step in ``train``); the full-depth figure is the sum, 1-block network +
(blocks - 1) x block, labelled ``est.`` (every block of a ViT costs the same). GPU (``--device
cuda``, or ``--full-depth`` on the CPU): the full-depth network is measured directly.

GFLOP/tile: the full-depth network's forward, counted by torch's FlopCounterMode (2 per
multiply-add) on the meta device. Peak memory: on the CPU the peak RSS of a fresh child process
per preset and mode (the 1-block network: NOT the full model's; with ``--full-depth``, the full
model's); on CUDA ``torch.cuda.max_memory_allocated`` of the full-depth run.
Prints Markdown.

    python experiments/benchmarks/vit_throughput.py                      # CPU, 1 thread
    python experiments/benchmarks/vit_throughput.py --presets uni virchow2 --threads 2
    python experiments/benchmarks/vit_throughput.py --device cuda --batch 32 --dtype bf16
    python experiments/benchmarks/vit_throughput.py --full-depth --presets uni --modes infer

Measured on this machine's CPU (2 shared cores, 1 thread; numbers vary ~30% with the load): the
full-depth UNI network at 0.34 tiles/s against 0.25-0.38 estimated from the 1-block runs.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import resource
import time
from collections.abc import Callable
from typing import Any

PRESETS = ("uni", "uni2_h", "virchow2", "h_optimus_0", "h_optimus_1", "prov_gigapath", "phikon_v2")
PATCH_14 = ("uni2_h", "virchow2", "h_optimus_0", "h_optimus_1")
MODES = ("infer", "train")


def _best_seconds(step: Callable[[], None], args: argparse.Namespace, cuda: bool) -> float:
    """The fastest of ``args.steps`` timed calls of ``step`` after ``args.warmup`` untimed."""
    import torch

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def _gflop_per_tile(preset: str, size: int) -> float:
    """Forward GFLOP (2 per multiply-add) of the full-depth network on one tile, counted by
    torch's FlopCounterMode on the meta device (shapes only: nothing is allocated or run)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from lymphnode.models import ViTUNet

    with torch.device("meta"):
        net = ViTUNet(preset, recon=False)
        x = torch.randn(1, 3, size, size)
    with FlopCounterMode(display=False) as counter:
        net(x)
    return counter.get_total_flops() / 1e9


def _measure(preset: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """Seconds per batch of the network (at ``depth``) and, on the CPU, of one block alone."""
    import torch
    import torch.nn.functional as F

    from lymphnode.models import ViTUNet
    from lymphnode.models.vit_presets import PRESETS as TABLE

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    full = TABLE[preset].blocks
    depth = full if args.full_depth else 1
    torch.manual_seed(0)
    net = ViTUNet(preset, depth=depth, recon=False).to(device)
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = (torch.rand(args.batch, 1, args.size, args.size, device=device) > 0.5).float()
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def stepper(module: torch.nn.Module, inputs: torch.Tensor, loss_of: Callable) -> Callable:
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5) if mode == "train" else None

        def step() -> None:
            if optimizer is None:
                with torch.inference_mode(), autocast():
                    module.eval()(inputs)
                return
            with autocast():
                loss = loss_of(module.train()(inputs))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    def seg_loss(out: Any) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(out.seg.float(), y)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    result: dict[str, Any] = {"depth": depth, "full": full}
    result["net"] = _best_seconds(stepper(net, x, seg_loss), args, cuda)
    result["cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    if (
        not args.full_depth
    ):  # one block alone, on the tokens of this batch (class/register tokens included)
        vit = net.encoder
        grid = (args.size // net.patch_size) ** 2
        tokens = torch.randn(args.batch, vit.num_prefix_tokens + grid, vit.embed_dim)
        tokens.requires_grad_(mode == "train")  # the full network back-propagates through it
        block = vit.blocks[0]
        result["block"] = _best_seconds(
            stepper(block, tokens, lambda out: out.float().square().mean()), args, cuda
        )
    return result


def _child(preset: str, mode: str, args: argparse.Namespace, queue: Any) -> None:
    import torch

    torch.set_num_threads(args.threads)
    result = _measure(preset, mode, args)
    result["rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    result["gflop"] = _gflop_per_tile(preset, args.size)
    queue.put(result)


def run(preset: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """Measure one preset and mode in a fresh process (its own peak RSS)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(preset, mode, args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    if proc.exitcode:
        raise SystemExit(f"error: the {preset} {mode} run failed (exit code {proc.exitcode})")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--batch", type=int, default=2, help="tiles per batch")
    parser.add_argument(
        "--size", type=int, default=224, help="tile side in px (224: 14 and 16 divide it)"
    )
    parser.add_argument("--steps", type=int, default=4, help="timed batches (the fastest counts)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (cpu)")
    parser.add_argument(
        "--dtype",
        default="fp32",
        choices=("fp32", "bf16", "fp16"),
        help="autocast dtype (fp32: none)",
    )
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument(
        "--full-depth",
        action="store_true",
        help="time the full-depth network (the default with --device cuda)",
    )
    args = parser.parse_args()  # fmt: skip
    args.full_depth = args.full_depth or args.device == "cuda"
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda: no CUDA GPU is visible to torch")
    for p in args.presets:
        patch = 14 if p in PATCH_14 else 16
        if args.size % patch:
            raise SystemExit(f"error: --size {args.size} is not a multiple of {p}'s patch size "
                             f"{patch} px; use 224 or 448")  # fmt: skip
    print(
        f"# ViTUNet throughput: {args.device} ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, {args.threads} torch thread(s)), batch {args.batch} x "
        f"{args.size} px, {args.dtype}, fastest of {args.steps} batches after {args.warmup}\n"
    )
    if args.full_depth:
        print("| preset | mode | blocks | GFLOP/tile fwd | tiles/s | peak MiB |")
        print("|---|---|---|---|---|---|")
    else:
        print("| preset | mode | blocks | GFLOP/tile fwd | tiles/s, 1-block network | "
              "ms/tile per block | tiles/s full depth | peak RSS MiB (1 block) |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|")
    for preset in args.presets:
        for mode in args.modes:
            r = run(preset, mode, args)
            if args.full_depth:
                rate = args.batch / r["net"]
                peak = r["cuda_mib"] if r["cuda_mib"] is not None else r["rss_mib"]
                print(f"| {preset} | {mode} | {r['full']} | {r['gflop']:.0f} | {rate:.2f} | "
                      f"{peak:.0f} |")  # fmt: skip
                continue
            per_block = r["block"] / args.batch  # seconds per tile
            whole = r["net"] / args.batch + (r["full"] - 1) * per_block
            print(f"| {preset} | {mode} | {r['full']} | {r['gflop']:.0f} | {args.batch / r['net']:.2f} | "
                  f"{per_block * 1e3:.0f} | {1 / whole:.3f} est. | {r['rss_mib']:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
