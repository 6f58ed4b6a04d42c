"""Filling a preset's timm ViT from the user's local weights file, strictly.

The file is read by :func:`lymphnode.models.weight_files.read_state_dict` (safetensors, or
``torch.load(weights_only=True)``: a pickle payload is refused before it runs). Its key names are
those of the preset's layout:

- ``timm``: timm's own state dict (``patch_embed.proj.weight``, ``blocks.0.attn.qkv.weight``, ...),
  what UNI, UNI2-h, Virchow2, H-optimus-0/1 and Prov-GigaPath publish;
- ``hf_dinov2``: Hugging Face transformers' ``Dinov2Model`` (Phikon-v2): ``embeddings.*``,
  ``encoder.layer.{i}.attention.attention.{query,key,value}``, ``layer_scale{1,2}.lambda1``,
  ``mlp.fc1``/``mlp.fc2`` (or SwiGLU's ``mlp.weights_in``/``weights_out``), ``layernorm``;
- ``hf_vit``: transformers' ``ViTModel``: ``layernorm_before``/``layernorm_after``,
  ``intermediate.dense``/``output.dense``.

Hugging Face names are mapped to timm's (query/key/value concatenated into timm's fused ``qkv``,
q then k then v along the output dimension); a ``dinov2.``/``vit.`` prefix is stripped; names
already timm's pass unchanged (a Hugging Face preset also takes a file converted to timm). Dropped,
and logged: classifier/pooler tensors (``head.*``, ``classifier.*``, ``pooler.*``) and Dinov2's
``embeddings.mask_token`` (its masked-image-modelling token, unused by a forward pass); with a
reduced ``depth`` (``model.depth``), the blocks beyond it. Everything else must match the model
exactly -- every tensor present, with its shape, and no other key -- or one ConfigError names the
file, the preset and the first offending keys, and nothing is copied.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from lymphnode.core.errors import ConfigError
from lymphnode.models.weight_files import describe_problems, read_state_dict

log = logging.getLogger(__name__)

DROPPED_PREFIXES = ("head.", "classifier.", "pooler.")  # heads a feature extractor has no use for
HF_PREFIXES = ("dinov2.", "vit.")  # *ForImageClassification wrappers
HF_MARKERS = ("encoder.layer.", "embeddings.")  # a file in a Hugging Face layout
_HF_EMBEDDINGS = {
    "embeddings.cls_token": "cls_token",
    "embeddings.register_tokens": "reg_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_HF_DROPPED = ("embeddings.mask_token",)
# per-block names (after "encoder.layer.{i}."), by layout -> timm's (after "blocks.{i}.")
_HF_BLOCK = {
    "hf_dinov2": {
        "norm1": "norm1",
        "norm2": "norm2",
        "attention.output.dense": "attn.proj",
        "layer_scale1.lambda1": "ls1.gamma",
        "layer_scale2.lambda1": "ls2.gamma",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
        "mlp.weights_in": "mlp.fc1",  # Dinov2SwiGLUFFN: silu(x1) * x2 = timm's SwiGLUPacked
        "mlp.weights_out": "mlp.fc2",
    },
    "hf_vit": {
        "layernorm_before": "norm1",
        "layernorm_after": "norm2",
        "attention.output.dense": "attn.proj",
        "intermediate.dense": "mlp.fc1",
        "output.dense": "mlp.fc2",
    },
}
_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)$")
_QKV = ("query", "key", "value")


def _rename_block(layout: str, index: str, inner: str, leaf: str) -> str | None:
    table = _HF_BLOCK[layout]
    if leaf == "lambda1":
        inner, leaf = f"{inner}.lambda1", ""
    target = table.get(inner)
    if target is None:
        return None
    return f"blocks.{index}.{target}" + (f".{leaf}" if leaf else "")


def hf_to_timm(state: Mapping[str, Tensor], layout: str) -> tuple[dict[str, Tensor], list[str]]:
    """``state`` (a Hugging Face ``hf_dinov2``/``hf_vit`` state dict) with timm's names; returns
    it and the dropped keys. Keys no rule knows keep their names (a strict load then reports
    them); a block's query/key/value are fused only when all three are there."""
    if layout not in _HF_BLOCK:
        raise ValueError(f"layout={layout!r} is not a Hugging Face layout ({', '.join(_HF_BLOCK)})")
    out: dict[str, Tensor] = {}
    dropped: list[str] = []
    qkv: dict[tuple[str, str], dict[str, tuple[str, Tensor]]] = {}  # (block, leaf) -> q/k/v
    for key, value in state.items():
        name = key
        for prefix in HF_PREFIXES:
            name = name.removeprefix(prefix)
        if name in _HF_DROPPED or name.startswith(DROPPED_PREFIXES):
            dropped.append(key)
            continue
        if name in _HF_EMBEDDINGS:
            out[_HF_EMBEDDINGS[name]] = value
            continue
        match = _LAYER.match(name)
        if match:
            index, inner, leaf = match.groups()
            part = inner.removeprefix("attention.attention.")
            if part in _QKV and leaf in ("weight", "bias"):
                qkv.setdefault((index, leaf), {})[part] = (key, value)
                continue
            renamed = _rename_block(layout, index, inner, leaf)
            if renamed is not None:
                out[renamed] = value
                continue
        out[key] = value  # unknown: kept, reported by the strict load
    for (index, leaf), parts in sorted(qkv.items()):
        if set(parts) == set(_QKV):
            out[f"blocks.{index}.attn.qkv.{leaf}"] = torch.cat([parts[p][1] for p in _QKV], dim=0)
        else:
            out.update({key: value for key, value in parts.values()})
    return out, dropped


