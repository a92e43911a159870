"""Accuracy metrics used by every benchmark: poses up to a global rotation and hand, shifts, conformations.

Ab initio reconstruction fixes the map only up to a global rotation and, from
projections alone, a mirror (handedness) flip. In RELION's frame (`A` maps map
coordinates to image coordinates, left-multiplying xyz column vectors):

- a map rotated by `R` is seen at poses `A_pred = A_true @ R^T`, so we fit `A_pred = A_true @ G`;
- its mirror image through z (`M = diag(1, 1, -1)`) gives the same images at `M @ A_true @ M`,
  so the flipped hypothesis is `A_pred = M @ A_true @ M @ G`.

`G` is the least-squares rotation (orthogonal Procrustes); the hypothesis with the
smaller median error wins.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from cryofire_ext.errors import InputError

MIRROR = np.diag([1.0, 1.0, -1.0])


@dataclass(frozen=True)
class RotationErrors:
    """Per-particle rotation errors after the best global alignment.

    errors_deg: `(n,)` geodesic angle between `A_pred` and the aligned truth, degrees.
    flipped: True when the mirrored hand fitted better. global_rotation: `G` `(3, 3)`.
    """

    errors_deg: np.ndarray
    flipped: bool
    global_rotation: np.ndarray

    @property
    def median_deg(self) -> float:
        return float(np.median(self.errors_deg))


def _as_rotations(A, name: str) -> np.ndarray:
    A = np.asarray(A, dtype=np.float64)
    if A.ndim != 3 or A.shape[1:] != (3, 3):
        raise InputError(f"{name} must be (n, 3, 3) rotation matrices, got shape {A.shape}")
    return A


def _procrustes(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Rotation `G` minimising `sum ||Y_i - X_i G||_F`."""
    S = np.einsum("nji,njk->ik", X, Y)  # sum X_i^T Y_i
    U, _, Vt = np.linalg.svd(S)
    d = np.sign(np.linalg.det(U @ Vt)) or 1.0
    return U @ np.diag([1.0, 1.0, d]) @ Vt


def geodesic_deg(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Angle of `A_i^T B_i` in degrees, `(n,)`."""
    tr = np.einsum("nij,nij->n", A, B)
    return np.degrees(np.arccos(np.clip((tr - 1.0) / 2.0, -1.0, 1.0)))


def rotation_error_deg(A_pred, A_true) -> RotationErrors:
    """Rotation errors `(n,)` of predicted poses after the best global rotation, trying both hands."""
    P = _as_rotations(A_pred, "A_pred")
    T = _as_rotations(A_true, "A_true")
    if P.shape != T.shape or len(P) == 0:
        raise InputError(f"A_pred {P.shape} and A_true {T.shape} must hold the same n > 0 rotations")
    best = None
    for flipped, X in ((False, T), (True, MIRROR @ T @ MIRROR)):
        G = _procrustes(X, P)
        err = geodesic_deg(X @ G, P)
        if best is None or np.median(err) < np.median(best.errors_deg):
            best = RotationErrors(err, flipped, G)
    return best


def rotation_error_in_frame_deg(A_pred, A_true, frame: RotationErrors) -> np.ndarray:
    """Rotation errors `(n,)` (degrees) of `A_pred` against `A_true` turned into the frame `frame` found for other
    particles of the same run (its hand and global rotation, `rotation_error_deg`): no alignment of its own, so
    new particles are judged in the frame of the run's maps."""
    T = _as_rotations(A_true, "A_true")
    X = MIRROR @ T @ MIRROR if frame.flipped else T
    return geodesic_deg(X @ frame.global_rotation, _as_rotations(A_pred, "A_pred"))


def shift_error_px(shifts_pred_px, shifts_true_px, A_pred=None) -> tuple[np.ndarray, np.ndarray]:
    """Per-particle shift errors `(n,)` in pixels after the best global offset, and that offset.

    With `A_pred` `(n, 3, 3)`: the offset is a 3D translation `r` (pixels, map frame) of the
    predicted map, which moves each RELION origin by `(A_pred r)_xy`; returns `(errors, r (3,))`.
    Without: a constant 2D offset `(2,)`.
    """
    p = np.asarray(shifts_pred_px, dtype=np.float64)
    t = np.asarray(shifts_true_px, dtype=np.float64)
    if p.shape != t.shape or p.ndim != 2 or p.shape[1] != 2 or len(p) == 0:
        raise InputError(f"shifts must both be (n, 2) with n > 0, got {p.shape} and {t.shape}")
    d = p - t
    if A_pred is None:
        off = d.mean(axis=0)
        return np.linalg.norm(d - off, axis=1), off
    A = _as_rotations(A_pred, "A_pred")
    M = A[:, :2, :].reshape(-1, 3)  # rows (A r)_x, (A r)_y
    r, *_ = np.linalg.lstsq(M, d.reshape(-1), rcond=None)
    resid = d - np.einsum("nij,j->ni", A[:, :2, :], r)
    return np.linalg.norm(resid, axis=1), r


def clustering_error(labels, truth) -> float:
    """Fraction of particles mislabelled under the best one-to-one matching of labels to true states."""
    labels = np.asarray(labels).reshape(-1)
    truth = np.asarray(truth).reshape(-1)
    if labels.shape != truth.shape or len(labels) == 0:
        raise InputError(f"labels and truth must be the same length n > 0, got {labels.shape} and {truth.shape}")
    lu, li = np.unique(labels, return_inverse=True)
    tu, ti = np.unique(truth, return_inverse=True)
    conf = np.zeros((len(lu), len(tu)), dtype=np.int64)
    np.add.at(conf, (li, ti), 1)
    r, c = linear_sum_assignment(-conf)
    return float(1.0 - conf[r, c].sum() / len(labels))


def pc1_correlation(z, state) -> float:
    """|Pearson correlation| of the first principal component of `z` `(n, d)` with a continuous `state` `(n,)`."""
    z = np.asarray(z, dtype=np.float64)
    s = np.asarray(state, dtype=np.float64).reshape(-1)
    if z.ndim == 1:
        z = z[:, None]
    if z.shape[0] != len(s) or len(s) < 2:
        raise InputError(f"z {z.shape} and state {s.shape} must have the same n >= 2 rows")
    zc = z - z.mean(0)
    _, _, Vt = np.linalg.svd(zc, full_matrices=False)
    pc1 = zc @ Vt[0]
    if pc1.std() == 0 or s.std() == 0:
        return 0.0
    return float(abs(np.corrcoef(pc1, s)[0, 1]))
