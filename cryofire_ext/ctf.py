"""CTF parameters (units in names) and, below, their evaluation on Fourier grids.

Convention (RELION, checked on relion_project images; see ../shared/CONVENTIONS.md):
`CTF = -sin(gamma) * scale * exp(-B/4 s^2)`,
`gamma = pi*lambda*df(theta)*s^2 - (pi/2)*Cs*lambda^3*s^4 ... ` with defocus
positive for underfocus, `df(theta) = (U+V)/2 + (U-V)/2 cos(2 (theta - angle))`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

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


def electron_wavelength_A(voltage_kv) -> np.ndarray:
    """Relativistic electron wavelength in Angstrom for an accelerating voltage in kV."""
    v = np.asarray(voltage_kv, dtype=np.float64) * 1e3
    return 12.2642598 / np.sqrt(v + 0.978466e-6 * v * v)
