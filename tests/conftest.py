"""Shared pytest fixtures: paths to the real fixtures (skipped when ../shared is missing)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
REAL_FIXTURES = PROJECT_ROOT.parent / "shared" / "fixtures" / "real"


@pytest.fixture(scope="session")
def real_fixtures() -> Path:
    """Folder of real slides/annotations; skips the test when ../shared is not beside the repo."""
    if not REAL_FIXTURES.is_dir():
        pytest.skip(
            f"real fixtures not found at {REAL_FIXTURES} (../shared is not beside the repo)"
        )
    return REAL_FIXTURES
