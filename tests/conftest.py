"""Shared fixtures: demo checkpoints are generated once per machine into a cache."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("CORRAL_CACHE_DIR", str(REPO / ".pytest_cache" / "corral"))
# the developer's own corral settings (~/.config/corral/config.toml) must not change what tests see
os.environ["XDG_CONFIG_HOME"] = str(REPO / ".pytest_cache" / "no-user-config")


@pytest.fixture(scope="session")
def scout_dir() -> Path:
    from toolbox.demo import resolve_checkpoint

    return resolve_checkpoint("demo:scout")


@pytest.fixture(scope="session")
def maverick_dir() -> Path:
    from toolbox.demo import resolve_checkpoint

    return resolve_checkpoint("demo:maverick")


@pytest.fixture
def scout_copy(scout_dir: Path, tmp_path: Path) -> Path:
    """A private copy of demo:scout that a test may damage."""
    dst = tmp_path / "scout"
    shutil.copytree(scout_dir, dst)
    return dst
