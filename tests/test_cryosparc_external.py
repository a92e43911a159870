"""cryoSPARC external job at the API-client boundary (as cryosparc-tools' own tests do: APIClient mocked).

The real cryosparc-tools controllers run; only `cryosparc.tools.APIClient` is replaced by a
recording fake server. The input particles are rows of a real cryoSPARC refinement .cs
(../shared/fixtures/cryodrgn/cryosparc_P12_J24_001_particles.cs) pointed at a stack we write.
"""

from __future__ import annotations

import types
from datetime import datetime, timezone
from pathlib import Path
from unittest import mock

import mrcfile
import numpy as np
import pytest
from cryosparc.dataset import Dataset
from cryosparc.models.job import Job
from cryosparc.models.job_spec import (InputSlot, InputSpec, JobSpec, Output, OutputResult, OutputSlot, OutputSpec,
                                      ResourceSpec)
from scipy.spatial.transform import Rotation

from cryofire_ext.errors import InputError
from cryofire_ext.poses import cryosparc_pose_to_matrix
from cryofire_ext.results import Predictions
from tests.conftest import shared_fixture
from tests.conftest import TEST_DEVICE

N, BOX, ZDIM = 24, 32, 3
PROJECT, WORKSPACE, SOURCE, NEW = "P12", "W1", "J24", "J43"
PASSWORD = "s3cret-pw-do-not-log"

# Fields a CryoSPARC 5 server allots per slot dtype (alignments3D as in the real J24 refinement .cs).
SERVER_FIELDS = {
    "alignments3D": [("split", "<u4"), ("shift", "<f4", (2,)), ("pose", "<f4", (3,)), ("psize_A", "<f4"),
                     ("error", "<f4"), ("error_min", "<f4"), ("resid_pow", "<f4"), ("slice_pow", "<f4"),
                     ("image_pow", "<f4"), ("cross_cor", "<f4"), ("alpha", "<f4"), ("weight", "<f4"),
                     ("pose_ess", "<f4"), ("shift_ess", "<f4"), ("class_posterior", "<f4"), ("class", "<u4"),
                     ("class_ess", "<f4")],
    "components": [("component", "<u4"), ("value", "<f4")],
    "map": [("path", "O"), ("shape", "<u4", (3,)), ("psize_A", "<f4")],
}


def _job(uid: str, type_: str = "snowflake", outputs: dict | None = None) -> Job:
    spec = JobSpec(type=type_, ui_tile_width=1, ui_tile_height=1, resource_spec=ResourceSpec())
    for name, (kind, slots) in (outputs or {}).items():
        spec.outputs.root[name] = Output(type=kind, title=name,
                                         results=[OutputResult(name=s, dtype=s) for s in slots])
    return Job(uid=uid, uid_num=int(uid[1:]), project_uid=PROJECT, project_uid_num=int(PROJECT[1:]), spec=spec,
               job_dir=uid, status="building", status_num=5, build_errors=[],
               job_dir_size_last_updated=datetime.now(timezone.utc))


class FakeServer:
    """Answers the APIClient endpoints the job uses; records every call in `api.mock_calls`."""

    def __init__(self, project_dir: Path, input_dset: Dataset, source_slots=("blob", "ctf", "alignments3D")):
        self.api = mock.MagicMock(name="api")
        self.output_specs: dict[str, OutputSpec] = {}
        api = self.api
        api.config.get_version.return_value = "v5.0.3"
        api.projects.get_directory.return_value = str(project_dir)
        source = _job(SOURCE, "homo_refine_new", {"particles": ("particle", list(source_slots))})
        new = _job(NEW)
        api.jobs.find_one.side_effect = lambda p, j: {SOURCE: source, NEW: new}[j]
        api.jobs.create.return_value = new

        def add_input(project_uid, job_uid, name, spec):
            new.spec.inputs.root[name] = spec
            return new

        api.jobs.add_external_input.side_effect = add_input
        api.jobs.connect.return_value = new
        api.jobs.mark_running.return_value = new
        api.jobs.mark_completed.return_value = new
        api.jobs.mark_failed.return_value = new
        api.jobs.save_output.return_value = new
        api.jobs.load_input.return_value = input_dset

        def add_output(project_uid, job_uid, name, spec):
            self.output_specs[name] = spec
            return new

        def output_fields(project_uid, job_uid, name, dtype_params):
            fields = []
            for slot in self.output_specs[name].slots:
                fields += [(f"{slot.name}/{f[0]}", *f[1:]) for f in SERVER_FIELDS[slot.dtype]]
            return fields

        api.jobs.add_external_output.side_effect = add_output
        api.jobs.get_output_fields.side_effect = output_fields

    def calls(self) -> list[str]:
        return [c[0] for c in self.api.mock_calls if c[0].count(".") == 1 and not c[0].startswith("config")]

    def calls_to(self, name: str) -> list:
        return [c for c in self.api.mock_calls if c[0] == name]


