"""Patches from slides: class-balanced sampling, the patch cache (format, writer, reader,
importer) and building the caches from slides (what ``prepare`` runs)."""
