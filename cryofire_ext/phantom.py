"""A bundled procedural phantom: a chiral, asymmetric "molecule" of Gaussian blobs in two or more states.

Made in code from fixed numbers (no data files, no third-party maps), so the demo
and the tests have a deterministic ground truth. The molecule (about 110 A across)
is a right-handed helical core of blobs of different sizes, a small off-axis
knob that breaks every symmetry, and an "arm" domain of three blobs that swings
about a hinge: state `s` rotates the arm by `s / (states - 1) * swing_deg` about
the hinge axis. Its mirror image is a different map (the helix is chiral), so a
reconstruction's hand can be told apart.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.spatial.transform import Rotation

from cryofire_ext.errors import InputError

#: physical box edge in Angstrom; the pixel size is `BOX_EXTENT_A / box`
BOX_EXTENT_A = 192.0


def _core_blobs(jitter: np.ndarray) -> list[tuple[np.ndarray, float, float]]:
    """(centre_A (3,), sigma_A, amplitude) of the core: a right-handed helix, blobs of growing size."""
    blobs = []
    n = 7
    for i in range(n):
        t = i / (n - 1)
        ang = 2.0 * math.pi * 1.25 * t  # 1.25 turns, counter-clockwise while rising in z: right-handed
        c = np.array([22.0 * math.cos(ang), 22.0 * math.sin(ang), -36.0 + 60.0 * t]) + jitter[i]
        blobs.append((c, 8.0 + 3.0 * t, 1.0 + 0.4 * math.sin(3.0 * i)))
    blobs.append((np.array([-8.0, 14.0, -4.0]) + jitter[n], 12.0, 0.8))  # a fat centre piece, off axis
    blobs.append((np.array([30.0, -24.0, 26.0]) + jitter[n + 1], 6.5, 1.3))  # the symmetry-breaking knob
    return blobs


_HINGE_A = np.array([0.0, -22.0, 20.0])
_HINGE_AXIS = np.array([1.0, 0.3, 0.2]) / np.linalg.norm([1.0, 0.3, 0.2])


def _arm_blobs(angle_rad: float) -> list[tuple[np.ndarray, float, float]]:
    """The arm (3 blobs leaving the hinge) rotated by `angle_rad` about the hinge axis."""
    R = Rotation.from_rotvec(_HINGE_AXIS * angle_rad).as_matrix()
    rest = [(np.array([0.0, -34.0, 30.0]), 8.0, 1.1),
            (np.array([-6.0, -46.0, 40.0]), 7.0, 1.0),
            (np.array([-14.0, -54.0, 52.0]), 6.5, 0.9)]
    return [(_HINGE_A + R @ (c - _HINGE_A), s, a) for c, s, a in rest]


def _render(blobs, box: int, pixel_size_A: float) -> np.ndarray:
    """Sum of isotropic Gaussians on a `(box, box, box)` grid (z, y, x), centre at `box // 2`."""
    ax = (np.arange(box) - box // 2) * pixel_size_A
    z, y, x = np.meshgrid(ax, ax, ax, indexing="ij")
    vol = np.zeros((box, box, box))
    for c, sigma, amp in blobs:
        r2 = (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2
        vol += amp * np.exp(-r2 / (2.0 * sigma * sigma))
    return vol


def phantom_maps(box: int = 32, states: int = 2, seed: int = 0, swing_deg: float = 40.0,
                 pixel_size_A: float | None = None) -> tuple[np.ndarray, float]:
    """The phantom in `states` conformations -> (`(states, box, box, box)` float32 maps (z, y, x), pixel_size_A).

    box: pixels per edge (even boxes are best for RELION round trips). seed: a small
    deterministic jitter of the core blobs (seed 0 = the reference molecule).
    swing_deg: arm rotation between the first and the last state.
    pixel_size_A: default `BOX_EXTENT_A / box` (6 A at 32 px), so the molecule fills the same
    fraction of the box at every size.
    """
    if box < 16:
        raise InputError(f"phantom box must be at least 16 pixels, got {box}")
    if states < 1:
        raise InputError(f"phantom needs at least 1 state, got {states}")
    apix = float(pixel_size_A) if pixel_size_A is not None else BOX_EXTENT_A / box
    rng = np.random.default_rng(seed)
    jitter = np.zeros((9, 3)) if seed == 0 else rng.normal(0.0, 2.0, size=(9, 3))
    core = _core_blobs(jitter)
    maps = []
    for s in range(states):
        frac = 0.0 if states == 1 else s / (states - 1)
        maps.append(_render(core + _arm_blobs(math.radians(swing_deg) * frac), box, apix))
    return np.stack(maps).astype(np.float32), apix
