"""The model pass and inference (`pipeline.infer`) / load_trained on the shared tiny trained run: a fresh inference pass over any stack."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryofire_ext.errors import InputError
from cryofire_ext.pipeline import infer
from cryofire_ext.predict import load_trained
from cryofire_ext.refine.config import RefineConfig
from cryofire_ext.results import Predictions
from tests.run_fixture import simulated_stack
from tests.conftest import TEST_DEVICE


def test_load_trained_gives_maps_with_the_run_voxel_size(trained_run):
    tm = load_trained(trained_run)
    assert tm.box == 32 and tm.zdim == 2 and tm.pixel_size_A == pytest.approx(6.0)
    vols = tm.volumes(np.zeros((2, 2)))
    assert vols.shape == (2, 32, 32, 32) and vols.dtype == np.float32 and np.isfinite(vols).all()
    assert not np.allclose(tm.volumes(np.array([[3.0, -3.0]]))[0], vols[0])  # z changes the map
    with pytest.raises(InputError, match=r"\(m, 2\)"):
        tm.volumes(np.zeros((2, 3)))


def test_predict_runs_every_particle_including_new_images(trained_run):
    stack, _ = simulated_stack(n=40, box=32, snr=1.0, seed=9)  # images the run never saw
    p = infer(trained_run, stack, batch_size=16, device=TEST_DEVICE)
    assert len(p) == 40 and p.zdim == 2 and list(p.ids) == list(stack.ids)
    assert np.allclose(p.A @ np.swapaxes(p.A, -1, -2), np.eye(3), atol=1e-5)
    assert np.isfinite(p.loss).all() and (p.loss > 0).all()
    # batched inference is per particle: the batch size does not change the answer
    q = infer(trained_run, stack, batch_size=7, device=TEST_DEVICE)
    assert np.allclose(p.A, q.A, atol=1e-5) and np.allclose(p.z, q.z, atol=1e-5)
    saved = Predictions.load(trained_run / "predictions.npz")
    assert saved.meta["model_box"] == 32 and len(saved) == 96


def test_predict_refuses_mismatched_particles_and_bad_checkpoints(trained_run, tmp_path):
    other, _ = simulated_stack(n=4, box=64, seed=0)
    with pytest.raises(InputError, match="trained on 32 px"):
        infer(trained_run, other)
    with pytest.raises(InputError, match="polish_rounds=-1"):
        infer(trained_run, other, RefineConfig(polish_rounds=-1))
    for bad in (10, 8000.0, True):
        with pytest.raises(InputError, match=f"search_rotations={bad!r}: expected an integer >= 100"):
            RefineConfig(search_rotations=bad)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="unreadable checkpoint"):
        load_trained(tmp_path)
    with pytest.raises(InputError, match="not found|does not exist"):
        load_trained(tmp_path / "nope")
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="not a cryofire checkpoint"):
        load_trained(tmp_path, checkpoint=tmp_path / "other.pt")


WARM_TINY = dict(zdim=2, epochs=1, batch_size=16, hidden=32, dec_hidden=32, dec_layers=2,
                 enc_channels=(4, 8, 8, 16, 16), warm_start="search", warm_images=64, warm_steps=20,
                 warm_rotations=300, distill_images=32, pose_only_images=32, num_workers=1,
                 device=TEST_DEVICE)


@pytest.fixture(scope="module")
def warm_run(tmp_path_factory):
    from cryofire_ext.train.config import TrainConfig
    from cryofire_ext.train.trainer import train

    stack, _ = simulated_stack(n=64, box=32, snr=1.0, seed=4)
    run = tmp_path_factory.mktemp("warm_run")
    train(stack, run, TrainConfig(**WARM_TINY))
    return run, stack


def test_predict_reuses_the_training_search_for_the_training_particles_only(warm_run, monkeypatch):
    from cryofire_ext.refine import search
    from cryofire_ext.train import candidates

    run, stack = warm_run
    calls = []
    real = search.search
    monkeypatch.setattr(candidates, "search", lambda warm, img, ctf: calls.append(len(img)) or real(warm, img, ctf))
    p = infer(run, stack, batch_size=16, device=TEST_DEVICE)
    assert calls == []  # every training particle's search result came from the checkpoint
    tm = load_trained(run)
    tm.searched = None  # the same particles searched afresh give the same answer
    q = infer(tm, stack, batch_size=16, device=TEST_DEVICE)
    assert sum(calls) == 64
    assert np.allclose(p.A, q.A, atol=1e-4) and np.allclose(p.shifts_A, q.shifts_A, atol=1e-4)
    calls.clear()
    other, _ = simulated_stack(n=64, box=32, snr=1.0, seed=5)  # same ids, count and box; other images
    infer(run, other, batch_size=16, device=TEST_DEVICE)
    assert sum(calls) == 64


def test_resume_with_other_particles_of_the_same_size_is_refused(warm_run, tmp_path):
    from cryofire_ext.train.config import TrainConfig
    from cryofire_ext.train.trainer import train

    run, _ = warm_run
    other, _ = simulated_stack(n=64, box=32, snr=1.0, seed=5)
    before = (run / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(InputError, match="other particles"):
        train(other, run, TrainConfig(**{**WARM_TINY, "epochs": 2}), resume=True)
    assert (run / "checkpoints" / "last.pt").read_bytes() == before


def test_training_few_particles_warns_that_the_warm_start_may_fail(warm_run, caplog):
    """The warm run trained on 64 particles: the log says the warm start may fail and what to do."""
    from cryofire_ext.train.config import TrainConfig
    from cryofire_ext.train.trainer import train

    _, stack = warm_run
    with caplog.at_level("WARNING", logger="cryofire_ext.refine.warmstart"):
        train(stack.take(np.arange(48)), warm_run[0].parent / "few", TrainConfig(**{**WARM_TINY, "epochs": 0}))
    assert any("only 48 particles" in r.getMessage() and "--seed" in r.getMessage() for r in caplog.records)
