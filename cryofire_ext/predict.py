"""Final inference pass: every particle through the trained encoder (and the forward model, for the loss).

Not the values recorded during training: `predict` runs the model in evaluation mode
over any stack with the training run's box and pixel size (new images included) and
returns `Predictions` (poses as RELION matrices, shifts in Angstrom, z, loss). Each particle's pose,
shift and z are those of the winning candidate: the encoder's heads at the encoder's z, and with a
search warm start the searched pose (at each warm class's z when there are classes).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cryofire_ext.errors import InputError
from cryofire_ext.model.cryofire import CryoFIRE
from cryofire_ext.particles import ParticleStack
from cryofire_ext.results import Predictions
from cryofire_ext.train.checkpoint import load_checkpoint
from cryofire_ext.train.config import TrainConfig
from cryofire_ext.train.data import StackStats, TrainingImages, stack_fingerprint
from cryofire_ext.train.distributed import resolve_device

log = logging.getLogger(__name__)


@dataclass
class TrainedModel:
    """A trained run, ready for inference.

    box / pixel_size_A: the model's box (px) and pixel size (A) - the maps' grid.
    input_box / input_pixel_size_A: the particles it was trained on.
    """

    model: CryoFIRE
    config: TrainConfig
    box: int
    pixel_size_A: float
    input_box: int
    input_pixel_size_A: float
    stats: StackStats
    run_dir: Path
    epoch: int
    images_seen: int
    warm: object = None
    #: the training particles' searched poses (trainer's SearchCache state) and their fingerprint
    searched: dict | None = None
    particles_fingerprint: str | None = None

    @property
    def zdim(self) -> int:
        return self.config.zdim

    @torch.no_grad()
    def volumes(self, z: np.ndarray | None = None) -> np.ndarray:
        """Real-space maps `(m, D, D, D)` float32 (index [z, y, x]) at latent points z `(m, zdim)`
        (zdim 0: pass None or `(1, 0)` for the one map). Voxel size `pixel_size_A`."""
        if self.zdim == 0:
            m = 1 if z is None else max(1, len(np.asarray(z)))
            return np.stack([self.model.volume(None).cpu().numpy() for _ in range(m)]).astype(np.float32)
        z = np.asarray(z, dtype=np.float32)
        if z.ndim == 1:
            z = z[None]
        if z.ndim != 2 or z.shape[1] != self.zdim:
            raise InputError(f"latent points must be (m, {self.zdim}), got shape {z.shape}")
        dev = self.model.k_half.device
        return np.stack([self.model.volume(torch.as_tensor(zi, device=dev)).cpu().numpy() for zi in z]
                        ).astype(np.float32)


def load_trained(run_dir, device: str | None = "cpu", checkpoint: str | Path | None = None) -> TrainedModel:
    """Load `run_dir/checkpoints/last.pt` (or `checkpoint`) with weights_only=True onto `device`
    (None: the device the run was trained with, its config's `device`)."""
    run_dir = Path(run_dir)
    path = Path(checkpoint) if checkpoint is not None else run_dir / "checkpoints" / "last.pt"
    if not run_dir.is_dir() and checkpoint is None:
        raise InputError(f"{run_dir}: not a training run folder (it does not exist)")
    state = load_checkpoint(path)
    try:
        config = TrainConfig.from_dict(state["config"], source=str(path))
        box, psize = int(state["box"]), float(state["pixel_size_A"])
        from cryofire_ext.train.trainer import seeded_model

        model = seeded_model(config, box, psize)
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as exc:
        raise InputError(f"{path}: checkpoint does not match this cryofire's model ({exc})") from exc
    model.to(resolve_device(config.device if device is None else device)).eval()
    warm = None
    if config.warm_start == "search" and config.search_candidates and "warm" in state:
        from cryofire_ext.train.warmstart import WarmMap

        warm = WarmMap.from_state(state["warm"])
    return TrainedModel(model, config, box, psize, int(state["input_box"]), float(state["input_pixel_size_A"]),
                        StackStats(*[float(v) for v in state["stats"]]), run_dir, int(state["epoch"]),
                        int(state["images"]), warm, state.get("searched") if warm is not None else None,
                        state.get("particles_fingerprint"))


@torch.no_grad()
def predict(run_dir, stack: ParticleStack, *, batch_size: int = 256, device: str = "auto",
            polish_rounds: int | None = None) -> Predictions:
    """Poses, shifts, z and loss for every particle of `stack` from the trained run in `run_dir`.

    The stack must have the training particles' box and pixel size (within 0.5%). Then
    `polish_rounds` (None: the run's `config.polish_rounds`) rounds of per-particle refinement
    of pose, shift and class against the particles' back-projected class maps (`train.polish`);
    a particle whose class changes gets that class's z. `loss` stays the model's loss.
    """
    if polish_rounds is not None and (not isinstance(polish_rounds, int) or polish_rounds < 0):
        raise InputError(f"polish rounds {polish_rounds!r}: expected an integer >= 0 (0 = no pose refinement)")
    tm = run_dir if isinstance(run_dir, TrainedModel) else load_trained(run_dir, device=device)
    if stack.box != tm.input_box or abs(stack.pixel_size_A / tm.input_pixel_size_A - 1) > 5e-3:
        raise InputError(f"particles are {stack.box} px at {stack.pixel_size_A:.4g} A/px but the run in "
                         f"{tm.run_dir} was trained on {tm.input_box} px at {tm.input_pixel_size_A:.4g} A/px; "
                         "re-extract or rescale them to match")
    data = TrainingImages(stack, tm.box, tm.stats)
    dev = tm.model.k_half.device
    n = len(stack)
    A = np.empty((n, 3, 3))
    shifts_A = np.empty((n, 2))
    z = np.empty((n, tm.zdim), np.float32)
    loss = np.empty(n)
    if tm.warm is not None:
        from cryofire_ext.train.trainer import SearchCache, candidates_at_codes
        from cryofire_ext.train.classes import class_targets

        codes = class_targets(tm.warm, tm.zdim, dev)
        searched = SearchCache(tm.warm, n, _training_search(tm, stack))
    for s in range(0, n, batch_size):
        idx = np.arange(s, min(n, s + batch_size))
        img, ctf = data.read(idx)
        img, ctf = img.to(dev), ctf.to(dev)
        extra, ez = (None, None), None
        if tm.warm is not None:
            A_s, t_s, _ = searched.get(idx, img, ctf)
            extra = (A_s[:, None], t_s[:, None])
            if codes is not None:  # the searched pose at each class's z (the decoder picks)
                extra, ez = candidates_at_codes(A_s, t_s, codes)
        out = tm.model(img, ctf, 1.0, None, *extra, extra_z=ez)
        A[idx] = out.R.double().cpu().numpy()
        shifts_A[idx] = out.shift_px.double().cpu().numpy() * tm.pixel_size_A
        z[idx] = out.z_win.float().cpu().numpy()
        loss[idx] = out.loss.double().cpu().numpy()
    rounds = tm.config.polish_rounds if polish_rounds is None else polish_rounds
    if rounds > 0:
        A, shifts_A, z = _polish(tm, data, A, shifts_A, z, rounds)
    meta = {"polish_rounds": rounds, "pixel_size_A": stack.pixel_size_A, "box": stack.box, "model_box": tm.box,
            "model_pixel_size_A": tm.pixel_size_A, "zdim": tm.zdim, "run_dir": str(tm.run_dir),
            "epoch": tm.epoch, "images_seen": tm.images_seen}
    return Predictions(ids=stack.ids, A=A, shifts_A=shifts_A, z=z, loss=loss, meta=meta)


def _training_search(tm: TrainedModel, stack: ParticleStack) -> dict | None:
    """The trainer's searched (pose, shift, class) per particle when `stack` is the training stack
    (same fingerprint): the warm maps are fixed, so searching again would give the same values."""
    if tm.searched is None or tm.particles_fingerprint is None or len(tm.searched["known"]) != len(stack):
        return None
    if stack_fingerprint(stack) != tm.particles_fingerprint:
        return None
    log.info("reusing the training search for %d of %d particles", int(tm.searched["known"].sum()), len(stack))
    return tm.searched


def _polish(tm: TrainedModel, data: TrainingImages, A: np.ndarray, shifts_A: np.ndarray, z: np.ndarray, rounds: int):
    """`train.polish` on the model's predictions; classes from z's nearest class code."""
    from cryofire_ext.train.polish import polish
    from cryofire_ext.train.classes import class_targets

    dev = tm.model.k_half.device
    codes = class_targets(tm.warm, tm.zdim, "cpu")
    if codes is None:
        labels, K = np.zeros(len(A), dtype=np.int64), 1
    else:
        codes = codes.numpy()
        labels, K = ((z[:, None, :] - codes[None]) ** 2).sum(-1).argmin(1), len(codes)
    grid = None  # the warm start's global grid, its shifts in pixels of the model box
    if tm.config.polish_global_search and tm.warm is not None:
        grid = (tm.warm.rotations.to(dev), tm.warm.shifts_px.to(dev) * (tm.box / tm.warm.box))
    A_t, t_t, lab_t = polish(data.read, len(A), torch.as_tensor(A, device=dev), torch.as_tensor(shifts_A / tm.pixel_size_A,
                             device=dev), torch.as_tensor(labels, device=dev), K, tm.box, tm.pixel_size_A, rounds,
                             global_grid=grid)
    new = lab_t.cpu().numpy()
    z = z.copy()
    if codes is not None:
        moved = new != labels
        z[moved] = codes[new[moved]]
    return A_t.double().cpu().numpy(), t_t.double().cpu().numpy() * tm.pixel_size_A, z
