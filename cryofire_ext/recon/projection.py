"""Projection of voxel maps at poses `A` by the Fourier slice theorem, as RELION's `relion_project` does it.

RELION's projector (`src/projector.cpp`, read for facts): divide the map by the
trilinear kernel's transform `sinc^2(r / (D * pad))` (gridding correction, `r` in
voxels from the centre), zero-pad it `pad`-fold (2 by default), take its 3D
transform, and sample it with trilinear interpolation at `pad * A^T (kx, ky, 0)`
(Fourier pixels) for every 2D frequency inside the Nyquist circle (`|k| <= 1`).
The origin is applied as a phase ramp, the CTF multiplies the slice, and the
inverse 2D transform gives the image. `Projector` keeps the padded transform so
that many batches of poses reuse it.

Amplitude: an image is the line integral of the map along z in voxel units (the
sum over voxels), like a plain real-space sum; see `project`.
"""

from __future__ import annotations

import numpy as np
import torch

from cryofire_ext import fourier
from cryofire_ext.ctf import ctf_on_lattice
from cryofire_ext.errors import InputError
from cryofire_ext.recon.lattice import sample_trilinear


def _check_volume(volume: torch.Tensor) -> torch.Tensor:
    volume = torch.as_tensor(volume)
    if volume.ndim != 3 or len(set(volume.shape)) != 1:
        raise InputError(f"a map must be a cubic (D, D, D) array, got shape {tuple(volume.shape)}")
    if volume.shape[0] < 2:
        raise InputError(f"a map must be at least 2 voxels wide, got shape {tuple(volume.shape)}")
    return volume


def gridding_correction(box: int, pad: int, device=None, dtype=torch.float64) -> torch.Tensor:
    """`(box, box, box)` divisor `sinc^2(r / (box * pad))` for trilinear interpolation, `r` in voxels from `box//2`."""
    r = fourier.radius_grid_3d(box, box // 2, device, dtype) / (box * pad)
    return torch.sinc(r) ** 2  # torch.sinc(x) = sin(pi x)/(pi x)


class Projector:
    """The padded 3D transform of one map, ready to be sliced at many poses.

    volume: `(D, D, D)` map (z, y, x). pad: zero-padding factor (RELION: 2).
    gridding: divide by the trilinear kernel's transform first (RELION does).
    """

    def __init__(self, volume: torch.Tensor, pad: int = 2, gridding: bool = True,
                 device=None, dtype=torch.float32):
        volume = _check_volume(volume).to(device=device, dtype=torch.float64)
        self.box = int(volume.shape[0])
        self.pad = int(pad)
        self.dtype = dtype
        D, P = self.box, self.pad * self.box
        if gridding:
            volume = volume / gridding_correction(D, self.pad, volume.device)
        padded = volume.new_zeros((P, P, P))
        s = P // 2 - D // 2
        padded[s:s + D, s:s + D, s:s + D] = volume
        F = fourier.fft3_centered(padded)
        # (2, P, P, P) real/imag channels for `lattice.sample_trilinear`
        self._grid_data = torch.stack((F.real, F.imag)).to(dtype)
        self.device = volume.device

    def slice(self, A: torch.Tensor) -> torch.Tensor:
        """Central slices `(n, D, D)` complex, centred lattice, at poses `A` `(n, 3, 3)`.

        `A` left-multiplies xyz column vectors; the slice samples the 3D transform at
        `A^T (kx, ky, 0)`. Zero outside the Nyquist circle.
        """
        A = torch.as_tensor(A, device=self.device).to(self.dtype).reshape(-1, 3, 3)
        D, P = self.box, self.pad * self.box
        k = fourier.slice_lattice(D, device=self.device, dtype=self.dtype).reshape(-1, 3)
        mask = fourier.circular_mask(D, 1.0, device=self.device).reshape(-1)
        # Fourier pixels of the padded grid: k (Nyquist) * D/2 * pad
        q = (k @ A) * (D / 2 * self.pad)  # (n, D*D, 3) as (x, y, z)
        idx = q + P // 2
        grid = 2.0 * idx / (P - 1) - 1.0  # align_corners=True normalisation
        vals = sample_trilinear(self._grid_data, grid)  # (2, n, D*D)
        F = torch.complex(vals[0], vals[1]) * mask
        return F.reshape(-1, D, D)

    def project(self, A: torch.Tensor, shifts_px: torch.Tensor | None = None,
                ctf: torch.Tensor | None = None, batch_size: int = 256) -> torch.Tensor:
        """Images `(n, D, D)` real at poses `A` `(n, 3, 3)`.

        shifts_px: `(n, 2)` RELION origins in pixels, (x, y) (`image(x) = projection(x + origin)`).
        ctf: `(n, D, D)` CTF on the centred lattice (`ctf.ctf_on_lattice`), or None.
        """
        A = torch.as_tensor(A).reshape(-1, 3, 3)
        n = A.shape[0]
        outs = []
        for start in range(0, n, batch_size):
            sl = slice(start, start + batch_size)
            F = self.slice(A[sl])
            if ctf is not None:
                F = F * torch.as_tensor(ctf[sl], device=self.device).to(self.dtype)
            if shifts_px is not None:
                t = torch.as_tensor(shifts_px[sl], device=self.device).to(self.dtype).reshape(-1, 2)
                F = fourier.phase_shift_centered(F, -t)
            outs.append(fourier.ifft2_centered(F).real)
        if not outs:
            return torch.zeros((0, self.box, self.box), dtype=self.dtype, device=self.device)
        return torch.cat(outs)


def project(volume, A, shifts_A=None, ctf=None, pixel_size_A: float = 1.0, *, pad: int = 2,
            gridding: bool = True, device=None, dtype=torch.float32, batch_size: int = 256) -> torch.Tensor:
    """Project a map at poses `A`, like `relion_project [--ctf]`, -> `(n, D, D)` images.

    volume: `(D, D, D)` tensor or array (z, y, x). A: `(n, 3, 3)` RELION matrices
    (left-multiply xyz column vectors). shifts_A: `(n, 2)` RELION origins in Angstrom
    (x, y), or None. ctf: `(n, 9)` CTF parameters (`CTFParams.as_array()` order, or a
    `CTFParams`), or None. pixel_size_A: Angstrom per voxel (for shifts and CTF).
    """
    proj = Projector(volume, pad=pad, gridding=gridding, device=device, dtype=dtype)
    A = torch.as_tensor(np.asarray(A) if not torch.is_tensor(A) else A).reshape(-1, 3, 3)
    n = A.shape[0]
    shifts_px = None
    if shifts_A is not None:
        shifts_px = torch.as_tensor(np.asarray(shifts_A) if not torch.is_tensor(shifts_A) else shifts_A)
        shifts_px = shifts_px.reshape(n, 2).to(torch.float64) / float(pixel_size_A)
    ctf_img = None
    if ctf is not None:
        ctf_img = ctf_on_lattice(ctf, proj.box, pixel_size_A, device=proj.device, dtype=dtype)
        if ctf_img.shape[0] != n:
            raise InputError(f"{ctf_img.shape[0]} CTF rows for {n} poses")
    return proj.project(A, shifts_px, ctf_img, batch_size=batch_size)


def correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image Pearson correlation of `(n, h, w)` stacks -> `(n,)`."""
    a = torch.as_tensor(a, dtype=torch.float64).flatten(1)
    b = torch.as_tensor(b, dtype=torch.float64).flatten(1)
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / torch.sqrt((a * a).sum(1) * (b * b).sum(1)).clamp_min(1e-300)


__all__ = ["Projector", "project", "gridding_correction", "correlation"]
