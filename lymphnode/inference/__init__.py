"""Whole-slide inference: the tile grid over tissue, batched prediction, stitching into a
heatmap, overlays and heatmap files."""
