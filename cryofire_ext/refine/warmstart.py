"""Warm start: ab initio maps and classes from a few hundred images, for the amortized model to learn from.

On CPU budgets gradient descent on a randomly started pose head learns no poses. Here a low-resolution map is
built ab initio by online hard-assignment EM over a fixed set of random rotations and a 3x3 shift grid on a few
hundred images Fourier-cropped to `warm_box`, starting from a map back-projected at random poses (batch EM with
a soft posterior collapses to the near-spherical average; the minibatch noise of the online version breaks that
symmetry). `refine_warm_map` then lifts it to the training box by projection-matching rounds (back-project,
search again) and, for heterogeneous runs, splits it into class maps by hard-EM classification at fixed poses.
`warm_start` runs both from a `TrainConfig`. Units and grids as in `recon.lattice`.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from cryofire_ext.ctf import evaluate_ctf
from cryofire_ext.model.losses import undo_shift
from cryofire_ext.poses import random_rotations
from cryofire_ext.recon.classmaps import RECONSTRUCT_PAD, on_box_lattice, reconstruct_classes
from cryofire_ext.recon.lattice import Lattice, SubLattice, grid_scores, insert, slices, solve
from cryofire_ext.refine.classify import classify
from cryofire_ext.refine.frames import one_frame
from cryofire_ext.refine.search import WarmMap, search, shift_grid
from cryofire_ext.train.data import crop

if TYPE_CHECKING:
    from cryofire_ext.particles import ParticleStack
    from cryofire_ext.train.config import TrainConfig
    from cryofire_ext.train.data import TrainingImages

log = logging.getLogger(__name__)


#: starting resolution of the online EM, units of the warm box's Nyquist (grows linearly to 1)
R0 = 0.3


def build_warm_map_online(images: torch.Tensor, ctf_params: torch.Tensor, pixel_size_A: float, *, n_rotations: int,
                          steps: int, max_shift_px: float, seed: int, batch: int = 32, forget: float = 0.9,
                          callback=None) -> WarmMap:
    """Online (stochastic) hard-assignment EM: each step assigns a random minibatch to its best grid pose
    and blends its back-projection into running sums that forget old batches by `forget`.

    The minibatch noise breaks the near-spherical symmetry a flat start is trapped in.
    images `(n, B, B)` normalised at the warm box; ctf_params `(n, 9)`; pixel_size_A of these images;
    max_shift_px the shift-grid step in warm-box pixels. Deterministic given `seed`.
    """
    n, box = images.shape[0], images.shape[-1]
    device = images.device
    lat = Lattice(box, pixel_size_A, device)
    rng = np.random.default_rng([int(seed), 4242])
    rots = torch.as_tensor(random_rotations(n_rotations, rng), dtype=torch.float32, device=device)
    shifts = shift_grid(max_shift_px, max_shift_px).to(device)  # 3x3 at 0, +-max
    Y = lat.observe(images)
    C = evaluate_ctf(ctf_params.double().to(device), lat.freqs).float()
    G = box + 1
    coords_all = torch.einsum("mi,rij->rmj", lat.k, rots)
    acc = torch.zeros(G, G, G, 3, dtype=torch.float32, device=device)
    pick = torch.as_tensor(rng.integers(0, n_rotations, n), device=device)
    YC0 = Y * C
    insert(acc, coords_all[pick].reshape(-1, 3), torch.stack((YC0.real, YC0.imag, C * C), -1).reshape(-1, 3))
    V = solve(acc, 0.1)
    for it in range(steps):
        frac = it / max(steps - 1, 1)
        radius = R0 + (1.0 - R0) * frac
        sel = torch.as_tensor(rng.choice(n, size=min(batch, n), replace=False), device=device)
        mask = lat.r <= radius + 1e-6
        S = slices(V, coords_all[:, mask])
        sub = SubLattice(lat, mask)
        sc = grid_scores(Y[sel][:, mask], C[sel][:, mask], S, sub, shifts).flatten(1)
        best = sc.argmax(1)
        s_idx, r_idx = best // rots.shape[0], best % rots.shape[0]
        Ys = undo_shift(Y[sel][:, mask], lat.k[mask, :2], shifts[s_idx][:, None])[:, 0]
        YC = Ys * C[sel][:, mask]
        acc.mul_(forget)
        insert(acc, coords_all[r_idx][:, mask].reshape(-1, 3),
               torch.stack((YC.real, YC.imag, C[sel][:, mask] ** 2), -1).reshape(-1, 3))
        V = solve(acc, 0.05)
        if callback is not None and (it + 1) % max(1, steps // 10) == 0:
            callback(it, WarmMap(V[None], rots, shifts, box, float(pixel_size_A), 1.0))
    return WarmMap(V[None], rots, shifts, box, float(pixel_size_A), 1.0)


#: search rounds over (class, rotation, shift) after the classification
CLASS_ROUNDS = 2


@torch.no_grad()
def refine_warm_map(warm: WarmMap, images: torch.Tensor, ctf_params: torch.Tensor, pixel_size_A: float, *,
                    rounds: int, n_classes: int, max_shift_px: float, seed: int, callback=None) -> WarmMap:
    """Projection-matching rounds that lift the coarse warm map to the training box, then classes.

    images `(n, B, B)` normalised at the training box; pixel_size_A of these images; max_shift_px
    the search range in pixels of B. Each round back-projects the images at their current poses
    and searches again (global grid + local refinement of rotation and shift). With
    `n_classes` > 1, a hard-EM classification at fixed poses from random splits follows, then
    `CLASS_ROUNDS` rounds search over (class, rotation, shift), and the class maps are turned into one
    frame (`frames.class_frames`). Deterministic given `seed`.
    Returns the maps (one per class) at the training box, on a `RECONSTRUCT_PAD` times finer Fourier grid, for
    `search`. `callback()` (if given) is called between rounds (it may raise to stop, e.g. on an abort request).
    """
    box = images.shape[-1]
    step = callback or (lambda: None)
    A, t, _ = search(warm, images, ctf_params)
    shifts = shift_grid(max_shift_px).to(images.device)
    labels = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
    for r in range(rounds):
        step()
        V = reconstruct_classes(images, ctf_params, A, t, labels, 1, pixel_size_A, pad=RECONSTRUCT_PAD)
        A, t, _ = search(WarmMap(V, warm.rotations, shifts, box, pixel_size_A, 1.0), images, ctf_params)
        log.info("refinement round %d/%d at %d px", r + 1, rounds, box)
    K = 1
    if n_classes > 1:
        labels = classify(images, ctf_params, A, t, n_classes, pixel_size_A, seed)
        for _ in range(CLASS_ROUNDS):
            step()
            V = reconstruct_classes(images, ctf_params, A, t, labels, n_classes, pixel_size_A, pad=RECONSTRUCT_PAD)
            A, t, labels = search(WarmMap(V, warm.rotations, shifts, box, pixel_size_A, 1.0), images, ctf_params)
        K = n_classes
        log.info("classification into %d classes: %s images", K, torch.bincount(labels, minlength=K).tolist())
    V = reconstruct_classes(images, ctf_params, A, t, labels, K, pixel_size_A, pad=RECONSTRUCT_PAD)
    A_one, moved_frame = one_frame(on_box_lattice(V, box), A, labels)
    if moved_frame:  # classes split from one map inherit its frame; give them their common part's
        V = reconstruct_classes(images, ctf_params, A_one, t, labels, K, pixel_size_A, pad=RECONSTRUCT_PAD)
    return WarmMap(V, warm.rotations, shifts, box, float(pixel_size_A), 1.0)


#: below this many particles the warm start is not reliable (benchmarks/results/demo_small_n.json)
FEW_PARTICLES = 1000


def warm_start(config: "TrainConfig", data: "TrainingImages", stack: "ParticleStack", box: int, device,
               poll: Callable[[], None] = lambda: None) -> WarmMap:
    """The warm maps of a run: the coarse map from `config.warm_images` images, then `config.warm_rounds`
    rounds and `config.warm_classes` classes at the training `box` (deterministic in `config.seed`).
    `poll()` is called between steps; it may raise to stop (the trainer's stop request)."""

    poll()
    n = len(stack)
    k = min(n, config.warm_images)
    if n < FEW_PARTICLES:
        log.warning("only %d particles: below about %d the search warm start can fail to find poses (the demo's "
                    "phantom at 300 particles failed with one seed of two); check the maps, and if they are blobs "
                    "train again with another --seed", n, FEW_PARTICLES)
    pick = np.sort(np.random.default_rng([config.seed, 99]).choice(n, size=k, replace=False))
    img, ctf = data.read(pick)
    wb = min(config.warm_box, box)
    t = time.monotonic()
    warm = build_warm_map_online(crop(img, wb).to(device), ctf.to(device), stack.pixel_size_A * stack.box / wb,
                                 n_rotations=config.warm_rotations, steps=config.warm_steps,
                                 max_shift_px=config.warm_max_shift_px * wb / stack.box, seed=config.seed,
                                 batch=config.warm_batch, callback=lambda *_: poll())
    log.info("warm start: coarse map from %d images at %d px in %.1f s", k, wb, time.monotonic() - t)
    poll()
    if config.warm_rounds > 0:
        t = time.monotonic()
        warm = refine_warm_map(warm, img.to(device), ctf.to(device), stack.pixel_size_A * stack.box / box,
                               rounds=config.warm_rounds, n_classes=config.warm_classes if config.zdim else 1,
                               max_shift_px=config.warm_max_shift_px * box / stack.box, seed=config.seed,
                               callback=lambda *_: poll())
        log.info("warm start: %d refinement rounds and %d class(es) at %d px in %.1f s", config.warm_rounds,
                 warm.n_classes, box, time.monotonic() - t)
    return warm
