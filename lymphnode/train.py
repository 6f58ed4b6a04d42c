"""One training run from the Hydra config: pretraining on a pretext task or multi-task fine-tuning.

    python -m lymphnode.train experiment=pretrain [pretext=reconstruction]
    python -m lymphnode.train experiment=finetune data.labeled_size=40 data.fold=0
    python -m lymphnode.train experiment=scratch  data.labeled_size=40 data.fold=0
    ... profile=demo, model=unet|smp_unet, trainer=cpu|gpu|ddp|debug, logger=csv|wandb|none,
    ckpt_path=last (resume), init=pretrained|scratch, seed=N, rerun=force (train a run again)

The objects come from the config's ``_target_`` (:mod:`lymphnode.tasks.build`: conf/, read top to
bottom in conf/train.yaml); the run's lifecycle — its folder and identity, skip / resume / refuse
when a record is there, fitting, evaluating its checkpoints, ``<run_dir>/results.json`` — is
:mod:`lymphnode.tasks.lifecycle`'s. This module is the command line: it composes the config and
maps errors to exit codes (:mod:`lymphnode.core.boundary`: bad input one ``error:`` line and exit
1, a signal-stopped run exit 143).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from lymphnode.core.boundary import config_dir, hydra_boundary
from lymphnode.tasks.lifecycle import (
    RESULTS_FILE,
    read_results,
    resolved_config,
    train,
    write_results,
)

__all__ = ["RESULTS_FILE", "main", "read_results", "resolved_config", "train", "write_results"]


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
@hydra_boundary
def main(cfg: DictConfig) -> float:
    """The CLI: :func:`lymphnode.tasks.lifecycle.train` behind the error boundary (bad input: one
    line, exit 1; in a ``--multirun`` sweep the failed job is recorded, the others run and the
    sweep exits non-zero; each run that started has its results.json)."""
    return train(cfg)


if __name__ == "__main__":
    main()
