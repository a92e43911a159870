"""Rotations and shifts in the package's one internal frame.

`A` is RELION's rotation matrix, `(..., 3, 3)`: it left-multiplies xyz column
vectors of map (volume) coordinates and gives image coordinates; the projection
of a map at pose `A` samples the map's 3D Fourier transform at `A^T (kx, ky, 0)`.
Shifts are `(..., 2)` in Angstrom, `(x, y)` order, with RELION's origin sign
(`image(x) = centred_projection(x + origin)`).

Conversions to software conventions live here as data-free functions:
RELION ZYZ Euler angles in degrees, cryoSPARC axis-angle vectors in radians
(`A = Rodrigues(pose)^T`, so `pose = -rotvec(A)`), and the 6D representation
(first two columns of `A`) with Gram-Schmidt.
"""

from __future__ import annotations

import numpy as np
import torch
from eulerangles import euler2matrix, matrix2euler
from scipy.spatial.transform import Rotation


def relion_euler_to_matrix(rot_deg, tilt_deg, psi_deg) -> np.ndarray:
    """RELION `rlnAngleRot/Tilt/Psi` (degrees, ZYZ) -> `A` `(n, 3, 3)` (left-multiplies xyz columns).

    `A = (Rz(rot) Ry(tilt) Rz(psi))^T` (RELION `Euler_angles2matrix`).
    """
    angles = np.stack(np.broadcast_arrays(*(np.asarray(a, dtype=np.float64) for a in (rot_deg, tilt_deg, psi_deg))), axis=-1)
    angles = angles.reshape(-1, 3)
    at = euler2matrix(angles, axes="zyz", intrinsic=True, right_handed_rotation=True)
    return np.ascontiguousarray(np.swapaxes(np.asarray(at).reshape(-1, 3, 3), -1, -2))


def matrix_to_relion_euler(A: np.ndarray) -> np.ndarray:
    """`A` `(n, 3, 3)` -> RELION (rot, tilt, psi) in degrees, `(n, 3)`.

    Another triplet than the one that made `A` may come back; both give the same matrix.
    """
    # entries of a rotation lie in [-1, 1]; round-off just outside (e.g. A[2, 2] = 1 + 2e-16 after a
    # Rodrigues round trip) would make eulerangles' arccos return NaN
    A = np.clip(np.asarray(A, dtype=np.float64).reshape(-1, 3, 3), -1.0, 1.0)
    eul = matrix2euler(np.swapaxes(A, -1, -2), axes="zyz", intrinsic=True, right_handed_rotation=True)
    return np.asarray(eul, dtype=np.float64).reshape(-1, 3)


def cryosparc_pose_to_matrix(pose_rad: np.ndarray) -> np.ndarray:
    """cryoSPARC `alignments3D/pose` `(n, 3)` (axis-angle, radians) -> `A` `(n, 3, 3)`.

    `A = Rodrigues(pose)^T` = Rodrigues(-pose).
    """
    pose = np.asarray(pose_rad, dtype=np.float64).reshape(-1, 3)
    return Rotation.from_rotvec(-pose).as_matrix()


def matrix_to_cryosparc_pose(A: np.ndarray) -> np.ndarray:
    """`A` `(n, 3, 3)` -> cryoSPARC `alignments3D/pose` `(n, 3)`, radians (`-rotvec(A)`)."""
    A = np.asarray(A, dtype=np.float64).reshape(-1, 3, 3)
    return -Rotation.from_matrix(A).as_rotvec()


def sixd_to_matrix(d6: torch.Tensor) -> torch.Tensor:
    """6D rotation representation `(..., 6)` -> rotation `(..., 3, 3)` by Gram-Schmidt.

    The 6 values are the first two columns of the matrix (Zhou et al. 2019).
    """
    a1, a2 = d6[..., 0:3], d6[..., 3:6]
    b1 = torch.nn.functional.normalize(a1, dim=-1)
    b2 = torch.nn.functional.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1)
    b3 = torch.cross(b1, b2, dim=-1)
    return torch.stack((b1, b2, b3), dim=-1)


def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` rotations uniform on SO(3), `(n, 3, 3)`, from the given generator."""
    q = rng.standard_normal((n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return Rotation.from_quat(q).as_matrix()
def axis_angle_matrix(v: torch.Tensor) -> torch.Tensor:
    """Rotation matrices `(..., 3, 3)` of rotation vectors `v` `(..., 3)` (axis times angle in radians; Rodrigues)."""
    theta = torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(1e-12)
    k = v / theta
    K = torch.zeros(*v.shape[:-1], 3, 3, dtype=v.dtype, device=v.device)
    K[..., 0, 1], K[..., 0, 2], K[..., 1, 2] = -k[..., 2], k[..., 1], -k[..., 0]
    K = K - K.transpose(-1, -2)
    th = theta[..., None]
    return torch.eye(3, dtype=v.dtype, device=v.device) + torch.sin(th) * K + (1 - torch.cos(th)) * K @ K
