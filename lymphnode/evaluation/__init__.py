"""Evaluation: the CAMELYON16 lesion FROC, slide AUC and pixel metrics, and the results table."""
