"""The training loop: streaming batches, Adam, schedules, warm start, checkpoints, resume, DDP.

One code path for one process and for `torchrun` (a world of one is the plain run).
Everything random is derived from `config.seed` and the (epoch, batch) position, and
the state is checkpointed atomically at every epoch end and on stop, so a resumed run
follows exactly the path of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cryofire_ext import run_layout
from cryofire_ext.errors import InputError
from cryofire_ext.model.cryofire import build_model
from cryofire_ext.model.losses import chordal_pose_loss
from cryofire_ext.particles import ParticleStack
from cryofire_ext.safe_io import atomic_path
from cryofire_ext.train import distributed, schedules
from cryofire_ext.train.checkpoint import load_checkpoint, save_checkpoint
from cryofire_ext.train.config import RESUMABLE_FIELDS, TrainConfig
from cryofire_ext.train.data import (PrefetchLoader, StackStats, TrainingImages, epoch_batches, scan_stack,
                                     stack_fingerprint)
from cryofire_ext.refine.search import WarmMap
from cryofire_ext.refine.warmstart import warm_start
from cryofire_ext.train.candidates import SearchCache, candidates_at_codes, class_targets

log = logging.getLogger(__name__)


class TrainingStopped(Exception):
    """Raised when `should_stop()` returned True; the state was checkpointed to `checkpoint` first
    (None when the stop came during the warm start, before the first checkpoint, or during the landscape
    stage, which a resume runs again)."""

    def __init__(self, checkpoint: Path | None, during: str = "the warm start (no checkpoint yet)"):
        super().__init__(f"training stopped on request; state saved to {checkpoint}" if checkpoint is not None
                         else f"training stopped on request during {during}")
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None


def training_box(config: TrainConfig, stack: ParticleStack) -> int:
    """The box the model works on: `config.train_box` or the stack's box (checked for the encoder)."""
    box = int(config.train_box or stack.box)
    if box > stack.box:
        raise InputError(f"train_box {box} px is larger than the particles' box {stack.box} px")
    if box < 32 or box % 32:
        hint = " (use --train-box 32 / train_box=32 to Fourier-crop)" if stack.box >= 32 else ""
        raise InputError(f"box {box} px is too small or not a multiple of 32 px for the encoder, which pools 5 "
                         f"times by 2 down to (D/32)^2 cells; the particles are {stack.box} px{hint}")
    return box


def seeded_model(config: TrainConfig, box: int, pixel_size_A: float):
    """The model with weights drawn from `config.seed` (the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return build_model(config, box, pixel_size_A)


def training_autocast(precision: str, device: torch.device):
    """The context the training step runs in: bf16 autocast on CUDA for "auto"/"bf16", else plain fp32."""
    if device.type == "cuda" and precision in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if precision == "bf16":
        raise InputError(f"precision 'bf16' needs a CUDA device (training runs on {device}); use auto or fp32")
    return contextlib.nullcontext()


def _stop_if_asked(should_stop: Callable[[], bool] | None) -> None:
    """Raise TrainingStopped (no checkpoint yet) when `should_stop()` says so: the warm start's poll."""
    if should_stop is not None and should_stop():
        raise TrainingStopped(None)


def _batch_generator(seed: int, epoch: int, batch: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch) * 10_007 + int(batch))


