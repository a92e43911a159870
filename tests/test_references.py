"""The run's references and the alignment of new particles to them (`refine.references`), through predict and
select: poses against the truth, junk judged by its confidence, the saved file, the exported columns, the errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import starfile
import torch
from cryosparc.dataset import Dataset

from cli.main import main
from cryofire_ext.errors import InputError
from cryofire_ext.images import ArrayImages
from cryofire_ext.metrics import geodesic_deg
from cryofire_ext.particles import ParticleStack
from cryofire_ext.poses import random_rotations
from cryofire_ext.refine.references import align, build_references, confidence_at, load_references
from cryofire_ext.refine.search import GRID_KEEP, WarmMap, every_other_shift, search_scored, shift_grid
from cryofire_ext.results import Predictions
from cryofire_ext.train.data import TrainingImages
from tests.conftest import phantom_training_set, shared_fixture
from tests.run_fixture import CLASS_RUN, predict_one_and_two_processes


@pytest.fixture(scope="module")
def truth_references():
    """References built at the true poses and states of 600 phantom particles (SNR 1), and their images' stats."""
    ds, data, apix = phantom_training_set(600, 0, snr=1.0)
    grid = (torch.as_tensor(random_rotations(4000, np.random.default_rng(0))).float(), shift_grid(2.0))
    refs = build_references(data.read, 600, torch.as_tensor(ds.A).float(), torch.as_tensor(ds.shifts_A / apix).float(),
                            torch.as_tensor(ds.state), 2, 32, apix, grid)
    return refs, data.stats, apix


def test_new_particles_align_to_the_references_in_their_frame(truth_references):
    refs, stats, apix = truth_references
    new, _, _ = phantom_training_set(200, 1, snr=1.0)  # other images of the same states
    out = align(refs, TrainingImages(new.particles, 32, stats).read, 200)
    # the references are in the truth's frame, so the poses compare directly, without a global alignment
    assert np.median(geodesic_deg(out.A.numpy(), new.A)) < 3.0
    assert np.median(np.linalg.norm(out.shifts_px.numpy() - new.shifts_A / apix, axis=1)) < 0.5
    assert np.mean(out.labels.numpy() == new.state) > 0.9
    assert 0.8 < float(out.residual.median()) < 1.2  # the references explain them down to the noise
    again = align(refs, TrainingImages(new.particles, 32, stats).read, 200, chunk=37)
    np.testing.assert_allclose(again.A.numpy(), out.A.numpy(), atol=1e-5)  # chunking does not change the answer


def test_coarse_to_fine_grid_search_finds_the_exhaustive_searchs_poses(truth_references):
    refs, stats, apix = truth_references
    new, _, _ = phantom_training_set(100, 3, snr=1.0)
    img, ctf = TrainingImages(new.particles, 32, stats).read(np.arange(100))
    warm = WarmMap(refs.V, refs.rotations, refs.shifts_px, refs.box, refs.pixel_size_A, refs.sigma2)
    A_all, t_all, c_all, g_all = search_scored(warm, img, ctf, refine=False)
    A, t, c, g = search_scored(warm, img, ctf, refine=False, keep=GRID_KEEP)
    same = (A == A_all).all(-1).all(-1) & (t == t_all).all(-1) & (c == c_all)
    assert same.float().mean() >= 0.95  # the coarse pass keeps the best grid point
    kept = torch.isfinite(g)
    assert (kept.sum(1) >= GRID_KEEP).all() and (kept.sum(1) <= GRID_KEEP * refs.n_classes).all()
    # a kept rotation is scored in full (for the classes that kept it: never above the exhaustive best over classes)
    assert (g[kept] <= g_all[kept] + 1e-4 * (1.0 + g_all[kept].abs())).all()
    torch.testing.assert_close(g.amax(1)[same], g_all.amax(1)[same], rtol=1e-5, atol=1e-4)