def _input_dataset(project_dir: Path) -> Dataset:
    """N rows of the real J24 .cs (uid, blob, ctf), blob pointed at a stack of ours under the project dir."""
    real = Dataset.load(shared_fixture("cryodrgn/cryosparc_P12_J24_001_particles.cs"))
    rows = real.take(np.arange(N))
    keep = ["uid"] + [f for f in rows.fields() if f.startswith(("blob/", "ctf/"))]
    dset = rows.filter_fields(keep)
    stack_rel = f"{SOURCE}/extract/particles_{BOX}.mrcs"
    (project_dir / SOURCE / "extract").mkdir(parents=True)
    rng = np.random.default_rng(0)
    with mrcfile.new(project_dir / stack_rel) as mrc:
        mrc.set_data(rng.normal(size=(N, BOX, BOX)).astype(np.float32))
    dset["blob/path"] = np.array([stack_rel] * N, dtype=object)
    dset["blob/idx"] = np.arange(N, dtype=np.uint32)[::-1]
    dset["blob/shape"] = np.tile(np.array([BOX, BOX], dtype=np.uint32), (N, 1))
    return dset


def _fake_trainer(calls: list):
    """Stand-in for integrations.job.run_training_job: reads every image, writes the run folder's files."""

    def run_training_job(particles, out_dir, config, *, datadir=None, should_stop=None, force=False, argv=None,
                         on_progress=None, resume=False, refine=None):
        calls.append({"stack": particles, "config": config, "argv": argv, "refine": refine})
        images = particles.require_images().read(np.arange(len(particles)))
        assert images.shape == (len(particles), particles.box, particles.box)
        out_dir = Path(out_dir)
        (out_dir / "maps").mkdir(parents=True, exist_ok=force)
        rng = np.random.default_rng(1)
        n = len(particles)
        preds = Predictions(ids=particles.ids, A=Rotation.random(n, random_state=2).as_matrix(),
                            shifts_A=rng.normal(scale=5.0, size=(n, 2)), z=rng.normal(size=(n, config.zdim)),
                            loss=rng.random(n), class_id=np.arange(n) % 3, meta={"pixel_size_A": particles.pixel_size_A})
        preds.save(out_dir / "predictions.npz", force=force)
        maps = []
        for k in range(2):
            path = out_dir / "maps" / f"map_{k:03d}.mrc"
            with mrcfile.new(path, overwrite=True) as mrc:
                mrc.set_data(rng.normal(size=(particles.box,) * 3).astype(np.float32))
                mrc.voxel_size = particles.pixel_size_A
            maps.append(path)
        from matplotlib.figure import Figure

        fig = Figure()
        fig.add_subplot().plot([3, 2, 1])
        fig.savefig(out_dir / "loss.png")
        if on_progress is not None:
            on_progress({"epoch": 0, "batch": 3, "loss": 0.5})
        return types.SimpleNamespace(out_dir=out_dir, particles_star=out_dir / "particles.star",
                                     particles_cs=out_dir / "particles.cs", predictions=out_dir / "predictions.npz",
                                     maps=maps, loss_plot=out_dir / "loss.png")

    return run_training_job


@pytest.fixture
def setup(tmp_path, monkeypatch):
    from cryosparc.tools import CryoSPARC

    project_dir = tmp_path / "CS-project"
    project_dir.mkdir()
    dset = _input_dataset(project_dir)
    server = FakeServer(project_dir, dset)
    trained: list = []
    with mock.patch("cryosparc.tools.APIClient", return_value=server.api):
        cs = CryoSPARC("http://localhost:39000", host=None, base_port=None, email="u@lab.org", password=PASSWORD)
    return types.SimpleNamespace(cs=cs, server=server, dset=dset, trained=trained, tmp=tmp_path,
                                 project_dir=project_dir)


