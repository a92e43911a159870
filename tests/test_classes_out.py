"""Our classes reach the files users split by: `rlnClassNumber` (1-based) in particles.star and
`alignments3D/class` (0-based) in the .cs, in every path (train, predict, the RELION External job, the
cryoSPARC job), agreeing with the run's class maps; and the refinement settings a resume or a predict is
given are the ones that run and are recorded.

The input STAR says class 7 for every particle: none of that may survive. The particles are the bundled
two-state phantom at a high SNR, enough for a seconds-long run to find two classes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from unittest import mock

import mrcfile
import numpy as np
import pytest
import starfile
from cryosparc.dataset import Dataset

from cli.main import main
from cryofire_ext.results import Predictions
from tests.run_fixture import CLASS_RUN

N = 240
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """particles.star (+ .mrcs) of the two-state phantom whose rlnClassNumber is 7 for every particle, and the
    run's config file (training and refinement fields)."""
    from integrations.simulated import SimulateConfig, run_simulate

    root = tmp_path_factory.mktemp("classes")
    out = root / "data"
    run_simulate(SimulateConfig(out_dir=str(out), n=N, phantom=True, box=32, snr=3.0, shift_px=1.0, seed=4))
    star = starfile.read(out / "particles.star", always_dict=True)
    star["particles"]["rlnClassNumber"] = 7
    starfile.write(star, out / "particles.star", overwrite=True)
    (root / "config.json").write_text(json.dumps(CLASS_RUN))
    return out


@pytest.fixture(scope="module")
def trained(data) -> Path:
    """`cryofire train` on the class-7 STAR (the module's one training run)."""
    run = data.parent / "run"
    assert main(["train", str(data / "particles.star"), "-o", str(run), "--config", str(data.parent / "config.json")]) == 0
    return run


def check_classes_out(folder: Path, star_name: str = "particles.star", cs_name: str | None = "particles.cs") -> np.ndarray:
    """The exports in `folder` carry the predictions' classes (two or more), not the input's 7, and the class
    maps and classes.json agree with them. Returns the classes (0-based) in the predictions' order."""
    preds = Predictions.load(folder / "predictions.npz")
    classes = preds.class_id
    assert len(np.unique(classes)) >= 2, np.bincount(classes)
    rows = starfile.read(folder / star_name, always_dict=True)["particles"]
    np.testing.assert_array_equal(rows["rlnClassNumber"].to_numpy(), classes + 1)  # written in the stack's order
    assert 7 not in set(rows["rlnClassNumber"])
    if cs_name is not None:
        cs = Dataset.load(folder / cs_name)
        np.testing.assert_array_equal(np.asarray(cs["alignments3D/class"]), classes)  # written in the same order
    info = json.loads((folder / "classes.json").read_text())
    assert info["counts"] == np.bincount(classes).tolist()
    for k in np.unique(classes):
        with mrcfile.open(folder / "maps" / f"class_{k + 1:02d}.mrc") as mrc:
            assert mrc.data.shape == (32, 32, 32) and np.isfinite(mrc.data).all()
    return classes


def test_train_exports_our_classes(trained):
    check_classes_out(trained)
    assert json.loads((trained / "refine.json").read_text())["config"] == {"polish_rounds": 1,
                                                                           "polish_global_search": False,
                                                                           "search_rotations": 800,
                                                                           "new_particles": "references"}


def test_predict_exports_our_classes_with_the_runs_refinement(trained, data, tmp_path):
    out = tmp_path / "pred"
    assert main(["predict", str(trained), str(data / "particles.star"), "-o", str(out)]) == 0
    check_classes_out(out)
    assert Predictions.load(out / "predictions.npz").meta["refine"]["polish_rounds"] == 1  # the run's setting