def test_coarse_pass_keeps_the_pose_of_an_elongated_particle():
    """The tubulin dimer (a real map) at 64 px, SNR 0.1: at low resolution its two ends look alike, so a coarse pass
    on too few shells kept only the half-turned pose for about one particle in ten (0.5 of the grid's radius)."""
    import mrcfile

    from cryofire_ext.simulate import simulate
    from cryofire_ext.train.data import StackStats

    vol = mrcfile.read(shared_fixture("cryojax/3jar_dimer_bfm1_ps5_28.mrc")).astype(np.float32)
    apix, n_ref, n_new = 5.28, 2000, 300
    ds = simulate(vol, n_ref + n_new, snr=0.1, shift_px=4.0, pixel_size_A=apix, seed=0)
    img = np.asarray(ds.particles.images.read(np.arange(n_ref)), dtype=np.float64)
    data = TrainingImages(ds.particles, 64, StackStats(float(img.mean()), float(img.std())))
    grid = (torch.as_tensor(random_rotations(8000, np.random.default_rng(0))).float(), shift_grid(4.0, 1.5))
    refs = build_references(data.read, n_ref, torch.as_tensor(ds.A[:n_ref]).float(),
                            torch.as_tensor(ds.shifts_A[:n_ref] / apix).float(), torch.zeros(n_ref, dtype=torch.long),
                            1, 64, apix, grid)
    img, ctf = data.read(np.arange(n_ref, n_ref + n_new))
    warm = WarmMap(refs.V, refs.rotations, refs.shifts_px, refs.box, refs.pixel_size_A, refs.sigma2)
    A_all, t_all, _, _ = search_scored(warm, img, ctf, refine=False)
    A, t, _, _ = search_scored(warm, img, ctf, refine=False, keep=GRID_KEEP)
    assert ((A == A_all).all(-1).all(-1) & (t == t_all).all(-1)).float().mean() >= 0.9
    half_turns = [np.mean(geodesic_deg(a.numpy(), ds.A[n_ref:]) > 150) for a in (A, A_all)]
    assert half_turns[0] <= half_turns[1] + 0.01, half_turns


def test_every_other_shift_doubles_the_pitch_and_keeps_the_ends():
    coarse = every_other_shift(shift_grid(4.0, 1.5))  # 7 x 7 points, pitch 4/3 px
    assert len(coarse) == 16
    assert sorted(set(coarse[:, 0].tolist())) == pytest.approx([-4.0, -4 / 3, 4 / 3, 4.0])
    assert len(every_other_shift(torch.zeros(1, 2))) == 1


def test_junk_gets_a_lower_pose_confidence_than_particles(truth_references):
    refs, stats, apix = truth_references
    new, _, _ = phantom_training_set(200, 2, snr=1.0)
    raw = np.asarray(new.particles.images.read(np.arange(200)))
    noise = np.random.default_rng(5).normal(0.0, raw.std(), raw.shape).astype(np.float32)
    junk = ParticleStack(ids=new.particles.ids, pixel_size_A=apix, box=32, ctf=new.particles.ctf,
                         images=ArrayImages(noise))
    good = align(refs, TrainingImages(new.particles, 32, stats).read, 200)
    bad = align(refs, TrainingImages(junk, 32, stats).read, 200)
    assert np.mean(good.pose_confidence.numpy() >= 0.9) > 0.9
    assert np.mean(bad.pose_confidence.numpy() < 0.9) > 0.3
    assert float(bad.residual.median()) > 1.5 * float(good.residual.median())
    # at given poses: the true ones are confident, random ones are not
    read = TrainingImages(new.particles, 32, stats).read
    conf_true, prob_true = confidence_at(refs, read, 200, torch.as_tensor(new.A), torch.as_tensor(new.shifts_A / apix),
                                         torch.as_tensor(new.state))
    wrong = random_rotations(200, np.random.default_rng(9))
    conf_wrong, _ = confidence_at(refs, read, 200, torch.as_tensor(wrong), torch.as_tensor(new.shifts_A / apix),
                                  torch.as_tensor(new.state))
    assert float(conf_true.mean()) > 0.9 > 0.2 > float(conf_wrong.mean())
    assert float(prob_true.mean()) > 0.85


def test_references_round_trip_and_a_corrupt_file_is_named(truth_references, tmp_path):
    refs, _, _ = truth_references
    path = refs.save(tmp_path / "references.pt")
    back = load_references(path)
    assert torch.equal(back.V, refs.V) and back.sigma2 == refs.sigma2 and back.box == refs.box
    assert torch.equal(back.rotations, refs.rotations) and torch.equal(back.shifts_px, refs.shifts_px)
    (tmp_path / "bad.pt").write_bytes(b"\0" * 64)
    with pytest.raises(InputError, match="bad.pt"):
        load_references(tmp_path / "bad.pt")
    state = torch.load(path, weights_only=True)
    state["V"] = state["V"][:, :10]
    torch.save(state, tmp_path / "cut.pt")
    with pytest.raises(InputError, match="cut.pt: not the references"):
        load_references(tmp_path / "cut.pt")


# ---------------------------------------------------------------- through the CLI
@pytest.fixture(scope="module")
def exported_run(tmp_path_factory) -> tuple[Path, Path]:
    """`cryofire train` on a simulated two-state STAR, and a second, independently simulated STAR for predict."""
    from integrations.simulated import SimulateConfig, run_simulate

    root = tmp_path_factory.mktemp("references")
    for name, seed in (("data", 4), ("new", 9)):
        run_simulate(SimulateConfig(out_dir=str(root / name), n=240 if name == "data" else 120, phantom=True, box=32,
                                    snr=3.0, shift_px=1.0, seed=seed))
    (root / "config.json").write_text(json.dumps(CLASS_RUN))
    run = root / "run"
    assert main(["train", str(root / "data" / "particles.star"), "-o", str(run), "--config",
                 str(root / "config.json")]) == 0
    return run, root / "new" / "particles.star"


