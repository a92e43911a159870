"""The model pass: every particle through the trained encoder (and the forward model, for the loss).

Not the values recorded during training: `model_pass` runs the model in evaluation mode over any stack with the
training run's box and pixel size (new images included) and returns `Predictions` (poses as RELION matrices,
shifts in Angstrom, z, class, loss). The refinement after it is `pipeline.infer`'s. Each particle's pose,
shift and z are those of the winning candidate: the encoder's heads at the encoder's z, and with a
search warm start the searched pose (at each warm class's z when there are classes).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cryofire_ext import run_layout
from cryofire_ext.errors import InputError
from cryofire_ext.landscape import Landscape, load_landscape
from cryofire_ext.model.cryofire import CryoFIRE
from cryofire_ext.particles import ParticleStack
from cryofire_ext.results import Predictions
from cryofire_ext.train.checkpoint import load_checkpoint
from cryofire_ext.train.config import TrainConfig
from cryofire_ext.train.data import StackStats, TrainingImages, stack_fingerprint
from cryofire_ext.refine.references import References, load_references
from cryofire_ext.refine.search import WarmMap
from cryofire_ext.train.candidates import SearchCache, candidates_at_codes, class_targets
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
    warm: WarmMap | None = None
    #: the training particles' searched poses (trainer's SearchCache state) and their fingerprint
    searched: dict | None = None
    particles_fingerprint: str | None = None
    #: the landscape stage (`landscape.pt`, z_mode "continuous"): z and the maps at z are its
    landscape: Landscape | None = None
    #: the run's fixed references (`references.pt`, written after training's refinement): new particles align to them
    references: References | None = None

    @property
    def zdim(self) -> int:
        """The dimension of the predictions' z: the landscape's when the run has one, else the pose model's."""
        return self.landscape.zdim if self.landscape is not None else self.model.zdim

    @torch.no_grad()
    def volumes(self, z: np.ndarray | None = None) -> np.ndarray:
        """Real-space maps `(m, D, D, D)` float32 (index [z, y, x]) at latent points z `(m, zdim)` of the
        predictions' z: the landscape's when the run has one, else the pose model's (zdim 0: pass None or
        `(1, 0)` for the one map). Voxel size `pixel_size_A`."""
        if self.landscape is not None:
            return self.landscape.volumes(_checked_z(z, self.landscape.zdim))
        return self.pose_model_volumes(z)

    @torch.no_grad()
    def class_volumes(self) -> np.ndarray:
        """The pose model's map of each warm class `(K, D, D, D)` (at its z code), or its one map `(1, D, D, D)`."""
        codes = class_targets(self.warm, self.model.zdim, "cpu")
        return self.pose_model_volumes(None if codes is None else codes.numpy())

    @torch.no_grad()
    def pose_model_volumes(self, z: np.ndarray | None = None) -> np.ndarray:
        """`volumes` from the pose model's decoder (z in its class-code space)."""
        if self.model.zdim == 0:
            m = 1 if z is None else max(1, len(np.asarray(z)))
            return np.stack([self.model.volume(None).cpu().numpy() for _ in range(m)]).astype(np.float32)
        z = _checked_z(z, self.model.zdim)
        dev = self.model.k_half.device
        return np.stack([self.model.volume(torch.as_tensor(zi, device=dev)).cpu().numpy() for zi in z]
                        ).astype(np.float32)


def _checked_z(z, zdim: int) -> np.ndarray:
    """Latent points as `(m, zdim)` float32 (one point may be `(zdim,)`); InputError otherwise."""
    z = np.asarray(z, dtype=np.float32)
    if z.ndim == 1:
        z = z[None]
    if z.ndim != 2 or z.shape[1] != zdim:
        raise InputError(f"latent points must be (m, {zdim}), got shape {z.shape}")
    return z


def load_trained(run_dir, device: str | None = "cpu", checkpoint: str | Path | None = None) -> TrainedModel:
    """Load `run_dir/checkpoints/last.pt` (or `checkpoint`) with weights_only=True onto `device`
    (None: the device the run was trained with, its config's `device`)."""
    run_dir = Path(run_dir)
    path = Path(checkpoint) if checkpoint is not None else run_dir / run_layout.LAST_CHECKPOINT
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
        warm = WarmMap.from_state(state["warm"])
    landscape = None
    if (run_dir / run_layout.LANDSCAPE).is_file():
        landscape = load_landscape(run_dir / run_layout.LANDSCAPE, device=model.k_half.device)
    references = None
    if (run_dir / run_layout.REFERENCES).is_file():
        references = load_references(run_dir / run_layout.REFERENCES, device=model.k_half.device)
    return TrainedModel(model, config, box, psize, int(state["input_box"]), float(state["input_pixel_size_A"]),
                        StackStats(*[float(v) for v in state["stats"]]), run_dir, int(state["epoch"]),
                        int(state["images"]), warm, state.get("searched") if warm is not None else None,
                        state.get("particles_fingerprint"), landscape, references)


