"""Filling a preset's timm ViT from the user's local weights file, strictly.

The file is read by :func:`lymphnode.models.weight_files.read_state_dict` (safetensors, or
``torch.load(weights_only=True)``: a pickle payload is refused before it runs). Its key names are
those of the preset's layout:

- ``timm``: timm's own state dict (``patch_embed.proj.weight``, ``blocks.0.attn.qkv.weight``, ...),
  what UNI, UNI2-h, Virchow2, H-optimus-0/1 and Prov-GigaPath publish;
- ``hf_dinov2``: Hugging Face transformers' ``Dinov2Model`` (Phikon-v2): ``embeddings.*``,
  ``encoder.layer.{i}.attention.attention.{query,key,value}`` (transformers 5:
  ``attention.{q,k,v,o}_proj``), ``layer_scale{1,2}.lambda1``, ``mlp.fc1``/``mlp.fc2`` (or SwiGLU's
  ``mlp.weights_in``/``weights_out``; transformers 5: ``mlp.{gate,up,down}_proj``), ``layernorm``;
- ``hf_vit``: transformers' ``ViTModel``: ``layernorm_before``/``layernorm_after``,
  ``intermediate.dense``/``output.dense`` (transformers 5: ``layers.{i}.``, ``mlp.fc1``/``fc2``).

Hugging Face names are mapped to timm's (query/key/value concatenated into timm's fused ``qkv``,
q then k then v along the output dimension; SwiGLU's gate then up into ``mlp.fc1``); a ``dinov2.``/``vit.`` prefix is stripped; names
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
HF_MARKERS = ("encoder.layer.", "layers.", "embeddings.")  # a file in a Hugging Face layout
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
# per-block module names (after "encoder.layer.{i}." in transformers 4, "layers.{i}." in ViTModel
# 5), by layout -> timm's (after "blocks.{i}."); transformers 4 and 5 names both
_ATTENTION_OUT = {"attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj"}
_HF_BLOCK = {
    "hf_dinov2": {
        **_ATTENTION_OUT,
        "norm1": "norm1",
        "norm2": "norm2",
        "layer_scale1": "ls1",
        "layer_scale2": "ls2",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
        "mlp.weights_in": "mlp.fc1",  # Dinov2SwiGLUFFN: silu(x1) * x2 = timm's SwiGLUPacked
        "mlp.weights_out": "mlp.fc2",
        "mlp.down_proj": "mlp.fc2",  # transformers 5's SwiGLU (gate_proj/up_proj: _FUSED)
    },
    "hf_vit": {
        **_ATTENTION_OUT,
        "layernorm_before": "norm1",
        "layernorm_after": "norm2",
        "intermediate.dense": "mlp.fc1",
        "output.dense": "mlp.fc2",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    },
}
# modules whose tensors timm fuses, concatenated along the output dimension in this order:
# attention query/key/value -> attn.qkv; SwiGLU gate/up (silu(gate) * up) -> mlp.fc1
_FUSED: dict[str, tuple[str, int]] = {
    "attention.attention.query": ("attn.qkv", 0),
    "attention.attention.key": ("attn.qkv", 1),
    "attention.attention.value": ("attn.qkv", 2),
    "attention.q_proj": ("attn.qkv", 0),
    "attention.k_proj": ("attn.qkv", 1),
    "attention.v_proj": ("attn.qkv", 2),
    "mlp.gate_proj": ("mlp.fc1", 0),
    "mlp.up_proj": ("mlp.fc1", 1),
}
_FUSED_PARTS = {"attn.qkv": 3, "mlp.fc1": 2}
_LAYER = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias|lambda1)$")


def hf_to_timm(state: Mapping[str, Tensor], layout: str) -> tuple[dict[str, Tensor], list[str]]:
    """``state`` (a Hugging Face ``hf_dinov2``/``hf_vit`` state dict, transformers 4 or 5 names)
    with timm's names; returns it and the dropped keys. Keys no rule knows keep their names (a
    strict load then reports them); fused tensors (qkv, SwiGLU's gate + up) are built only when
    all their parts are there, otherwise the parts keep their names too."""
    if layout not in _HF_BLOCK:
        raise ValueError(f"layout={layout!r} is not a Hugging Face layout ({', '.join(_HF_BLOCK)})")
    table = _HF_BLOCK[layout]
    out: dict[str, Tensor] = {}
    dropped: list[str] = []
    fused: dict[tuple[str, str, str], dict[int, tuple[str, Tensor]]] = {}  # (block, target, leaf)
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
            index, module, leaf = match.groups()
            if module in _FUSED and leaf in ("weight", "bias"):
                target, order = _FUSED[module]
                fused.setdefault((index, target, leaf), {})[order] = (key, value)
                continue
            if module in table:
                timm_leaf = "gamma" if leaf == "lambda1" else leaf
                out[f"blocks.{index}.{table[module]}.{timm_leaf}"] = value
                continue
        out[key] = value  # unknown: kept, reported by the strict load
    for (index, target, leaf), parts in sorted(fused.items()):
        if sorted(parts) == list(range(_FUSED_PARTS[target])):
            tensors = [parts[i][1] for i in sorted(parts)]
            out[f"blocks.{index}.{target}.{leaf}"] = torch.cat(tensors, dim=0)
        else:
            out.update(dict(parts.values()))
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