def test_training_saves_references_and_exports_each_particles_confidence(exported_run):
    run, _ = exported_run
    refs = load_references(run / "references.pt")
    preds = Predictions.load(run / "predictions.npz")
    assert refs.n_classes == preds.n_classes == 2 and refs.box == 32
    assert len(refs.rotations) == CLASS_RUN["search_rotations"]  # the job's refinement grid, not the warm start's
    assert preds.meta["inference"] == "refine"  # the training particles keep the refinement's poses
    assert preds.pose_confidence.shape == preds.class_probability.shape == (len(preds),)
    star = starfile.read(run / "particles.star", always_dict=True)["particles"]
    np.testing.assert_allclose(star["cryofirePoseConfidence"].to_numpy(), preds.pose_confidence, atol=1e-5)
    np.testing.assert_allclose(star["cryofireClassProbability"].to_numpy(), preds.class_probability, atol=1e-5)
    cs = Dataset.load(run / "particles.cs")
    np.testing.assert_allclose(cs["cryofire/pose_confidence"], preds.pose_confidence, atol=1e-6)
    np.testing.assert_allclose(cs["alignments3D/class_posterior"], preds.class_probability, atol=1e-6)


def test_predict_aligns_new_particles_to_the_references(exported_run, tmp_path):
    run, new_star = exported_run
    out = tmp_path / "pred"
    assert main(["predict", str(run), str(new_star), "-o", str(out)]) == 0
    preds = Predictions.load(out / "predictions.npz")
    assert preds.meta["inference"] == "references" and len(preds) == 120
    truth = np.load(new_star.parent / "truth.npz")
    # in the run's frame: the training particles' poses against their truth give the frame
    train = Predictions.load(run / "predictions.npz")
    train_truth = np.load(run.parent / "data" / "truth.npz")
    from cryofire_ext.metrics import rotation_error_deg, rotation_error_in_frame_deg

    frame = rotation_error_deg(train.A, train_truth["A"])
    new_err = rotation_error_in_frame_deg(preds.A, truth["A"], frame)  # judged in the run's frame, not realigned
    assert np.median(new_err) < max(2.0 * frame.median_deg, 6.0)
    assert preds.pose_confidence is not None and np.all((preds.pose_confidence >= 0) & (preds.pose_confidence <= 1))
    # the old path on demand
    out2 = tmp_path / "pred_refine"
    assert main(["predict", str(run), str(new_star), "-o", str(out2), "--new-particles", "refine"]) == 0
    assert Predictions.load(out2 / "predictions.npz").meta["inference"] == "refine"
    assert main(["predict", str(run), str(new_star), "-o", str(tmp_path / "x"), "--new-particles", "magic"]) != 0
    assert not (tmp_path / "x" / "predictions.npz").exists()


def test_predict_names_corrupt_references_and_writes_nothing(exported_run, tmp_path):
    run, new_star = exported_run
    broken = tmp_path / "run"
    shutil.copytree(run, broken)
    (broken / "references.pt").write_bytes(b"\0" * 64)
    out = tmp_path / "pred"
    assert main(["predict", str(broken), str(new_star), "-o", str(out)]) != 0
    assert not (out / "predictions.npz").exists()
    with pytest.raises(InputError, match="references.pt"):
        from cryofire_ext.predict import load_trained

        load_trained(broken)


def test_select_keeps_the_confident_particles(exported_run, tmp_path):
    run, _ = exported_run
    preds = Predictions.load(run / "predictions.npz")
    cut = float(np.median(preds.pose_confidence))
    out = tmp_path / "confident.star"
    assert main(["select", str(run), "--min-confidence", str(cut), "-o", str(out)]) == 0
    kept = starfile.read(out, always_dict=True)["particles"]
    assert len(kept) == int((preds.pose_confidence >= cut).sum())
    assert np.all(kept["cryofirePoseConfidence"].to_numpy() >= cut - 1e-6)
    for bad in ("1.5", "-0.1"):
        assert main(["select", str(run), "--min-confidence", bad, "-o", str(tmp_path / "no.star")]) != 0
    assert main(["select", str(run), "-o", str(tmp_path / "no.star")]) != 0  # neither clusters nor a threshold
    assert not (tmp_path / "no.star").exists()


def test_two_gloo_processes_predict_what_one_does(exported_run, tmp_path):
    two, one = predict_one_and_two_processes(*exported_run, tmp_path)
    assert two.meta["inference"] == one.meta["inference"] == "references"
    np.testing.assert_array_equal(two.ids, one.ids)  # gathered in input order
    np.testing.assert_allclose(two.A, one.A, atol=1e-5)
    np.testing.assert_allclose(two.shifts_A, one.shifts_A, atol=1e-5)
    np.testing.assert_array_equal(two.class_id, one.class_id)
    np.testing.assert_allclose(two.pose_confidence, one.pose_confidence, atol=1e-5)
