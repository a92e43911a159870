"""Centred Fourier transforms, the slice lattice, masks, phase shifts, cropping.

Conventions (checked on RELION-simulated images, see ../shared/CONVENTIONS.md):

- Centred transforms: `F = fftshift(fft2(ifftshift(img)))` over the last two
  (or three) dims, unnormalised forward, `1/N` on the inverse (torch's "backward").
  The zero frequency sits at index `box // 2` for even and odd boxes.
- Lattice `k` in units of Nyquist: `k = (j - box//2) / (box/2)`, so `k` runs over
  `[-1, 1)` for an even box; cycles/pixel = `k / 2`; spatial frequency in 1/A is
  `s = k / (2 * pixel_size_A)`.
- Arrays are `(..., y, x)`; lattice points carry `(kx, ky, 0)`.
- For a real image `F(-k) = conj F(k)`.
- `-k` on the centred lattice is the index `(2*(box//2) - j) mod box`: for an
  even box the row/column at `k = -1` is its own partner (it wraps).

Every function takes torch tensors with any leading batch dims and keeps their
device; dtypes follow the input (complex64 for float32 images).
"""

from __future__ import annotations

import math

import torch

_DIMS2 = (-2, -1)
_DIMS3 = (-3, -2, -1)


def _centered(transform, x, dims: tuple[int, ...]) -> torch.Tensor:
    """`fftshift(transform(ifftshift(x)))` over `dims`: zero frequency (or the origin) at index `n // 2`."""
    x = torch.as_tensor(x)
    return torch.fft.fftshift(transform(torch.fft.ifftshift(x, dim=dims), dim=dims), dim=dims)


def fft2_centered(img: torch.Tensor) -> torch.Tensor:
    """Centred 2D DFT `(..., h, w)` real or complex -> complex `(..., h, w)`: `fftshift(fft2(ifftshift(img)))`."""
    return _centered(torch.fft.fft2, img, _DIMS2)


def ifft2_centered(F: torch.Tensor) -> torch.Tensor:
    """Inverse of `fft2_centered`, complex `(..., h, w)` -> complex `(..., h, w)` (take `.real` for images)."""
    return _centered(torch.fft.ifft2, F, _DIMS2)


def fft3_centered(vol: torch.Tensor) -> torch.Tensor:
    """Centred 3D DFT over the last three dims `(..., d, h, w)` -> complex, zero frequency at `[d//2, h//2, w//2]`."""
    return _centered(torch.fft.fftn, vol, _DIMS3)


def ifft3_centered(F: torch.Tensor) -> torch.Tensor:
    """Inverse of `fft3_centered`, complex `(..., d, h, w)` -> complex (take `.real` for maps)."""
    return _centered(torch.fft.ifftn, F, _DIMS3)


def negate_centered(x: torch.Tensor, ndim: int = 2) -> torch.Tensor:
    """`x(-k)` on the centred lattice over the last `ndim` dims, `(..., h, w)` -> same shape.

    Index `j` maps to `(2*(n//2) - j) mod n`; on an even box the `k = -1` row/column
    maps to itself.
    """
    x = torch.as_tensor(x)
    dims = tuple(range(-ndim, 0))
    x = x.flip(dims)  # j -> n-1-j: the answer for odd n
    even = tuple(d for d in dims if x.shape[d] % 2 == 0)
    if even:  # j -> n-j (mod n) for even n
        x = x.roll((1,) * len(even), even)
    return x


def _axis_k(box: int, device=None, dtype=None) -> torch.Tensor:
    dtype = dtype or torch.get_default_dtype()
    return (torch.arange(box, device=device, dtype=dtype) - box // 2) / (box / 2)


def slice_lattice(box: int, device=None, dtype=None) -> torch.Tensor:
    """The central-slice lattice `(box, box, 3)`, indexed `[y, x]`, rows `(kx, ky, 0)` in units of Nyquist.

    `k = (j - box//2) / (box/2)` per axis (`[-1, 1)` for an even box). For a pose
    `A` (RELION matrix, left-multiplies xyz column vectors) the projection samples the
    3D transform at `A^T k`; with lattice points as row vectors that is
    `slice_lattice(box) @ A` (shape `(..., box, box, 3)` for `A` `(..., 1, 1, 3, 3)`,
    or `(box*box, 3) @ A` for `A` `(n, 3, 3)` -> `(n, box*box, 3)`).
    """
    k = _axis_k(box, device, dtype)
    ky, kx = torch.meshgrid(k, k, indexing="ij")
    return torch.stack((kx, ky, torch.zeros_like(kx)), dim=-1)


def radius_grid_3d(size: int, centre: float, device=None, dtype=torch.float64) -> torch.Tensor:
    """`(size, size, size)` distance in voxels of each voxel of a cubic grid from the point `(centre,) * 3`."""
    c = torch.arange(size, device=device, dtype=dtype) - centre
    return torch.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)


def radius_nyquist_grid(box: int, device=None, dtype=None) -> torch.Tensor:
    """`|k|` on the centred 2D lattice `(box, box)` in units of Nyquist."""
    k = slice_lattice(box, device, dtype)
    return torch.linalg.vector_norm(k[..., :2], dim=-1)


