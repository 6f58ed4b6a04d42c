"""The exception family of lymphnode.

Every error the package raises on bad input derives from :class:`LymphnodeError`, so a caller (or a
CLI entry point) can catch one type. Messages name the file or parameter, the bad value and what
was expected.
"""

from __future__ import annotations


class LymphnodeError(Exception):
    """Base class of every lymphnode error."""


class SlideError(LymphnodeError):
    """A slide cannot be opened or read (missing, unsupported, truncated, out of range)."""


class AnnotationError(LymphnodeError):
    """An annotation file is malformed or does not fit its slide."""


class TissueError(LymphnodeError):
    """No usable tissue was found where some was required."""


class SamplingError(LymphnodeError):
    """Patch sampling could not meet its quota."""


class CacheError(LymphnodeError):
    """A patch cache is missing, corrupt, or was built with another configuration."""


class ConfigError(LymphnodeError):
    """A configuration value is invalid or parameters cannot be combined."""


class CheckpointError(LymphnodeError):
    """A checkpoint is missing, not a lymphnode checkpoint, or does not fit the model."""


class EvaluationError(LymphnodeError):
    """Heatmaps and annotations cannot be evaluated together."""


__all__ = [
    "AnnotationError",
    "CacheError",
    "CheckpointError",
    "ConfigError",
    "EvaluationError",
    "LymphnodeError",
    "SamplingError",
    "SlideError",
    "TissueError",
]
