"""Warm start: a global search that gives the amortized model poses and classes to learn from.

On CPU budgets gradient descent on a randomly started pose head learns no poses
(issue 4). Here a low-resolution map is built ab initio by online hard-assignment EM
over a fixed set of random rotations and a 3x3 shift grid on a few hundred images
Fourier-cropped to `warm_box`, starting from a map back-projected at random poses.
(Batch EM with a soft posterior collapsed to the near-spherical average here; the
minibatch noise of the online version breaks that symmetry.) `classes.refine_warm_map` then lifts
it to the training box by projection-matching rounds (back-project, search again) and,
for heterogeneous runs, splits it into class maps by hard-EM classification at fixed poses.
`search` gives the best (class, pose, shift) of any batch of images against those maps:
a global grid (two matrix products per class) and a local refinement of rotation and shift.
The trainer distils the result into the encoder and keeps it as a candidate.

Units: lattice `k` in Nyquist units of the map's box; shifts in that box's pixels
(RELION origin sign). Each map is a complex Fourier grid `(G, G, G)`, `G = box + 1`,
index `[kz, ky, kx]`, `k = 2 j / box - 1`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as Fn

from cryofire_ext import fourier
from cryofire_ext.ctf import evaluate_ctf
from cryofire_ext.model.losses import undo_shift
from cryofire_ext.poses import random_rotations
from cryofire_ext.train.data import crop

log = logging.getLogger(__name__)

#: starting resolution of the online EM, units of the warm box's Nyquist (grows linearly to 1)
R0 = 0.3


@dataclass
class WarmMap:
    """V `(K, G, G, G)` complex64 Fourier maps (one per class, K >= 1) on the lattice of `box` (`G = box + 1`) or
    on a grid over the same frequencies `pad` times finer (`G = pad * box + 1`, `classes.refine_warm_map`);
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


class _Lattice:
    def __init__(self, box: int, pixel_size_A: float, device):
        half = fourier.half_plane_mask(box, 1.0 - 1e-3)
        k = fourier.slice_lattice(box, dtype=torch.float32).reshape(-1, 3)
        self.idx = torch.nonzero(half.reshape(-1)).squeeze(-1).to(device)
        self.k = k[self.idx.cpu()].to(device)
        self.r = torch.linalg.vector_norm(self.k[:, :2], dim=-1)
        self.freqs = self.k[:, :2].double() / (2.0 * pixel_size_A)
        self.box = box

    def observe(self, img: torch.Tensor) -> torch.Tensor:
        F = fourier.fft2_centered(img.float()) / self.box
        return F.reshape(F.shape[0], -1)[:, self.idx]


