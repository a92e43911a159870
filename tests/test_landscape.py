"""The landscape stage (z_mode "continuous"): z as each particle's position along a curve of maps through the main
motion, found at fixed poses, carried by the run into predict (new particles get their z at their poses), with
maps on the run's grid.

The learning tests use the true poses of a five-state phantom (its arm swings through 40 degrees): the stage must
order the states in z (nothing tells it the states), and new particles must get z as well as the training ones.
The job tests go through the CLI on a seconds-long run.
"""

from __future__ import annotations

import json
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch

from cli.main import main

from cryofire_ext.errors import InputError
from cryofire_ext.landscape import fit_landscape, load_landscape
from cryofire_ext.recon.reconstruct import reconstruct
from cryofire_ext.refine.references import load_references
from cryofire_ext.results import Predictions
from cryofire_ext.train.config import TrainConfig
from tests.conftest import TEST_DEVICE
from tests.run_fixture import predict_one_and_two_processes, simulated_stack

torch.set_num_threads(2)
FIVE = (0.2,) * 5


def _corr(a, b) -> float:
    return abs(float(np.corrcoef(np.asarray(a).reshape(-1), np.asarray(b).reshape(-1))[0, 1]))


@pytest.fixture(scope="module")
def five_states():
    """A landscape fitted at the true poses of 1,500 images of five states (32 px, SNR 1), and 500 new images."""
    stack, truth = simulated_stack(n=1500, box=32, snr=1.0, seed=3, fractions=FIVE)
    new, new_truth = simulated_stack(n=500, box=32, snr=1.0, seed=8, fractions=FIVE)
    seen = []
    lm, z = fit_landscape(stack, truth.A, truth.shifts_A, TrainConfig(landscape_nodes=8), map_box=32,
                          map_pixel_size_A=stack.pixel_size_A, device=TEST_DEVICE, on_progress=seen.append)
    return lm, z, stack, truth, new, new_truth, seen


def test_the_landscape_orders_the_states_and_new_particles_get_the_same_z(five_states, tmp_path):
    lm, z, stack, truth, new, new_truth, seen = five_states
    assert z.shape == (1500, 1) and np.isfinite(z).all() and z.min() >= 0 and z.max() <= 1
    assert len(np.unique(z)) > 1400  # a coordinate per particle, not a code per class
    trained = _corr(z, truth.state)
    assert trained > 0.85
    z_new = lm.z_of(new, new_truth.A, new_truth.shifts_A)
    assert abs(_corr(z_new, new_truth.state) - trained) < 0.05  # amortized: the same function on new particles
    medians = [np.median(z[truth.state == s]) for s in range(5)]
    assert np.all(np.diff(medians) > 0) or np.all(np.diff(medians) < 0)  # the states in their order along z
    assert {r["stage"] for r in seen} == {"landscape"} and seen[-1]["epoch"] == seen[-1]["epochs"] - 1
    lm.save(tmp_path / "landscape.pt")
    again = load_landscape(tmp_path / "landscape.pt", device=TEST_DEVICE)
    np.testing.assert_allclose(again.z_of(new, new_truth.A, new_truth.shifts_A), z_new, atol=1e-5)