@pytest.fixture
def fake_training(setup, monkeypatch):
    """Replace the trainer by `_fake_trainer` (these tests are about the cryoSPARC side, not training)."""
    import integrations.job

    monkeypatch.setattr(integrations.job, "run_training_job", _fake_trainer(setup.trained))
    return setup


def _config(zdim=ZDIM):
    from cryofire_ext.train.config import TrainConfig

    return TrainConfig(zdim=zdim, epochs=1)


def test_job_calls_slots_dtypes_and_saved_output(fake_training):
    from integrations.cryosparc.external_job import run_cryosparc_job

    s = fake_training
    result = run_cryosparc_job(s.cs, PROJECT, WORKSPACE, f"{SOURCE}.particles", _config(), run_dir=s.tmp / "run")
    api = s.server.api
    assert result.job_uid == NEW

    # the order of what the job asks the server
    calls = s.server.calls()
    order = ["jobs.create", "jobs.add_external_input", "jobs.connect", "jobs.mark_running", "jobs.load_input",
             "jobs.add_external_output", "jobs.save_output", "jobs.mark_completed"]
    positions = [calls.index(c) for c in order]
    assert positions == sorted(positions), calls
    assert calls.index("jobs.find_one") < calls.index("jobs.create")  # the source is checked before a job exists
    assert "jobs.mark_failed" not in calls
    api.jobs.create.assert_called_once_with(PROJECT, WORKSPACE, type="snowflake", title="cryoFIRE ab initio",
                                            description=mock.ANY)
    api.jobs.add_external_input.assert_called_once_with(PROJECT, NEW, "particles", InputSpec(
        type="particle", title="Particles to reconstruct", description="",
        slots=[InputSlot(name="blob", dtype="blob", required=True), InputSlot(name="ctf", dtype="ctf", required=True)],
        count_min=1, count_max=1))
    api.jobs.connect.assert_called_once_with(PROJECT, NEW, "particles", source_job_uid=SOURCE,
                                             source_output_name="particles")
    api.jobs.load_input.assert_called_once_with(PROJECT, NEW, "particles", slots=["blob", "ctf"])

    # output slots: alignments3D and one components slot per latent dimension, passing the input through
    spec = s.server.output_specs["particles"]
    assert spec.type == "particle" and spec.passthrough == "particles"
    assert spec.slots == [OutputSlot(name="alignments3D", dtype="alignments3D")] + [
        OutputSlot(name=f"components_mode_{k}", dtype="components") for k in range(ZDIM)]

    # the saved particle dataset: valid Dataset, same uids, poses convert back to our A
    saved_calls = {c.args[2]: c.args[3] for c in s.server.calls_to("jobs.save_output")}
    out = saved_calls["particles"]
    assert isinstance(out, Dataset)
    again = Dataset.load(_roundtrip(out, s.tmp / "saved.cs"))
    np.testing.assert_array_equal(again["uid"], s.dset["uid"])
    assert again["alignments3D/pose"].dtype == np.float32 and again["alignments3D/pose"].shape == (N, 3)
    assert again["alignments3D/shift"].dtype == np.float32
    assert again[f"components_mode_{ZDIM - 1}/component"].dtype == np.uint32
    preds = Predictions.load(s.tmp / "run" / "predictions.npz")
    np.testing.assert_array_equal(preds.ids, s.dset["uid"].astype(str))  # ids are the uids as text
    np.testing.assert_allclose(cryosparc_pose_to_matrix(again["alignments3D/pose"]), preds.A, atol=2e-6)
    np.testing.assert_allclose(again["alignments3D/shift"] * again["alignments3D/psize_A"][:, None],
                               preds.shifts_A, atol=1e-4)
    np.testing.assert_allclose(again["alignments3D/psize_A"], s.dset["blob/psize_A"])
    for k in range(ZDIM):
        assert np.all(again[f"components_mode_{k}/component"] == k)
        np.testing.assert_allclose(again[f"components_mode_{k}/value"], preds.z[:, k], rtol=1e-6)
    np.testing.assert_allclose(again["alignments3D/class_posterior"], 1.0)
    np.testing.assert_array_equal(again["alignments3D/class"], preds.class_id)  # the run's classes, 0-based
    assert np.any(preds.class_id != 0)

    # the stack the trainer saw: blob paths resolved against the project directory, CTF from the .cs
    stack = s.trained[0]["stack"]
    assert stack.box == BOX and len(stack) == N
    np.testing.assert_allclose(stack.ctf.defocus_u_A, s.dset["ctf/df1_A"], rtol=1e-6)

    # volumes: uploaded into the job directory and saved as volume outputs
    uploads = [c.kwargs["path"] for c in s.server.calls_to("projects.upload_file")]
    assert uploads == [f"{NEW}/cryofire_map_000.mrc", f"{NEW}/cryofire_map_001.mrc"]
    for k in range(2):
        vol = saved_calls[f"volume_{k}"]
        assert s.server.output_specs[f"volume_{k}"].type == "volume"
        assert vol["map/path"][0] == f"{NEW}/cryofire_map_{k:03d}.mrc"
        assert list(vol["map/shape"][0]) == [BOX] * 3
        assert vol["map/psize_A"][0] == pytest.approx(float(s.dset["blob/psize_A"][0]), rel=1e-5)
    assert result.volumes == uploads

    # log lines and the two plots (loss, latent)
    texts = [c.args[2] for c in s.server.calls_to("jobs.add_event_log")]
    assert any("training done" in t for t in texts)
    assert "training: epoch=0 batch=3 loss=0.5" in texts  # the trainer's progress dict, as a log line
    plots = [c.kwargs.get("text") for c in s.server.calls_to("jobs.add_image_log")]
    assert plots == ["Training loss", "Latent coordinates z (PCA)"]
    # credentials never reach the job log
    assert not any(PASSWORD in str(c) for c in api.mock_calls)