def _slices(V: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Trilinear samples of complex V `(G,G,G)` at coords `(M, m, 3)` (Nyquist units, (kx,ky,kz)) -> `(M, m)`."""
    inp = torch.stack((V.real, V.imag))[None]  # (1, 2, G, G, G)
    grid = coords.reshape(1, 1, -1, 1, 3).float()
    out = Fn.grid_sample(inp, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    out = out.reshape(2, *coords.shape[:-1])
    return torch.complex(out[0], out[1])


def _splat(acc: torch.Tensor, coords: torch.Tensor, values: torch.Tensor) -> None:
    """Add real `values` `(P, 3)` = (Re, Im, weight) at coords `(P, 3)` (Nyquist units) trilinearly into
    `acc` `(G, G, G, 3)`, and the Hermitian mates (-k, conj) too."""
    G = acc.shape[0]
    mate = values * torch.tensor([1.0, -1.0, 1.0], device=values.device)
    coords = torch.cat((coords, -coords))
    values = torch.cat((values, mate))
    j = (coords + 1.0) * (G - 1) / 2.0  # index space (x, y, z)
    j0 = torch.floor(j)
    f = j - j0
    j0 = j0.long()
    idx, vals = [], []
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                ix, iy, iz = j0[:, 0] + dx, j0[:, 1] + dy, j0[:, 2] + dz
                w = ((f[:, 0] if dx else 1 - f[:, 0]) * (f[:, 1] if dy else 1 - f[:, 1])
                     * (f[:, 2] if dz else 1 - f[:, 2]))
                ok = (ix >= 0) & (ix < G) & (iy >= 0) & (iy < G) & (iz >= 0) & (iz < G)
                idx.append(((iz * G + iy) * G + ix)[ok])
                vals.append(values[ok] * w[ok, None])
    acc.view(-1, 3).index_add_(0, torch.cat(idx), torch.cat(vals).to(acc.dtype))


def _solve(acc: torch.Tensor, reg: float) -> torch.Tensor:
    """Wiener-like division of the splatted numerator by its weights -> complex map."""
    den = acc[..., 2]
    lam = reg * den[den > 0].mean() if bool((den > 0).any()) else 1.0
    return torch.complex(acc[..., 0], acc[..., 1]) / (den + lam + 1e-6)


def _scores(Y: torch.Tensor, C: torch.Tensor, S: torch.Tensor, lat: "_Lattice | _Sub",
            shifts: torch.Tensor) -> torch.Tensor:
    """Log-likelihood up to a constant `(n, S, M)`: `2 Re<Y_s C, S_m> - <C^2, |S_m|^2>` on the points of
    `lat` (restrict the lattice, e.g. with `_Sub`, to score fewer shells)."""
    Ys = undo_shift(Y, lat.k[:, :2], shifts[None].expand(Y.shape[0], -1, -1))  # (n, S, m)
    YC = Ys * C[:, None, :]
    cross = YC.real @ S.real.T + YC.imag @ S.imag.T  # (n, S, M)
    quad = (C * C) @ (S.abs().square()).T  # (n, M)
    return 2.0 * cross - quad[:, None, :]


def _score_at(Y: torch.Tensor, C: torch.Tensor, k_xy: torch.Tensor, S: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Log-likelihood up to a constant of images `Y` `(n, m)` under slices `S` `(n, c, m)` at shifts
    `t` `(n, c, 2)` px -> `(n, c)`."""
    Ys = undo_shift(Y, k_xy, t)
    return 2.0 * (Ys * C[:, None]).conj().mul(S).real.sum(-1) - ((C * C)[:, None] * S.abs().square()).sum(-1)


@torch.no_grad()
def search(warm: WarmMap, images: torch.Tensor, ctf_params: torch.Tensor, refine: bool = True,
           chunk: int = 128):
    """Best pose and class of each image against the warm maps (global grid, then local refinement).

    images `(n, B, B)` normalised, `B >= warm.box` (Fourier-cropped to the warm box here) ->
    (A `(n, 3, 3)` RELION matrices, shifts `(n, 2)` in pixels of B, class `(n,)` int64). Each class
    map is searched on its own and the best score wins. The grid is scored on the shells it resolves
    (`global_radius`). With `refine`, a local search of rotations (steps of `REFINE_STEPS_RAD`, each
    on the shells it resolves) and then of shifts (`REFINE_SHIFT_STEPS`, a fraction of the grid's
    pitch) follows the grid search.
    """
    device = images.device
    box = images.shape[-1]
    images = crop(images, warm.box)
    lat = _Lattice(warm.box, warm.pixel_size_A, device)
    rots = warm.rotations.to(device)
    shifts = warm.shifts_px.to(device)
    pitch = _grid_pitch(warm.shifts_px)
    low = lat.r <= global_radius(len(rots), warm.box) + 1e-6
    sub = _Sub(lat, low)
    coords = torch.einsum("mi,rij->rmj", sub.k, rots)
    maps = [V.to(device) for V in warm.V]
    S_all = [_slices(V, coords) for V in maps]
    out_A, out_t, out_c = [], [], []
    for s in range(0, images.shape[0], chunk):
        Y = lat.observe(images[s:s + chunk])
        C = evaluate_ctf(ctf_params[s:s + chunk].double().to(device), lat.freqs).float()
        per_class = []  # each class searched (and refined) on its own; the best final score wins
        for V, S in zip(maps, S_all):
            val, flat = _scores(Y[:, low], C[:, low], S, sub, shifts).flatten(1).max(1)  # (shift, rotation)
            A, t = rots[flat % S.shape[0]], shifts[flat // S.shape[0]]
            if refine:
                A, t, val = refine_local(V, Y, C, lat, A, t, pitch)
            per_class.append((A, t, val))
        A, t, cls = best_class(per_class)
        out_A.append(A)
        out_t.append(t)
        out_c.append(cls)
    return torch.cat(out_A), torch.cat(out_t) * (box / warm.box), torch.cat(out_c)


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
    spacing_rad = (8.0 * np.pi ** 2 / max(int(n_rotations), 1)) ** (1.0 / 3.0)
    return resolved_radius(spacing_rad, box, GLOBAL_REACH_PX)


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


def refine_local(V: torch.Tensor, Y: torch.Tensor, C: torch.Tensor, lat: "_Lattice", A: torch.Tensor,
                 t: torch.Tensor, pitch_px: float, n_dir: int = 16):
    """Hill-climb each image's pose `A` `(n, 3, 3)` and shift `t` `(n, 2)` px against the map `V`
    `(G, G, G)` (any grid over the same frequencies as `lat`'s, e.g. oversampled): observed `Y` `(n, m)`, CTF `C`
    `(n, m)` on `lat`; shift steps are fractions of `pitch_px`. Deterministic. Returns (A, t, score `(n,)` the
    log-likelihood at them)."""
    gen = torch.Generator().manual_seed(99)
    ar = torch.arange(A.shape[0], device=A.device)
    box = lat.box
    for step in REFINE_STEPS_RAD:
        axes = Fn.normalize(torch.randn(n_dir, 3, generator=gen), dim=-1).to(A.device)
        cand = torch.cat((A[:, None], _axis_angle(axes * step)[None] @ A[:, None]), dim=1)  # (n, 1+n_dir, 3, 3)
        m = lat.r <= resolved_radius(step, box, REFINE_REACH_PX) + 1e-6  # coarse steps: coarse shells
        k = lat.k[m]
        S = _slices(V, torch.einsum("mi,ncij->ncmj", k, cand))
        score = _score_at(Y[:, m], C[:, m], k[:, :2], S, t[:, None].expand(-1, cand.shape[1], -1))
        A = cand[ar, score.argmax(1)]
    S = _slices(V, torch.einsum("mi,nij->nmj", lat.k, A)[:, None])  # (n, 1, m)
    for frac in REFINE_SHIFT_STEPS:
        d = frac * pitch_px
        g = torch.tensor([[x, y] for y in (-d, 0.0, d) for x in (-d, 0.0, d)], device=A.device)
        tc = t[:, None] + g[None]  # (n, 9, 2)
        best, j = _score_at(Y, C, lat.k[:, :2], S.expand(-1, tc.shape[1], -1), tc).max(1)
        t = tc[ar, j]
    return A, t, best


def _grid_pitch(shifts_px: torch.Tensor) -> float:
    u = torch.unique(shifts_px[:, 0])
    return float((u[1:] - u[:-1]).min()) if len(u) > 1 else 1.0


def _axis_angle(v: torch.Tensor) -> torch.Tensor:
    theta = torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(1e-12)
    k = v / theta
    K = torch.zeros(*v.shape[:-1], 3, 3, dtype=v.dtype, device=v.device)
    K[..., 0, 1], K[..., 0, 2], K[..., 1, 2] = -k[..., 2], k[..., 1], -k[..., 0]
    K = K - K.transpose(-1, -2)
    th = theta[..., None]
    return torch.eye(3, dtype=v.dtype, device=v.device) + torch.sin(th) * K + (1 - torch.cos(th)) * K @ K


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
    lat = _Lattice(box, pixel_size_A, device)
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
    _splat(acc, coords_all[pick].reshape(-1, 3), torch.stack((YC0.real, YC0.imag, C * C), -1).reshape(-1, 3))
    V = _solve(acc, 0.1)
    for it in range(steps):
        frac = it / max(steps - 1, 1)
        radius = R0 + (1.0 - R0) * frac
        sel = torch.as_tensor(rng.choice(n, size=min(batch, n), replace=False), device=device)
        mask = lat.r <= radius + 1e-6
        S = _slices(V, coords_all[:, mask])
        sub = _Sub(lat, mask)
        sc = _scores(Y[sel][:, mask], C[sel][:, mask], S, sub, shifts).flatten(1)
        best = sc.argmax(1)
        s_idx, r_idx = best // rots.shape[0], best % rots.shape[0]
        Ys = undo_shift(Y[sel][:, mask], lat.k[mask, :2], shifts[s_idx][:, None])[:, 0]
        YC = Ys * C[sel][:, mask]
        acc.mul_(forget)
        _splat(acc, coords_all[r_idx][:, mask].reshape(-1, 3),
               torch.stack((YC.real, YC.imag, C[sel][:, mask] ** 2), -1).reshape(-1, 3))
        V = _solve(acc, 0.05)
        if callback is not None and (it + 1) % max(1, steps // 10) == 0:
            callback(it, WarmMap(V[None], rots, shifts, box, float(pixel_size_A), 1.0))
    return WarmMap(V[None], rots, shifts, box, float(pixel_size_A), 1.0)


class _Sub:
    """A lattice restricted to `mask` (for scoring a subset of points)."""

    def __init__(self, lat: _Lattice, mask: torch.Tensor):
        self.k, self.r = lat.k[mask], lat.r[mask]


# ---------------------------------------------------------------- refinement at the training box
def shift_grid(max_shift_px: float, max_pitch_px: float = 1.5) -> torch.Tensor:
    """Square grid `(S, 2)` over `[-max, max]^2` px with a pitch of at most `max_pitch_px`."""
    if max_shift_px <= 0:
        return torch.zeros(1, 2)
    per_side = 2 * int(np.ceil(max_shift_px / max_pitch_px)) + 1
    g = torch.linspace(-float(max_shift_px), float(max_shift_px), per_side)
    return torch.stack(torch.meshgrid(g, g, indexing="xy"), dim=-1).reshape(-1, 2)
