"""CTF parameters (units in names) and, below, their evaluation on Fourier grids.

Convention (RELION `ctf.h`, checked against relion_project images; see ../shared/CONVENTIONS.md).
With `df` positive for underfocus and `s` in 1/A:

    CTF(s) = scale * exp(-B/4 s^2) * sin(pi*lambda*df(theta)*s^2 - (pi/2)*Cs*lambda^3*s^4
                                         + phase_shift + atan(Q0/sqrt(1-Q0^2)))
    df(theta) = (U+V)/2 + (U-V)/2 * cos(2*(theta - defocus_angle)),   theta = atan2(sy, sx)

This is RELION's `-sin(gamma)` with RELION's internal defocus `deltaf = -df`
(`gamma = pi*lambda*deltaf*s^2 + (pi/2)*Cs*lambda^3*s^4 - phase_shift - atan(...)`).
Cs is converted from mm to Angstrom (x 1e7); lambda is the relativistic wavelength.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import math

import numpy as np
import torch

from cryofire_ext.errors import InputError


@dataclass(frozen=True)
class CTFParams:
    """Per-particle CTF parameters, each an `(n,)` float64 array.

    defocus_u_A, defocus_v_A: defocus in Angstrom, positive = underfocus.
    defocus_angle_rad: astigmatism angle (RELION rlnDefocusAngle / cryoSPARC df_angle_rad), radians.
    voltage_kv, cs_mm, amplitude_contrast (fraction), phase_shift_rad, bfactor_A2, scale.
    """

    defocus_u_A: np.ndarray
    defocus_v_A: np.ndarray
    defocus_angle_rad: np.ndarray
    voltage_kv: np.ndarray
    cs_mm: np.ndarray
    amplitude_contrast: np.ndarray
    phase_shift_rad: np.ndarray
    bfactor_A2: np.ndarray
    scale: np.ndarray

    def __post_init__(self) -> None:
        n = None
        for f in fields(self):
            value = np.atleast_1d(np.asarray(getattr(self, f.name), dtype=np.float64))
            object.__setattr__(self, f.name, value)
            if n is None:
                n = len(value)
        for f in fields(self):
            value = getattr(self, f.name)
            if len(value) != n:
                if len(value) == 1:
                    object.__setattr__(self, f.name, np.full(n, value[0]))
                else:
                    raise InputError(f"CTF field {f.name} has {len(value)} values, expected {n}")

    def __len__(self) -> int:
        return len(self.defocus_u_A)

    def subset(self, index) -> "CTFParams":
        """The parameters of the particles selected by `index` (array of ints or bools)."""
        return CTFParams(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def as_array(self) -> np.ndarray:
        """`(n, 9)` float64 in field order (for tensors and saving)."""
        return np.stack([getattr(self, f.name) for f in fields(self)], axis=1)

    @classmethod
    def from_array(cls, arr: np.ndarray) -> "CTFParams":
        """Inverse of `as_array`."""
        arr = np.asarray(arr, dtype=np.float64)
        return cls(*[arr[:, i] for i in range(arr.shape[1])])

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def constant(cls, n: int, *, defocus_u_A=15000.0, defocus_v_A=None, defocus_angle_rad=0.0,
                 voltage_kv=300.0, cs_mm=2.7, amplitude_contrast=0.1, phase_shift_rad=0.0,
                 bfactor_A2=0.0, scale=1.0) -> "CTFParams":
        """`n` particles with the same parameters (defocus_v_A defaults to defocus_u_A)."""
        dv = defocus_u_A if defocus_v_A is None else defocus_v_A
        return cls(*(np.full(n, float(v)) for v in (defocus_u_A, dv, defocus_angle_rad, voltage_kv, cs_mm,
                                                    amplitude_contrast, phase_shift_rad, bfactor_A2, scale)))


#: Sane ranges of the CTF values (internal units, which are also the STAR/.cs units): anything outside,
#: and anything not finite, is refused by `check_ctf_values`. Angles are only required to be finite.
CTF_RANGES = {
    "defocus_u_A": (-1e6, 1e6, "a defocus in Angstrom (|value| <= 1e6, i.e. 100 um)"),
    "defocus_v_A": (-1e6, 1e6, "a defocus in Angstrom (|value| <= 1e6, i.e. 100 um)"),
    "defocus_angle_rad": (-1e4, 1e4, "a finite astigmatism angle"),
    "voltage_kv": (1.0, 3000.0, "an accelerating voltage from 1 to 3000 kV"),
    "cs_mm": (-100.0, 100.0, "a spherical aberration from -100 to 100 mm"),
    "amplitude_contrast": (0.0, 1.0, "an amplitude contrast from 0 to 1"),
    "phase_shift_rad": (-1e4, 1e4, "a finite phase shift"),
    "bfactor_A2": (-1e4, 1e5, "a B-factor from -1e4 to 1e5 A^2"),
    "scale": (1e-6, 1e3, "a positive CTF scale factor up to 1000"),
}
#: Pixel sizes outside this range (Angstrom) are refused as absurd.
PIXEL_SIZE_RANGE_A = (1e-3, 1e3)


def _out_of_range(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return ~((values >= lo) & (values <= hi))  # NaN is out of range too


def check_ctf_values(ctf: "CTFParams", where) -> None:
    """InputError for the first particle whose CTF value is not finite or is absurd (see `CTF_RANGES`).

    `where(field, i)` -> text naming that value in the file (e.g. "particles.star: row 5 of data_particles
    has rlnDefocusU = 'inf'"), for the CTFParams field name and the 0-based particle index; readers of
    every format share these limits through this one function.
    """
    for name, (lo, hi, expected) in CTF_RANGES.items():
        bad = _out_of_range(getattr(ctf, name), lo, hi)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            more = f" ({int(bad.sum())} particles in all)" if bad.sum() > 1 else ""
            raise InputError(f"{where(name, i)}{more}; expected {expected}")


def check_pixel_size(values, where) -> None:
    """InputError for the first pixel size (Angstrom) that is not finite or outside `PIXEL_SIZE_RANGE_A`.

    `values` one value or `(n,)`; `where(i)` names value `i` in the file (see `check_ctf_values`).
    """
    lo, hi = PIXEL_SIZE_RANGE_A
    bad = _out_of_range(np.atleast_1d(values), lo, hi)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(f"{where(i)}; expected a pixel size from {lo:g} to {hi:g} A")


def electron_wavelength_A(voltage_kv) -> np.ndarray:
    """Relativistic electron wavelength in Angstrom for an accelerating voltage in kV (RELION's constant)."""
    v = np.asarray(voltage_kv, dtype=np.float64) * 1e3
    return 12.2643247 / np.sqrt(v + 0.978466e-6 * v * v)


def electron_wavelength_A_torch(voltage_kv: torch.Tensor) -> torch.Tensor:
    """Relativistic electron wavelength in Angstrom, torch version of `electron_wavelength_A`."""
    v = voltage_kv * 1e3
    return 12.2643247 / torch.sqrt(v + 0.978466e-6 * v * v)


def _as_params(params, like: torch.Tensor) -> torch.Tensor:
    if isinstance(params, CTFParams):
        params = params.as_array()
    p = torch.as_tensor(params, device=like.device)
    if p.ndim == 1:
        p = p[None]
    if p.ndim != 2 or p.shape[1] != 9:
        raise InputError(f"CTF parameters must be (n, 9) in CTFParams.as_array() order, got shape {tuple(p.shape)}")
    return p


def evaluate_ctf(params, freqs_per_A: torch.Tensor) -> torch.Tensor:
    """The CTF of `n` particles at spatial frequencies shared by all of them.

    params: `(n, 9)` tensor (or array, or a `CTFParams`) in `CTFParams.as_array()` order:
        defocus_u_A, defocus_v_A, defocus_angle_rad, voltage_kv, cs_mm, amplitude_contrast,
        phase_shift_rad, bfactor_A2, scale.
    freqs_per_A: `(..., 2)` `(sx, sy)` in 1/A.
    Returns `(n, ...)` in the dtype of `freqs_per_A` (at least float32); RELION's sign
    (see the module docstring: positive at low frequency for amplitude contrast > 0).
    """
    freqs = torch.as_tensor(freqs_per_A)
    if not freqs.is_floating_point():
        freqs = freqs.to(torch.get_default_dtype())
    dtype = freqs.dtype
    p = _as_params(params, freqs).to(torch.float64)
    lead = (-1,) + (1,) * (freqs.ndim - 1)
    du, dv, ang, kv, cs, q0, phase, bfac, scale = (p[:, i].reshape(lead) for i in range(9))
    lam = electron_wavelength_A_torch(kv)
    sx = freqs[..., 0].to(torch.float64)
    sy = freqs[..., 1].to(torch.float64)
    s2 = sx * sx + sy * sy
    theta = torch.atan2(sy, sx)
    df = 0.5 * (du + dv) + 0.5 * (du - dv) * torch.cos(2.0 * (theta - ang))
    w = torch.atan(q0 / torch.sqrt(1.0 - q0 * q0))
    chi = math.pi * lam * df * s2 - 0.5 * math.pi * (cs * 1e7) * lam ** 3 * s2 * s2 + phase + w
    ctf = scale * torch.sin(chi) * torch.exp(-0.25 * bfac * s2)
    return ctf.to(dtype)


def ctf_on_lattice(params, box: int, pixel_size_A: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """The CTF `(n, box, box)` on the centred Fourier lattice of `box`-pixel images.

    Frequencies `s = k / (2 * pixel_size_A)` with `k = fourier.slice_lattice(box)` (units of
    Nyquist), indexed `[y, x]` like `fourier.fft2_centered` output.
    """
    from cryofire_ext.fourier import slice_lattice

    k = slice_lattice(box, device=device, dtype=torch.float64)[..., :2]
    ctf = evaluate_ctf(_as_params(params, k), k / (2.0 * float(pixel_size_A)))
    return ctf.to(dtype)
