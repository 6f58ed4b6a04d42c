"""Whole-slide inference (what ``python -m lymphnode.infer`` runs), one module per job:

- ``settings``: how to run a model over a slide (:class:`InferenceSettings`) and on which device;
- ``grid``: the tile grid over a slide's tissue and the tiles (level-0 px);
- ``predict``: batched prediction of a slide's tiles into a heatmap (CPU threads, TTA, scratch);
- ``stitch``: stitching tile probabilities into a heatmap with bounded memory;
- ``heatmap``: heatmap files (pyramidal TIFF + metadata), the hand-off to ``evaluate``;
- ``overlay``: the PNG thumbnail of a slide with its heatmap and annotation outlines.
"""
