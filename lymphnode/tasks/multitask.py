"""Multi-task fine-tuning (the paper's second stage): segmentation + reconstruction.

Loss = BCE with logits (optional ``pos_weight``) + ``dice_weight`` x soft Dice loss
+ ``recon_weight`` x reconstruction loss. The paper keeps the reconstruction term (weight 1.0)
because fine-tuning on segmentation alone destroys what pretraining learned; weight 0 turns it off
(and then the network needs no reconstruction head: ``ViTUNet(recon=False)``).

How fast the encoder trains does not depend on where its weights came from (a foundation model's
file, an smp/timm file, a lymphnode pretext, nothing): ``encoder_lr_scale`` and
``freeze_encoder_steps`` cover the parameters under the network's ``encoder_prefix``. The older
``pretrained_lr_*`` / ``freeze_pretrained_steps`` cover only the tensors copied from
``pretrained`` (a scratch run ignores them), with the same optimizer groups.

Batches are dicts: ``{"image": (B, 3, H, W) float32 normalised, "mask": (B, 1, H, W) float32 in
{0, 1} (1 = tumour), ...}``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import (
    BinaryF1Score,
    BinaryJaccardIndex,
    BinaryPrecision,
    BinaryRecall,
)

from lymphnode.core import validate
from lymphnode.core.errors import ConfigError
from lymphnode.models.checkpoint import (
    LoadReport,
    load_pretrained_weights,
    plan_pretrained_transfer,
)
from lymphnode.models.contract import require_recon_head
from lymphnode.models.preprocess import Preprocess
from lymphnode.tasks.base import (
    DEFAULT_OPTIMIZER,
    DEFAULT_SCHEDULER,
    TaskModule,
    freeze_heads,
    image_grid,
    plain,
    require_keys,
)
from lymphnode.tasks.reconstruction import RECON_LOSSES
from lymphnode.tasks.semi import SemiSettings, generator_for, pseudo_label_loss, strong_stain

log = logging.getLogger(__name__)

SEG_LOSS_KEYS = ("pos_weight", "dice_weight")
LR_SCOPES = ("network", "encoder")  # what pretrained_lr_scale / freeze_pretrained_steps cover
SEG_HEAD_PREFIX = "seg_head."  # the segmentation head: frozen (untrained) in every pretext
DICE_SMOOTH = 1.0  # soft Dice smoothing (pixels): keeps the loss finite on empty masks


def soft_dice_loss(logits: Tensor, target: Tensor) -> Tensor:
    """1 - soft Dice over the whole batch: logits, target (B, 1, H, W), target in {0, 1}."""
    prob = torch.sigmoid(logits)
    intersection = (prob * target).sum()
    return 1.0 - (2.0 * intersection + DICE_SMOOTH) / (prob.sum() + target.sum() + DICE_SMOOTH)


def per_patch_dice(pred: Tensor, target: Tensor) -> Tensor:
    """Dice of binary pred vs target per patch (B,); 1.0 where both are empty."""
    pred, target = pred.flatten(1).float(), target.flatten(1).float()  # (B, H*W)
    intersection = (pred * target).sum(1)
    total = pred.sum(1) + target.sum(1)
    return torch.where(total > 0, 2.0 * intersection / total.clamp_min(1.0), torch.ones_like(total))


def _seg_metrics(stage: str, threshold: float) -> MetricCollection:
    """Pixel-wise metrics accumulated over the whole epoch (counts, not per-batch means)."""
    return MetricCollection(
        {
            "precision": BinaryPrecision(threshold=threshold, validate_args=False),
            "recall": BinaryRecall(threshold=threshold, validate_args=False),
            "f1": BinaryF1Score(threshold=threshold, validate_args=False),
            "iou": BinaryJaccardIndex(threshold=threshold, validate_args=False),
        },
        prefix=f"{stage}/seg_",
    )


class MultiTaskModule(TaskModule):
    """Segmentation + reconstruction fine-tuning of the network (or training from scratch).

    Args:
        net: the network's config (``_target_`` + arguments, conf/model/*.yaml; default the UNet
            with ``top_skip=True``).
        seg_loss: ``{"pos_weight": float | None, "dice_weight": float (default 0)}``; pos_weight
            multiplies the BCE of tumour pixels.
        recon_weight: weight of the reconstruction term (1.0 as the paper; 0 turns it off and
            freezes the reconstruction head).
        recon_loss: ``"mse"`` or ``"l1"``.
        pretrained: a lymphnode checkpoint (usually the pretraining's best.ckpt) whose UNet
            weights initialise this one when fitting starts (:func:`load_pretrained_weights`; a
            UNet with a different ``top_skip`` re-initialises its top decoder block). Skipped when the
            weights come from a checkpoint (resume or ``load_from_checkpoint``).
        optimizer, scheduler, preprocess, channels_last, log_images_every_n_epochs,
            n_log_images: as :class:`lymphnode.tasks.ReconstructionModule`.
        threshold: probability above which a pixel counts as tumour for the metrics and images.
        pretrained_lr_scale: the parameters that come from ``pretrained`` train at this multiple
            of the optimizer's lr (discriminative fine-tuning: 0.1 lets the new heads and any
            re-initialised block move fast while the pretrained features change slowly; 1.0,
            the default, is one lr for all; 0 keeps them fixed). No effect without ``pretrained``.
        pretrained_lr_scope: which pretrained parameters ``pretrained_lr_scale`` and
            ``freeze_pretrained_steps`` apply to: ``network`` (every tensor that came from the
            checkpoint, the default) or ``encoder`` (those under the network's ``encoder_prefix``:
            a whole-network pretext's decoder then trains at the full lr, as the new head does).
        freeze_pretrained_steps: the pretrained parameters stay fixed for this many optimizer
            steps first (no update, no weight decay; their BatchNorm statistics still adapt),
            then train: linear probing then fine-tuning (LP-FT). 0, the default, never freezes.
        encoder_lr_scale: the encoder's parameters (under the network's ``encoder_prefix``)
            train at this multiple of the optimizer's lr, whatever initialised them: 1.0 (the
            default) one lr for all; 0.1 discriminative fine-tuning; 0 frozen (``requires_grad``
            off: no update, no weight decay, no gradient computed; BatchNorm statistics of a CNN
            encoder still adapt). Cannot be combined with the ``pretrained_lr_*`` settings.
        freeze_encoder_steps: the encoder stays fixed for this many optimizer steps first, then
            trains at ``encoder_lr_scale`` (warm-up freezing, LP-FT for any weight source).
        semi: null (the default: supervised only) or the settings of semi-supervised fine-tuning
            with the unlabeled pool (:mod:`lymphnode.tasks.semi`, FixMatch-style weak-to-strong
            pseudo-labels under strong stain views; keys ``weight, threshold, warmup_steps, sigma,
            bias, jitter``). Needs unlabeled batches from the DataModule (``data.unlabeled_dir``;
            ``semi=fixmatch`` sets both).

    Logs ``train/loss``, ``train/seg_loss``, ``train/recon_mse``; on val and test
    ``{stage}/loss``, ``{stage}/seg_loss``, ``{stage}/recon_mse`` (``recon_mse`` only when
    ``recon_weight`` > 0), pixel-wise
    ``{stage}/seg_precision``, ``{stage}/seg_recall``, ``{stage}/seg_f1``, ``{stage}/seg_iou``
    (counts accumulated over the epoch; F1 is the paper's metric and equals the pooled Dice)
    and ``{stage}/seg_dice`` (mean per-patch Dice, 1 for a patch where truth and prediction are
    both empty). Overlays of truth vs prediction (the paper's Figure 5) on the first validation
    and test batch.
    """

    task_name = "multitask"

    def __init__(
        self,
        net: Mapping[str, Any] | None = None,
        seg_loss: Mapping[str, Any] | None = None,
        recon_weight: float = 1.0,
        recon_loss: str = "mse",
        pretrained: str | Path | None = None,
        optimizer: Any = DEFAULT_OPTIMIZER,
        scheduler: Any = DEFAULT_SCHEDULER,
        preprocess: Preprocess | Mapping[str, Any] | None = None,
        channels_last: bool = False,
        threshold: float = 0.5,
        log_images_every_n_epochs: int = 1,
        n_log_images: int = 8,
        pretrained_lr_scale: float = 1.0,
        freeze_pretrained_steps: int = 0,
        pretrained_lr_scope: str = "network",
        semi: Mapping[str, Any] | None = None,
        encoder_lr_scale: float = 1.0,
        freeze_encoder_steps: int = 0,
    ) -> None:
        super().__init__()
        if pretrained_lr_scope not in LR_SCOPES:
            raise ConfigError(
                f"pretrained_lr_scope={pretrained_lr_scope!r} is not supported; expected one of "
                f"{list(LR_SCOPES)}"
            )
        pretrained_lr_scale = validate.number("pretrained_lr_scale", pretrained_lr_scale, 0.0)
        freeze_pretrained_steps = validate.integer(
            "freeze_pretrained_steps", freeze_pretrained_steps, 0
        )
        encoder_lr_scale = validate.number("encoder_lr_scale", encoder_lr_scale, 0.0)
        freeze_encoder_steps = validate.integer("freeze_encoder_steps", freeze_encoder_steps, 0)
        self._encoder_lr_set = encoder_lr_scale != 1.0 or freeze_encoder_steps > 0
        if self._encoder_lr_set and (pretrained_lr_scale != 1.0 or freeze_pretrained_steps > 0):
            raise ConfigError(
                f"encoder_lr_scale={encoder_lr_scale} / freeze_encoder_steps="
                f"{freeze_encoder_steps} cannot be combined with pretrained_lr_scale="
                f"{pretrained_lr_scale} / freeze_pretrained_steps={freeze_pretrained_steps}: "
                "expected one of the two (the encoder_* keys cover the encoder whatever "
                "initialised it, the pretrained_* keys only the tensors from task.pretrained)"
            )
        seg_loss = validate.keys(
            "seg_loss", plain(seg_loss) if seg_loss is not None else {}, SEG_LOSS_KEYS
        )
        # Non-finite weights pass (as ever): NonFiniteLossGuard stops such a run at its first step.
        pos_weight = seg_loss.get("pos_weight")  # None: unweighted
        if pos_weight is not None:
            pos_weight = validate.number("seg_loss.pos_weight", pos_weight, 0.0, finite=False)
        dice_weight = validate.number(
            "seg_loss.dice_weight", seg_loss.get("dice_weight", 0.0), 0.0, finite=False
        )
        recon_weight = validate.number("recon_weight", recon_weight, 0.0, finite=False)
        if recon_loss not in RECON_LOSSES:
            raise ConfigError(
                f"recon_loss={recon_loss!r} is not supported; expected one of {list(RECON_LOSSES)}"
            )
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, int | float)
            or not (0.0 < threshold < 1.0)
        ):
            raise ConfigError(f"threshold={threshold!r} is invalid; expected a number in (0, 1)")
        if pretrained is not None and not isinstance(pretrained, str | Path):
            raise ConfigError(f"pretrained={pretrained!r} is invalid; expected a path or null")
        self.semi = SemiSettings.parse(plain(semi) if semi is not None else None)
        self._init_common(
            net,
            {},
            optimizer,
            scheduler,
            preprocess,
            channels_last,
            log_images_every_n_epochs,
            n_log_images,
        )
        self.pos_weight = pos_weight
        self.dice_weight = dice_weight
        self.recon_weight = recon_weight
        self.recon_loss = recon_loss
        self.threshold = float(threshold)
        self.pretrained = str(pretrained) if pretrained is not None else None
        self.pretrained_lr_scale = float(pretrained_lr_scale)
        self.freeze_pretrained_steps = int(freeze_pretrained_steps)
        self.pretrained_lr_scope = pretrained_lr_scope
        self.encoder_lr_scale = float(encoder_lr_scale)
        self.freeze_encoder_steps = int(freeze_encoder_steps)
        self._scaled_params: list[torch.nn.Parameter] = []  # the group with its own lr_scale
        self._scaled_freeze_steps = 0  # ... fixed for this many optimizer steps first
        self.pretrained_report: LoadReport | None = None
        self._weights_initialised = pretrained is None  # True once pretrained / checkpoint loaded
        if pos_weight is not None:
            self.register_buffer("_pos_weight", torch.tensor([pos_weight]), persistent=False)
        else:
            self._pos_weight = None
        if recon_weight:
            require_recon_head(self.network, f"recon_weight={recon_weight}")
        else:
            freeze_heads(self.network.recon_head)  # no gradient reaches it (DDP would object)
        if self.encoder_lr_scale == 0.0:
            for name, param in self.net.named_parameters():
                if name.startswith(self.network.encoder_prefix):
                    param.requires_grad_(False)  # frozen: out of the optimizer, no gradient
        self.save_hyperparameters(
            {
                **self._common_hparams(),
                "seg_loss": {"pos_weight": pos_weight, "dice_weight": dice_weight},
                "recon_weight": recon_weight,
                "recon_loss": recon_loss,
                "pretrained": self.pretrained,
                "threshold": self.threshold,
                "pretrained_lr_scale": self.pretrained_lr_scale,
                "freeze_pretrained_steps": self.freeze_pretrained_steps,
                "pretrained_lr_scope": self.pretrained_lr_scope,
                "semi": None if self.semi is None else self.semi.as_dict(),
                "encoder_lr_scale": self.encoder_lr_scale,
                "freeze_encoder_steps": self.freeze_encoder_steps,
            }
        )
        self.val_metrics = _seg_metrics("val", self.threshold)
        self.test_metrics = _seg_metrics("test", self.threshold)
        self.val_dice = MeanMetric()
        self.test_dice = MeanMetric()

    # --- pretrained initialisation ----------------------------------------------------------
    def load_pretrained(self) -> LoadReport | None:
        """Load ``pretrained`` into ``self.net`` now (a no-op without one); done automatically
        when fitting starts unless the weights came from a checkpoint."""
        if self.pretrained is None:
            return None
        self.pretrained_report = load_pretrained_weights(self.net, self.pretrained)
        self._weights_initialised = True
        log.info(
            "initialised from pretrained %s (top_skip %s)",
            self.pretrained_report.summary(),
            "changed: decoder.0 re-initialised"
            if self.pretrained_report.reinitialized
            else "unchanged",
        )
        return self.pretrained_report

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._weights_initialised = True  # the checkpoint's weights win over `pretrained`

    def on_fit_start(self) -> None:
        if not self._weights_initialised:
            self.load_pretrained()

    # --- optimisation of the pretrained part -----------------------------------------------
    def pretrained_parameter_names(self) -> list[str]:
        """Names (in ``self.net``) of the trainable parameters that come from ``pretrained``;
        empty without one. Read from the load report, or planned from the checkpoint when the
        weights are not loaded yet (the optimizer is built before fitting starts). The
        segmentation head is never among them: every pretext keeps it frozen at its random
        initialisation, so it is new to fine-tuning. With ``pretrained_lr_scope="encoder"`` only
        the encoder's."""
        if self.pretrained is None:
            return []
        report = self.pretrained_report
        if report is None:
            report, _ = plan_pretrained_transfer(self.net, self.pretrained)
        loaded = set(report.loaded)
        prefix = self.network.encoder_prefix
        return [
            n
            for n, p in self.net.named_parameters()
            if n in loaded
            and p.requires_grad
            and not n.startswith(SEG_HEAD_PREFIX)
            and (self.pretrained_lr_scope == "network" or n.startswith(prefix))
        ]

    def encoder_parameter_names(self) -> list[str]:
        """Names (in ``self.net``) of the trainable parameters under the network's
        ``encoder_prefix``: what ``encoder_lr_scale`` and ``freeze_encoder_steps`` cover, whatever
        initialised them (empty when the encoder is frozen, ``encoder_lr_scale=0``)."""
        prefix = self.network.encoder_prefix
        return [
            n for n, p in self.net.named_parameters() if p.requires_grad and n.startswith(prefix)
        ]

    def optimizer_param_groups(self) -> list[dict[str, Any]]:
        """Two groups when fine-tuning treats part of the network apart: the encoder's
        parameters (``encoder_lr_scale`` != 1 or ``freeze_encoder_steps`` > 0) or the pretrained
        ones (``pretrained_lr_scale`` != 1 or ``freeze_pretrained_steps`` > 0), sorted by name,
        with their ``lr_scale``, then the rest in the network's order; otherwise one."""
        if self._encoder_lr_set:
            names = set(self.encoder_parameter_names())
            scale, freeze, what = self.encoder_lr_scale, self.freeze_encoder_steps, "encoder"
        elif self.pretrained is None or (
            self.pretrained_lr_scale == 1.0 and self.freeze_pretrained_steps == 0
        ):
            return super().optimizer_param_groups()
        else:
            if self.pretrained_report is None and not self._weights_initialised:
                self.load_pretrained()  # now, not at fit start: planning first would read it twice
            names = set(self.pretrained_parameter_names())
            scale, freeze, what = (
                self.pretrained_lr_scale,
                self.freeze_pretrained_steps,
                "pretrained",
            )
        if not names:
            return super().optimizer_param_groups()
        named = dict(self.net.named_parameters())
        self._scaled_params = [named[n] for n in sorted(names)]
        self._scaled_freeze_steps = freeze
        ids = {id(p) for p in self._scaled_params}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        log.info(
            "fine-tuning %d %s parameter tensors at lr x %g%s, %d others at lr",
            len(self._scaled_params),
            what,
            scale,
            f", fixed for the first {freeze} steps" if freeze else "",
            len(rest),
        )
        return [{"params": self._scaled_params, "lr_scale": scale}, {"params": rest}]

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.global_step < self._scaled_freeze_steps:
            for param in self._scaled_params:
                param.grad = None  # the optimizer skips it: no update, no weight decay

    # --- steps ------------------------------------------------------------------------------
    def _losses(self, batch: Mapping[str, Tensor], stage: str) -> tuple[Tensor, Tensor, Any]:
        require_keys(batch, ["image", "mask"], "multi-task")
        x, y = batch["image"], batch["mask"]  # (B, 3, H, W), (B, 1, H, W) {0, 1}
        if y.shape != (x.shape[0], 1, *x.shape[-2:]):
            raise ConfigError(
                f"batch['mask'] has shape {tuple(y.shape)}; expected (B, 1, H, W) = "
                f"{(x.shape[0], 1, *x.shape[-2:])} for images of shape {tuple(x.shape)}"
            )
        y = y.to(x.dtype)
        out = self.net(x)  # seg (B, 1, H, W) logits, recon (B, 3, H, W) or None
        seg_loss = F.binary_cross_entropy_with_logits(out.seg, y, pos_weight=self._pos_weight)
        if self.dice_weight:
            seg_loss = seg_loss + self.dice_weight * soft_dice_loss(out.seg, y)
        loss = seg_loss
        mse = None  # not computed at recon_weight=0
        if self.recon_weight:
            mse = F.mse_loss(out.recon, x)
            recon = mse if self.recon_loss == "mse" else F.l1_loss(out.recon, x)
            loss = loss + self.recon_weight * recon
        kwargs: dict[str, Any] = {
            "on_step": stage == "train",
            "on_epoch": True,
            "sync_dist": stage != "train",
            "batch_size": x.shape[0],
        }
        self.log(f"{stage}/loss", loss.detach(), prog_bar=stage != "test", **kwargs)
        self.log(f"{stage}/seg_loss", seg_loss.detach(), **kwargs)
        if mse is not None:
            self.log(f"{stage}/recon_mse", mse.detach(), **kwargs)
        return loss, y, out

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        unlabeled = None
        if "labeled" in batch:  # {"labeled": batch, "unlabeled": batch} (data.unlabeled_dir)
            unlabeled, batch = batch.get("unlabeled"), batch["labeled"]
        if batch_idx == 0:
            _check_mask_values(batch)
        loss = self._losses(batch, "train")[0]
        if self.semi is not None:
            if unlabeled is None:
                raise ConfigError(
                    "task.semi is set but the DataModule gives no unlabeled batch: expected "
                    "data.unlabeled_dir=<unlabeled cache> (semi=fixmatch sets both)"
                )
            loss = loss + self._semi_loss(unlabeled["image"])
        return loss

    def _semi_loss(self, x: Tensor) -> Tensor:
        """The weighted FixMatch loss of one unlabeled batch (normalised (B, 3, H, W) weak views)."""
        assert self.semi is not None
        with torch.no_grad():
            weak = torch.sigmoid(self.net(x).seg.float())
        rgb = self.denormalize(x.float())
        strong_rgb = strong_stain(rgb, self.semi, generator_for(0, int(self.global_step)))
        mean = torch.tensor(self.preprocess.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.preprocess.std, device=x.device).view(1, -1, 1, 1)
        strong = ((strong_rgb - mean) / std).to(x.dtype)
        if self.channels_last:
            strong = strong.contiguous(memory_format=torch.channels_last)
        loss, confident = pseudo_label_loss(self.net(strong).seg, weak, self.semi.threshold)
        weight = self.semi.weight_at(int(self.global_step))
        kwargs: dict[str, Any] = {"on_step": True, "on_epoch": True, "batch_size": x.shape[0]}
        self.log("train/semi_loss", loss.detach(), **kwargs)
        self.log("train/semi_confident", confident.detach(), **kwargs)
        return weight * loss

    def _eval_step(self, batch: Mapping[str, Tensor], batch_idx: int, stage: str) -> None:
        if batch_idx == 0:
            _check_mask_values(batch)
        _, y, out = self._losses(batch, stage)
        prob = torch.sigmoid(out.seg.float())  # (B, 1, H, W)
        target = y.long()  # (B, 1, H, W) {0, 1}
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        dice = self.val_dice if stage == "val" else self.test_dice
        metrics.update(prob, target)
        dice.update(per_patch_dice(prob > self.threshold, target))
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage == "val")
        self.log(f"{stage}/seg_dice", dice, on_step=False, on_epoch=True)
        if self._should_log_images(batch_idx):
            n = self.n_log_images
            image = self.denormalize(batch["image"][:n].float())  # (n, 3, H, W) 0..1
            truth = y[:n].float()
            pred = (prob[:n] > self.threshold).float()
            grid = image_grid(
                [image, _tint(image, truth, (0.0, 1.0, 0.0)), _tint(image, pred, (1.0, 0.0, 0.0))]
            )
            self.log_image_grid(
                f"{stage}/overlays",
                grid,
                f"epoch {self.current_epoch}: input, truth (green), prediction > "
                f"{self.threshold} (red)",
            )

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def probabilities(self, x: Tensor) -> Tensor:
        """Tumour probabilities (B, 1, H, W) float32 for normalised images (B, C, H, W)."""
        return torch.sigmoid(self.net(x).seg.float())

    def predict_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        """Tumour probabilities (B, 1, H, W) for ``batch["image"]``."""
        require_keys(batch, ["image"], "prediction")
        return self.probabilities(batch["image"])

    def _should_log_images(self, batch_idx: int) -> bool:
        trainer = self._trainer
        if trainer is not None and trainer.testing:
            return batch_idx == 0 and trainer.is_global_zero and self.log_images_every_n_epochs > 0
        return super()._should_log_images(batch_idx)


def _tint(
    image: Tensor, mask: Tensor, color: tuple[float, float, float], alpha: float = 0.5
) -> Tensor:
    """Blend ``color`` into 0..1 images (N, 3, H, W) where mask (N, 1, H, W) is 1."""
    rgb = torch.tensor(color, device=image.device, dtype=image.dtype).view(1, 3, 1, 1)
    weight = alpha * mask
    return image * (1 - weight) + rgb * weight


def _check_mask_values(batch: Mapping[str, Tensor]) -> None:
    """ConfigError when a mask holds values other than 0 and 1 (e.g. 0/255 from a file)."""
    mask = batch.get("mask") if isinstance(batch, Mapping) else None
    if isinstance(mask, Tensor) and mask.numel():
        bad = (mask != 0) & (mask != 1)
        if bool(bad.any()):
            raise ConfigError(
                f"batch['mask'] holds values other than 0 and 1 (e.g. {mask[bad][0].item()}); "
                "masks must be float {0, 1} (1 = tumour)"
            )


__all__ = ["MultiTaskModule", "per_patch_dice", "soft_dice_loss"]