def train(stack: ParticleStack, run_dir, config: TrainConfig, *, resume: bool = False,
          should_stop: Callable[[], bool] | None = None, on_progress: Callable[[dict], None] | None = None,
          argv: list[str] | None = None) -> Path:
    """Train cryoFIRE on `stack`, writing `run_dir/config.json` and `run_dir/checkpoints/`.

    Returns the last checkpoint's path. `resume` continues from `checkpoints/last.pt` (the
    training fields of `config` must match the saved ones; those in `config.RESUMABLE_FIELDS`
    may change). Stops early (checkpointed, no error) after `config.max_minutes`; raises
    `TrainingStopped` (checkpointed) when `should_stop()` returns True. `on_progress` gets a
    dict (epoch, batch, images, loss, lr, radius, time_s) every `log_every` steps.
    """
    config.validate()
    run_dir = Path(run_dir)
    env = distributed.setup(config.device)
    autocast = training_autocast(config.precision, env.device)  # refuses bf16 on the CPU before anything is written
    stack.require_images()
    box = training_box(config, stack)
    n = len(stack)
    ckdir = run_dir / run_layout.CHECKPOINTS
    last = run_dir / run_layout.LAST_CHECKPOINT
    state = None
    if resume:
        if not last.is_file():
            raise InputError(f"{run_dir}: nothing to resume (no checkpoints/last.pt); drop --resume to start a run")
        state = load_checkpoint(last)
        saved = TrainConfig.from_dict(state["config"], source=str(last))
        diffs = saved.differences(config)
        if diffs:
            raise InputError(f"{run_dir}: --resume with a changed config ({'; '.join(diffs)}); only "
                             f"{', '.join(RESUMABLE_FIELDS)} may change (and the refinement settings, which are not "
                             "training's). Nothing was modified.")
        if int(state["n_particles"]) != n or int(state["input_box"]) != stack.box:
            raise InputError(f"{run_dir}: the checkpoint was trained on {state['n_particles']} particles of "
                             f"{state['input_box']} px, not {n} of {stack.box} px; resume with the same particles")
    elif last.exists():
        raise InputError(f"{run_dir} already holds a training run (checkpoints/last.pt); pass --resume to continue "
                         "it or choose another output folder")
    pixel_size = stack.pixel_size_A * stack.box / box
    if state is not None:
        stats = StackStats(float(state["stats"][0]), float(state["stats"][1]))
    else:
        stats = scan_stack(stack, box)
    data = TrainingImages(stack, box, stats)
    fingerprint = stack_fingerprint(stack)
    if state is not None and state.get("particles_fingerprint", fingerprint) != fingerprint:
        raise InputError(f"{run_dir}: the checkpoint was trained on other particles (same count and box, "
                         "different ids, CTF or images); resume with the same particles. Nothing was modified.")
    model = seeded_model(config, box, pixel_size)
    model.img_scale.fill_(stats.std)
    model.to(env.device)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    if env.is_main:
        cfg_path = run_dir / run_layout.CONFIG
        config.save(cfg_path, force=True, argv=argv)
    warm = None
    if config.warm_start == "search":
        if state is not None and "warm" in state:
            warm = WarmMap.from_state(state["warm"])
        else:
            warm = warm_start(config, data, stack, box, env.device, poll=lambda: _stop_if_asked(should_stop))
    searched = SearchCache(warm, n, state.get("searched") if state else None) if warm is not None else None
    codes = class_targets(warm, config.zdim, env.device)
    net = distributed.wrap(model, env)
    epoch0 = int(state["epoch"]) if state else 0
    batch0 = int(state["batch"]) if state else 0
    images_seen = int(state["images"]) if state else 0
    history: list = list(state["history"]) if state else []
    elapsed0 = float(state["elapsed_s"]) if state else 0.0
    t0 = time.monotonic()
    march_start = config.march_start
    if warm is not None:
        march_start = max(march_start, min(1.0, warm.box / box))

    def snapshot(epoch: int, batch: int) -> dict:
        s = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch, "batch": batch,
             "images": images_seen, "elapsed_s": elapsed0 + time.monotonic() - t0, "history": history,
             "config": config.to_dict(), "stats": [stats.mean, stats.std], "n_particles": n,
             "input_box": stack.box, "input_pixel_size_A": stack.pixel_size_A, "box": box,
             "pixel_size_A": pixel_size, "particles_fingerprint": fingerprint}
        if warm is not None:
            s["warm"] = warm.state()
            s["searched"] = searched.state()
        return s

    def checkpoint(epoch: int, batch: int, epoch_file: bool = False) -> Path:
        if env.is_main:
            s = snapshot(epoch, batch)
            save_checkpoint(last, s)
            if epoch_file:
                save_checkpoint(ckdir / f"epoch_{epoch:04d}.pt", {k: v for k, v in s.items() if k != "optimizer"})
            with atomic_path(run_dir / run_layout.HISTORY, force=True) as tmp:
                tmp.write_text(json.dumps(history))
        distributed.barrier(env)
        return last

    model.train()
    for epoch in range(epoch0, config.epochs):
        batches = epoch_batches(n, config.batch_size, config.seed, epoch)
        start_b = batch0 if epoch == epoch0 else 0
        todo = [(b, env.shard(idx)) for b, idx in enumerate(batches) if b >= start_b]
        sizes = {b: len(idx) for b, idx in enumerate(batches)}
        losses = []
        for b, idx, img, ctf in PrefetchLoader(data, todo, config.num_workers):
            if should_stop is not None and should_stop():
                path = checkpoint(epoch, b)
                raise TrainingStopped(path)
            if config.max_minutes is not None and elapsed0 + time.monotonic() - t0 > 60.0 * config.max_minutes:
                log.info("time limit of %.1f min reached at epoch %d batch %d; checkpointing",
                         config.max_minutes, epoch, b)
                return checkpoint(epoch, b)
            gbatch = sizes[b]
            lr = schedules.learning_rate(config, images_seen)
            for group in opt.param_groups:
                group["lr"] = lr
            radius = schedules.march_radius(config, images_seen, march_start)
            z_rand = None
            if schedules.pose_only(config, images_seen):
                z_rand = env.shard(torch.randn(gbatch, config.zdim, generator=_batch_generator(config.seed, epoch, b)))
                z_rand = z_rand.to(env.device)
            img, ctf = img.to(env.device), ctf.to(env.device)
            dw = schedules.distill_weight(config, images_seen) if warm is not None else 0.0
            extra, ez = (None, None), None
            z_t = None
            if warm is not None and (dw > 0 or config.search_candidates):
                A_t, t_t, c_t = searched.get(idx, img, ctf)
                if config.search_candidates:
                    extra = (A_t[:, None], t_t[:, None])
                if codes is not None:
                    z_t = codes[c_t]
                    if dw >= 1.0:  # the decoder learns each class from its searched class's z
                        z_rand = z_t
                    elif config.search_candidates:  # at every class's z
                        extra, ez = candidates_at_codes(A_t, t_t, codes)
            with autocast:
                out = net(img, ctf, radius, z_rand, *extra, extra[0] is not None and dw >= 1.0, ez)
            loss = out.loss.mean()
            if dw > 0:
                n_enc = out.R_all.shape[1] - (extra[0].shape[1] if extra[0] is not None else 0)
                loss = loss + dw * chordal_pose_loss(out.R_all[:, :n_enc], out.shift_all[:, :n_enc], A_t, t_t).mean()
            if z_t is not None and dw > 0:
                loss = loss + dw * (out.z - z_t).square().sum(-1).mean()
            if config.z_l2 > 0 and config.zdim:
                loss = loss + config.z_l2 * out.z.square().sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            images_seen += gbatch
            gl = float(distributed.all_mean(out.loss.detach().mean(), env))
            losses.append(gl)
            if len(losses) % config.log_every == 0 or b == len(batches) - 1:
                rec = {"epoch": epoch, "batch": b, "images": images_seen, "loss": gl, "lr": lr,
                       "radius": radius, "distill": dw, "time_s": elapsed0 + time.monotonic() - t0}
                history.append(rec)
                if on_progress is not None:
                    on_progress(dict(rec, batches=len(batches), epochs=config.epochs))
        log.info("epoch %d/%d: mean loss %.5f, %d images seen", epoch + 1, config.epochs,
                 float(np.mean(losses)) if losses else float("nan"), images_seen)
        checkpoint(epoch + 1, 0, epoch_file=True)
        batch0 = 0
    if not last.exists():
        checkpoint(epoch0, batch0)
    return last