def test_the_curve_that_explains_the_images_is_kept_whichever_component_starts_it(five_states, monkeypatch):
    """The leading 3D variability components can be near-equal in variance (a continuum and a minority of
    misaligned particles), so their order is arbitrary: each starts a curve and the best-fitting curve is kept.
    Here the motion is only the last of the starts given; the first two order the particles at random."""
    from types import SimpleNamespace

    from cryofire_ext import landscape

    _, _, stack, truth, _, _, _ = five_states
    rng = np.random.default_rng(0)
    starts = np.stack([rng.normal(size=len(stack)), rng.normal(size=len(stack)),
                       truth.state + 0.1 * rng.normal(size=len(stack))], 1)
    monkeypatch.setattr(landscape, "variability_of", lambda obs, **kw: SimpleNamespace(coords=starts))
    seen = []
    _, z = fit_landscape(stack, truth.A, truth.shifts_A, TrainConfig(landscape_nodes=8), map_box=32,
                         map_pixel_size_A=stack.pixel_size_A, device=TEST_DEVICE, on_progress=seen.append)
    assert _corr(z, truth.state) > 0.85
    assert len(seen) == 3 * TrainConfig().landscape_iters  # every start ran
    monkeypatch.setattr(landscape, "variability_of", lambda obs, **kw: SimpleNamespace(coords=starts[:, :1]))
    _, z_first = fit_landscape(stack, truth.A, truth.shifts_A, TrainConfig(landscape_nodes=8), map_box=32,
                               map_pixel_size_A=stack.pixel_size_A, device=TEST_DEVICE)
    assert _corr(z_first, truth.state) < 0.5  # a random start alone does not find the motion


def test_the_maps_along_z_are_the_states_in_the_images_units(five_states):
    """The map at each end of z is the nearer end state's (better than the far one's), band-limited at the
    landscape's resolution, on the run's grid, at the scale of a reconstruction from the same images."""
    lm, z, stack, truth, *_ = five_states
    ends = lm.volumes(np.array([[0.0], [1.0]]))
    assert ends.shape == (2, 32, 32, 32) and np.isfinite(ends).all()
    low = z[:, 0] < np.quantile(z, 0.2)
    first = int(np.bincount(truth.state[low], minlength=5).argmax())
    last = 4 - first
    assert first in (0, 4)
    assert _corr(ends[0], truth.maps[first]) > _corr(ends[0], truth.maps[last]) + 0.02
    assert _corr(ends[1], truth.maps[last]) > _corr(ends[1], truth.maps[first]) + 0.02
    # the same particles' Wiener reconstruction at the same resolution: same scale within 25%
    rows = np.nonzero(truth.state == first)[0]
    ref = reconstruct(stack.take(rows).images, truth.A[rows], truth.shifts_A[rows], stack.ctf.subset(rows),
                      stack.pixel_size_A).numpy()
    from cryofire_ext import fourier

    low_ref = fourier.ifft3_centered(fourier.fft3_centered(torch.as_tensor(ref).double())
                                     * (fourier.radius_nyquist_grid(32) < lm.box / 32)).real.numpy()
    assert _corr(ends[0], low_ref) > 0.8
    assert 0.75 < np.linalg.norm(ends[0]) / np.linalg.norm(low_ref) < 1.25
    assert np.allclose(lm.volumes(np.array([[-3.0]])), ends[:1])  # z outside [0, 1] is the end of the curve


def test_particles_of_another_physical_box_are_refused(five_states):
    from dataclasses import replace

    lm, *_ = five_states
    other, truth = simulated_stack(n=8, box=32, snr=1.0, seed=1)
    other = replace(other, pixel_size_A=other.pixel_size_A * 1.5)
    with pytest.raises(InputError, match="do not match the landscape"):
        lm.z_of(other, truth.A, truth.shifts_A)


def test_too_few_particles_are_refused_by_name():
    stack, truth = simulated_stack(n=20, box=32, snr=1.0, seed=1)
    with pytest.raises(InputError, match="too few.*landscape_nodes"):
        fit_landscape(stack, truth.A, truth.shifts_A, TrainConfig(), map_box=32, map_pixel_size_A=stack.pixel_size_A)


def test_a_corrupt_or_foreign_landscape_file_is_named(tmp_path):
    bad = tmp_path / "landscape.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="landscape.pt"):
        load_landscape(bad)
    from cryofire_ext.train.checkpoint import save_checkpoint

    save_checkpoint(bad, {"model": {}, "box": 32})  # e.g. an earlier version's (an autoencoder's weights)
    with pytest.raises(InputError, match="not a landscape"):
        load_landscape(bad)


@pytest.mark.parametrize("field,value", [("landscape_resolution_A", 0.0), ("landscape_nodes", 1),
                                         ("landscape_iters", 0), ("z_mode", "smooth")])
