"""Warm start: a coarse EM global search that gives the amortized encoder something to learn from.

On CPU budgets gradient descent on a randomly started pose head learns no poses
(issue 4). Here a low-resolution map is built ab initio by online hard-assignment EM
over a fixed set of random rotations and a 3x3 shift grid on a few hundred images
Fourier-cropped to `warm_box`, starting from a map back-projected at random poses.
(Batch EM with a soft posterior collapsed to the near-spherical average here; the
minibatch noise of the online version breaks that symmetry.) `search` then gives the best grid pose of any batch of
images against that map (cheap: two matrix products), which the trainer distils into
the encoder while the decoder learns.

Units: lattice `k` in Nyquist units of the warm box; shifts in warm-box pixels
(RELION origin sign). The map is a complex Fourier grid `(G, G, G)`, `G = warm_box + 1`,
index `[kz, ky, kx]`, `k = 2 j / warm_box - 1`.
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

log = logging.getLogger(__name__)

#: starting resolution of the online EM, units of the warm box's Nyquist (grows linearly to 1)
R0 = 0.3


@dataclass
class WarmMap:
    """V `(G, G, G)` complex64 Fourier map on the warm lattice; rotations `(M, 3, 3)`; shifts_px `(S, 2)`."""

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
        return cls(torch.complex(s["V_re"], s["V_im"]), s["rotations"], s["shifts_px"], int(s["box"]),
                   float(s["pixel_size_A"]), float(s["sigma2"]))


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


def _shift_grid(max_shift_px: float) -> torch.Tensor:
    s = float(max_shift_px)
    if s <= 0:
        return torch.zeros(1, 2)
    g = torch.tensor([-s, 0.0, s])
    return torch.stack(torch.meshgrid(g, g, indexing="xy"), dim=-1).reshape(-1, 2)


def _scores(Y: torch.Tensor, C: torch.Tensor, S: torch.Tensor, lat: _Lattice, shifts: torch.Tensor,
            radius: float) -> torch.Tensor:
    """Log-likelihood up to a constant `(n, S, M)`: `2 Re<Y_s C, S_m> - <C^2, |S_m|^2>` on `|k| <= radius`."""
    w = (lat.r <= radius + 1e-6).float()
    Ys = undo_shift(Y, lat.k[:, :2], shifts[None].expand(Y.shape[0], -1, -1))  # (n, S, m)
    YC = Ys * (C * w)[:, None, :]
    cross = YC.real @ S.real.T + YC.imag @ S.imag.T  # (n, S, M)
    quad = (C * C * w) @ (S.abs().square()).T  # (n, M)
    return 2.0 * cross - quad[:, None, :]


@torch.no_grad()
def search(warm: WarmMap, images: torch.Tensor, ctf_params: torch.Tensor, refine: bool = True):
    """Best grid pose of each image against the warm map.

    images `(n, B, B)` normalised at the warm box -> (A `(n, 3, 3)` RELION matrices, shifts `(n, 2)`
    warm-box pixels). With `refine`, a second pass over 8 nearby rotations per image.
    """
    device = images.device
    lat = _Lattice(warm.box, warm.pixel_size_A, device)
    Y = lat.observe(images)
    C = evaluate_ctf(ctf_params.double().to(device), lat.freqs).float()
    rots = warm.rotations.to(device)
    S = _slices(warm.V.to(device), torch.einsum("mi,rij->rmj", lat.k, rots))
    sc = _scores(Y, C, S, lat, warm.shifts_px.to(device), 1.0)  # (n, S, M)
    flat = sc.flatten(1).argmax(1)
    s_idx, r_idx = flat // sc.shape[2], flat % sc.shape[2]
    A = rots[r_idx]
    t = warm.shifts_px.to(device)[s_idx]
    if refine:
        A = _refine(warm, Y, C, lat, A, t)
    return A, t


def _refine(warm, Y, C, lat, A, t, steps=(0.12, 0.06), n_dir: int = 12):
    """Local search: perturb each pose by small rotations (radians) and keep the best."""
    gen = torch.Generator().manual_seed(99)
    for step in steps:
        axes = Fn.normalize(torch.randn(n_dir, 3, generator=gen), dim=-1).to(A.device)
        dR = _axis_angle(axes * step)  # (n_dir, 3, 3)
        cand = torch.cat((A[:, None], dR[None] @ A[:, None]), dim=1)  # (n, 1+n_dir, 3, 3)
        coords = torch.einsum("mi,ncij->ncmj", lat.k, cand)
        S = _slices(warm.V.to(A.device), coords.reshape(-1, lat.k.shape[0], 3)).reshape(*cand.shape[:2], -1)
        Ys = undo_shift(Y, lat.k[:, :2], t[:, None, :])[:, 0]  # (n, m)
        YC = Ys * C
        score = 2.0 * (YC[:, None].conj() * S).real.sum(-1) - ((C * C)[:, None] * S.abs().square()).sum(-1)
        A = cand[torch.arange(A.shape[0]), score.argmax(1)]
    return A


def _axis_angle(v: torch.Tensor) -> torch.Tensor:
    theta = torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(1e-12)
    k = v / theta
    K = torch.zeros(*v.shape[:-1], 3, 3, dtype=v.dtype, device=v.device)
    K[..., 0, 1], K[..., 0, 2], K[..., 1, 2] = -k[..., 2], k[..., 1], -k[..., 0]
    K = K - K.transpose(-1, -2)
    th = theta[..., None]
    return torch.eye(3, dtype=v.dtype, device=v.device) + torch.sin(th) * K + (1 - torch.cos(th)) * K @ K


def warm_volume(warm: WarmMap) -> torch.Tensor:
    """Real-space view of the warm map `(box, box, box)` (for inspection)."""
    G, box = warm.V.shape[0], warm.box
    F = warm.V[:box, :box, :box]
    return fourier.ifft3_centered(F).real


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
    shifts = _shift_grid(max_shift_px).to(device)
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
        sc = _scores(Y[sel][:, mask], C[sel][:, mask], S, sub, shifts, 2.0).flatten(1)
        best = sc.argmax(1)
        s_idx, r_idx = best // rots.shape[0], best % rots.shape[0]
        Ys = undo_shift(Y[sel][:, mask], lat.k[mask, :2], shifts[s_idx][:, None])[:, 0]
        YC = Ys * C[sel][:, mask]
        acc.mul_(forget)
        _splat(acc, coords_all[r_idx][:, mask].reshape(-1, 3),
               torch.stack((YC.real, YC.imag, C[sel][:, mask] ** 2), -1).reshape(-1, 3))
        V = _solve(acc, 0.05)
        if callback is not None and (it + 1) % max(1, steps // 10) == 0:
            callback(it, WarmMap(V, rots, shifts, box, float(pixel_size_A), 1.0))
    return WarmMap(V, rots, shifts, box, float(pixel_size_A), 1.0)


class _Sub:
    """A lattice restricted to `mask` (for scoring a subset of points)."""

    def __init__(self, lat: _Lattice, mask: torch.Tensor):
        self.k, self.r = lat.k[mask], lat.r[mask]
