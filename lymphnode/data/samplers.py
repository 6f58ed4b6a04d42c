"""The order patches are served in, made so that a resumed run repeats an uninterrupted one.

:class:`EpochSampler` (training) shuffles by ``(seed, epoch)`` alone and hands the dataset keys
``(epoch seed, position)``, from which :class:`lymphnode.data.datasets.CacheDataset` seeds the
augmentation of that one patch. Order and augmentation of epoch ``e`` are therefore a function of
the seed and ``e``, not of how many epochs this process has iterated, nor of the DataLoader
workers (persistent or not): a run resumed at an epoch boundary from ``last.ckpt`` (Lightning
calls ``set_epoch`` with the restored epoch) sees exactly the batches the uninterrupted run saw,
and on CPU ends with bit-identical weights. (A resume in the middle of an epoch continues with the
right step count but replays that epoch from its start; Lightning warns about it.)

It is a :class:`~torch.utils.data.distributed.DistributedSampler`, so Lightning keeps it under
DDP, where each process takes its share of the same permutation (one process: all of it, in the
permutation's order).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data.distributed import DistributedSampler

__all__ = ["EpochSampler", "epoch_seed", "item_seed"]

ItemKey = tuple[int, int]  # (epoch seed, position in the dataset)


def epoch_seed(seed: int, epoch: int) -> int:
    """The 63-bit seed of epoch ``epoch`` (from 0) of a run seeded with ``seed``."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, int(epoch)]).generate_state(
        1, np.uint64
    )
    return int(state[0] >> np.uint64(1))


def item_seed(key: ItemKey) -> int:
    """The 32-bit augmentation seed of one patch in one epoch (``(epoch seed, position)``)."""
    return int(np.random.SeedSequence([key[0], key[1]]).generate_state(1, np.uint32)[0])


class EpochSampler(DistributedSampler):
    """A shuffled epoch of ``dataset`` as keys ``(epoch_seed(seed, epoch), position)``.

    Args:
        dataset: the (sized) dataset to serve; its ``__getitem__`` takes the keys.
        seed: the run's data seed (shuffling and augmentation).
        num_replicas, rank: the DDP processes and this one (1 and 0: a single process).
        drop_last: as DistributedSampler (False: the last processes' shares are padded with
            repeated positions so that every process trains the same number of steps).

    The permutation of epoch ``e`` is ``torch.randperm`` seeded with ``epoch_seed(seed, e)``,
    padded and dealt to the processes as DistributedSampler does; Lightning calls
    :meth:`set_epoch` before every training epoch.
    """

    def __init__(
        self,
        dataset: object,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(
            dataset,  # type: ignore[arg-type]
            num_replicas=num_replicas,
            rank=rank,
            shuffle=True,
            seed=int(seed),
            drop_last=drop_last,
        )

    def __iter__(self) -> Iterator[ItemKey]:  # type: ignore[override]
        current = epoch_seed(self.seed, self.epoch)
        generator = torch.Generator()
        generator.manual_seed(current)
        positions = torch.randperm(len(self.dataset), generator=generator).tolist()  # type: ignore[arg-type]
        if self.drop_last:
            positions = positions[: self.total_size]
        else:  # pad with the permutation's first positions (as DistributedSampler)
            padding = self.total_size - len(positions)
            positions += (positions * math.ceil(padding / max(1, len(positions))))[:padding]
        share = positions[self.rank : self.total_size : self.num_replicas]  # this process's
        return iter([(current, int(i)) for i in share])
