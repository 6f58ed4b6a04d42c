"""Whole-slide images: reading slides (the only OpenSlide import), lesion annotations, tissue
masks and the pyramidal TIFF writer. Coordinates are level-0 pixels, (x, y) top-left."""