def circular_mask(box: int, radius_nyquist: float = 1.0, device=None) -> torch.Tensor:
    """Bool `(box, box)`: lattice points with `|k| <= radius_nyquist` (units of Nyquist)."""
    r = radius_nyquist_grid(box, device, torch.float64)
    return r <= radius_nyquist + 1e-9


def half_plane_mask(box: int, radius_nyquist: float = 1.0, device=None) -> torch.Tensor:
    """Bool `(box, box)`: one point of every Hermitian pair `{k, -k}` inside the circle.

    Holds `ky > 0`, the `ky = 0` line with `kx >= 0` (the origin included), and,
    on an even box, the points of the wrapped `k = -1` row/column whose flattened
    index is not smaller than their partner's (self-partners included). Together
    with `negate_centered` it covers `circular_mask(box, radius_nyquist)` exactly.
    """
    circle = circular_mask(box, radius_nyquist, device)
    lin = torch.arange(box * box, device=device).reshape(box, box)
    partner = negate_centered(lin)
    return circle & (lin >= partner)


def expand_half(values_on_half: torch.Tensor, box: int, radius_nyquist: float = 1.0) -> torch.Tensor:
    """Fill the full centred lattice from values on `half_plane_mask(box, radius_nyquist)`.

    values_on_half: `(..., m)`, `m = half_plane_mask(...).sum()`, in the mask's row-major order.
    Returns `(..., box, box)`: `F(k)` on the half, `F(-k) = conj F(k)` on the other half,
    zero outside the circle. Complex input gives the transform of a real image; real
    input is filled as an even function (`f(-k) = f(k)`, e.g. a CTF or a weight).

    Hartley values: `H(-k)` is NOT determined by `H(k)` alone (`H(k) = Re F - Im F`,
    `H(-k) = Re F + Im F`). Evaluate the complex `F` on the half, expand it here,
    then take `hartley_from_fourier` of the result.
    """
    values_on_half = torch.as_tensor(values_on_half)
    half = half_plane_mask(box, radius_nyquist, values_on_half.device)
    m = int(half.sum())
    if values_on_half.shape[-1] != m:
        raise ValueError(f"expand_half: expected {m} values on the half lattice of box {box}, "
                         f"got {values_on_half.shape[-1]}")
    lead = values_on_half.shape[:-1]
    out = values_on_half.new_zeros(lead + (box * box,))
    flat_half = half.reshape(-1)
    out[..., flat_half] = values_on_half
    partner = negate_centered(torch.arange(box * box, device=half.device).reshape(box, box)).reshape(-1)
    src = torch.nonzero(flat_half).squeeze(-1)
    vals = values_on_half.conj() if values_on_half.is_complex() else values_on_half
    # write partners first-come; self-partners keep F(k) (real for a real image)
    dst = partner[src]
    not_self = dst != src
    out[..., dst[not_self]] = vals[..., not_self]
    return out.reshape(lead + (box, box))


def phase_shift_centered(F: torch.Tensor, shifts_px: torch.Tensor) -> torch.Tensor:
    """Undo a RELION origin: `F (..., h, w)` complex times `exp(-i*pi*(kx*tx + ky*ty))`.

    shifts_px: `(..., 2)` `(x, y)` in pixels, RELION origin sign (`image(x) =
    centred_projection(x + origin)`), broadcast against `F`'s leading dims. The result
    is the transform of the centred image. Pass `-shifts_px` to apply an origin.
    """
    F = torch.as_tensor(F)
    shifts_px = torch.as_tensor(shifts_px, device=F.device)
    phase = _phase(F.shape[-2], F.shape[-1], shifts_px, F.real.dtype, F.device)
    return F * torch.polar(torch.ones_like(phase), -phase)


def _phase(h: int, w: int, shifts_px: torch.Tensor, dtype, device) -> torch.Tensor:
    """`pi * (kx*tx + ky*ty)`, `(..., h, w)`."""
    kx = _axis_k(w, device, dtype)
    ky = _axis_k(h, device, dtype)
    t = shifts_px.to(dtype)
    tx = t[..., 0, None, None]
    ty = t[..., 1, None, None]
    return math.pi * (kx[None, :] * tx + ky[:, None] * ty)


def fourier_crop(img: torch.Tensor, new_box: int) -> torch.Tensor:
    """Downsample real images `(..., h, w)` (square) to `(..., new_box, new_box)` by cropping the centred transform.

    The pixel size grows by `box / new_box`; values are rescaled so that the image
    mean (and hence real-space density per pixel) is preserved.
    """
    img = torch.as_tensor(img)
    box = img.shape[-1]
    if img.shape[-2] != box:
        raise ValueError(f"fourier_crop needs square images, got {tuple(img.shape[-2:])}")
    if not 0 < new_box <= box:
        raise ValueError(f"fourier_crop: new_box must be in 1..{box}, got {new_box}")
    if new_box == box:
        return img.clone()
    F = fft2_centered(img)
    start = box // 2 - new_box // 2
    Fc = F[..., start:start + new_box, start:start + new_box]
    out = ifft2_centered(Fc).real * (new_box / box) ** 2
    return out.to(img.dtype)