def _roundtrip(dset: Dataset, path: Path) -> Path:
    with open(path, "wb") as fh:
        dset.save(fh)
    return path


def test_error_inside_the_job_marks_it_failed_with_traceback(setup, monkeypatch):
    from integrations.cryosparc.external_job import run_cryosparc_job

    s = setup

    def broken(*args, **kwargs):
        raise RuntimeError("decoder exploded")

    import integrations.job

    monkeypatch.setattr(integrations.job, "run_training_job", broken)
    with pytest.raises(RuntimeError, match="decoder exploded"):
        run_cryosparc_job(s.cs, PROJECT, WORKSPACE, f"{SOURCE}.particles", _config(), run_dir=s.tmp / "run")
    failed = s.server.calls_to("jobs.mark_failed")
    assert len(failed) == 1
    error = failed[0].kwargs["error"]
    assert "Traceback" in error and "decoder exploded" in error
    assert "jobs.mark_completed" not in s.server.calls()


def test_input_group_without_ctf_is_refused_before_a_job_is_made(setup):
    from integrations.cryosparc.external_job import run_cryosparc_job

    s = setup
    no_ctf = _job(SOURCE, "extract_micrographs_multi", {"particles": ("particle", ["blob", "location"])})
    s.server.api.jobs.find_one.side_effect = lambda p, j: no_ctf
    with pytest.raises(InputError, match=r"J24\.particles has no ctf slot \(it has: blob, location\)"):
        run_cryosparc_job(s.cs, PROJECT, WORKSPACE, f"{SOURCE}.particles", _config(), run_dir=s.tmp / "run")
    assert "jobs.create" not in s.server.calls()
    with pytest.raises(InputError, match="has no output 'parts'"):
        run_cryosparc_job(s.cs, PROJECT, WORKSPACE, f"{SOURCE}.parts", _config(), run_dir=s.tmp / "run")
    with pytest.raises(InputError, match="JOB.OUTPUT"):
        run_cryosparc_job(s.cs, PROJECT, WORKSPACE, "J24", _config(), run_dir=s.tmp / "run")


def test_loaded_input_without_ctf_fails_the_job(fake_training):
    """A server that connects the group but hands back no ctf fields: the job fails, readable."""
    from integrations.cryosparc.external_job import run_cryosparc_job

    s = fake_training
    s.server.api.jobs.load_input.return_value = s.dset.filter_prefixes(["blob"])
    with pytest.raises(InputError, match="no ctf fields"):
        run_cryosparc_job(s.cs, PROJECT, WORKSPACE, f"{SOURCE}.particles", _config(), run_dir=s.tmp / "run")
    assert "no ctf fields" in s.server.calls_to("jobs.mark_failed")[0].kwargs["error"]