def test_bad_landscape_settings_are_refused_by_name(field, value):
    with pytest.raises(InputError, match=field):
        TrainConfig(**{field: value})


def test_a_config_of_the_earlier_landscape_still_loads():
    cfg = TrainConfig.from_dict({**TrainConfig().to_dict(), "landscape_box": 32, "landscape_epochs": 20,
                                 "landscape_lr": 1e-3})
    assert cfg.landscape_nodes == TrainConfig().landscape_nodes


#: a seconds-long run: search warm start into two classes, one refinement round, a short landscape
CONTINUOUS_RUN = {"zdim": 2, "epochs": 1, "batch_size": 32, "hidden": 32, "dec_hidden": 32, "dec_layers": 2,
                  "enc_channels": [4, 8, 8, 16, 16], "warm_start": "search", "warm_images": 160, "warm_box": 16,
                  "warm_steps": 60, "warm_rotations": 800, "warm_max_shift_px": 1.0, "warm_classes": 2,
                  "warm_rounds": 1, "distill_images": 240, "pose_only_images": 0, "num_workers": 0,
                  "device": TEST_DEVICE, "polish_rounds": 1, "polish_global_search": False, "search_rotations": 800,
                  "z_mode": "continuous", "landscape_nodes": 4}


@pytest.fixture(scope="module")
def continuous_run(tmp_path_factory) -> tuple[Path, Path]:
    """`cryofire train --z-mode continuous` on a simulated two-state STAR (from the config file), and a second,
    independently simulated STAR of the same states for predict."""
    from integrations.simulated import SimulateConfig, run_simulate

    root = tmp_path_factory.mktemp("landscape")
    for name, seed in (("data", 4), ("new", 9)):
        run_simulate(SimulateConfig(out_dir=str(root / name), n=240 if name == "data" else 64, phantom=True, box=32,
                                    snr=3.0, shift_px=1.0, seed=seed))
    (root / "config.json").write_text(json.dumps({k: v for k, v in CONTINUOUS_RUN.items() if k != "z_mode"}))
    run = root / "run"
    assert main(["train", str(root / "data" / "particles.star"), "-o", str(run), "--config",
                 str(root / "config.json"), "--z-mode", "continuous"]) == 0
    return run, root / "new" / "particles.star"


def test_the_training_job_exports_the_landscape_z(continuous_run):
    run, _ = continuous_run
    assert (run / "landscape.pt").is_file()
    preds = Predictions.load(run / "predictions.npz")
    assert preds.meta["z"] == "landscape"
    assert len(np.unique(preds.z[:, 0])) > len(preds) // 2  # continuous: not one code per class or node
    # the refinement posed every particle against one map of all of them, then decided the classes at those
    # poses (test_polish checks they are the states): the warm start's two classes stay beside z, each with its
    # reference and map
    assert load_references(run / "references.pt").n_classes == preds.n_classes == 2
    assert len(list((run / "maps").glob("class_*.mrc"))) == len(np.unique(preds.class_id)) == 2
    lm = load_landscape(run / "landscape.pt")
    from integrations.job import load_particles

    stack = load_particles(run.parent / "data" / "particles.star")
    assert preds.z.shape == (len(stack), 1) and 0 <= preds.z.min() and preds.z.max() <= 1
    # scored against the other half-set's maps in training; the run's maps give new particles nearly the same z
    assert _corr(preds.z, lm.z_of(stack, preds.A, preds.shifts_A)) > 0.8
    with mrcfile.open(run / "maps" / "mean_z.mrc") as mrc:  # the landscape's map, on the run's grid
        assert mrc.data.shape == (32, 32, 32) and np.isfinite(mrc.data).all()
        assert float(mrc.voxel_size.x) == pytest.approx(stack.pixel_size_A, rel=1e-4)


