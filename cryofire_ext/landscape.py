"""The landscape stage: each particle's conformation z as a continuous coordinate, found at its refined pose.

The pose model's z is a class code (`train.candidates.class_codes`): it names the warm start's class and cannot
vary within one. Once training and the refinement have fixed every particle's pose and shift, this stage lays a
curve through map space along the particles' main motion and gives each particle its position on it:

1. images Fourier-cropped to `landscape_resolution_A` (heterogeneity lives at low resolution), at their poses
   (`analysis.variability.observe_at_poses`);
2. each of the `STARTS` leading 3D variability components (`analysis.variability.variability_of`) orders the
   particles; its quantiles make `landscape_nodes` K groups, the starting nodes of one curve;
3. `landscape_iters` rounds of a self-organising EM along the curve: each node's map is back-projected from the
   particles weighted by their responsibilities, smoothed over neighbouring nodes (a Gaussian over the node
   index whose width shrinks from K/5 to K/10 nodes, which keeps the nodes in order); each particle is scored
   against the maps of the half-set it is not in (its own contribution does not hold it), and its
   responsibilities are the softmax of those log-likelihoods over the nodes;
4. of the `STARTS` curves, the one whose node maps leave the least residual power in the images is kept;
5. z `(n, 1)` in [0, 1]: the particle's expected position along the curve, node k at `k / (K - 1)`.

The map at any z interpolates the two nearest nodes' Fourier maps (`Landscape.volumes`, on the run's map grid).
New particles get their z in one pass at their pose (`Landscape.z_of`): the same scores against the nodes' maps
from all the training particles. Unlike an image-only encoder, z is a function of the image *at its pose*, so it
is the same function on training and new particles. The run keeps the stage in `landscape.pt`
(`run_layout.LANDSCAPE`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cryofire_ext import fourier
from cryofire_ext.analysis.variability import Observed, observe_at_poses, variability_of
from cryofire_ext.errors import InputError
from cryofire_ext.particles import ParticleStack
from cryofire_ext.recon.classmaps import half_set
from cryofire_ext.recon.lattice import insert, slices, solve
from cryofire_ext.train.checkpoint import load_checkpoint, save_checkpoint
from cryofire_ext.train.config import TrainConfig
from cryofire_ext.train.trainer import TrainingStopped

log = logging.getLogger(__name__)

LANDSCAPE_FORMAT, LANDSCAPE_VERSION = "cryofire-landscape-curve", 1
#: the node maps' Wiener constant (`recon.lattice.solve`: relative to the mean weight of the filled voxels)
NODE_REG = 0.05
#: responsibilities are softmax(score / (TEMPERATURE * sigma2)); 1 would be the Gaussian posterior, 2 softens
#: it for the errors of the poses and of the maps themselves
TEMPERATURE = 2.0
#: the curve starts once from each of the leading 3D variability components and the fit that explains the images
#: best (least residual power, each half-set scored against the other's node maps) is kept: the leading components
#: of a continuum and of a minority of misaligned particles can have almost equal variance, and their order
#: from the subspace iteration is then arbitrary
STARTS = 3
#: particles per step of the node back-projection and the scores (bounded working set at any n)
PARTICLE_CHUNK = 1024


@dataclass
class Landscape:
    """The fitted landscape. nodes `(K, G, G, G)` complex64: the curve's Fourier maps on the lattice grid of `box`
    (`G = box + 1`, `recon.lattice` units) at `pixel_size_A` (the cropped grid, Nyquist `resolution_A`);
    `sigma2` the noise power per lattice point that scales the scores; `map_box` / `map_pixel_size_A`: the grid
    of its maps (the run's model box, so landscape and class maps overlay)."""

    nodes: torch.Tensor
    sigma2: float
    box: int
    pixel_size_A: float
    resolution_A: float
    map_box: int
    map_pixel_size_A: float
    config: TrainConfig

    zdim = 1

    @property
    def n_nodes(self) -> int:
        return int(self.nodes.shape[0])

    @torch.no_grad()
    def z_of(self, stack: ParticleStack, A: np.ndarray, shifts_A: np.ndarray, chunk: int = 2048) -> np.ndarray:
        """z `(n, 1)` float32 in [0, 1] of every particle of `stack` at its pose A `(n, 3, 3)` (RELION matrices)
        and shift shifts_A `(n, 2)` (RELION origins, Angstrom), read in chunks of `chunk` particles."""
        n = len(stack)
        A = np.asarray(A).reshape(n, 3, 3)
        shifts_A = np.asarray(shifts_A).reshape(n, 2)
        self._check_grid(stack)
        out = np.empty((n, 1), np.float32)
        dev = self.nodes.device
        for s in range(0, n, chunk):
            idx = np.arange(s, min(n, s + chunk))
            part = stack.take(idx)
            obs = observe_at_poses(part.require_images(), A[idx], shifts_A[idx], part.ctf, stack.pixel_size_A,
                                   self.resolution_A, device=dev)
            out[idx, 0] = _positions(_responsibilities(_scores(obs, self.nodes[None]), self.sigma2)).cpu().numpy()
        return out

    @torch.no_grad()
    def volumes(self, z: np.ndarray) -> np.ndarray:
        """Maps `(m, B, B, B)` float32 at z `(m, 1)` (clipped to [0, 1]), B = `map_box` (voxel size
        `map_pixel_size_A`), in the images' units: the nodes' Fourier maps interpolated linearly between the two
        nearest nodes, Fourier-padded to B."""
        z = np.clip(np.asarray(z, np.float64).reshape(-1), 0.0, 1.0)
        pos = z * (self.n_nodes - 1)
        lo = np.minimum(np.floor(pos).astype(int), self.n_nodes - 2) if self.n_nodes > 1 else np.zeros(len(z), int)
        B, D = self.map_box, self.box
        ax = (torch.arange(B, dtype=torch.float32) - B // 2) / (D / 2)
        kz, ky, kx = torch.meshgrid(ax, ax, ax, indexing="ij")
        pts = torch.stack((kx, ky, kz), dim=-1).reshape(-1, 3)
        inside = torch.linalg.vector_norm(pts, dim=-1) < 1.0
        nodes = self.nodes.cpu()
        out = np.empty((len(z), B, B, B), np.float32)
        for i, (k, p) in enumerate(zip(lo, pos)):
            f = float(p - k) if self.n_nodes > 1 else 0.0
            V = nodes[k] * (1 - f) + (nodes[k + 1] * f if f > 0 else 0)
            F = torch.zeros(B ** 3, dtype=torch.complex64)
            F[inside] = slices(V, pts[inside][None])[0]
            # as `CryoFIRE.volume`: the lattice holds image transforms / D; D (B/D)^2 gives a B-grid map whose
            # projections are B-pixel images
            out[i] = fourier.ifft3_centered(F.reshape(B, B, B) * (D * (B / D) ** 2)).real.numpy()
        return out

    def save(self, path) -> Path:
        """`path` (atomic, replacing it: the run folder's own file)."""
        state = {"landscape_format": LANDSCAPE_FORMAT, "landscape_version": LANDSCAPE_VERSION,
                 "nodes": self.nodes.cpu(), "sigma2": self.sigma2, "box": self.box, "pixel_size_A": self.pixel_size_A,
                 "resolution_A": self.resolution_A, "map_box": self.map_box,
                 "map_pixel_size_A": self.map_pixel_size_A, "config": self.config.to_dict()}
        return save_checkpoint(Path(path), state)

    def _check_grid(self, stack: ParticleStack) -> None:
        want = self.map_box * self.map_pixel_size_A
        have = stack.box * stack.pixel_size_A
        if abs(have - want) > 1e-3 * want:
            raise InputError(f"particles of {stack.box} px at {stack.pixel_size_A:.4g} A/px "
                             f"({have:.1f} A across) do not match the landscape's {want:.1f} A box")


def fit_landscape(stack: ParticleStack, A: np.ndarray, shifts_A: np.ndarray, config: TrainConfig, *,
                  map_box: int, map_pixel_size_A: float, device: torch.device | str = "cpu",
                  should_stop: Callable[[], bool] | None = None,
                  on_progress: Callable[[dict], None] | None = None) -> tuple[Landscape, np.ndarray]:
    """Fit the landscape to `stack` at fixed poses A `(n, 3, 3)` (RELION matrices) and shifts_A `(n, 2)`
    (RELION origins, Angstrom). `map_box` / `map_pixel_size_A`: the run's model grid (where its maps go).
    Returns (the landscape, the training particles' z `(n, 1)`, each scored against the other half-set's
    maps). Raises `train.trainer.TrainingStopped` (nothing kept) when `should_stop()` says so between rounds;
    `on_progress` gets a trainer-like dict (`stage` "landscape", one `epoch` per round)."""
    K, iters = int(config.landscape_nodes), int(config.landscape_iters)
    n = len(stack)
    if n < 4 * K:
        raise InputError(f"{n} particles are too few for a landscape of {K} nodes "
                         f"(at least {4 * K}; lower landscape_nodes)")
    t0 = time.monotonic()
    obs = observe_at_poses(stack.require_images(), A, shifts_A, stack.ctf, stack.pixel_size_A, config.landscape_resolution_A,
                           device=device)
    starts = variability_of(obs, n_components=STARTS, resolution_A=config.landscape_resolution_A, iters=15,
                            seed=config.seed).coords
    half = half_set(n, obs.Y.device)
    index = torch.arange(K, dtype=torch.float32, device=obs.Y.device)
    n_starts, best = starts.shape[1], None
    for j in range(n_starts):
        rank = np.argsort(np.argsort(starts[:, j], kind="stable"), kind="stable")
        resp = torch.nn.functional.one_hot(torch.as_tensor(rank * K // n), K).float().to(obs.Y.device)
        sigma2 = 1.0
        for it in range(iters):
            if should_stop is not None and should_stop():
                raise TrainingStopped(None, "the landscape stage (the trained model is kept; --resume runs the "
                                            "landscape again)")
            weights = resp @ _neighbourhood(index, _width(K, it))
            halves = _node_maps(obs, weights, half, 2)
            scores = _scores(obs, halves.flip(0), half)  # each half scored against the other half's node maps
            sigma2 = _noise_power(obs, scores)
            resp = _responsibilities(scores, sigma2)
            if on_progress is not None:
                on_progress({"stage": "landscape", "epoch": j * iters + it, "epochs": n_starts * iters,
                             "batch": 0, "batches": 1, "loss": -float(scores.max(1).values.mean()) / sigma2,
                             "time_s": time.monotonic() - t0})
        log.info("landscape start %d/%d (from 3D variability component %d): residual power %.6g per point, "
                 "particles per node %s", j + 1, n_starts, j + 1, sigma2,
                 torch.bincount(resp.argmax(1), minlength=K).tolist())
        if best is None or sigma2 < best[1]:
            best = (resp, sigma2, j)
    resp, sigma2, j = best
    log.info("landscape: the curve from 3D variability component %d explains the images best", j + 1)
    z = _positions(resp).cpu().numpy().astype(np.float32)[:, None]
    nodes = _node_maps(obs, resp @ _neighbourhood(index, _width(K, max(iters - 1, 0))))[0]
    lm = Landscape(nodes, float(sigma2), obs.box, obs.pixel_size_A, float(config.landscape_resolution_A),
                   int(map_box), float(map_pixel_size_A), config)
    log.info("landscape: %d nodes from %d particles at %d px (%.0f A) in %.0f s", K, n, obs.box,
             config.landscape_resolution_A, time.monotonic() - t0)
    return lm, z


def load_landscape(path, device: torch.device | str = "cpu") -> Landscape:
    """The landscape saved at `path` on `device`; InputError naming the file when it is not one of ours."""
    path = Path(path)
    state = load_checkpoint(path)
    try:
        if state["landscape_format"] != LANDSCAPE_FORMAT or int(state["landscape_version"]) > LANDSCAPE_VERSION:
            raise ValueError(f"format {state['landscape_format']} v{state['landscape_version']}")
        config = TrainConfig.from_dict(state["config"], source=str(path))
        nodes = torch.as_tensor(state["nodes"]).to(torch.complex64)
        box = int(state["box"])
        if nodes.ndim != 4 or nodes.shape[1:] != (box + 1,) * 3:
            raise ValueError(f"node maps of shape {tuple(nodes.shape)} for box {box}")
        return Landscape(nodes.to(device), float(state["sigma2"]), box, float(state["pixel_size_A"]),
                         float(state["resolution_A"]), int(state["map_box"]), float(state["map_pixel_size_A"]),
                         config)
    except (KeyError, RuntimeError, TypeError, ValueError) as exc:
        raise InputError(f"{path}: not a landscape of this cryofire ({exc}); train the run again, or delete the "
                         "file to use the class z") from exc


def _width(K: int, it: int) -> float:
    """Neighbourhood width (nodes) of round `it`: K/5 shrinking by 0.7 a round to K/10."""
    return max(K / 10.0, K / 5.0 * 0.7 ** it)


def _neighbourhood(index: torch.Tensor, width: float) -> torch.Tensor:
    """`(K, K)` Gaussian weights between nodes `width` apart."""
    return torch.exp(-0.5 * ((index[:, None] - index[None]) / width) ** 2)


def _groups(obs: Observed, group: torch.Tensor | None, n_groups: int, chunk: int):
    """(group g, its particles' Y `(r, m)`, C `(r, m)`, coords `(r, m, 3)`, their row indices `(r,)`) for every
    chunk of `chunk` particles and every group present in it (`group` `(n,)` in [0, n_groups); None: all 0)."""
    for s in range(0, len(obs), chunk):
        rows = torch.arange(s, min(len(obs), s + chunk), device=obs.Y.device)
        for g in range(n_groups):
            sel = rows if group is None else rows[group[rows] == g]
            if len(sel):
                yield g, obs.Y[sel], obs.C[sel], obs.coords(sel), sel


def _node_maps(obs: Observed, weights: torch.Tensor, group: torch.Tensor | None = None, n_groups: int = 1,
               chunk: int = PARTICLE_CHUNK) -> torch.Tensor:
    """Wiener back-projections `(n_groups, K, G, G, G)`: for each group (`group` `(n,)`, e.g. the half-sets) the
    K node maps of its particles weighted by `weights` `(n, K)`; `chunk` particles at a time."""
    G, K = obs.box + 1, weights.shape[1]
    acc = torch.zeros(n_groups, G, G, G, K, 3, device=obs.Y.device)  # all K maps in one insertion
    for g, Y, C, coords, rows in _groups(obs, group, n_groups, chunk):
        YC, w = Y * C, weights[rows][:, None, :]  # (r, m), (r, 1, K)
        values = torch.stack((YC.real[..., None] * w, YC.imag[..., None] * w, (C * C)[..., None] * w), -1)
        insert(acc[g], coords.reshape(-1, 3), values.reshape(-1, K, 3))
    return torch.stack([torch.stack([solve(per_group[..., k, :], NODE_REG) for k in range(K)])
                        for per_group in acc])


def _scores(obs: Observed, nodes: torch.Tensor, group: torch.Tensor | None = None,
            chunk: int = PARTICLE_CHUNK) -> torch.Tensor:
    """Log-likelihood up to a constant, times sigma2, `(n, K)`: `2 Re<Y, C S_k> - |C S_k|^2` of each particle
    under each node map's slice at its pose; nodes `(n_groups, K, G, G, G)`, particle i scored against
    `nodes[group[i]]` (None: all against `nodes[0]`); `chunk` particles at a time."""
    out = torch.empty(len(obs), nodes.shape[1], device=obs.Y.device)
    for g, Y, C, coords, rows in _groups(obs, group, nodes.shape[0], chunk):
        for k, V in enumerate(nodes[g]):
            S = C * slices(V, coords)
            out[rows, k] = 2.0 * (Y.conj() * S).real.sum(1) - S.abs().square().sum(1)
    return out


def _noise_power(obs: Observed, scores: torch.Tensor) -> float:
    """Mean residual power per lattice point at each particle's best node: `(|Y|^2 - best score) / m`."""
    power = obs.Y.abs().square().sum(1)
    return max(float((power - scores.max(1).values).mean()) / obs.Y.shape[1], 1e-12)


def _responsibilities(scores: torch.Tensor, sigma2: float) -> torch.Tensor:
    """Each particle's weights `(n, K)` over the nodes: softmax(scores / (TEMPERATURE sigma2))."""
    return torch.softmax(scores / (TEMPERATURE * sigma2), 1)


def _positions(resp: torch.Tensor) -> torch.Tensor:
    """Expected position `(n,)` in [0, 1] along the nodes (node k at k / (K - 1)) under `resp` `(n, K)`."""
    K = resp.shape[1]
    return resp @ torch.arange(K, dtype=resp.dtype, device=resp.device) / max(K - 1, 1)