def test_missing_url_and_credentials_are_clear_errors(monkeypatch, tmp_path):
    from integrations.cryosparc import external_job as ej

    with pytest.raises(InputError, match="no server URL. Pass --url"):
        ej.connect_cryosparc(None, env={})
    # no email/password and no saved session (the session file is looked up in a fresh HOME)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / ".config"))
    with mock.patch("cryosparc.auth.InstanceAuthSessions.load") as load:
        load.return_value.find.return_value = None
        with pytest.raises(InputError, match="no credentials for http://cs:39000. Set CRYOSPARC_EMAIL"):
            ej.connect_cryosparc("http://cs:39000", env={"CRYOSPARC_EMAIL": "u@lab.org"})
    # refused credentials: the message names the server, never the password
    api = mock.MagicMock()
    api.users.me.side_effect = RuntimeError(f"401 Unauthorized for password {PASSWORD}")
    with mock.patch("cryosparc.tools.APIClient", return_value=api):
        with pytest.raises(InputError) as info:
            ej.connect_cryosparc(env={"CRYOSPARC_BASE_URL": "http://cs:39000", "CRYOSPARC_EMAIL": "u@lab.org",
                                      "CRYOSPARC_PASSWORD": PASSWORD})
    assert "could not connect to http://cs:39000" in str(info.value) and PASSWORD not in str(info.value)


def test_cli_missing_url_exits_2(monkeypatch, capsys):
    from cli.main import main

    monkeypatch.delenv("CRYOSPARC_BASE_URL", raising=False)
    code = main(["cryosparc", "run", "--project", "P1", "--workspace", "W1", "--particles", "J2.particles",
                 "--zdim", "2"])
    assert code == 2
    assert "no server URL" in capsys.readouterr().err
    assert main(["cryosparc", "run", "--project", "P1", "--workspace", "W1", "--particles", "J2.particles",
                 "--zdmi", "2"]) == 2
    assert "unknown parameter --zdmi" in capsys.readouterr().err


def test_export_writes_importable_cs_with_poses_and_latents(tmp_path):
    from cli.main import main

    real = Dataset.load(shared_fixture("cryodrgn/cryosparc_P12_J24_001_particles.cs"))
    like = tmp_path / "particles.cs"
    _roundtrip(real, like)
    n = 50
    pick = np.random.default_rng(3).choice(len(real), n, replace=False)
    A = Rotation.random(n, random_state=4).as_matrix()
    shifts = np.random.default_rng(5).normal(scale=3, size=(n, 2))
    z = np.random.default_rng(6).normal(size=(n, 2))
    run = tmp_path / "run"
    run.mkdir()
    Predictions(ids=real["uid"][pick].astype(str), A=A, shifts_A=shifts, z=z, loss=np.zeros(n)).save(
        run / "predictions.npz")
    out = tmp_path / "out.cs"
    assert main(["cryosparc", "export", str(run), "--like", str(like), "-o", str(out)]) == 0
    got = Dataset.load(out)
    order = np.argsort(pick)  # rows come back in the --like file's order
    np.testing.assert_array_equal(got["uid"], real["uid"][np.sort(pick)])
    np.testing.assert_allclose(cryosparc_pose_to_matrix(got["alignments3D/pose"]), A[order], atol=2e-6)
    np.testing.assert_allclose(got["alignments3D/shift"] * got["alignments3D/psize_A"][:, None], shifts[order],
                               atol=1e-4)
    np.testing.assert_allclose(got["components_mode_1/value"], z[order, 1], rtol=1e-6)
    assert set(real.fields()) <= set(got.fields())  # every input field passes through
    np.testing.assert_array_equal(got["ctf/df1_A"], real["ctf/df1_A"][np.sort(pick)])
    csg = (tmp_path / "out.csg").read_text()  # the result group cryoSPARC's Import Result Group reads
    assert "type: particle\n" in csg and f"num_items: {n}" in csg
    for slot, kind in (("alignments3D", "alignments3D"), ("blob", "blob"), ("ctf", "ctf"),
                       ("components_mode_1", "components")):
        assert f"  {slot}:\n    metafile: '>out.cs'\n    num_items: {n}\n    type: particle.{kind}\n" in csg
    # our poses replaced the refinement's, and read back through our own .cs reader
    from integrations.cryosparc import read_cs

    stack = read_cs(out)
    np.testing.assert_allclose(stack.A, A[order], atol=2e-6)
    # refuses to overwrite; a run whose ids are not uids is named as such
    assert main(["cryosparc", "export", str(run), "--like", str(like), "-o", str(out)]) == 2
    Predictions(ids=[f"{i}@stack.mrcs" for i in range(n)], A=A, shifts_A=shifts, z=z, loss=np.zeros(n)).save(
        run / "predictions.npz", force=True)
    with pytest.raises(InputError, match="none of the 2019 particle uids match"):
        from integrations.cryosparc import export_cs

        export_cs(run, like, tmp_path / "other.cs")


