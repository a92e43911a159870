"""`integrations.job.export_predictions` writes the refinement's classes (Predictions.class_id) into both exports.

Fixed Predictions, no model: this checks the wiring from predictions to files, not training
(tests/test_classes_out.py runs the whole flow with training).
"""

from __future__ import annotations

import numpy as np
import starfile
from cryosparc.dataset import Dataset

from cryofire_ext.poses import random_rotations
from cryofire_ext.results import Predictions
from integrations.relion import read_star
from integrations.run_folder import PARTICLES_CS, PARTICLES_STAR, PREDICTIONS
from tests.conftest import shared_fixture


def test_export_replaces_the_input_classes_with_the_predicted_ones(tmp_path, monkeypatch):
    import types

    import cryofire_ext.analysis
    from cryofire_ext.refine.config import RefineConfig
    from integrations.job import export_predictions

    stack = read_star(shared_fixture("cryodrgn/relion31.star"))
    n = len(stack)
    stack.class_id = np.full(n, 6)  # the input says RELION class 7 for every particle
    classes = np.arange(n) % 2
    preds = Predictions(ids=stack.ids, A=random_rotations(n, np.random.default_rng(0)), shifts_A=np.zeros((n, 2)),
                        z=np.zeros((n, 0), np.float32), loss=np.zeros(n), class_id=classes)
    monkeypatch.setattr(cryofire_ext.analysis, "write_maps", lambda *args, **kwargs: [])
    tm = types.SimpleNamespace(run_dir=tmp_path / "run", pixel_size_A=1.0,
                               class_volumes=lambda: np.zeros((2, 4, 4, 4), np.float32))
    job = export_predictions(preds, tm, stack, tmp_path / "out", RefineConfig())
    assert job.particles_star == tmp_path / "out" / PARTICLES_STAR and job.predictions.name == PREDICTIONS
    star = starfile.read(job.particles_star, always_dict=True)["particles"]
    np.testing.assert_array_equal(star["rlnClassNumber"].to_numpy(), classes + 1)
    cs = Dataset.load(str(tmp_path / "out" / PARTICLES_CS))
    np.testing.assert_array_equal(np.asarray(cs["alignments3D/class"]), classes)
