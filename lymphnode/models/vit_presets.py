"""Pathology foundation-model ViTs by preset: their timm architecture and quirks, normalisation,
resolution, weight-file layout, licence and where the weights come from.

A preset is what a user types (``model=vit model.preset=uni model.weights=UNI.bin``); this module
turns it into a randomly initialised timm ``VisionTransformer`` (``pretrained=False``: timm never
downloads anything) that :func:`lymphnode.models.vit_weights.load_vit_weights` then fills from the
user's local file. Every preset's kwargs are the ones its authors publish for
``timm.create_model`` (model cards and their ``config.json``), checked against timm 1.0's
entrypoints:

=============  ==============================  ======  ========  =====================  =========
preset         timm architecture               patch   regs      MLP                    layer-
                                                                                        scale
=============  ==============================  ======  ========  =====================  =========
uni            vit_large_patch16_224           16      0         GELU, ratio 4          1e-5
uni2_h         vit_giant_patch14_224 (1536 d,  14      8 (no     SwiGLUPacked + SiLU,   1e-5
               24 blocks, 24 heads)                    pos emb)  ratio 5.33334
virchow2       vit_huge_patch14_224            14      4         SwiGLUPacked + SiLU,   1e-5
                                                                 ratio 5.3375
h_optimus_0    vit_giant_patch14_reg4_dinov2   14      4 (no     SwiGLUPacked + SiLU    1e-5
                                                       pos emb)  (the entrypoint's)
h_optimus_1    vit_giant_patch14_reg4_dinov2   14      4         as h_optimus_0         1e-5
prov_gigapath  vit_giant_patch14_dinov2 with   **16**  0         SwiGLUPacked + SiLU    1e-5
               patch_size=16                                     (the entrypoint's)
phikon_v2      vit_large_patch16_224, from     16      0         GELU, ratio 4          yes
               Hugging Face Dinov2 layout
=============  ==============================  ======  ========  =====================  =========

All are built at ``img_size=224`` (the size their position embeddings were stored at) with
``dynamic_img_size=True`` (the position embeddings are resampled to any input whose sides the
patch size divides), ``num_classes=0`` and no pooling. ``preset=timm`` takes any timm
VisionTransformer by ``arch`` (its ImageNet mean/std from timm's own config, no resolution).

Layer classes are named in the kwargs (``mlp_layer: swiglu_packed``, ``act_layer: silu``) and
resolved from the fixed tables :data:`MLP_LAYERS` / :data:`ACT_LAYERS`: a config or checkpoint
never names code.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from lymphnode.core.errors import ConfigError

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BIOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)  # H-optimus-0/1 model cards
BIOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
VIT_MODULES = ("vision_transformer", "deit")  # timm modules whose models are VisionTransformers
LAYOUTS = ("timm", "hf_dinov2", "hf_vit")  # see lymphnode.models.vit_weights
ALWAYS = {"num_classes": 0, "global_pool": "", "dynamic_img_size": True}  # every preset's build
# kwargs a preset or model.vit_kwargs may not set: they are ALWAYS's, or code
NOT_SETTABLE = (
    *ALWAYS,
    "pretrained",
    "embed_layer",
    "block_fn",
    "attn_layer",
    "norm_layer",
    "embed_norm_layer",
    "device",
    "dtype",
    "weight_init",
)


def _mlp_layers() -> dict[str, Any]:  # classes and functools.partials of timm's
    from timm.layers import GluMlp, Mlp, SwiGLU, SwiGLUPacked

    return {"mlp": Mlp, "swiglu_packed": SwiGLUPacked, "swiglu": SwiGLU, "glu": GluMlp}


MLP_LAYERS = ("mlp", "swiglu_packed", "swiglu", "glu")  # timm.layers Mlp / SwiGLUPacked / ...
ACT_LAYERS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "silu": nn.SiLU, "relu": nn.ReLU}


@dataclass(frozen=True)
class ViTPreset:
    """One foundation model: how to build it and where its weights come from.

    Attributes:
        name: the preset, as ``model.preset`` names it.
        arch: timm architecture (None for ``timm``: the user's ``model.arch``).
        kwargs: ``timm.create_model`` keyword arguments (plain data; layer classes by name).
        mean, std: RGB normalisation of inputs in 0..1 that the model was trained with.
        mpp: µm/px of the tiles it was trained at (None: unknown).
        layout: key names in its published weights file: ``timm`` (timm's state dict),
            ``hf_dinov2`` / ``hf_vit`` (Hugging Face transformers' Dinov2Model / ViTModel).
        licence: the weights' licence (SPDX id or the model card's wording).
        source: where a user gets the weights (a Hugging Face repository).
        gated: whether the repository asks the user to log in and accept conditions first.
        weights_file: the file to download from ``source``.
        blocks: transformer blocks of the published model (None for ``timm``).
        note: what else a user should know.
    """

    name: str
    arch: str | None
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    mpp: float | None = None
    layout: str = "timm"
    licence: str = ""
    source: str = ""
    gated: bool = False
    weights_file: str = ""
    blocks: int | None = None
    note: str = ""


_DINOV2_GIANT = {"img_size": 224, "init_values": 1e-5}
PRESETS: dict[str, ViTPreset] = {
    p.name: p
    for p in (
        ViTPreset(
            name="uni",
            arch="vit_large_patch16_224",
            kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5},
            mpp=0.5,
            licence="CC-BY-NC-ND-4.0",
            source="https://huggingface.co/MahmoodLab/UNI",
            gated=True,
            weights_file="pytorch_model.bin",
            blocks=24,
            note="trained on 256 px tiles at 20x (~0.5 µm/px)",
        ),
        ViTPreset(
            name="uni2_h",
            arch="vit_giant_patch14_224",
            kwargs={
                "img_size": 224,
                "patch_size": 14,
                "depth": 24,
                "num_heads": 24,
                "init_values": 1e-5,
                "embed_dim": 1536,
                "mlp_ratio": 2.66667 * 2,
                "no_embed_class": True,
                "mlp_layer": "swiglu_packed",
                "act_layer": "silu",
                "reg_tokens": 8,
            },
            mpp=0.5,
            licence="CC-BY-NC-ND-4.0",
            source="https://huggingface.co/MahmoodLab/UNI2-h",
            gated=True,
            weights_file="pytorch_model.bin",
            blocks=24,
            note="20x (~0.5 µm/px) H&E and IHC tiles",
        ),
        ViTPreset(
            name="virchow2",
            arch="vit_huge_patch14_224",
            kwargs={
                "img_size": 224,
                "init_values": 1e-5,
                "mlp_ratio": 5.3375,
                "reg_tokens": 4,
                "mlp_layer": "swiglu_packed",
                "act_layer": "silu",
            },
            mpp=0.5,
            licence="CC-BY-NC-ND-4.0",
            source="https://huggingface.co/paige-ai/Virchow2",
            gated=True,
            weights_file="pytorch_model.bin",
            blocks=32,
            note="mixed-magnification training (2, 1, 0.5 and 0.25 µm/px); 0.5 µm/px by default",
        ),
        ViTPreset(
            name="h_optimus_0",
            arch="vit_giant_patch14_reg4_dinov2",
            kwargs=_DINOV2_GIANT,
            mean=BIOPTIMUS_MEAN,
            std=BIOPTIMUS_STD,
            mpp=0.5,
            licence="Apache-2.0",
            source="https://huggingface.co/bioptimus/H-optimus-0",
            gated=True,
            weights_file="pytorch_model.bin",
            blocks=40,
            note="224 px tiles at 0.5 µm/px; its own mean/std (not ImageNet's)",
        ),
        ViTPreset(
            name="h_optimus_1",
            arch="vit_giant_patch14_reg4_dinov2",
            kwargs=_DINOV2_GIANT,
            mean=BIOPTIMUS_MEAN,
            std=BIOPTIMUS_STD,
            mpp=0.5,
            licence="non-commercial (Bioptimus's terms on the model card)",
            source="https://huggingface.co/bioptimus/H-optimus-1",
            gated=True,
            weights_file="pytorch_model.bin",
            blocks=40,
            note="224 px tiles at 0.5 µm/px; H-optimus-0's mean/std",
        ),
        ViTPreset(
            name="prov_gigapath",
            arch="vit_giant_patch14_dinov2",
            kwargs={
                "img_size": 224,
                "patch_size": 16,  # the tile encoder's real patch size, despite the name
                "embed_dim": 1536,
                "depth": 40,
                "num_heads": 24,
                "init_values": 1e-5,
                "mlp_ratio": 5.33334,
            },
            mpp=0.5,
            licence="Apache-2.0",
            source="https://huggingface.co/prov-gigapath/prov-gigapath",
            gated=True,
            weights_file="pytorch_model.bin",
            blocks=40,
            note="the tile encoder (not the slide encoder); 256 px tiles at 20x (~0.5 µm/px)",
        ),
        ViTPreset(
            name="phikon_v2",
            arch="vit_large_patch16_224",
            kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5},
            mpp=0.5,
            layout="hf_dinov2",
            licence="non-commercial (Owkin's terms on the model card)",
            source="https://huggingface.co/owkin/phikon-v2",
            gated=False,
            weights_file="model.safetensors",
            blocks=24,
            note="a transformers Dinov2Model file (ViT-L/16, 20x); key names mapped to timm's",
        ),
        ViTPreset(
            name="timm",
            arch=None,
            licence="that of the weights file",
            note="any timm VisionTransformer by model.arch, in timm's layout; mean/std from timm",
        ),
    )
}


def preset(name: Any) -> ViTPreset:
    """The preset ``name``; ConfigError listing the presets otherwise."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(
            f"model.preset={name!r} is not a ViT preset; expected one of {', '.join(PRESETS)}"
        )
    return PRESETS[name]


def _settable_kwargs() -> tuple[str, ...]:
    from timm.models.vision_transformer import VisionTransformer

    names = inspect.signature(VisionTransformer.__init__).parameters
    return tuple(n for n in names if n != "self" and n not in NOT_SETTABLE)


def _plain(value: Any) -> bool:
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, bool | int | float | str)


