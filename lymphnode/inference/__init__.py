"""Whole-slide inference, one module per job: the tile grid over tissue (grid), batched prediction
(predict), stitching into a heatmap (stitch), overlays (overlay), heatmap files (heatmap) and the
settings (settings)."""