def test_relion_external_job_exports_our_classes(data, tmp_path):
    from integrations.relion.external_job import run_relion_external

    project = tmp_path / "project"
    (project / "Import").mkdir(parents=True)
    for f in data.iterdir():
        shutil.copy(f, project / "Import" / f.name)
    params = [f"--{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in CLASS_RUN.items()]
    rc = run_relion_external(["--o", "External/job001/", "--in_parts", "Import/particles.star", *params, "--j", "2"],
                             project_dir=project)
    assert rc == 0, (project / "External/job001/run.err").read_text()
    check_classes_out(project / "External/job001", cs_name=None)


def test_cryosparc_job_exports_our_classes(data, tmp_path):
    """The cryoSPARC external job at the API-client boundary (tests/test_cryosparc_external.FakeServer), with the
    real trainer: the saved output's alignments3D/class are the run's classes, matched on uid."""
    from cryosparc.tools import CryoSPARC

    from cryofire_ext.refine.config import RefineConfig
    from cryofire_ext.train.config import TrainConfig
    from integrations.cryosparc import write_cs
    from integrations.cryosparc.external_job import run_cryosparc_job
    from integrations.formats import read_particles
    from tests.test_cryosparc_external import PASSWORD, PROJECT, SOURCE, WORKSPACE, FakeServer

    project = tmp_path / "CS-project"
    (project / SOURCE).mkdir(parents=True)
    for f in data.glob("*.mrcs"):
        shutil.copy(f, project / SOURCE / f.name)
    stack = read_particles(data / "particles.star")
    write_cs(stack, project / SOURCE / "particles.cs")
    dset = Dataset.load(project / SOURCE / "particles.cs")
    dset["blob/path"] = np.array([f"{SOURCE}/{Path(p).name}" for p in dset["blob/path"]], dtype=object)
    server = FakeServer(project, dset)
    with mock.patch("cryosparc.tools.APIClient", return_value=server.api):
        cs = CryoSPARC("http://localhost:39000", host=None, base_port=None, email="u@lab.org", password=PASSWORD)
    train_fields = {k: tuple(v) if isinstance(v, list) else v for k, v in CLASS_RUN.items()
                    if k not in RefineConfig.fields_in(CLASS_RUN)}
    run_cryosparc_job(cs, PROJECT, WORKSPACE, f"{SOURCE}.particles", TrainConfig(**train_fields),
                      run_dir=tmp_path / "run", refine=RefineConfig(polish_rounds=1, polish_global_search=False))
    classes = check_classes_out(tmp_path / "run")
    saved = {c.args[2]: c.args[3] for c in server.calls_to("jobs.save_output")}["particles"]
    preds = Predictions.load(tmp_path / "run" / "predictions.npz")
    order = {u: i for i, u in enumerate(preds.ids)}
    np.testing.assert_array_equal(np.asarray(saved["alignments3D/class"]),
                                  classes[[order[str(u)] for u in saved["uid"]]])


# ---------------------------------------------------------------- refinement settings on resume and predict
def test_resume_and_predict_run_and_record_the_refinement_settings_they_are_given(trained, data, tmp_path):
    """`train --resume --polish-rounds 0` on a finished run: the export runs no refinement (the model pass's poses)
    and refine.json says 0, while config.json (training settings only) is unchanged; a later predict without flags
    runs the run's saved 0 rounds, and with `--polish-rounds 1` refines and records 1."""
    from cryofire_ext.predict import load_trained, model_pass
    from cryofire_ext.refine.config import RefineConfig
    from integrations.formats import read_particles
    from integrations.job import saved_refine_config

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    star = data / "particles.star"
    config_before = json.loads((run / "config.json").read_text())["config"]
    assert main(["train", str(star), "-o", str(run), "--resume", "--polish-rounds", "0"]) == 0
    assert saved_refine_config(run) == RefineConfig(polish_rounds=0, polish_global_search=False, search_rotations=800)
    config_after = json.loads((run / "config.json").read_text())["config"]
    assert "polish_rounds" not in config_after
    assert {k: v for k, v in config_after.items() if k not in ("created", "command_line")} == {
        k: v for k, v in config_before.items() if k not in ("created", "command_line")}
    plain = model_pass(load_trained(run, device="cpu"), read_particles(star))
    exported = Predictions.load(run / "predictions.npz")
    np.testing.assert_allclose(exported.A, plain.A, atol=1e-5)
    assert exported.meta["refine"]["polish_rounds"] == 0

    assert main(["predict", str(run), str(star), "-o", str(tmp_path / "p0")]) == 0  # the run's settings: 0 rounds
    np.testing.assert_allclose(Predictions.load(tmp_path / "p0" / "predictions.npz").A, plain.A, atol=1e-5)
    assert main(["predict", str(run), str(star), "-o", str(tmp_path / "p1"), "--polish-rounds", "1"]) == 0
    moved = Predictions.load(tmp_path / "p1" / "predictions.npz")
    assert moved.meta["refine"]["polish_rounds"] == 1 and saved_refine_config(tmp_path / "p1").polish_rounds == 1
    assert not np.allclose(moved.A, plain.A, atol=1e-3)  # one round of refinement ran


def test_a_runs_legacy_config_gives_its_refinement_settings(tmp_path):
    """Runs made before refine.json kept polish_rounds in config.json: a resume or predict still runs them."""
    from integrations.job import saved_refine_config

    (tmp_path / "config.json").write_text(json.dumps({"format": "cryofire-train-config", "format_version": 1,
                                                      "config": {"zdim": 2, "polish_rounds": 5}}))
    assert saved_refine_config(tmp_path).polish_rounds == 5
    assert saved_refine_config(tmp_path / "nothing").polish_rounds == 3  # the default
