"""One frame for all class maps: each class map registered, on the part it shares with a reference
class, by a rigid rotation; the poses of its particles are turned into that frame and the maps rebuilt.

Classes split from one consensus map inherit its frame, the one in which the states' whole masses
overlap best. When a domain moves between states, that frame differs from state to state, so the
class maps do not superpose on their common core and the particles' poses disagree between classes
by that rotation. On the demo phantom (an arm swings 40 deg, ~1/4 of the mass) the two class maps were
5.5 deg apart: median rotation error 2.7 deg within each state but 4.2 deg over all particles, and a
particle refined against the other class's map started that far from its pose there.

The registration is trimmed least squares in real space at `REGISTER_BOX` px at most: fit a rotation
`R` maximising the correlation of `v_ref(x)` and `v_k(R x)` over the voxels with density, then leave
out the `TRIM` fraction of those voxels that the fit explains worst (the moving part) and fit again.
On the phantom's true maps it finds the core's frame (0.08 deg from the truth) where the untrimmed fit
is 5.0 deg off. Rotations: `v_k(R x)` in real space is `V_k(R q)` in Fourier space, so a particle's
pose `A` in class k's old frame becomes `A R` (RELION matrices, `recon.lattice`'s conventions).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as Fn

from cryofire_ext import fourier
from cryofire_ext.metrics import geodesic_deg
from cryofire_ext.poses import axis_angle_matrix

log = logging.getLogger(__name__)

#: maps are registered Fourier-cropped to this box at most (the frame is set by the low resolution)
REGISTER_BOX = 32
#: voxels with density: above this fraction of the map's maximum
DENSITY_FRACTION = 0.1
#: fraction of the density voxels left out of each refit, those with the largest residual
TRIM = 0.3
#: refits after the first (untrimmed) fit
TRIM_ROUNDS = 3
#: hill-climbing rotation steps (radians), each tried along random axes until none improves
STEPS_RAD = (0.2, 0.12, 0.08, 0.05, 0.03, 0.02, 0.012, 0.007, 0.004)
#: at most this many moves per step
MAX_MOVES = 20
#: classes with fewer particles than this are left in their frame (their maps are too noisy)
MIN_PARTICLES = 20


def real_map(V: torch.Tensor, max_box: int = REGISTER_BOX) -> torch.Tensor:
    """Complex Fourier grid `(G, G, G)`, `G = box + 1`, -> real-space map `(b, b, b)` (z, y, x),
    Fourier-cropped to `b = min(box, max_box)` (even)."""
    box = V.shape[-1] - 1
    b = min(box, max_box - max_box % 2)
    c = box // 2
    F = V[c - b // 2:c + b // 2, c - b // 2:c + b // 2, c - b // 2:c + b // 2]
    return fourier.ifft3_centered(F).real.float()


def rotate_map(v: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """`v(R x)` `(b, b, b)` of a real-space map `v` `(b, b, b)` (z, y, x), rotated about voxel `b // 2`
    (trilinear, zero outside)."""
    b = v.shape[-1]
    ax = torch.arange(b, dtype=torch.float32, device=v.device) - b // 2
    z, y, x = torch.meshgrid(ax, ax, ax, indexing="ij")
    p = torch.stack((x, y, z), -1).reshape(-1, 3) @ R.float().T + b // 2  # index space (x, y, z)
    grid = (2.0 * p / (b - 1) - 1.0).reshape(1, 1, 1, -1, 3)
    out = Fn.grid_sample(v[None, None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.reshape(b, b, b)


def register(v_ref: torch.Tensor, v: torch.Tensor, *, trim: float = TRIM, trim_rounds: int = TRIM_ROUNDS,
             n_dir: int = 24, seed: int = 5) -> torch.Tensor:
    """Rotation `R` `(3, 3)` that best superposes `v(R x)` on `v_ref(x)` on their common part
    (real-space maps `(b, b, b)`, same grid). Deterministic given `seed`."""
    gen = torch.Generator().manual_seed(seed)
    R = torch.eye(3)
    weight = (v_ref > DENSITY_FRACTION * v_ref.max()).float()
    for r in range(trim_rounds + 1):
        if r > 0:
            vr = rotate_map(v, R)
            scale = (weight * v_ref * vr).sum() / (weight * vr * vr).sum().clamp_min(1e-12)
            resid = (v_ref - scale * vr).abs()
            dens = (v_ref > DENSITY_FRACTION * v_ref.max()) | (vr > DENSITY_FRACTION * vr.max())
            weight = (dens & (resid <= torch.quantile(resid[dens], 1.0 - trim))).float()

        def corr(cands: torch.Tensor) -> torch.Tensor:
            out = []
            for Rc in cands:
                vr = rotate_map(v, Rc)
                out.append((weight * v_ref * vr).sum() / (weight * vr * vr).sum().sqrt().clamp_min(1e-12))
            return torch.stack(out)

        best = corr(R[None])[0]
        for step in STEPS_RAD:
            for _ in range(MAX_MOVES):
                axes = Fn.normalize(torch.randn(n_dir, 3, generator=gen), dim=-1)
                cands = axis_angle_matrix(torch.cat((axes, -axes)) * step) @ R
                score = corr(cands)
                j = int(score.argmax())
                if not bool(score[j] > best):
                    break
                R, best = cands[j], score[j]
    return R


#: class frames less than this far from the reference's are left alone: the registration's own error at
#: 32 px is about 0.5-0.8 deg (the same map turned by 7 deg; maps of 400 particles at their true poses)
MIN_ANGLE_DEG = 1.5


@torch.no_grad()
def class_frames(V: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Rotation `R_k` `(K, 3, 3)` that turns class k's frame into the frame of the most populated class:
    `V_k(R_k q)` superposes on that class's map. V `(K, G, G, G)` complex Fourier class maps; labels
    `(n,)` in `[0, K)`. Identity for the reference, for classes with fewer than `MIN_PARTICLES`
    and for rotations under `MIN_ANGLE_DEG`."""
    K = V.shape[0]
    rotations = torch.eye(3).repeat(K, 1, 1)
    if K < 2:
        return rotations
    pops = torch.bincount(labels.cpu(), minlength=K)
    ref = int(pops.argmax())
    v_ref = real_map(V[ref].cpu())
    angles = []
    for k in range(K):
        R = torch.eye(3)
        if k != ref and int(pops[k]) >= MIN_PARTICLES:
            R = register(v_ref, real_map(V[k].cpu()))
        angle = float(geodesic_deg(np.eye(3)[None], R.double().numpy()[None])[0])
        angles.append(angle)
        if angle >= MIN_ANGLE_DEG:
            rotations[k] = R
    log.info("class frames: class map(s) %s deg from class %d's", ", ".join(f"{a:.1f}" for a in angles), ref + 1)
    return rotations


def turn_poses(A: torch.Tensor, labels: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Poses `A` `(n, 3, 3)` of class `labels` `(n,)` in the frame that `rotations` `(K, 3, 3)` (from
    `class_frames`) lead to: `A_i R_k` (a new tensor)."""
    return A @ rotations.to(A.device, A.dtype)[labels]


def turned(rotations: torch.Tensor) -> bool:
    """Whether any class frame is turned (then the class maps must be rebuilt from the turned poses)."""
    return not bool(torch.equal(rotations, torch.eye(3).repeat(len(rotations), 1, 1)))


def one_frame(V: torch.Tensor, A: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Poses `A` `(n, 3, 3)` of class `labels` `(n,)` turned so that the class maps `V` `(K, D, D, D)` (on the
    images' lattice) superpose on their common part (`class_frames`), and whether any turned (then the class
    maps must be rebuilt from the turned poses)."""
    rotations = class_frames(V, labels)
    return (turn_poses(A, labels, rotations), True) if turned(rotations) else (A, False)
