"""Patches from slides, one module per job:

- ``sampling``: class-balanced patch locations of one slide (level-0 px);
- ``split``: the slides of a build and their seeded train/test split (``split.json``);
- ``format``: the cache's file layout and manifest; ``writer`` / ``reader``: writing and reading
  caches; ``importer``: patch images (folders, files, globs, lists) into a cache;
  ``cache``: the public names of the four in one import;
- ``build``: building the unlabeled / labeled / test caches from slides (what ``prepare`` runs).
"""
