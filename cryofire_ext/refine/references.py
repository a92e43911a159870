"""The run's references: its final class maps, kept fixed, and the alignment of new particles to them.

After training, the refinement's final poses and classes give each class a gold-standard map
(`recon.classmaps.class_maps_fsc`: half-set FSC-weighted, on a 2x oversampled Fourier grid). `build_references`
keeps them with the global search grid and the noise power of the images; the run saves them
(`run_layout.REFERENCES`). `align` puts particles onto them the way RELION or cryoSPARC refine new particles
against a reference: a global search over the grid and a local refinement against each class's map
(`search.search_scored`), then the class whose map explains the particle best up to
`classify.CLASSIFY_RESOLUTION_A` (the refinement's rule), all scored on the shells the maps hold
(`classmaps.signal_radius`: beyond the classes' FSC the FSC-weighted maps are about 0). No map is rebuilt from the
new particles, so each chunk costs the same and a handful of particles is aligned as well as a million.

Each aligned particle also gets a pose confidence (the posterior mass, over the search grid, near its pose:
`posterior_near` over the search grid, `_judged`) and its class probability (softmax over the classes of the log-likelihood at its
pose, on the shells the class is decided on). `confidence_at` gives the same two numbers at given poses (the
training particles', after the refinement).

Units as in `recon.lattice`: maps `(K, G, G, G)` complex, `G = RECONSTRUCT_PAD * box + 1`; shifts in pixels of
`box` (RELION origin sign); images normalised as `train.data.TrainingImages` reads them at `box`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cryofire_ext.ctf import evaluate_ctf
from cryofire_ext.errors import InputError
from cryofire_ext.model.losses import undo_shift
from cryofire_ext.recon.classmaps import RECONSTRUCT_PAD, class_maps_fsc, signal_radius
from cryofire_ext.recon.lattice import Lattice, SubLattice, slices
from cryofire_ext.refine.classify import class_scores, low_resolution
from cryofire_ext.refine.polish import SHIFT_PITCH_PX
from cryofire_ext.refine.search import GRID_KEEP, WarmMap, posterior_near, refine_local, search_scored
from cryofire_ext.train.checkpoint import load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

REFERENCES_FORMAT = "cryofire-references"
REFERENCES_VERSION = 1

Reader = Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]]

#: at most this many particles estimate the noise power (`build_references`)
NOISE_PARTICLES = 2048
#: `align`'s local refinements against the searched class's map after the search's own: the grid's nearest
#: rotation is about half a spacing (6 deg for 8,000 rotations) from the pose, further than one pass of
#: `search.REFINE_STEPS_RAD` climbs (benchmarks/results/predict_references.json)
LOCAL_PASSES = 2
#: images per grid search inside a chunk (its `(n, shifts, rotations)` scores held at once)
SEARCH_CHUNK = 64


@dataclass
class References:
    """V `(K, G, G, G)` complex64: each class's map, `G = RECONSTRUCT_PAD * box + 1`, in the frame of the run's
    final poses; fsc `(K, box // 2 + 1)` each class's half-set FSC; rotations `(M, 3, 3)` and shifts_px `(S, 2)`
    (pixels of `box`): the global search grid; box (px) and pixel_size_A: the model grid the particles are read
    at; sigma2: the noise power per Fourier coefficient of the normalised images (the residual at the final
    poses), the scale of the log-likelihood."""

    V: torch.Tensor
    fsc: torch.Tensor
    rotations: torch.Tensor
    shifts_px: torch.Tensor
    box: int
    pixel_size_A: float
    sigma2: float

    @property
    def n_classes(self) -> int:
        return int(self.V.shape[0])

    def save(self, path) -> Path:
        """`path` (atomic, replacing it: the run folder's own file)."""
        state = {"references_format": REFERENCES_FORMAT, "references_version": REFERENCES_VERSION,
                 "V": self.V.cpu(), "fsc": self.fsc.cpu(), "rotations": self.rotations.cpu(),
                 "shifts_px": self.shifts_px.cpu(), "box": self.box, "pixel_size_A": self.pixel_size_A,
                 "sigma2": self.sigma2}
        return save_checkpoint(Path(path), state)

    @property
    def radius(self) -> float:
        """The lattice radius (Nyquist units) of the shells the maps hold (`classmaps.signal_radius`)."""
        return signal_radius(self.fsc, self.box)

    def lattice(self, device) -> Lattice:
        """The lattice the particles are scored on: up to `radius`."""
        return Lattice(self.box, self.pixel_size_A, device, self.radius)

    def _search_grid(self) -> WarmMap:
        return WarmMap(self.V, self.rotations, self.shifts_px, self.box, self.pixel_size_A, self.sigma2)


def load_references(path, device: torch.device | str = "cpu") -> References:
    """The references saved at `path` on `device`; InputError naming the file when it is not one of ours."""
    path = Path(path)
    state = load_checkpoint(path)
    try:
        if state["references_format"] != REFERENCES_FORMAT or int(state["references_version"]) > REFERENCES_VERSION:
            raise ValueError(f"format {state['references_format']} v{state['references_version']}")
        box = int(state["box"])
        V = torch.as_tensor(state["V"]).to(torch.complex64)
        G = RECONSTRUCT_PAD * box + 1
        if V.ndim != 4 or V.shape[1:] != (G,) * 3:
            raise ValueError(f"maps of shape {tuple(V.shape)} for box {box}")
        rotations, shifts = torch.as_tensor(state["rotations"]).float(), torch.as_tensor(state["shifts_px"]).float()
        if rotations.ndim != 3 or rotations.shape[1:] != (3, 3) or shifts.ndim != 2 or shifts.shape[1] != 2:
            raise ValueError(f"a search grid of shapes {tuple(rotations.shape)} and {tuple(shifts.shape)}")
        sigma2 = float(state["sigma2"])
        if not np.isfinite(sigma2) or sigma2 <= 0:
            raise ValueError(f"noise power {sigma2}")
        return References(V.to(device), torch.as_tensor(state["fsc"]).float().to(device), rotations.to(device),
                          shifts.to(device), box, float(state["pixel_size_A"]), sigma2)
    except (KeyError, RuntimeError, TypeError, ValueError) as exc:
        raise InputError(f"{path}: not the references of a cryofire run ({exc}); re-export the run "
                         "(`cryofire train ... --resume`) to write them again") from exc


@torch.no_grad()
def build_references(read: Reader, n: int, A: torch.Tensor, shifts_px: torch.Tensor, labels: torch.Tensor,
                     n_classes: int, box: int, pixel_size_A: float, grid: tuple[torch.Tensor, torch.Tensor],
                     chunk: int = 256) -> References:
    """The references of `n` particles `read(idx)` -> (images `(m, box, box)` normalised, ctf `(m, 9)`) at their
    final poses A `(n, 3, 3)`, shifts_px `(n, 2)` and classes `labels` `(n,)`; `grid` = (rotations `(M, 3, 3)`,
    shifts `(S, 2)` px of `box`), the global search grid kept with them."""
    t0 = time.perf_counter()
    A, shifts_px = A.float(), shifts_px.float()
    V, fsc = class_maps_fsc(read, n, A, shifts_px, labels.long(), n_classes, box, pixel_size_A, chunk)
    lat = Lattice(box, pixel_size_A, A.device, signal_radius(fsc, box))
    idx = np.linspace(0, n - 1, min(n, NOISE_PARTICLES)).round().astype(np.int64)
    power = []
    for s in range(0, len(idx), chunk):
        sel = idx[s:s + chunk]
        img, ctf = read(sel)
        Y = lat.observe(img.to(A.device))
        C = evaluate_ctf(ctf.double().to(A.device), lat.freqs).float()
        power.append(_residual_power(V, Y, C, lat, A[sel], shifts_px[sel], labels[sel].long().to(A.device)))
    sigma2 = float(torch.cat(power).mean())
    rotations, shifts = grid
    log.info("references: %d class map(s) at %d px, noise power %.3g, %.1f s", n_classes, box, sigma2,
             time.perf_counter() - t0)
    return References(V, fsc, rotations.float().to(A.device), shifts.float().to(A.device), box, pixel_size_A,
                      sigma2)


@dataclass
class Aligned:
    """A `(n, 3, 3)` RELION matrices; shifts_px `(n, 2)` pixels of the references' box; labels `(n,)` int64;
    pose_confidence `(n,)` in [0, 1] (`_judged`); class_probability `(n,)` in [0, 1];
    residual `(n,)`: the mean of `|Y - C S|^2` over the lattice, the image against its class map's slice at its
    pose, in units of the noise power (about 1 for an image the references explain)."""

    A: torch.Tensor
    shifts_px: torch.Tensor
    labels: torch.Tensor
    pose_confidence: torch.Tensor
    class_probability: torch.Tensor
    residual: torch.Tensor


@torch.no_grad()
def align(refs: References, read: Reader, n: int, chunk: int = 1024,
          on_chunk: Callable[[int], None] | None = None) -> Aligned:
    """Align `n` particles `read(idx)` to the references (module docstring): coarse-to-fine global search
    (`GRID_KEEP`) and local refinement (`search_scored`), `LOCAL_PASSES` more local refinements against the
    searched class's map, then the class at the refined pose. Streams `chunk` images at a time (the grid's slices
    are made once per chunk); `on_chunk(done)` after each. Deterministic."""
    device = refs.V.device
    warm = refs._search_grid()
    lat = refs.lattice(device)
    low = low_resolution(lat, refs.pixel_size_A)
    sub = SubLattice(lat, low)
    out = []
    for s in range(0, n, chunk):
        idx = np.arange(s, min(n, s + chunk))
        img, ctf = read(idx)
        img, ctf = img.to(device), ctf.to(device)
        A, t, searched, grid = search_scored(warm, img, ctf, chunk=SEARCH_CHUNK, max_radius=refs.radius, keep=GRID_KEEP)
        Y = lat.observe(img)
        C = evaluate_ctf(ctf.double(), lat.freqs).float()
        for _ in range(LOCAL_PASSES):
            for k in torch.unique(searched).tolist():
                sel = searched == k
                A[sel], t[sel], _ = refine_local(refs.V[k], Y[sel], C[sel], lat, A[sel], t[sel], SHIFT_PITCH_PX)
        labels, prob, conf, residual = _judged(refs, Y, C, lat, (low, sub), grid, A, t)
        out.append((A, t, labels, conf, prob, residual))
        if on_chunk is not None:
            on_chunk(int(idx[-1]) + 1)
    return Aligned(*(torch.cat(parts) for parts in zip(*out)))


@torch.no_grad()
def confidence_at(refs: References, read: Reader, n: int, A: torch.Tensor, shifts_px: torch.Tensor,
                  labels: torch.Tensor, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(pose confidence `(n,)`, class probability `(n,)` of `labels`) of `n` particles at given poses A
    `(n, 3, 3)` and shifts_px `(n, 2)` px of the references' box: as `align` gives them, without moving the
    poses (the grid's posterior mass within `POSTERIOR_NEAR_SPACINGS` spacings of A)."""
    device = refs.V.device
    warm = refs._search_grid()
    lat = refs.lattice(device)
    low = low_resolution(lat, refs.pixel_size_A)
    sub = SubLattice(lat, low)
    A, shifts_px, labels = A.float().to(device), shifts_px.float().to(device), labels.long().to(device)
    conf, prob = [], []
    for s in range(0, n, chunk):
        idx = np.arange(s, min(n, s + chunk))
        img, ctf = read(idx)
        img, ctf = img.to(device), ctf.to(device)
        grid = search_scored(warm, img, ctf, refine=False, chunk=SEARCH_CHUNK, keep=GRID_KEEP)[3]
        Y = lat.observe(img)
        C = evaluate_ctf(ctf.double(), lat.freqs).float()
        _, p, c, _ = _judged(refs, Y, C, lat, (low, sub), grid, A[idx], shifts_px[idx], labels[idx])
        conf.append(c)
        prob.append(p)
    return torch.cat(conf), torch.cat(prob)


def _judged(refs: References, Y: torch.Tensor, C: torch.Tensor, lat: Lattice, classed: tuple, grid: torch.Tensor,
            A: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None):
    """(class `(n,)`, its probability `(n,)`, pose confidence `(n,)`, residual `(n,)`) of images `Y` `(n, m)` (CTF
    `C`) on `lat` at poses A, shifts t; `classed` = (mask, SubLattice) of the shells the class is decided on;
    `grid` `(n, M)` each grid rotation's score. The class: the given `labels`, else the most probable. The
    residual (`Aligned.residual`) scales the noise of the pose posterior per image (`posterior_near` at
    `sigma2 * max(1, residual)`): an image the references explain worse than the noise (junk, another
    particle) is judged with its own, larger noise, so that its posterior is not sharper than the data allow."""
    mask, sub = classed
    p_all = _class_probabilities(refs, Y[:, mask], C[:, mask], sub, A, t)
    if labels is None:
        labels = p_all.argmax(1)
    ar = torch.arange(len(labels), device=labels.device)
    residual = _residual_power(refs.V, Y, C, lat, A, t, labels) / refs.sigma2
    conf = posterior_near(grid, refs.rotations, A, refs.sigma2 * residual.clamp_min(1.0))
    return labels, p_all[ar, labels], conf, residual


def _class_probabilities(refs: References, Y: torch.Tensor, C: torch.Tensor, sub: SubLattice, A: torch.Tensor,
                         t: torch.Tensor) -> torch.Tensor:
    """`(n, K)`: softmax over the class maps of each image's log-likelihood at its pose (on `sub`'s points)."""
    return torch.softmax(class_scores(refs.V, Y, C, sub, A, t) / refs.sigma2, dim=1)


def _residual_power(V: torch.Tensor, Y: torch.Tensor, C: torch.Tensor, lat: Lattice, A: torch.Tensor,
                    t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`(n,)` mean over the lattice of `|Y - C S|^2`: each image `Y` `(n, m)` (CTF `C`) against the slice `S` of its
    class's map `V[labels]` at its pose A `(n, 3, 3)` and shift t `(n, 2)` px."""
    coords = torch.einsum("mi,nij->nmj", lat.k, A.float())
    S = torch.zeros_like(Y)
    for k in torch.unique(labels).tolist():
        sel = labels == k
        S[sel] = slices(V[k], coords[sel])
    Ys = undo_shift(Y, lat.k[:, :2], t.float()[:, None])[:, 0]
    return (Ys - C * S).abs().square().mean(1)