def timm_kwargs(p: ViTPreset, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``timm.create_model`` kwargs of preset ``p`` updated with ``overrides`` (e.g. a smaller
    ``embed_dim``/``depth``/``num_heads`` for tests, keeping the preset's quirks), layer names
    resolved to classes and :data:`ALWAYS` added. ConfigError names a key timm's
    VisionTransformer does not take, a value that is not plain data, or an unknown layer name."""
    merged = {**p.kwargs, **dict(overrides or {})}
    settable = _settable_kwargs()
    for key, value in merged.items():
        if key not in settable:
            raise ConfigError(
                f"model.vit_kwargs: {key!r} cannot be set for preset {p.name!r}; expected some "
                f"of timm's VisionTransformer arguments: {', '.join(settable)}"
            )
        if not _plain(value):
            raise ConfigError(
                f"model.vit_kwargs.{key}={value!r} is not plain data (numbers, strings, lists)"
            )
    kwargs = dict(merged)
    if "mlp_layer" in kwargs:
        name = kwargs["mlp_layer"]
        if name not in MLP_LAYERS:
            raise ConfigError(
                f"model.vit_kwargs.mlp_layer={name!r} is invalid; expected one of "
                f"{', '.join(MLP_LAYERS)}"
            )
        kwargs["mlp_layer"] = _mlp_layers()[name]
    if "act_layer" in kwargs:
        name = kwargs["act_layer"]
        if name not in ACT_LAYERS:
            raise ConfigError(
                f"model.vit_kwargs.act_layer={name!r} is invalid; expected one of "
                f"{', '.join(ACT_LAYERS)}"
            )
        kwargs["act_layer"] = ACT_LAYERS[name]
    return {**kwargs, **ALWAYS}


@contextmanager
def offline() -> Iterator[None]:
    """Hugging Face Hub offline (``HF_HUB_OFFLINE=1``) while a model is built; restored after."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def build_vit(
    p: ViTPreset, arch: str | None = None, overrides: Mapping[str, Any] | None = None
) -> VisionTransformer:
    """A randomly initialised timm VisionTransformer of preset ``p`` (``arch`` for ``timm``,
    which only that preset takes), never downloading anything (``pretrained=False``, Hub
    offline)."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    if p.arch is None:
        if not isinstance(arch, str) or not arch:
            raise ConfigError(
                f"model.preset={p.name} needs model.arch: a timm ViT name, e.g. "
                "vit_small_patch16_224 (timm.list_models('vit_*'))"
            )
        name = arch
    else:
        if arch is not None and arch != p.arch:
            raise ConfigError(
                f"model.arch={arch!r} cannot be combined with model.preset={p.name} (its "
                f"architecture is {p.arch}); use model.preset=timm model.arch={arch}"
            )
        name = p.arch
    if not timm.is_model(name):
        raise ConfigError(
            f"model.arch={name!r} is not a timm model name; expected e.g. "
            "vit_small_patch16_224 (timm.list_models('vit_*'))"
        )
    if not timm.models.is_model_in_modules(name, VIT_MODULES):
        raise ConfigError(
            f"model.arch={name!r} is not a timm VisionTransformer; expected a model of timm's "
            f"{' / '.join(VIT_MODULES)} modules, e.g. vit_small_patch16_224"
        )
    kwargs = timm_kwargs(p, overrides)
    with offline():
        try:
            model = timm.create_model(name, pretrained=False, **kwargs)
        except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
            raise ConfigError(
                f"timm cannot build {name} for preset {p.name!r} with {kwargs} "
                f"({type(exc).__name__}: {str(exc)[:200]})"
            ) from exc
    if not isinstance(model, VisionTransformer):
        raise ConfigError(
            f"model.arch={name!r} builds a {type(model).__name__}, not a timm VisionTransformer "
            "(expected a vit_* / deit_* / *_dinov2 name)"
        )
    return model


__all__ = [
    "ACT_LAYERS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LAYOUTS",
    "MLP_LAYERS",
    "PRESETS",
    "ViTPreset",
    "build_vit",
    "offline",
    "preset",
    "timm_kwargs",
]
