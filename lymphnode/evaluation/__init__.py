"""Evaluation: the CAMELYON16 lesion FROC, slide AUC and pixel metrics, and the results table.

Whole-slide heatmaps (``python -m lymphnode.evaluate``):

- ``truth``: which slides are tumor (ASAP XML, ``reference.csv``, ``normal_*``) and their masks;
- ``lesions``: the evaluation mask, isolated tumor cells, detections (local maxima + NMS), hits;
- ``froc``: the FROC curve and score, as the official CAMELYON16 code;
- ``slides``: slide-level ROC AUC and curve;
- ``pixels``: pixel precision / recall / F1;
- ``camelyon16``: all of the above over a folder of heatmaps, and the files it writes.

The results table of a sweep (``python -m lymphnode.report``):

- ``runs``: the runs read from their ``results.json`` (and the run folders that lack one);
- ``table``: the figures (mean ± std over folds, paired differences and t-tests, collapse counts);
- ``table_output``: ``table.md``, ``table.csv``, ``f1_vs_labels.png`` and the wandb summary.
"""
