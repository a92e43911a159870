"""Reconstruction from images with known poses and CTF (Wiener-filtered direct Fourier inversion), and FSC.

Each image's centred transform, with its origin undone (`fourier.phase_shift_centered`),
is multiplied by its CTF and added into a 2x-padded 3D Fourier grid at `A^T (kx, ky, 0)`
(one half of each Hermitian pair, the grid mirrored at the end) with trilinear weights (`lattice.insert_trilinear`, the transpose of `projection.Projector`'s sampling); the CTF^2
weights go into a second grid. The estimate is `sum(c F) / (sum(c^2) + wiener)`,
then the inverse transform, the central `D^3` crop, and the gridding correction.
The map's amplitude follows `projection.project` (an image is the sum of voxels along z).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from cryofire_ext import fourier
from cryofire_ext.ctf import ctf_on_lattice
from cryofire_ext.errors import InputError
from cryofire_ext.recon.lattice import insert_trilinear
from cryofire_ext.recon.projection import gridding_correction

log = logging.getLogger(__name__)


def _as_tensor(x, dtype=torch.float64, device=None) -> torch.Tensor:
    if torch.is_tensor(x):
        return x.to(device=device, dtype=dtype)
    return torch.as_tensor(np.asarray(x), dtype=dtype, device=device)


def reconstruct(images, A, shifts_A=None, ctf_params=None, pixel_size_A: float = 1.0, *,
                wiener: float = 0.1, pad: int = 2, batch_size: int = 256, device=None) -> torch.Tensor:
    """A map `(D, D, D)` float32 (z, y, x) from `n` images at known poses.

    images: `(n, D, D)` real, or an image source (`len`, `.box`, `.read(indices)`) read in batches.
    A: `(n, 3, 3)` RELION matrices (left-multiply xyz column vectors).
    shifts_A: `(n, 2)` RELION origins in Angstrom (x, y), or None. ctf_params: `(n, 9)`
    (`CTFParams.as_array()` order, or a `CTFParams`), or None for no CTF.
    wiener: constant added to the summed CTF^2 weight of each Fourier voxel (about the
    noise-to-signal power ratio of one image; larger = smoother; 0 = plain ratio).
    """
    lazy = hasattr(images, "read") and not torch.is_tensor(images)
    if lazy:  # an image source: read batch by batch (memory holds one batch and the grids)
        n, D = len(images), int(images.box)
        imgs = torch.empty(0, D, D, dtype=torch.float64, device=device)
    else:
        imgs = _as_tensor(images, device=device)
        n = imgs.shape[0] if imgs.ndim == 3 else 0
    if imgs.ndim != 3 or imgs.shape[1] != imgs.shape[2] or n == 0:
        raise InputError(f"reconstruct needs images (n, D, D) with n > 0, got shape {(n, *imgs.shape[1:])}")
    D = imgs.shape[1]
    A = _as_tensor(A, device=imgs.device).reshape(-1, 3, 3)
    if A.shape[0] != n:
        raise InputError(f"{A.shape[0]} poses for {n} images")
    if wiener < 0:
        raise InputError(f"wiener must be >= 0, got {wiener}")
    P = pad * D
    acc = torch.zeros((P, P, P, 3), dtype=torch.float64, device=imgs.device)  # Re sum(cF), Im sum(cF), sum(c^2)
    # insert one point of each Hermitian pair {k, -k} and mirror the grid at the end (half the work);
    # self-partner points (the origin, the wrapped k = -1 points) count half so the mirror restores them once
    k = fourier.slice_lattice(D, device=imgs.device, dtype=torch.float64).reshape(-1, 3)
    inside = fourier.half_plane_mask(D, 1.0, device=imgs.device).reshape(-1)
    lin = torch.arange(D * D, device=imgs.device)
    self_partner = (fourier.negate_centered(lin.reshape(D, D)).reshape(-1) == lin)[inside]
    share = torch.where(self_partner, 0.5, 1.0).to(torch.float64)
    k = k[inside]
    for start in range(0, n, batch_size):
        sl = slice(start, min(start + batch_size, n))
        batch = _as_tensor(images.read(np.arange(sl.start, sl.stop)), device=imgs.device) if lazy else imgs[sl]
        F = fourier.fft2_centered(batch)
        if shifts_A is not None:
            t = _as_tensor(shifts_A, device=imgs.device).reshape(n, 2)[sl] / float(pixel_size_A)
            F = fourier.phase_shift_centered(F, t)
        if ctf_params is not None:
            c = ctf_on_lattice(np.asarray(_ctf_rows(ctf_params))[start:sl.stop], D, pixel_size_A,
                               device=imgs.device, dtype=torch.float64)
        else:
            c = torch.ones_like(F.real)
        F = (F * c).reshape(F.shape[0], -1)[:, inside] * share
        w = (c * c).reshape(c.shape[0], -1)[:, inside] * share
        q = (k @ A[sl]) * (D / 2 * pad) + P // 2  # (b, m, 3) fractional indices (x, y, z)
        insert_trilinear(acc, q.reshape(-1, 3), torch.stack((F.real, F.imag, w), -1).reshape(-1, 3).float())
    acc = acc.permute(3, 0, 1, 2)
    mirror = fourier.negate_centered(acc, ndim=3)  # F(-k) = conj F(k)
    re, im, wt = acc[0] + mirror[0], acc[1] - mirror[1], acc[2] + mirror[2]
    del acc, mirror
    V = torch.complex(re, im) / (wt + wiener).clamp_min(1e-12)
    vol = fourier.ifft3_centered(V).real
    s = P // 2 - D // 2
    vol = vol[s:s + D, s:s + D, s:s + D]
    vol = vol / gridding_correction(D, pad, vol.device)
    return vol.to(torch.float32)


def _ctf_rows(ctf_params):
    if hasattr(ctf_params, "as_array"):
        return ctf_params.as_array()
    return np.asarray(ctf_params.cpu() if torch.is_tensor(ctf_params) else ctf_params)


def shell_correlation(Fa: torch.Tensor, Fb: torch.Tensor, shell: torch.Tensor, nshell: int) -> torch.Tensor:
    """Correlation `(nshell,)` of two complex Fourier grids over each shell: `shell` (the grids' shape) holds
    each voxel's shell index; voxels with an index `>= nshell` are left out. Real dtype of the grids."""
    shell = shell.reshape(-1)
    keep = shell < nshell
    idx = shell[keep]

    def per_shell(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(nshell, dtype=x.dtype, device=x.device).index_add_(0, idx, x.reshape(-1)[keep])

    num = per_shell((Fa * Fb.conj()).real)
    den = torch.sqrt(per_shell(Fa.abs().square()) * per_shell(Fb.abs().square()))
    return num / den.clamp_min(torch.finfo(den.dtype).tiny)


def fsc(vol1, vol2, pixel_size_A: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fourier shell correlation of two `(D, D, D)` maps.

    Returns `(freqs, values)`, each `(D//2 + 1,)`: shell `r` holds voxels whose radius in
    Fourier pixels rounds to `r`. `freqs` is in units of Nyquist (`r / (D/2)`) when
    `pixel_size_A` is None, else in 1/A (`r / (D * pixel_size_A)`).
    """
    a = _as_tensor(vol1)
    b = _as_tensor(vol2)
    if a.shape != b.shape or a.ndim != 3 or len(set(a.shape)) != 1:
        raise InputError(f"fsc needs two cubic maps of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    D = a.shape[0]
    Fa, Fb = fourier.fft3_centered(a), fourier.fft3_centered(b)
    nshell = D // 2 + 1
    values = shell_correlation(Fa, Fb, torch.round(fourier.radius_grid_3d(D, D // 2)).long(), nshell).numpy()
    rr = np.arange(nshell, dtype=np.float64)
    freqs = rr / (D / 2) if pixel_size_A is None else rr / (D * float(pixel_size_A))
    return freqs, values