def test_predict_gives_new_particles_their_z_at_their_poses(continuous_run, tmp_path):
    run, new_star = continuous_run
    out = tmp_path / "pred"
    assert main(["predict", str(run), str(new_star), "-o", str(out)]) == 0
    preds = Predictions.load(out / "predictions.npz")
    from integrations.job import load_particles

    expected = load_landscape(run / "landscape.pt").z_of(load_particles(new_star), preds.A, preds.shifts_A)
    np.testing.assert_allclose(preds.z, expected, atol=1e-5)
    assert preds.meta["z"] == "landscape"


def test_two_gloo_processes_give_new_particles_the_z_one_does(continuous_run, tmp_path):
    two, one = predict_one_and_two_processes(*continuous_run, tmp_path)
    assert two.meta["z"] == one.meta["z"] == "landscape"
    np.testing.assert_array_equal(two.ids, one.ids)
    np.testing.assert_allclose(two.z, one.z, atol=1e-5)


def test_predict_names_a_corrupt_landscape_and_writes_nothing(continuous_run, tmp_path):
    import shutil

    run, new_star = continuous_run
    broken = tmp_path / "run"
    shutil.copytree(run, broken)
    (broken / "landscape.pt").write_bytes(b"\0" * 64)
    out = tmp_path / "pred"
    assert main(["predict", str(broken), str(new_star), "-o", str(out)]) != 0
    assert not (out / "predictions.npz").exists()


def test_references_of_fewer_classes_than_the_refinement_gives_no_confidences(continuous_run, tmp_path, capsys):
    """A continuous run of an earlier release has one reference (its particles all in class 0); predicting its
    training particles again now refines them into two classes: the job still runs, without pose confidences,
    and says how to rebuild the references."""
    import dataclasses
    import shutil

    run, _ = continuous_run
    old = tmp_path / "run"
    shutil.copytree(run, old)
    refs = load_references(old / "references.pt")
    dataclasses.replace(refs, V=refs.V[:1], fsc=refs.fsc[:1]).save(old / "references.pt")
    out = tmp_path / "pred"
    assert main(["predict", str(old), str(run.parent / "data" / "particles.star"), "-o", str(out)]) == 0
    preds = Predictions.load(out / "predictions.npz")
    assert preds.n_classes == 2 and preds.pose_confidence is None
    said = " ".join(capsys.readouterr().err.split())
    assert "1 class map(s)" in said and "--resume" in said


def test_resuming_with_class_z_drops_the_landscape(continuous_run, tmp_path):
    import shutil

    run, _ = continuous_run
    again = tmp_path / "run"
    shutil.copytree(run, again)
    assert main(["train", str(run.parent / "data" / "particles.star"), "-o", str(again), "--resume",
                 "--z-mode", "classes"]) == 0
    assert not (again / "landscape.pt").exists()
    preds = Predictions.load(again / "predictions.npz")
    assert "z" not in preds.meta  # z is the pose model's again (its class codes), not the landscape's
    assert not np.allclose(preds.z, Predictions.load(run / "predictions.npz").z, atol=1e-3)


def test_a_run_without_class_z_gets_its_landscape_too(tmp_path):
    """`--zdim 0 --z-mode continuous`: the pose model has no z, the landscape still gives every particle one."""
    from integrations.simulated import SimulateConfig, run_simulate

    run_simulate(SimulateConfig(out_dir=str(tmp_path / "data"), n=160, phantom=True, box=32, snr=3.0, shift_px=1.0,
                                seed=6))
    cfg = {k: v for k, v in CONTINUOUS_RUN.items() if k != "z_mode"}
    cfg.update(zdim=0, warm_classes=1, warm_images=120, distill_images=160)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    run = tmp_path / "run"
    assert main(["train", str(tmp_path / "data" / "particles.star"), "-o", str(run), "--config",
                 str(tmp_path / "config.json"), "--z-mode", "continuous"]) == 0
    preds = Predictions.load(run / "predictions.npz")
    assert (run / "landscape.pt").is_file() and preds.meta["z"] == "landscape" and preds.zdim == 1
    assert np.all((preds.z >= 0) & (preds.z <= 1)) and len(np.unique(preds.z[:, 0])) > len(preds) // 2
