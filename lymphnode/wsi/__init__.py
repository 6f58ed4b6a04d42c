"""Whole-slide images, one module per job (coordinates: level-0 px, (x, y) top-left, as OpenSlide):

- ``slide``: opening slides, levels, reading regions as RGB (the only OpenSlide import);
- ``tiles``: direct reads of tiled JPEG TIFFs behind ``slide`` (only the tiles a region covers);
- ``annotations``: ASAP XML lesion outlines (tumor and exclusion polygons), their masks, writing;
- ``tissue``: tissue masks (Otsu on saturation of a low-resolution level);
- ``pyramid``: the pyramidal tiled TIFF writer (synthetic slides, masks, heatmaps).
"""