def _layout_hint(keys: list[str], layout: str) -> str:
    hf = any(k.startswith(HF_MARKERS) or k.startswith(HF_PREFIXES) for k in keys)
    if hf and layout == "timm":
        return "; the file looks like a Hugging Face transformers file, this preset expects timm's"
    if not hf and layout != "timm" and any(k.startswith("blocks.") for k in keys):
        return f"; the file looks like a timm file, this preset expects the {layout} layout"
    return ""


def load_vit_weights(
    vit: nn.Module,
    path: str | Path,
    *,
    preset: str,
    layout: str = "timm",
    truncated: bool = False,
) -> list[str]:
    """Copy the local weights file ``path`` into the timm ViT ``vit`` (built for ``preset``) in
    place, strictly; returns the dropped keys (module docstring).

    ``layout`` names the file's key names (``timm``, ``hf_dinov2``, ``hf_vit``). ``truncated``:
    ``vit`` keeps only the first ``len(vit.blocks)`` blocks of the model the file holds
    (``model.depth``), so the file's deeper blocks are dropped; otherwise they are unexpected.
    """
    path = Path(path)
    state = read_state_dict(path, "weights")
    hint = _layout_hint(list(state), layout)
    dropped: list[str] = []
    if layout != "timm":
        state, dropped = hf_to_timm(state, layout)
    kept_blocks = len(getattr(vit, "blocks", ()))
    for key in list(state):
        block = re.match(r"^blocks\.(\d+)\.", key)
        deeper = truncated and block is not None and int(block.group(1)) >= kept_blocks
        if deeper or key.startswith(DROPPED_PREFIXES):
            dropped.append(key)
            del state[key]
    mine = vit.state_dict()
    shapes = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(mine[k].shape)}"
        for k, v in state.items()
        if k in mine and tuple(v.shape) != tuple(mine[k].shape)
    ]
    unexpected = [k for k in state if k not in mine]
    missing = [k for k in mine if k not in state]
    problems = [
        *shapes,
        *(f"unexpected {k}" for k in unexpected),
        *(f"missing {k}" for k in missing),
    ]
    if problems:
        raise ConfigError(
            f"weights={path} does not fit model.preset={preset} ({type(vit).__name__}, "
            f"{len(mine)} tensors, {layout} layout): {len(missing)} missing, {len(unexpected)} "
            f"unexpected, {len(shapes)} of another shape{hint}:{describe_problems(problems)}"
        )
    vit.load_state_dict(state, strict=True)
    if dropped:
        log.info("weights %s: dropped %d keys (%s)", path, len(dropped), ", ".join(dropped[:5]))
    log.info("weights %s: loaded %d tensors into preset %s", path, len(state), preset)
    return dropped


__all__ = ["hf_to_timm", "load_vit_weights"]
