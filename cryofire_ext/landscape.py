"""The landscape stage: each particle's conformation z as a continuous coordinate, learned at fixed poses.

The pose model's z is a class code (`train.candidates.class_codes`): it names the warm start's class and
cannot vary within one. Once training and the refinement have fixed every particle's pose and shift, this
stage learns z the way cryoDRGN's `train_vae` does given poses: a second `CryoFIRE` (encoder -> z, neural
field `V(k, z)`; no pose heads used, no in-plane copy) on images Fourier-cropped to `landscape_box`
(heterogeneity lives at low resolution, and a 32 px box runs several times more images per second than 64 px),
trained so that the field at the encoder's z, seen at the particle's pose and shift through its CTF, explains
the image. The encoder's z is batch-normalised (zero mean, unit variance per dimension), so the decoder uses
it from the first steps, and `z_l2` bounds it.

The encoder is amortized: new particles get their z in one pass (`Landscape.z_of`). The run keeps the stage in
`landscape.pt` (`run_layout.LANDSCAPE`); its maps (`Landscape.volumes`) are on the run's map grid.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cryofire_ext.errors import InputError
from cryofire_ext.model.cryofire import CryoFIRE
from cryofire_ext.particles import ParticleStack
from cryofire_ext.train.checkpoint import load_checkpoint, save_checkpoint
from cryofire_ext.train.config import TrainConfig
from cryofire_ext.train.data import PrefetchLoader, StackStats, TrainingImages, epoch_batches, scan_stack
from cryofire_ext.train.trainer import TrainingStopped, training_autocast

log = logging.getLogger(__name__)


@dataclass
class Landscape:
    """The trained landscape stage. `box` / `pixel_size_A`: its images' grid; `map_box` / `map_pixel_size_A`:
    the grid of its maps (the run's model box, so landscape and class maps overlay)."""

    model: CryoFIRE
    stats: StackStats
    box: int
    pixel_size_A: float
    map_box: int
    map_pixel_size_A: float
    config: TrainConfig

    @property
    def zdim(self) -> int:
        return self.model.zdim

    @torch.no_grad()
    def z_of(self, stack: ParticleStack, batch_size: int = 256) -> np.ndarray:
        """z `(n, zdim)` float32 of every particle of `stack` (the encoder alone, evaluation mode)."""
        data = TrainingImages(stack, self.box, self.stats)
        dev = self.model.k_half.device
        self.model.eval()
        out = np.empty((len(stack), self.zdim), np.float32)
        for s in range(0, len(stack), batch_size):
            idx = np.arange(s, min(len(stack), s + batch_size))
            img, _ = data.read(idx)
            out[idx] = self.model.encoder(img.to(dev)).z.float().cpu().numpy()
        return out

    @torch.no_grad()
    def volumes(self, z: np.ndarray) -> np.ndarray:
        """Maps `(m, B, B, B)` float32 at z `(m, zdim)`, B = `map_box` (voxel size `map_pixel_size_A`)."""
        dev = self.model.k_half.device
        return np.stack([self.model.volume(torch.as_tensor(zi, device=dev), out_box=self.map_box).cpu().numpy()
                         for zi in np.asarray(z, np.float32).reshape(-1, self.zdim)]).astype(np.float32)

    def save(self, path) -> Path:
        """`path` (atomic, replacing it: the run folder's own file): weights, image statistics, grids, config."""
        state = {"model": self.model.state_dict(), "stats": [self.stats.mean, self.stats.std], "box": self.box,
                 "pixel_size_A": self.pixel_size_A, "map_box": self.map_box,
                 "map_pixel_size_A": self.map_pixel_size_A, "config": self.config.to_dict()}
        return save_checkpoint(Path(path), state)


def landscape_model(config: TrainConfig, box: int, pixel_size_A: float) -> CryoFIRE:
    """The landscape's model for `box`-pixel images, weights drawn from `config.seed` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 1)
        return CryoFIRE(box, pixel_size_A, config.zdim, enc_channels=config.enc_channels, hidden=config.hidden,
                        dec_hidden=config.dec_hidden, dec_layers=config.dec_layers, pe_sigma=config.pe_sigma,
                        n_pose_heads=1, symmetric=False, seed=config.seed, z_norm=True)


def landscape_box(config: TrainConfig, model_box: int) -> int:
    """The landscape's image box: `config.landscape_box`, at most the pose model's box."""
    return min(int(config.landscape_box), int(model_box))


def fit_landscape(stack: ParticleStack, A: np.ndarray, shifts_A: np.ndarray, config: TrainConfig, *,
                  map_box: int, map_pixel_size_A: float, device: torch.device | str = "cpu",
                  should_stop: Callable[[], bool] | None = None,
                  on_progress: Callable[[dict], None] | None = None) -> Landscape:
    """Train the landscape on `stack` at fixed poses A `(n, 3, 3)` (RELION matrices) and shifts_A `(n, 2)`
    (RELION origins, Angstrom) for `config.landscape_epochs` epochs. `map_box` / `map_pixel_size_A`: the run's
    model grid (where its maps go). Raises `train.trainer.TrainingStopped` (nothing saved) when
    `should_stop()` says so; `on_progress` gets the trainer's dict (with `stage` "landscape")."""
    if config.zdim < 1:
        raise InputError("the landscape stage needs zdim >= 1 (z_mode 'continuous' with zdim 0 has no z to learn)")
    n = len(stack)
    dev = torch.device(device)
    box = landscape_box(config, map_box)
    apix = stack.pixel_size_A * stack.box / box
    stats = scan_stack(stack, box)
    data = TrainingImages(stack, box, stats)
    model = landscape_model(config, box, apix)
    model.img_scale.fill_(stats.std)
    model.to(dev).train()
    opt = torch.optim.Adam(model.parameters(), lr=config.landscape_lr)
    A_t = torch.as_tensor(np.asarray(A), dtype=torch.float32, device=dev).reshape(n, 3, 3)
    t_px = torch.as_tensor(np.asarray(shifts_A) / apix, dtype=torch.float32, device=dev).reshape(n, 2)
    autocast = training_autocast(config.precision, dev)
    epochs = config.landscape_epochs
    t0 = time.monotonic()
    for epoch in range(epochs):
        batches = epoch_batches(n, config.batch_size, config.seed, 10_000 + epoch)
        losses = []
        for b, idx, img, ctf in PrefetchLoader(data, list(enumerate(batches)), config.num_workers):
            if should_stop is not None and should_stop():
                raise TrainingStopped(None, "the landscape stage (the trained model is kept; --resume runs the "
                                            "landscape again)")
            img, ctf = img.to(dev), ctf.to(dev)
            sel = torch.as_tensor(idx, device=dev)
            with autocast:
                out = model(img, ctf, 1.0, None, A_t[sel][:, None], t_px[sel][:, None], True)
            loss = out.loss.mean()
            if config.z_l2 > 0:
                loss = loss + config.z_l2 * out.z.square().sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(out.loss.detach().mean()))
            if on_progress is not None and (len(losses) % config.log_every == 0 or b == len(batches) - 1):
                on_progress({"stage": "landscape", "epoch": epoch, "batch": b, "batches": len(batches),
                             "epochs": epochs, "loss": losses[-1], "time_s": time.monotonic() - t0})
        log.info("landscape epoch %d/%d: mean loss %.5f", epoch + 1, epochs, float(np.mean(losses)))
    model.eval()
    return Landscape(model, stats, box, apix, int(map_box), float(map_pixel_size_A), config)


def load_landscape(path, device: torch.device | str = "cpu") -> Landscape:
    """The landscape saved at `path` on `device`; InputError naming the file when it is not one of ours."""
    path = Path(path)
    state = load_checkpoint(path)
    try:
        config = TrainConfig.from_dict(state["config"], source=str(path))
        model = landscape_model(config, int(state["box"]), float(state["pixel_size_A"]))
        model.load_state_dict(state["model"])
        lm = Landscape(model, StackStats(*[float(v) for v in state["stats"]]), int(state["box"]),
                       float(state["pixel_size_A"]), int(state["map_box"]), float(state["map_pixel_size_A"]), config)
    except (KeyError, RuntimeError, TypeError, ValueError) as exc:
        raise InputError(f"{path}: not a landscape of this cryofire ({exc}); train the run again, or delete the "
                         "file to use the class z") from exc
    lm.model.to(device).eval()
    return lm
