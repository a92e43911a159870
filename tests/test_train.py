"""Training contracts: config files, bad input, checkpoints, exact resume after SIGKILL, DDP = one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cryofire_ext.errors import InputError
from cryofire_ext.images import ArrayImages
from cryofire_ext.train.checkpoint import load_checkpoint
from cryofire_ext.train.config import TrainConfig
from cryofire_ext.train.trainer import TrainingStopped, train
from tests.conftest import TEST_DEVICE
from tests.run_fixture import simulated_stack

torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parents[1]
TINY = dict(zdim=2, batch_size=16, hidden=32, dec_hidden=32, dec_layers=2, enc_channels=(4, 8, 8, 16, 16),
            warm_start="none", pose_only_images=48, lr_warmup_images=32, num_workers=1, device=TEST_DEVICE, log_every=1)


def test_config_round_trip_records_version_time_and_command(tmp_path):
    cfg = TrainConfig(zdim=3, epochs=7, max_minutes=1.5)
    cfg.save(tmp_path / "c.json", argv=["cryofire", "train", "x.star"])
    back = TrainConfig.load(tmp_path / "c.json")
    assert back.zdim == 3 and back.epochs == 7 and back.max_minutes == 1.5
    assert back.version and back.created and back.command_line == ["cryofire", "train", "x.star"]
    (tmp_path / "bad.json").write_text(json.dumps({"zdim": 2, "zdimm": 3}))
    with pytest.raises(InputError, match="zdimm"):
        TrainConfig.load(tmp_path / "bad.json")
    with pytest.raises(InputError, match="zdim=-1"):
        TrainConfig(zdim=-1)


def test_bad_input_is_refused_before_anything_is_written(tmp_path):
    stack, _ = simulated_stack(n=32, box=32, seed=0)
    data = stack.images.data.copy()
    data[7, 3, 3] = np.nan
    bad = type(stack)(ids=stack.ids, pixel_size_A=stack.pixel_size_A, box=32, ctf=stack.ctf, images=ArrayImages(data))
    with pytest.raises(InputError, match=r"sim000007.*NaN"):
        train(bad, tmp_path / "nan", TrainConfig(**TINY, epochs=1))
    assert not (tmp_path / "nan" / "checkpoints").exists()
    small, _ = simulated_stack(n=8, box=16, seed=0)
    with pytest.raises(InputError, match="too small"):
        train(small, tmp_path / "small", TrainConfig(**TINY, epochs=1))


def test_stop_checkpoints_and_changed_config_or_broken_checkpoint_refuse_resume(tmp_path):
    stack, _ = simulated_stack(n=48, box=32, seed=0)
    run = tmp_path / "run"
    calls = []
    with pytest.raises(TrainingStopped) as info:
        train(stack, run, TrainConfig(**TINY, epochs=2), should_stop=lambda: calls.append(1) or len(calls) > 2)
    state = load_checkpoint(info.value.checkpoint)
    assert (state["epoch"], state["batch"], state["images"]) == (0, 2, 32)
    before = (run / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(InputError, match=r"lr: 0\.0001 -> 0\.001"):
        train(stack, run, TrainConfig(**TINY, epochs=2, lr=1e-3), resume=True)
    with pytest.raises(InputError, match="--resume"):
        train(stack, run, TrainConfig(**TINY, epochs=2))
    assert (run / "checkpoints" / "last.pt").read_bytes() == before  # nothing lost
    (tmp_path / "broken.pt").write_bytes(before[: len(before) // 2])
    with pytest.raises(InputError, match="unreadable checkpoint"):
        load_checkpoint(tmp_path / "broken.pt")
    # more epochs may be asked for on resume
    last = train(stack, run, TrainConfig(**TINY, epochs=3), resume=True)
    assert load_checkpoint(last)["epoch"] == 3


WORKER = """
import os, sys, json, signal, torch
sys.path.insert(0, {root!r})
torch.set_num_threads(1)
from tests.run_fixture import simulated_stack
from cryofire_ext.train.config import TrainConfig
from cryofire_ext.train.trainer import train
mode, run = sys.argv[1], sys.argv[2]
stack, _ = simulated_stack(n=64, box=32, seed=2)
cfg = TrainConfig(**{tiny!r}, epochs=3)
def kill(rec):
    if mode == "kill" and rec["epoch"] == 1 and rec["batch"] == 2:
        os.kill(os.getpid(), signal.SIGKILL)
train(stack, run, cfg, resume=(mode == "resume"), on_progress=kill)
"""


def _final_params(run: Path) -> dict:
    return load_checkpoint(run / "checkpoints" / "last.pt")["model"]


def test_resume_after_sigkill_mid_epoch_equals_uninterrupted_run(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT), tiny=TINY))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    killed = subprocess.run([sys.executable, str(script), "kill", str(tmp_path / "a")], env=env)
    assert killed.returncode == -9
    assert load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")["epoch"] == 1  # epoch 0 was saved
    subprocess.run([sys.executable, str(script), "resume", str(tmp_path / "a")], env=env, check=True)
    subprocess.run([sys.executable, str(script), "plain", str(tmp_path / "b")], env=env, check=True)
    a, b = _final_params(tmp_path / "a"), _final_params(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6, rtol=1e-5), k
    ha = json.loads((tmp_path / "a" / "history.json").read_text())
    hb = json.loads((tmp_path / "b" / "history.json").read_text())
    assert [h["loss"] for h in ha] == pytest.approx([h["loss"] for h in hb], rel=1e-5)


DDP_WORKER = """
import os, sys, json, torch
sys.path.insert(0, {root!r})
torch.set_num_threads(1)
from tests.run_fixture import simulated_stack
from cryofire_ext.train.config import TrainConfig
from cryofire_ext.train import distributed
from cryofire_ext.train.trainer import train
stack, _ = simulated_stack(n=64, box=32, seed=4)
try:
    train(stack, sys.argv[1], TrainConfig(**{tiny!r}, epochs=1))
finally:
    distributed.finish()  # as the train job does: gloo may abort a process that exits inside the group
"""


def test_two_process_gloo_run_matches_one_process_with_the_same_global_batch(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_WORKER.format(root=str(ROOT), tiny={**TINY, "device": "cpu"}))  # gloo: the CPU path
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(tmp_path / "ddp")], env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-6000:]
    subprocess.run([sys.executable, str(script), str(tmp_path / "one")], env=env, check=True)
    h2 = json.loads((tmp_path / "ddp" / "history.json").read_text())
    h1 = json.loads((tmp_path / "one" / "history.json").read_text())
    assert len(h1) == len(h2) == 4
    assert [h["loss"] for h in h2] == pytest.approx([h["loss"] for h in h1], rel=1e-4)
    a, b = _final_params(tmp_path / "ddp"), _final_params(tmp_path / "one")
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5, rtol=1e-4), k
