"""The Fourier-grid engine every stage runs: a slice lattice, trilinear slices of a 3D Fourier map, trilinear
insertion (back-projection) with Hermitian mates, the Wiener-like solve, and the Gaussian log-likelihood of
images under slices.

Units: lattice `k` in Nyquist units of its box, `(kx, ky, kz)`; shifts in that box's pixels (RELION origin
sign). A map is a complex Fourier grid `(G, G, G)`, `G = box + 1` (or `pad * box + 1` for a grid `pad` times
finer over the same frequencies), index `[kz, ky, kx]`, `k = 2 j / (G - 1) - 1`. Poses are RELION matrices `A`
(left-multiply xyz column vectors); an image's slice samples the map at `A^T (kx, ky, 0)`, i.e. `k @ A`.
The RELION-checked projector and reconstructor (`projection`, `reconstruct`) use the same trilinear
insertion (`insert_trilinear`) and sampling (`sample_trilinear`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as Fn

from cryofire_ext import fourier
from cryofire_ext.model.losses import undo_shift


class Lattice:
    """The half-plane slice lattice of `box` (one point of each Hermitian pair, inside the Nyquist circle, or
    inside `max_radius` Nyquist units when that is smaller).

    k `(m, 3)` Nyquist units; r `(m,)` radius; freqs `(m, 2)` float64 1/A (for the CTF); `observe(img)` the
    images' centred transforms on it."""

    def __init__(self, box: int, pixel_size_A: float, device, max_radius: float = 1.0):
        half = fourier.half_plane_mask(box, min(float(max_radius), 1.0 - 1e-3))
        k = fourier.slice_lattice(box, dtype=torch.float32).reshape(-1, 3)
        self.idx = torch.nonzero(half.reshape(-1)).squeeze(-1).to(device)
        self.k = k[self.idx.cpu()].to(device)
        self.r = torch.linalg.vector_norm(self.k[:, :2], dim=-1)
        self.freqs = self.k[:, :2].double() / (2.0 * pixel_size_A)
        self.box = box

    def observe(self, img: torch.Tensor) -> torch.Tensor:
        """Images `(n, box, box)` -> their centred transforms on the lattice `(n, m)` complex64 (scaled 1/box)."""
        F = fourier.fft2_centered(img.float()) / self.box
        return F.reshape(F.shape[0], -1)[:, self.idx]


class SubLattice:
    """A lattice restricted to `mask` `(m,)` (for scoring a subset of points, e.g. the low shells)."""

    def __init__(self, lat: Lattice, mask: torch.Tensor):
        self.k, self.r = lat.k[mask], lat.r[mask]


