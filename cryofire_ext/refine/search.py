"""The pose search: the best (class, pose, shift) of any batch of images against fixed class maps (`WarmMap`):
a global grid of rotations and shifts (two matrix products per class; optionally coarse to fine, `_search`'s
`keep`), then a local refinement of rotation and shift (`refine_local`). The warm start builds the maps
(`warmstart`); the trainer distils the result into the encoder and keeps it as a candidate; the refinement after
training (`polish`) re-searches lost particles; new particles are aligned to the run's references (`references`).

Units: lattice `k` in Nyquist units of the map's box; shifts in that box's pixels (RELION origin sign). Each map
is a complex Fourier grid `(G, G, G)`, `G = box + 1` (or `pad * box + 1`), as in `recon.lattice`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as Fn

from cryofire_ext.ctf import evaluate_ctf
from cryofire_ext.poses import axis_angle_matrix
from cryofire_ext.recon.lattice import Lattice, SubLattice, grid_scores, score_at, slices
from cryofire_ext.train.data import crop

log = logging.getLogger(__name__)


@dataclass
class WarmMap:
    """V `(K, G, G, G)` complex64 Fourier maps (one per class, K >= 1) on the lattice of `box` (`G = box + 1`) or
    on a grid over the same frequencies `pad` times finer (`G = pad * box + 1`, `warmstart.refine_warm_map`);
    rotations `(M, 3, 3)` the global-search grid; shifts_px `(S, 2)` its shift grid (pixels of `box`)."""

    V: torch.Tensor
    rotations: torch.Tensor
    shifts_px: torch.Tensor
    box: int
    pixel_size_A: float
    sigma2: float

    def state(self) -> dict:
        return {"V_re": self.V.real.contiguous(), "V_im": self.V.imag.contiguous(), "rotations": self.rotations,
                "shifts_px": self.shifts_px, "box": self.box, "pixel_size_A": self.pixel_size_A,
                "sigma2": self.sigma2}

    @classmethod
    def from_state(cls, s: dict) -> "WarmMap":
        V = torch.complex(s["V_re"], s["V_im"])
        return cls(V if V.dim() == 4 else V[None], s["rotations"], s["shifts_px"], int(s["box"]),
                   float(s["pixel_size_A"]), float(s["sigma2"]))

    @property
    def n_classes(self) -> int:
        return int(self.V.shape[0])


#: a coarse-to-fine grid search (`_search`'s `keep`) scores each image's this many best rotations of the coarse
#: pass in full (on the two-state target set's grid of 8,000 the same poses as scoring all of them)
GRID_KEEP = 100


@torch.no_grad()
def search(warm: WarmMap, images: torch.Tensor, ctf_params: torch.Tensor, refine: bool = True,
           chunk: int = 128, max_radius: float = 1.0, keep: int = 0):
    """Best pose and class of each image against the warm maps (global grid, then local refinement).

    images `(n, B, B)` normalised, `B >= warm.box` (Fourier-cropped to the warm box here) ->
    (A `(n, 3, 3)` RELION matrices, shifts `(n, 2)` in pixels of B, class `(n,)` int64). Each class
    map is searched on its own and the best score wins. The grid is scored on the shells it resolves
    (`global_radius`). With `refine`, a local search of rotations (steps of `REFINE_STEPS_RAD`, each
    on the shells it resolves) and then of shifts (`REFINE_SHIFT_STEPS`, a fraction of the grid's
    pitch) follows the grid search, on the lattice up to `max_radius` (Nyquist units; where the maps end).
    With `keep` > 0 the grid is searched coarse to fine (`_search`).
    """
    A, t, cls, _ = _search(warm, images, ctf_params, refine, chunk, scored=False, max_radius=max_radius, keep=keep)
    return A, t, cls


@torch.no_grad()
def search_scored(warm: WarmMap, images: torch.Tensor, ctf_params: torch.Tensor, refine: bool = True,
                  chunk: int = 64, max_radius: float = 1.0, keep: int = 0):
    """`search` that also returns each image's score of every grid rotation `(n, M)`: its log-likelihood up to a
    constant, the best over the grid's shifts and the classes, on the shells the grid resolves (for
    `posterior_near`; -inf for the rotations a coarse-to-fine search, `keep` > 0, did not score in full: see
    `_search`). The local refinement scores no shell beyond `max_radius` (Nyquist units; where the maps end)."""
    return _search(warm, images, ctf_params, refine, chunk, scored=True, max_radius=max_radius, keep=keep)


#: `posterior_near` counts the grid rotations this many grid spacings (`grid_spacing_rad`) from the final pose
POSTERIOR_NEAR_SPACINGS = 2.0


def grid_spacing_rad(n_rotations: int) -> float:
    """Typical spacing (rad) of `n_rotations` random rotations: `(8 pi^2 / M)^(1/3)`."""
    return float((8.0 * np.pi ** 2 / max(int(n_rotations), 1)) ** (1.0 / 3.0))


def posterior_near(scores: torch.Tensor, rotations: torch.Tensor, A: torch.Tensor,
                   sigma2: "float | torch.Tensor") -> torch.Tensor:
    """Posterior mass `(n,)` in [0, 1] of the grid rotations `(M, 3, 3)` within `POSTERIOR_NEAR_SPACINGS` grid
    spacings of each image's pose A `(n, 3, 3)`, each rotation weighted by exp(score / sigma2), its score
    `scores` `(n, M)` a log-likelihood up to a constant, sigma2 a number or one per image `(n,)`."""
    if torch.is_tensor(sigma2):
        sigma2 = sigma2.reshape(-1, 1)
    p = torch.softmax(scores / sigma2, dim=1)
    cos = (torch.einsum("rij,nij->nr", rotations, A) - 1.0) / 2.0  # cos of the angle between grid and pose
    near = np.cos(POSTERIOR_NEAR_SPACINGS * grid_spacing_rad(len(rotations)))
    return (p * (cos >= near)).sum(1).clamp(0.0, 1.0)


#: the coarse pass of a coarse-to-fine grid search scores the shells up to this fraction of `global_radius`,
#: at every other shift of the grid. Half the radius would tolerate twice the pitch, but at half the radius the
#: two ends of an elongated particle look alike: its half-turned pose wins the coarse pass and the true one is
#: not kept (benchmarks/results/pose_ceiling_*.json); three quarters keeps it, at a little more time
COARSE_RADIUS_FRACTION = 0.75


def every_other_shift(shifts_px: torch.Tensor) -> torch.Tensor:
    """The points `(S', 2)` of a square shift grid `(S, 2)` px at every other x and y value (the ends and the
    centre of an odd grid kept): twice the pitch."""
    ux, uy = torch.unique(shifts_px[:, 0]), torch.unique(shifts_px[:, 1])
    ok = torch.isin(shifts_px[:, 0], ux[::2]) & torch.isin(shifts_px[:, 1], uy[::2])
    return shifts_px[ok]


def _search(warm: WarmMap, images: torch.Tensor, ctf_params: torch.Tensor, refine: bool, chunk: int, *,
            scored: bool, max_radius: float = 1.0, keep: int = 0):
    """The engine of `search` and `search_scored`: per chunk, each class's grid scores, its best grid point, its
    local refinement (on the lattice up to `max_radius`), then the best class; with `scored` also each grid
    rotation's score (else None). With `keep` (0 < keep < M) the grid is searched coarse to fine: every rotation
    on the shells up to `COARSE_RADIUS_FRACTION` of the grid's radius at `every_other_shift`, then each image's
    `keep` best of them on all the grid's shells and shifts (the others score -inf)."""
    device = images.device
    box = images.shape[-1]
    images = crop(images, warm.box)
    lat = Lattice(warm.box, warm.pixel_size_A, device, max_radius)
    rots = warm.rotations.to(device)
    shifts = warm.shifts_px.to(device)
    pitch = grid_pitch(warm.shifts_px)
    low = lat.r <= global_radius(len(rots), warm.box) + 1e-6
    sub = SubLattice(lat, low)
    coords = torch.einsum("mi,rij->rmj", sub.k, rots)
    maps = [V.to(device) for V in warm.V]
    S_all = [slices(V, coords) for V in maps]
    keep = int(keep) if 0 < keep < len(rots) else 0
    if keep:
        coarse = sub.r <= COARSE_RADIUS_FRACTION * global_radius(len(rots), warm.box) + 1e-6
        sub_c, shifts_c = SubLattice(sub, coarse), every_other_shift(shifts)
        S_coarse = [S[:, coarse] for S in S_all]
    out_A, out_t, out_c, out_m = [], [], [], []
    for s in range(0, images.shape[0], chunk):
        Y = lat.observe(images[s:s + chunk])
        C = evaluate_ctf(ctf_params[s:s + chunk].double().to(device), lat.freqs).float()
        Yl, Cl = Y[:, low], C[:, low]
        per_class = []  # each class searched (and refined) on its own; the best final score wins
        per_rotation = None  # (n, M): each rotation's best score over shifts and classes (-inf: not rescored)
        for c, (V, S) in enumerate(zip(maps, S_all)):
            if keep:  # the coarse pass picks each image's `keep` rotations; only they are scored in full
                top = grid_scores(Yl[:, coarse], Cl[:, coarse], S_coarse[c], sub_c, shifts_c).amax(1).topk(keep).indices
                g = grid_scores(Yl, Cl, S[top], sub, shifts)  # (n, shift, kept rotation)
            else:
                g = grid_scores(Yl, Cl, S, sub, shifts)  # (n, shift, rotation)
            val, flat = g.flatten(1).max(1)
            if scored:
                g = g.amax(1)
                if keep:
                    g = torch.full((len(Y), len(rots)), -torch.inf, device=device).scatter_(1, top, g)
                per_rotation = g if per_rotation is None else torch.maximum(per_rotation, g)
            del g
            r = flat % S.shape[0] if not keep else top.gather(1, (flat % keep)[:, None])[:, 0]
            A, t = rots[r], shifts[flat // (keep or len(rots))]
            if refine:
                A, t, val = refine_local(V, Y, C, lat, A, t, pitch)
            per_class.append((A, t, val))
        A, t, cls = best_class(per_class)
        out_A.append(A)
        out_t.append(t)
        out_c.append(cls)
        if scored:
            out_m.append(per_rotation)
    scores = torch.cat(out_m) if scored else None
    return torch.cat(out_A), torch.cat(out_t) * (box / warm.box), torch.cat(out_c), scores


#: the global grid is scored up to the radius where its spacing moves a lattice point this many pixels
GLOBAL_REACH_PX = 3.0


def resolved_radius(angle_rad: float, box: int, reach_px: float) -> float:
    """Lattice radius (Nyquist units of `box`, at most 1) up to which a rotation by `angle_rad` moves a
    point by at most `reach_px` pixels: the shells on which poses that far apart can be compared."""
    return float(min(1.0, reach_px / (angle_rad * box / 2.0)))


def global_radius(n_rotations: int, box: int) -> float:
    """Lattice radius (Nyquist units of `box`) that a grid of `n_rotations` random rotations resolves:
    `resolved_radius` of its spacing `(8 pi^2 / M)^(1/3)` rad at `GLOBAL_REACH_PX`. Finer shells cost
    time and add noise to the grid's choice (D=64, SNR 0.1, maps from true poses: 1.05 deg median
    error after refinement at radius 0.5 vs 1.51 deg when the grid was scored to Nyquist)."""
    return resolved_radius(grid_spacing_rad(n_rotations), box, GLOBAL_REACH_PX)


def best_class(per_class: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[(A `(n, 3, 3)`, t `(n, 2)`, score `(n,)`) for each class, as `refine_local` returns them] ->
    each image's (A, t, class) of its best-scoring class."""
    cls = torch.stack([v for _, _, v in per_class], 1).argmax(1)
    ar = torch.arange(len(cls), device=cls.device)
    return (torch.stack([a for a, _, _ in per_class], 1)[ar, cls],
            torch.stack([t for _, t, _ in per_class], 1)[ar, cls], cls)


#: local refinement: rotation steps (radians, each tried along `n_dir` random axes), then shift steps
#: (fractions of the shift grid's pitch, a 3x3 neighbourhood each)
REFINE_STEPS_RAD = (0.12, 0.08, 0.05, 0.03, 0.02, 0.012)
REFINE_SHIFT_STEPS = (0.5, 0.25)
#: a rotation step of `s` rad is scored on lattice radii up to `REFINE_REACH_PX / s` pixels, where the
#: step moves a point by at most this many pixels (finer shells only add noise to that comparison)
REFINE_REACH_PX = 1.0
#: `refine_local` works through the images in blocks of at most this many slice points (images x candidate
#: poses x lattice points): its working set (the candidates' coordinates, slices and scores) is then bounded
#: whatever number of images a caller hands it
REFINE_POINTS = 1 << 21


def refine_local(V: torch.Tensor, Y: torch.Tensor, C: torch.Tensor, lat: "Lattice", A: torch.Tensor,
                 t: torch.Tensor, pitch_px: float, n_dir: int = 16):
    """Hill-climb each image's pose `A` `(n, 3, 3)` and shift `t` `(n, 2)` px against the map `V`
    `(G, G, G)` (any grid over the same frequencies as `lat`'s, e.g. oversampled): observed `Y` `(n, m)`, CTF `C`
    `(n, m)` on `lat`; shift steps are fractions of `pitch_px`. Each image is refined on its own, in blocks of
    `REFINE_POINTS`; the search directions are drawn once per call, so the answer does not depend on the block
    size. Deterministic. Returns (A, t, score `(n,)` the log-likelihood at them)."""
    gen = torch.Generator().manual_seed(99)
    axes = [Fn.normalize(torch.randn(n_dir, 3, generator=gen), dim=-1).to(A.device) for _ in REFINE_STEPS_RAD]
    block = max(1, REFINE_POINTS // ((1 + n_dir) * lat.k.shape[0]))
    if A.shape[0] <= block:
        return _refine_block(V, Y, C, lat, A, t, pitch_px, axes)
    parts = [_refine_block(V, Y[s:s + block], C[s:s + block], lat, A[s:s + block], t[s:s + block], pitch_px, axes)
             for s in range(0, A.shape[0], block)]
    return tuple(torch.cat(p) for p in zip(*parts))


def _refine_block(V, Y, C, lat, A, t, pitch_px, axes):
    """`refine_local` of one block of images, along the search directions `axes` (one `(n_dir, 3)` per step)."""
    ar = torch.arange(A.shape[0], device=A.device)
    box = lat.box
    for step, dirs in zip(REFINE_STEPS_RAD, axes):
        cand = torch.cat((A[:, None], axis_angle_matrix(dirs * step)[None] @ A[:, None]), dim=1)  # (n, 1+n_dir, 3, 3)
        m = lat.r <= resolved_radius(step, box, REFINE_REACH_PX) + 1e-6  # coarse steps: coarse shells
        k = lat.k[m]
        S = slices(V, torch.einsum("mi,ncij->ncmj", k, cand))
        score = score_at(Y[:, m], C[:, m], k[:, :2], S, t[:, None])  # one shift per image: its phases once
        A = cand[ar, score.argmax(1)]
    S = slices(V, torch.einsum("mi,nij->nmj", lat.k, A)[:, None])  # (n, 1, m)
    for frac in REFINE_SHIFT_STEPS:
        d = frac * pitch_px
        g = torch.tensor([[x, y] for y in (-d, 0.0, d) for x in (-d, 0.0, d)], device=A.device)
        tc = t[:, None] + g[None]  # (n, 9, 2)
        best, j = score_at(Y, C, lat.k[:, :2], S.expand(-1, tc.shape[1], -1), tc).max(1)
        t = tc[ar, j]
    return A, t, best


def grid_pitch(shifts_px: torch.Tensor) -> float:
    u = torch.unique(shifts_px[:, 0])
    return float((u[1:] - u[:-1]).min()) if len(u) > 1 else 1.0


# ---------------------------------------------------------------- refinement at the training box
def shift_grid(max_shift_px: float, max_pitch_px: float = 1.5) -> torch.Tensor:
    """Square grid `(S, 2)` over `[-max, max]^2` px with a pitch of at most `max_pitch_px`."""
    if max_shift_px <= 0:
        return torch.zeros(1, 2)
    per_side = 2 * int(np.ceil(max_shift_px / max_pitch_px)) + 1
    g = torch.linspace(-float(max_shift_px), float(max_shift_px), per_side)
    return torch.stack(torch.meshgrid(g, g, indexing="xy"), dim=-1).reshape(-1, 2)