def test_apply_predictions_replaces_the_input_classes(tmp_path):
    """A refinement .cs whose particles are all in class 7 (0-based 6): the run's class_id replaces it,
    alongside poses and latents, on rows matched by uid; every other input field passes through."""
    from integrations.cryosparc import apply_predictions, export_cs

    real = Dataset.load(shared_fixture("cryodrgn/cryosparc_P12_J24_001_particles.cs")).take(np.arange(40))
    real["alignments3D/class"] = np.full(len(real), 6, dtype=np.uint32)
    n = 30
    pick = np.arange(n)[::-1]
    classes = np.arange(n) % 2
    preds = Predictions(ids=real["uid"][pick].astype(str), A=Rotation.random(n, random_state=1).as_matrix(),
                        shifts_A=np.zeros((n, 2)), z=np.zeros((n, 2)), loss=np.zeros(n), class_id=classes)
    out = apply_predictions(real, preds)
    assert len(out) == n and set(real.fields()) <= set(out.fields())
    np.testing.assert_array_equal(out["uid"], real["uid"][:n])
    np.testing.assert_array_equal(out["alignments3D/class"], classes[::-1])
    assert out["alignments3D/class"].dtype == np.uint32
    np.testing.assert_array_equal(out["alignments3D/class_posterior"], 1.0)
    np.testing.assert_array_equal(real["alignments3D/class"], 6)  # the input was not touched
    # the same through the offline export (`cryofire cryosparc export`)
    like = _roundtrip(real, tmp_path / "like.cs")
    run = tmp_path / "run"
    run.mkdir()
    preds.save(run / "predictions.npz")
    got = Dataset.load(export_cs(run, like, tmp_path / "out.cs"))
    np.testing.assert_array_equal(got["alignments3D/class"], classes[::-1])


def test_real_training_run_saves_uid_matched_output(setup):
    """Same job with the real trainer (a seconds-long run): the saved poses are the run's predictions."""
    from cryofire_ext.train.config import TrainConfig
    from integrations.cryosparc.external_job import run_cryosparc_job

    s = setup
    cfg = TrainConfig(zdim=2, epochs=1, batch_size=8, num_workers=0, device=TEST_DEVICE, warm_start="none", hidden=32,
                      dec_hidden=32, enc_channels=(8, 8, 16, 16, 16), log_every=1)
    result = run_cryosparc_job(s.cs, PROJECT, WORKSPACE, f"{SOURCE}.particles", cfg, run_dir=s.tmp / "real")
    out = {c.args[2]: c.args[3] for c in s.server.calls_to("jobs.save_output")}["particles"]
    preds = Predictions.load(s.tmp / "real" / "predictions.npz")
    order = {u: i for i, u in enumerate(preds.ids)}
    rows = [order[str(u)] for u in out["uid"]]
    np.testing.assert_array_equal(out["uid"], s.dset["uid"])
    np.testing.assert_allclose(cryosparc_pose_to_matrix(out["alignments3D/pose"]), preds.A[rows], atol=2e-6)
    np.testing.assert_allclose(out["components_mode_1/value"], preds.z[rows, 1], rtol=1e-6)
    assert len(result.volumes) == 1  # the map at mean z (no warm start: one class, no class maps)
    assert "jobs.mark_completed" in s.server.calls()
