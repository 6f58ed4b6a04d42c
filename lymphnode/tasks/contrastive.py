"""Contrastive pretraining (SimCLR) of the network's encoder on two augmented views per patch.

Why SimCLR among the joint-embedding methods: it needs one network and one loss (no momentum
encoder or teacher as BYOL/DINO, whose extra copies of the network and their schedules double the
cost and the settings to tune), it has no collapse mode to guard against (the negatives prevent it),
and with the small batches of a CPU or one GPU it stays well defined (NT-Xent on 2B views). The views
come from the project's own albumentations pipeline (``pretext.view_transforms``: D4, strong colour
jitter, HED stain jitter, blur, greyscale, random crops), so the encoder learns invariance to stain
and orientation, the nuisances that separate centres. The loss (NT-Xent), the projection head and
the distributed gathering of negatives are lightly's (MIT licence; runs offline).

Only the encoder is trained (the decoder and heads are frozen: no gradient reaches them), and
checkpoints say ``transfer: encoder``: fine-tuning copies the encoder and keeps its own random
decoder. The network must have ``encode(x) -> (B, C, h, w)`` (its deepest features) and
``encoder_channels`` (C): :class:`lymphnode.models.UNet` and :class:`lymphnode.models.SmpUNet`.

Batches are dicts ``{"image": (B, 3, H, W), "image2": (B, 3, H, W), ...}``: two views of the same
patches (``data.views: 2``, set by conf/pretext/contrastive.yaml).

The dense variant (``dense_weight`` > 0; ``pretext=dense_contrastive``) adds DenseCL's local term
(Wang et al. 2021), since the downstream task labels pixels, not patches: every location of the
encoder's feature map (B, C, h, w) is projected by a per-location MLP (lightly's
``DenseCLProjectionHead``), its partner in the other view is the location whose encoder features
are most similar (lightly's ``select_most_similar``; the views differ by D4, crops and colour, so
the geometric correspondence is not tracked), and NT-Xent contrasts it against a memory bank of
earlier batches' locations (lightly's memory bank: the negatives are other patches' locations,
not the same map's neighbours). Loss = (1 - dense_weight) x global + dense_weight x dense (DenseCL
uses 0.5). Unlike DenseCL there is no momentum encoder: both views pass through the same
network, as in SimCLR.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from lightly.models.modules.heads import DenseCLProjectionHead
from lightly.models.utils import select_most_similar
from torch import Tensor

from lymphnode.core import validate
from lymphnode.models.preprocess import Preprocess
from lymphnode.tasks.base import (
    DEFAULT_OPTIMIZER,
    DEFAULT_SCHEDULER,
    TaskModule,
    image_grid,
    require_keys,
    stage_log_kwargs,
)


def pair_accuracy(z1: Tensor, z2: Tensor) -> Tensor:
    """Share of rows i whose most similar row of ``z2`` (cosine) is row i: how often a view finds
    its partner among the batch's other patches. z1, z2 (B, D); a scalar in 0..1."""
    sim = F.normalize(z1.float(), dim=1) @ F.normalize(z2.float(), dim=1).T  # (B, B)
    target = torch.arange(z1.shape[0], device=z1.device)
    return (sim.argmax(dim=1) == target).float().mean()


