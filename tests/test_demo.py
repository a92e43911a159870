"""End to end through the CLI: train on a STAR file, predict new particles, the demo, and bad input -> exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch

from cli.main import main
from cryofire_ext.errors import InputError
from cryofire_ext.train.config import TrainConfig
from tests.conftest import TEST_DEVICE

torch.set_num_threads(2)
TINY = dict(zdim=2, epochs=1, batch_size=16, hidden=32, dec_hidden=32, dec_layers=2, enc_channels=(4, 8, 8, 16, 16),
            warm_start="search", warm_images=64, warm_steps=20, warm_rotations=300, distill_images=32,
            pose_only_images=32, num_workers=1, device=TEST_DEVICE)


@pytest.fixture(scope="module")
def star_dataset(tmp_path_factory) -> Path:
    from cryofire_ext.phantom import phantom_maps
    from cryofire_ext.simulate import simulate
    from integrations.simulated import write_dataset

    maps, apix = phantom_maps(32, states=2)
    ds = simulate(maps, 64, snr=1.0, shift_px=2.0, pixel_size_A=apix, seed=0)
    out = tmp_path_factory.mktemp("sim")
    write_dataset(ds, out)
    return out / "particles.star"


def test_cli_train_writes_the_run_folder_and_predict_reads_new_particles(star_dataset, tmp_path):
    cfg = tmp_path / "tiny.json"
    TrainConfig(**TINY).save(cfg)
    run = tmp_path / "run"
    assert main(["train", str(star_dataset), "-o", str(run), "--config", str(cfg), "--seed", "3"]) == 0
    for name in ("config.json", "checkpoints/last.pt", "checkpoints/epoch_0001.pt", "predictions.npz",
                 "particles.star", "particles.cs", "loss.png", "train.log", "maps/mean_z.mrc"):
        assert (run / name).is_file(), name
    saved = TrainConfig.load(run / "config.json")
    assert saved.seed == 3 and saved.command_line[0] == "cryofire" and saved.version
    from integrations.cryosparc import read_cs
    from integrations.relion import read_star
    from integrations.relion.star import read_latents

    back = read_star(run / "particles.star")
    pred = np.load(run / "predictions.npz")
    assert np.allclose(back.A, pred["A"], atol=1e-4)
    assert read_latents(run / "particles.star").shape == (64, 2)
    assert read_cs(run / "particles.cs").A.shape == (64, 3, 3)
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert state["warm"]["V_re"].shape == (2, 65, 65, 65)  # two warm classes at the training box, 2x oversampled
    assert bool(state["searched"]["known"].all())  # every particle searched once, kept for resume
    maps = sorted((run / "maps").glob("*.mrc"))
    assert len(maps) >= 2  # mean z + cluster centres
    with mrcfile.open(maps[0]) as mrc:
        assert mrc.data.shape == (32, 32, 32) and float(mrc.voxel_size.x) == pytest.approx(6.0)
    # outputs are not overwritten without --force; a changed config cannot resume
    assert main(["train", str(star_dataset), "-o", str(run), "--config", str(cfg)]) == 2
    assert main(["train", str(star_dataset), "-o", str(run), "--resume", "--zdim", "3"]) == 2
    assert main(["predict", str(run), str(star_dataset), "-o", str(tmp_path / "pred")]) == 0
    assert (tmp_path / "pred" / "particles.star").is_file()


def test_cli_bad_input_exits_2(tmp_path, star_dataset):
    assert main(["train", str(star_dataset), "-o", str(tmp_path / "r"), "--zdim", "-1"]) == 2
    assert main(["train", str(tmp_path / "missing.star"), "-o", str(tmp_path / "r")]) == 2
    assert main(["predict", str(tmp_path / "norun"), str(star_dataset), "-o", str(tmp_path / "p")]) == 2
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_demo_small_writes_scored_metrics(tmp_path):
    from integrations.job import DemoSettings, run_demo

    m = run_demo(tmp_path / "demo", DemoSettings(n=96, snr=1.0, config=dict(TINY, zdim=2)))
    saved = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    for key in ("median_rotation_error_deg", "median_shift_error_px", "clustering_error", "maps_fsc", "wall_s"):
        assert key in saved
    assert 0 <= m["median_rotation_error_deg"] <= 180 and 0 <= m["clustering_error"] <= 0.5
    assert (tmp_path / "demo" / "data" / "truth.npz").is_file() and (tmp_path / "demo" / "run" / "maps").is_dir()
    # again into the same folder: refused before anything is written, then done from scratch with force
    before = (tmp_path / "demo" / "data" / "truth.npz").stat().st_mtime_ns
    with pytest.raises(InputError, match="--force"):
        run_demo(tmp_path / "demo", DemoSettings(n=96, snr=1.0, config=dict(TINY, zdim=2)))
    assert (tmp_path / "demo" / "data" / "truth.npz").stat().st_mtime_ns == before
    again = run_demo(tmp_path / "demo", DemoSettings(n=96, snr=1.0, config=dict(TINY, zdim=2)), force=True)
    assert again["median_rotation_error_deg"] == pytest.approx(m["median_rotation_error_deg"], abs=1e-6)


def test_run_log_opens_in_a_folder_that_does_not_exist_yet(tmp_path):
    """`cryofire demo -o NEW` logs (the simulation) before NEW exists: train.log must make its folder."""
    import logging

    from cli.train import run_log_handler

    handler = run_log_handler(tmp_path / "new" / "train.log")
    try:
        handler.handle(logging.LogRecord("x", logging.INFO, __file__, 1, "simulated 96 particles", None, None))
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    assert "simulated 96 particles" in (tmp_path / "new" / "train.log").read_text()
