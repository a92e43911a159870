"""Shared test setup: where the real third-party fixtures lie, and RELION availability."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# the tiny trained run, one per session for every test module (importing it in a module would make a second one)
pytest_plugins = ["tests.run_fixture"]

#: the device the training/predict tests run on: `CRYOFIRE_DEVICE=cuda python -m pytest` runs them on a GPU
TEST_DEVICE = os.environ.get("CRYOFIRE_DEVICE", "cpu")

SHARED_FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


def shared_fixture(relpath: str) -> Path:
    """Path of a real third-party fixture in ../shared/fixtures; skips the test when absent."""
    path = SHARED_FIXTURES / relpath
    if not path.exists():
        pytest.skip(f"real fixture {relpath} not found under {SHARED_FIXTURES} (../shared/fixtures is absent)")
    return path


def phantom_training_set(n: int, seed: int, snr: float = 3.0, mix: tuple = (0.5, 0.5)):
    """(simulated dataset, normalised `TrainingImages` at 32 px, pixel size) of the bundled two-state
    phantom: `n` particles, `mix` the fraction in each state (half in each by default), shifts up to 2 px."""
    import numpy as np

    from cryofire_ext.phantom import phantom_maps
    from cryofire_ext.simulate import simulate
    from cryofire_ext.train.data import StackStats, TrainingImages

    maps, apix = phantom_maps(32, states=2)
    ds = simulate(maps, n, mix=list(mix), snr=snr, shift_px=2.0, pixel_size_A=apix, seed=seed)
    img = np.asarray(ds.particles.images.read(np.arange(n)), dtype=np.float64)
    return ds, TrainingImages(ds.particles, 32, StackStats(float(img.mean()), float(img.std()))), apix


def require_relion(*programs: str) -> None:
    """Skip with a reason when a RELION program is not installed (CI installs it)."""
    for prog in programs or ("relion_reconstruct",):
        if shutil.which(prog) is None:
            pytest.skip(f"{prog} not installed (apt-get install -y relion)")


def pytest_generate_tests(metafunc):
    """Parametrise contract tests over each class's `fixtures` list (see tests/contract.py)."""
    if "fixture_name" in metafunc.fixturenames and metafunc.cls is not None:
        names = list(getattr(metafunc.cls, "fixtures", []))
        metafunc.parametrize("fixture_name", names, ids=[n.replace("/", "_") for n in names])
