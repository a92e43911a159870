"""The landscape stage (z_mode "continuous"): z learned as a continuous coordinate at fixed poses, carried by the
run into predict (the encoder gives new particles their z), with maps on the run's grid.

The learning test uses the true poses of a two-state phantom at a high SNR: the stage must find the states in z
(nothing tells it the classes). The job tests go through the CLI on a seconds-long run.
"""

from __future__ import annotations

import json
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch

from cli.main import main
from cryofire_ext import fourier, metrics
from cryofire_ext.errors import InputError
from cryofire_ext.landscape import fit_landscape, load_landscape
from cryofire_ext.model.cryofire import CryoFIRE
from cryofire_ext.results import Predictions
from cryofire_ext.train.config import TrainConfig
from tests.conftest import TEST_DEVICE
from tests.run_fixture import simulated_stack

torch.set_num_threads(2)
SMALL = dict(zdim=2, hidden=32, dec_hidden=64, dec_layers=2, enc_channels=(8, 16, 16, 32, 32), batch_size=32,
             num_workers=0, device=TEST_DEVICE)


def test_a_map_on_a_finer_grid_projects_like_the_model_box():
    """`volume(out_box=B)` is the same band-limited map on a B grid: its projections, Fourier-cropped back to the
    model box, are the model-box map's, so landscape maps overlay the run's maps in the images' units."""
    m = CryoFIRE(32, 2.0, 2, symmetric=False, hidden=32, dec_hidden=32, dec_layers=2,
                 enc_channels=(4, 8, 8, 16, 16), seed=3)
    m.img_scale.fill_(1.7)
    z = torch.tensor([0.3, -0.5])
    small, big = m.volume(z), m.volume(z, out_box=64)
    assert big.shape == (64, 64, 64)
    for axis in range(3):
        back = fourier.fourier_crop(big.sum(axis)[None].double(), 32)[0].float()
        expected = small.sum(axis).numpy()
        np.testing.assert_allclose(back.numpy(), expected, atol=1e-3 * float(np.abs(expected).max()))
    with pytest.raises(ValueError, match="smaller than the model's box"):
        m.volume(z, out_box=16)


def test_the_landscape_finds_the_states_at_fixed_poses(tmp_path):
    stack, truth = simulated_stack(n=1024, box=32, snr=10.0, seed=3)
    cfg = TrainConfig(**SMALL, landscape_epochs=40, landscape_lr=3e-3)
    seen = []
    lm = fit_landscape(stack, truth.A, truth.shifts_A, cfg, map_box=32, map_pixel_size_A=stack.pixel_size_A,
                       device=TEST_DEVICE, on_progress=seen.append)
    z = lm.z_of(stack)
    assert z.shape == (1024, 2) and np.isfinite(z).all()
    assert metrics.pc1_correlation(z, truth.state) > 0.7
    assert len(np.unique(z[:, 0])) > 1000  # a coordinate per particle, not a code per class
    assert {r["stage"] for r in seen} == {"landscape"} and seen[-1]["epoch"] == 39
    # saved and loaded, the encoder gives the same z and the maps come on the map grid
    lm.save(tmp_path / "landscape.pt")
    again = load_landscape(tmp_path / "landscape.pt", device=TEST_DEVICE)
    np.testing.assert_allclose(again.z_of(stack), z, atol=1e-5)
    assert again.volumes(z[:2]).shape == (2, 32, 32, 32)


def test_a_corrupt_or_foreign_landscape_file_is_named(tmp_path):
    bad = tmp_path / "landscape.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="landscape.pt"):
        load_landscape(bad)
    from cryofire_ext.train.checkpoint import save_checkpoint

    save_checkpoint(bad, {"model": {}, "box": 32})
    with pytest.raises(InputError, match="not a landscape"):
        load_landscape(bad)


@pytest.mark.parametrize("field,value", [("landscape_box", 48), ("landscape_epochs", 0), ("landscape_lr", 0.0),
                                         ("z_mode", "smooth")])
def test_bad_landscape_settings_are_refused_by_name(field, value):
    with pytest.raises(InputError, match=field):
        TrainConfig(**{field: value})


#: a seconds-long run: search warm start into two classes, one refinement round, a short landscape
CONTINUOUS_RUN = {"zdim": 2, "epochs": 1, "batch_size": 32, "hidden": 32, "dec_hidden": 32, "dec_layers": 2,
                  "enc_channels": [4, 8, 8, 16, 16], "warm_start": "search", "warm_images": 160, "warm_box": 16,
                  "warm_steps": 60, "warm_rotations": 800, "warm_max_shift_px": 1.0, "warm_classes": 2,
                  "warm_rounds": 1, "distill_images": 240, "pose_only_images": 0, "num_workers": 0,
                  "device": TEST_DEVICE, "polish_rounds": 1, "polish_global_search": False,
                  "z_mode": "continuous", "landscape_epochs": 2}


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
    assert len(np.unique(preds.z[:, 0])) == len(preds)  # continuous: no two particles share a class code
    assert len(np.unique(preds.class_id)) == 2  # the classes are still the refinement's
    lm = load_landscape(run / "landscape.pt")
    from integrations.job import load_particles

    stack = load_particles(run.parent / "data" / "particles.star")
    np.testing.assert_allclose(preds.z, lm.z_of(stack), atol=1e-5)
    with mrcfile.open(run / "maps" / "mean_z.mrc") as mrc:  # the landscape's map, on the run's grid
        assert mrc.data.shape == (32, 32, 32) and np.isfinite(mrc.data).all()
        assert float(mrc.voxel_size.x) == pytest.approx(stack.pixel_size_A, rel=1e-4)
    for k in (1, 2):  # class maps from the pose model, numbered as rlnClassNumber
        assert (run / "maps" / f"class_{k:02d}.mrc").is_file()


def test_predict_gives_new_particles_their_z_from_the_encoder(continuous_run, tmp_path):
    run, new_star = continuous_run
    out = tmp_path / "pred"
    assert main(["predict", str(run), str(new_star), "-o", str(out)]) == 0
    preds = Predictions.load(out / "predictions.npz")
    from integrations.job import load_particles

    expected = load_landscape(run / "landscape.pt").z_of(load_particles(new_star))
    np.testing.assert_allclose(preds.z, expected, atol=1e-5)
    assert preds.meta["z"] == "landscape"


def test_predict_names_a_corrupt_landscape_and_writes_nothing(continuous_run, tmp_path):
    import shutil

    run, new_star = continuous_run
    broken = tmp_path / "run"
    shutil.copytree(run, broken)
    (broken / "landscape.pt").write_bytes(b"\0" * 64)
    out = tmp_path / "pred"
    assert main(["predict", str(broken), str(new_star), "-o", str(out)]) != 0
    assert not (out / "predictions.npz").exists()


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