def sample_trilinear(grid: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Trilinear samples of `grid` `(C, G, G, G)` (index [z, y, x]) at `coords` `(..., 3)` in `[-1, 1]` (x, y, z;
    -1 and 1 are the first and last voxels' centres), zero outside -> `(C, ...)`."""
    out = Fn.grid_sample(grid[None], coords.reshape(1, 1, -1, 1, 3), mode="bilinear", padding_mode="zeros",
                         align_corners=True)
    return out.reshape(grid.shape[0], *coords.shape[:-1])


def slices(V: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Trilinear samples of the complex map V `(G, G, G)` at coords `(M, m, 3)` (Nyquist units, (kx, ky, kz))
    -> `(M, m)` complex."""
    out = sample_trilinear(torch.view_as_real(V).permute(3, 0, 1, 2), coords.float())  # a view: no copy of V
    return torch.complex(out[0], out[1])


#: values inserted per step (points x channels): the trilinear insertion's working set stays bounded however
#: many particles one call back-projects
INSERT_VALUES = 3 << 20


def insert_trilinear(acc: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> None:
    """Add `values` `(P, ...)` at fractional voxel indices `idx` `(P, 3)` (x, y, z) trilinearly into `acc`
    `(G, G, G, ...)` (index [z, y, x]; the trailing shapes match: several channels, e.g. several maps, share
    one computation of the corners and weights); weights falling outside the grid are dropped. Works through
    the points `INSERT_VALUES` values at a time."""
    step = max(1, INSERT_VALUES // max(1, values.shape[1:].numel()))
    for s in range(0, idx.shape[0], step):
        _insert_points(acc, idx[s:s + step], values[s:s + step])


def _insert_points(acc: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> None:
    G = acc.shape[0]
    target = acc.view(G ** 3, -1)
    values = values.reshape(values.shape[0], -1)
    j0 = torch.floor(idx)
    f = idx - j0
    j0 = j0.long()
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                ix, iy, iz = j0[:, 0] + dx, j0[:, 1] + dy, j0[:, 2] + dz
                w = ((f[:, 0] if dx else 1 - f[:, 0]) * (f[:, 1] if dy else 1 - f[:, 1])
                     * (f[:, 2] if dz else 1 - f[:, 2]))
                ok = (ix >= 0) & (ix < G) & (iy >= 0) & (iy < G) & (iz >= 0) & (iz < G)
                lin = (iz.clamp(0, G - 1) * G + iy.clamp(0, G - 1)) * G + ix.clamp(0, G - 1)
                w = torch.where(ok, w, torch.zeros((), dtype=w.dtype, device=w.device))
                target.index_add_(0, lin, (values * w[:, None].to(values.dtype)).to(acc.dtype))


def insert(acc: torch.Tensor, coords: torch.Tensor, values: torch.Tensor) -> None:
    """Back-project: add real `values` `(P, ..., 3)` = (Re, Im, weight) at coords `(P, 3)` (Nyquist units)
    trilinearly into `acc` `(G, G, G, ..., 3)` (the trailing shapes match: several maps at once), and their
    Hermitian mates (-k, conjugate) too (`INSERT_VALUES` values and their mates at a time)."""
    G = acc.shape[0]
    sign = torch.tensor([1.0, -1.0, 1.0], device=values.device, dtype=values.dtype)
    step = max(1, INSERT_VALUES // (2 * max(1, values.shape[1:].numel())))
    for s in range(0, coords.shape[0], step):
        c, v = coords[s:s + step], values[s:s + step]
        _insert_points(acc, (torch.cat((c, -c)) + 1.0) * (G - 1) / 2.0, torch.cat((v, v * sign)))


def solve(acc: torch.Tensor, reg: float) -> torch.Tensor:
    """Wiener-like division of the inserted numerator `acc[..., :2]` by its weights `acc[..., 2]` plus `reg`
    times their mean over the filled voxels -> complex map `acc.shape[:-1]`."""
    den = acc[..., 2]
    lam = reg * den[den > 0].mean() if bool((den > 0).any()) else 1.0
    return torch.complex(acc[..., 0], acc[..., 1]) / (den + lam + 1e-6)


def grid_scores(Y: torch.Tensor, C: torch.Tensor, S: torch.Tensor, lat: "Lattice | SubLattice",
                shifts: torch.Tensor) -> torch.Tensor:
    """Log-likelihood up to a constant `(n, S, M)` of images `Y` `(n, m)` (CTF `C` `(n, m)`) under every slice
    `S` `(M, m)` (shared by all images) or `(n, M, m)` (each image's own) at every shift `shifts` `(S, 2)` px:
    `2 Re<Y_s C, S_m> - <C^2, |S_m|^2>` on the points of `lat` (restrict the lattice, e.g. with `SubLattice`, to
    score fewer shells)."""
    Ys = undo_shift(Y, lat.k[:, :2], shifts[None].expand(Y.shape[0], -1, -1))  # (n, S, m)
    YC = Ys * C[:, None, :]
    Sr, Si = (S.real.T, S.imag.T) if S.dim() == 2 else (S.real.transpose(1, 2), S.imag.transpose(1, 2))
    cross = YC.real @ Sr + YC.imag @ Si  # (n, S, M)
    quad = (C * C)[:, None] @ (Sr.square() + Si.square())  # (n, 1, M)
    return cross.mul_(2.0).sub_(quad)


def score_at(Y: torch.Tensor, C: torch.Tensor, k_xy: torch.Tensor, S: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Log-likelihood up to a constant of images `Y` `(n, m)` (CTF `C`, lattice `k_xy` `(m, 2)`) under their own
    slices `S` `(n, c, m)` at shifts `t` `(n, c, 2)` px, or `(n, 1, 2)` (one shift per image for all its slices) ->
    `(n, c)`."""
    YC = undo_shift(Y, k_xy, t) * C[:, None]  # (n, c or 1, m)
    Sr, Si = S.real, S.imag
    quad = ((Sr.square() + Si.square()) @ (C * C)[..., None])[..., 0]
    if YC.shape[1] == 1:  # batched products against the one shifted image, no (n, c, m) temporaries
        return 2.0 * (Sr @ YC.real.transpose(1, 2) + Si @ YC.imag.transpose(1, 2))[..., 0] - quad
    return 2.0 * (YC.real * Sr + YC.imag * Si).sum(-1) - quad
