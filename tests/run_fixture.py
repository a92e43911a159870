"""Shared training fixtures: simulated two-state phantom stacks and a tiny trained run (session scope).

`trained_run` (a run folder with config.json, checkpoints/last.pt, predictions.npz) is registered
for every test module by tests/conftest.py (`pytest_plugins`): ask for it by name, do not import it
(an imported copy is a second session fixture and trains a second run). `simulated_stack` is a plain
function: `from tests.run_fixture import simulated_stack`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from cryofire_ext.ctf import CTFParams
from cryofire_ext.images import ArrayImages
from cryofire_ext.particles import ParticleStack
from cryofire_ext.phantom import phantom_maps
from cryofire_ext.poses import random_rotations
from cryofire_ext.recon.projection import project
from cryofire_ext.results import Predictions
from tests.conftest import TEST_DEVICE


#: a seconds-long run with a search warm start into two classes and one refinement round (no global search)
CLASS_RUN = {"zdim": 2, "epochs": 1, "batch_size": 32, "hidden": 32, "dec_hidden": 32, "dec_layers": 2,
             "enc_channels": [4, 8, 8, 16, 16], "warm_start": "search", "warm_images": 160, "warm_box": 16,
             "warm_steps": 60, "warm_rotations": 800, "warm_max_shift_px": 1.0, "warm_classes": 2,
             "warm_rounds": 1, "distill_images": 240, "pose_only_images": 0, "num_workers": 0,
             "device": TEST_DEVICE, "polish_rounds": 1, "polish_global_search": False, "search_rotations": 800}


@dataclass
class SimTruth:
    A: np.ndarray  # (n, 3, 3)
    shifts_A: np.ndarray  # (n, 2)
    state: np.ndarray  # (n,)
    maps: np.ndarray  # (states, D, D, D)


def simulated_stack(n: int = 256, box: int = 32, snr: float = 0.1, seed: int = 0, max_shift_px: float = 2.0,
                    fractions=(0.5, 0.5)) -> tuple[ParticleStack, SimTruth]:
    """A two-state phantom stack with CTF and noise at `snr` (signal var / noise var), truth alongside."""
    rng = np.random.default_rng(seed)
    maps, apix = phantom_maps(box, states=len(fractions))
    A = random_rotations(n, rng)
    shifts_A = rng.uniform(-max_shift_px, max_shift_px, (n, 2)) * apix
    state = rng.choice(len(fractions), size=n, p=np.asarray(fractions) / np.sum(fractions))
    dfu = rng.uniform(10000, 25000, n)
    ctf = CTFParams(dfu, dfu - rng.uniform(0, 500, n), rng.uniform(0, np.pi, n), np.full(n, 300.0),
                    np.full(n, 2.7), np.full(n, 0.1), np.zeros(n), np.zeros(n), np.ones(n))
    imgs = np.empty((n, box, box), np.float32)
    for s in range(len(fractions)):
        sel = np.nonzero(state == s)[0]
        if len(sel):
            imgs[sel] = project(maps[s], A[sel], shifts_A[sel], ctf.subset(sel).as_array(), apix).numpy()
    sig = imgs.std()
    imgs += rng.normal(0.0, sig / np.sqrt(snr), imgs.shape).astype(np.float32)
    stack = ParticleStack(ids=np.array([f"sim{i:06d}" for i in range(n)]), pixel_size_A=apix, box=box, ctf=ctf,
                          images=ArrayImages(imgs))
    return stack, SimTruth(A, shifts_A, state, maps)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A tiny trained run folder on simulated phantom data (built once, well under a minute)."""
    from cryofire_ext.pipeline import infer
    from cryofire_ext.train.config import TrainConfig
    from cryofire_ext.train.trainer import train

    torch.set_num_threads(2)
    stack, _ = simulated_stack(n=96, box=32, snr=1.0, seed=1)
    run = tmp_path_factory.mktemp("trained_run")
    cfg = TrainConfig(zdim=2, epochs=2, batch_size=32, hidden=32, dec_hidden=32, dec_layers=2, enc_channels=(4, 8, 16, 32, 32),
                      warm_start="none", pose_only_images=96, lr_warmup_images=0, num_workers=1, device=TEST_DEVICE)
    train(stack, run, cfg)
    infer(run, stack).save(run / "predictions.npz")
    return run


PREDICT_WORKER = """
import sys, torch
sys.path.insert(0, {root!r})
torch.set_num_threads(1)
from integrations.job import predict_job
predict_job(sys.argv[1], sys.argv[2], sys.argv[3])
"""


def predict_one_and_two_processes(run: Path, new_star: Path, tmp_path: Path) -> tuple[Predictions, Predictions]:
    """`integrations.job.predict_job` of `new_star` with `run`, under torchrun with two gloo processes and in one
    plain process -> (two's predictions, one's)."""
    script = tmp_path / "predict.py"
    script.write_text(PREDICT_WORKER.format(root=str(Path(__file__).resolve().parents[1])))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for cmd in ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
                 str(run), str(new_star), str(tmp_path / "two")],
                [sys.executable, str(script), str(run), str(new_star), str(tmp_path / "one")]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{cmd} exited {done.returncode}:\n{done.stderr[-6000:]}"
    return tuple(Predictions.load(tmp_path / d / "predictions.npz") for d in ("two", "one"))