@torch.no_grad()
def model_pass(tm: TrainedModel, stack: ParticleStack, *, batch_size: int = 256) -> Predictions:
    """Poses, shifts, z, class and loss of every particle of `stack` from the trained model alone (no refinement).

    The stack must have the training particles' box and pixel size (within 0.5%). With a search warm start the
    searched pose competes at each warm class's z (the training particles' searches are reused); a particle's
    class is the warm class whose z code is nearest its z (0 without classes). z is the pose model's (a class
    code); `pipeline.infer` replaces it with the landscape's when the run has one.
    """
    check_matches_run(tm, stack)
    data = TrainingImages(stack, tm.box, tm.stats)
    dev = tm.model.k_half.device
    n = len(stack)
    A = np.empty((n, 3, 3))
    shifts_A = np.empty((n, 2))
    z = np.empty((n, tm.model.zdim), np.float32)
    loss = np.empty(n)
    codes = class_targets(tm.warm, tm.model.zdim, dev)
    if tm.warm is not None:
        searched = SearchCache(tm.warm, n, _training_search(tm, stack))
    for s in range(0, n, batch_size):
        idx = np.arange(s, min(n, s + batch_size))
        img, ctf = data.read(idx)
        img, ctf = img.to(dev), ctf.to(dev)
        extra, ez = (None, None), None
        if tm.warm is not None:
            A_s, t_s, _ = searched.get(idx, img, ctf)
            extra = (A_s[:, None], t_s[:, None])
            if codes is not None:  # at each class's z (the decoder picks)
                extra, ez = candidates_at_codes(A_s, t_s, codes)
        out = tm.model(img, ctf, 1.0, None, *extra, extra_z=ez)
        A[idx] = out.R.double().cpu().numpy()
        shifts_A[idx] = out.shift_px.double().cpu().numpy() * tm.pixel_size_A
        z[idx] = out.z_win.float().cpu().numpy()
        loss[idx] = out.loss.double().cpu().numpy()
    return Predictions(ids=stack.ids, A=A, shifts_A=shifts_A, z=z, loss=loss, meta=run_meta(tm, stack),
                       class_id=nearest_class(z, codes))


def run_meta(tm: TrainedModel, stack: ParticleStack) -> dict:
    """The predictions' meta for `stack` under the run `tm`: the particles' grid, the model's, the run and how far
    it trained."""
    return {"pixel_size_A": stack.pixel_size_A, "box": stack.box, "model_box": tm.box,
            "model_pixel_size_A": tm.pixel_size_A, "zdim": tm.model.zdim, "run_dir": str(tm.run_dir),
            "epoch": tm.epoch, "images_seen": tm.images_seen}


def nearest_class(z: np.ndarray, codes: torch.Tensor | None) -> np.ndarray:
    """Class `(n,)` int64 of each z `(n, d)`: the index of the nearest class code `(K, d)` (all 0 for None)."""
    if codes is None:
        return np.zeros(len(z), dtype=np.int64)
    c = codes.cpu().numpy()
    return ((z[:, None, :] - c[None]) ** 2).sum(-1).argmin(1).astype(np.int64)


def check_matches_run(tm: TrainedModel, stack: ParticleStack) -> None:
    """Refuse particles of another box or pixel size (beyond 0.5%) than the run's training particles."""
    if stack.box != tm.input_box or abs(stack.pixel_size_A / tm.input_pixel_size_A - 1) > 5e-3:
        raise InputError(f"particles are {stack.box} px at {stack.pixel_size_A:.4g} A/px but the run in "
                         f"{tm.run_dir} was trained on {tm.input_box} px at {tm.input_pixel_size_A:.4g} A/px; "
                         "re-extract or rescale them to match")


def is_training_stack(tm: TrainedModel, stack: ParticleStack) -> bool:
    """Whether `stack` is the run's training particles (same fingerprint; False when the run kept none)."""
    return tm.particles_fingerprint is not None and stack_fingerprint(stack) == tm.particles_fingerprint


def _training_search(tm: TrainedModel, stack: ParticleStack) -> dict | None:
    """The trainer's searched (pose, shift, class) per particle when `stack` is the training stack
    (same fingerprint): the warm maps are fixed, so searching again would give the same values."""
    if tm.searched is None or len(tm.searched["known"]) != len(stack) or not is_training_stack(tm, stack):
        return None
    log.info("reusing the training search for %d of %d particles", int(tm.searched["known"].sum()), len(stack))
    return tm.searched