class ContrastiveModule(TaskModule):
    """SimCLR on the encoder: NT-Xent between the projections of two views of each patch.

    Args:
        net: the network's config (conf/model/*.yaml); any network of the contract
            (:class:`lymphnode.models.contract.SegmentationNetwork`): ``encode`` and
            ``encoder_channels`` feed the projection head, ``encoder_prefix`` names what trains.
        temperature: NT-Xent temperature (0.2; SimCLR used 0.1-0.5, lower for small batches).
        hidden_dim, projection_dim: the projection head's hidden and output widths (an MLP with
            batch norm, discarded after pretraining).
        dense_weight: weight of DenseCL's local term in 0..1 (0: SimCLR only, the default; 0.5
            as DenseCL). The dense head has the same widths and is discarded too.
        dense_memory: locations in the dense term's memory bank of negatives (4096; at least
            one batch's locations, B x h x w, keeps every step's negatives from other batches).
        optimizer, scheduler, preprocess, channels_last, log_images_every_n_epochs,
            n_log_images: as :class:`lymphnode.tasks.ReconstructionModule`.

    Logs ``{stage}/loss`` (NT-Xent, or the weighted sum) and ``{stage}/pair_acc``
    (:func:`pair_accuracy` of the projections; chance is 1 / batch size), with ``dense_weight`` > 0
    also ``{stage}/global_loss`` and ``{stage}/dense_loss``, and on the first validation batch a
    grid of the two views.
    """

    task_name = "contrastive"
    transfer = "encoder"

    def __init__(
        self,
        net: Mapping[str, Any] | None = None,
        temperature: float = 0.2,
        hidden_dim: int = 256,
        projection_dim: int = 128,
        dense_weight: float = 0.0,
        dense_memory: int = 4096,
        optimizer: Any = DEFAULT_OPTIMIZER,
        scheduler: Any = DEFAULT_SCHEDULER,
        preprocess: Preprocess | Mapping[str, Any] | None = None,
        channels_last: bool = False,
        log_images_every_n_epochs: int = 1,
        n_log_images: int = 8,
    ) -> None:
        super().__init__()
        self.temperature = validate.number("temperature", temperature, 0.0, strict_minimum=True)
        self.hidden_dim = validate.integer("hidden_dim", hidden_dim, 1)
        self.projection_dim = validate.integer("projection_dim", projection_dim, 1)
        self.dense_weight = validate.number("dense_weight", dense_weight, 0.0, 1.0)
        self.dense_memory = validate.integer("dense_memory", dense_memory, 1)
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
        prefix = self.network.encoder_prefix  # the contract guarantees encode() and the rest
        for name, param in self.net.named_parameters():
            if not name.startswith(prefix):
                param.requires_grad_(False)  # decoder and heads: untouched, not transferred
        channels = int(self.network.encoder_channels)
        self.head = SimCLRProjectionHead(channels, self.hidden_dim, self.projection_dim)
        self.criterion = NTXentLoss(temperature=self.temperature, gather_distributed=True)
        if self.dense_weight > 0:
            self.dense_head = DenseCLProjectionHead(channels, self.hidden_dim, self.projection_dim)
            # one bank per direction: a bank fed by one direction's keys within the step would
            # hand the other direction its own queries (similarity 1) as negatives
            self.dense_criteria = torch.nn.ModuleList(
                NTXentLoss(
                    temperature=self.temperature,
                    memory_bank_size=(self.dense_memory, self.projection_dim),
                )
                for _ in range(2)
            )
        self.save_hyperparameters(
            {
                **self._common_hparams(),
                "temperature": self.temperature,
                "hidden_dim": self.hidden_dim,
                "projection_dim": self.projection_dim,
                "dense_weight": self.dense_weight,
                "dense_memory": self.dense_memory,
            }
        )

    def embed(self, x: Tensor) -> Tensor:
        """Projections (B, projection_dim) of normalised images (B, C, H, W): encoder ->
        global average pool -> projection head."""
        return self._encode(x)[1]

    def _encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Encoder features (B, C, h, w) and their global projection (B, projection_dim)."""
        features = self.network.encode(x)  # (B, encoder_channels, h, w)
        return features, self.head(features.mean(dim=(2, 3)))

    def dense_loss(self, f1: Tensor, f2: Tensor) -> Tensor:
        """DenseCL's local NT-Xent between encoder feature maps f1, f2 (B, C, h, w) of two views:
        each location of view 1 against the most similar location of view 2 (by encoder
        features), negatives from the memory bank of earlier steps' partners (one bank per
        direction, so none holds this step's queries); symmetric in the two views."""
        a = f1.flatten(2).transpose(1, 2)  # (B, h*w, C)
        b = f2.flatten(2).transpose(1, 2)
        da, db = self.dense_head(a), self.dense_head(b)  # (B, h*w, D): per location
        pa = select_most_similar(a.detach(), b.detach(), db)  # partner of each a-location
        pb = select_most_similar(b.detach(), a.detach(), da)
        forward, backward = self.dense_criteria
        return 0.5 * (
            forward(da.flatten(0, 1), pa.flatten(0, 1))
            + backward(db.flatten(0, 1), pb.flatten(0, 1))
        )

    def _step(self, batch: Mapping[str, Tensor], stage: str) -> Tensor:
        require_keys(batch, ["image", "image2"], "contrastive (data.views: 2)")
        x1, x2 = batch["image"], batch["image2"]
        (f1, z1), (f2, z2) = self._encode(x1), self._encode(x2)
        loss = self.criterion(z1, z2)
        kwargs = stage_log_kwargs(stage, x1.shape[0])
        if self.dense_weight > 0:
            dense = self.dense_loss(f1, f2)
            self.log(f"{stage}/global_loss", loss.detach(), **kwargs)
            self.log(f"{stage}/dense_loss", dense.detach(), **kwargs)
            loss = (1.0 - self.dense_weight) * loss + self.dense_weight * dense
        self.log(f"{stage}/loss", loss.detach(), **kwargs)
        self.log(f"{stage}/pair_acc", pair_accuracy(z1.detach(), z2.detach()), **kwargs)
        return loss

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")
        if self._should_log_images(batch_idx):
            n = self.n_log_images
            rows = [self.denormalize(batch[k][:n].float()) for k in ("image", "image2")]
            self.log_image_grid(
                "val/views", image_grid(rows), f"epoch {self.current_epoch}: view 1, view 2"
            )

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")


__all__ = ["ContrastiveModule", "pair_accuracy"]
