#!/usr/bin/env bash
# Minutes per CAMELYON-sized slide on one GPU (issue 5, Performance), in one go.
#
# What it runs (see README_infer.md, "GPU"): experiments/benchmarks/infer.py slide on a synthetic
# 100k x 200k level-0 slide with ~30 % tissue, 300-px tiles at level 0, a UNet of width 64 and
# depth 4 (random weights), bf16 + channels_last, end to end through lymphnode.infer's
# run_inference, plus the read-only and compute-only rates; then the compute-only rate with 8-way
# TTA. About 3-5 minutes on an H100 (most of it writing the slide and the end-to-end run).
#
#   here, once, where PyPI is reachable:   bash experiments/benchmarks/gpu_infer.sh --fetch-wheels
#       downloads the packages the GPU image lacks (OpenSlide, imagecodecs, Hydra, ...) into .whl/
#       (ignored by git through .git/info/exclude) for Python 3.12 / manylinux x86-64.
#   on the GPU machine (device tool: carry [".whl"], timeout_s 600):
#       bash experiments/benchmarks/gpu_infer.sh
#   dry run on a CPU (tiny slide and model, minutes):
#       bash experiments/benchmarks/gpu_infer.sh --tiny
#
# Figures: printed (Markdown) and, with $OUT set (the device tool's folder), $OUT/infer_slide*.json
# and $OUT/infer_slide.md. Environment: PYTHON (default: .venv/bin/python if it has torch, else
# python3), WORKDIR (synthetic slide and outputs, default /tmp/lnbench; reused when present).
set -euo pipefail
cd "$(dirname "$0")/../.."

WHEELS=.whl
# what lymphnode's inference path imports that the GPU image lacks (versions as in .venv)
PINNED=(openslide-python==1.4.7 openslide-bin==4.0.1.2 imagecodecs==2026.3.6 hydra-core==1.3.8
        omegaconf==2.3.1 defusedxml==0.7.1)
SDIST_ONLY=(antlr4-python3-runtime==4.9.3)  # omegaconf's parser: no wheel on PyPI, built here

mode=gpu
case "${1:-}" in
  --fetch-wheels) mode=fetch ;;
  --tiny) mode=tiny ;;
  "") ;;
  *) echo "usage: $0 [--fetch-wheels | --tiny]" >&2; exit 2 ;;
esac

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]] && .venv/bin/python -c "import torch" 2>/dev/null; then
    PYTHON=.venv/bin/python
  else
    PYTHON=python3
  fi
fi

if [[ $mode == fetch ]]; then
  mkdir -p "$WHEELS"
  grep -qx "/$WHEELS/" .git/info/exclude 2>/dev/null || echo "/$WHEELS/" >> .git/info/exclude
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d "$WHEELS" "${PINNED[@]}"
  "$PYTHON" -m pip wheel -q --no-deps -w "$WHEELS" "${SDIST_ONLY[@]}"
  ls -l "$WHEELS"
  du -sh "$WHEELS"
  exit 0
fi

if compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/lnsite "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/lnsite${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # lymphnode from this tree (not installed there)
export PYTHONUNBUFFERED=1 WANDB_MODE=offline

if ! "$PYTHON" -c "import torch, openslide, imagecodecs, hydra, omegaconf, defusedxml, tifffile, \
cv2, psutil, lymphnode.infer" 2>/tmp/lnbench-import.err; then
  echo "missing Python packages for $PYTHON:" >&2
  tail -n 3 /tmp/lnbench-import.err >&2
  echo "run 'bash $0 --fetch-wheels' where PyPI is reachable and carry .whl" >&2
  exit 2
fi
"$PYTHON" -c "import torch; print('# torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name() if torch.cuda.is_available() else '')"

OUT=${OUT:-}
WORKDIR=${WORKDIR:-/tmp/lnbench}
json() { [[ -n $OUT ]] && echo "--json $OUT/$1" || true; }

if [[ $mode == tiny ]]; then
  # shellcheck disable=SC2046
  "$PYTHON" experiments/benchmarks/infer.py slide --tiny --device cpu --workdir "$WORKDIR-tiny" \
    $(json infer_slide_tiny.json)
  exit 0
fi

if ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "no CUDA GPU visible to $PYTHON: use --tiny for a CPU dry run" >&2
  exit 3
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
log=${OUT:-$WORKDIR}/infer_slide.md
mkdir -p "$(dirname "$log")" "$WORKDIR"
# 1. end to end + components, no TTA (the headline: minutes per slide)
# shellcheck disable=SC2046
"$PYTHON" experiments/benchmarks/infer.py slide --device cuda --bf16 --channels-last \
  --batch-size 64 --workdir "$WORKDIR" $(json infer_slide.json) 2>&1 | tee "$log"
# 2. 8-way TTA: compute-only rate on the same slide (8x the model work per tile)
# shellcheck disable=SC2046
"$PYTHON" experiments/benchmarks/infer.py slide --device cuda --bf16 --channels-last --tta \
  --batch-size 64 --skip-e2e --component-tiles 2048 --workdir "$WORKDIR" \
  $(json infer_slide_tta.json) 2>&1 | tee -a "$log"
