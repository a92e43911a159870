"""The image-formation model as a generator of datasets with known truth.

`simulate` draws, from one seed: a state per particle (from `mix`), a pose uniform on
SO(3), an origin uniform in `[-shift_px, shift_px]^2`, defocus U uniform in
`defocus_um` with a little astigmatism (V = U - up to `astigmatism_A`, random angle),
then renders each particle with `projection.Projector` (RELION's projector: same
images as `relion_project --ctf`), and adds white Gaussian noise of variance
`signal_variance / snr`, where `signal_variance` is the variance of all noise-free
images over the whole box (every pixel of every image, before noise).

`simulate_states` makes `K` states from one map by a smooth rigid motion of part of it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.ndimage import map_coordinates
from scipy.spatial.transform import Rotation

from cryofire_ext.ctf import CTFParams, ctf_on_lattice
from cryofire_ext.errors import InputError
from cryofire_ext.images import ArrayImages
from cryofire_ext.particles import ParticleStack
from cryofire_ext.poses import random_rotations
from cryofire_ext.recon.projection import Projector

log = logging.getLogger(__name__)

STACK_NAME = "particles.mrcs"


@dataclass
class SimulatedDataset:
    """A simulated dataset and its truth.

    images: `(n, D, D)` float32 noisy images. particles: `ParticleStack` with the true poses
    (`A`, `shifts_A`), classes (`class_id` = state) and CTF; ids `"1".."n"`, image names
    `NNNNNN@particles.mrcs`. A: `(n, 3, 3)`, shifts_A: `(n, 2)`, state: `(n,)` int (0-based),
    maps: `(K, D, D, D)` float32. signal_variance and noise_sigma describe the noise.
    """

    images: np.ndarray
    particles: ParticleStack
    A: np.ndarray
    shifts_A: np.ndarray
    state: np.ndarray
    maps: np.ndarray
    pixel_size_A: float
    snr: float
    signal_variance: float
    noise_sigma: float
    seed: int


def check_maps(maps, where: str = "maps") -> np.ndarray:
    """`(K, D, D, D)` float32 from one map `(D, D, D)` or a stack; InputError for non-cubic, empty or unequal maps."""
    arr = np.asarray(maps, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[0] == 0:
        raise InputError(f"{where}: expected one (D, D, D) map or a (K, D, D, D) stack, got shape {arr.shape}")
    if len(set(arr.shape[1:])) != 1 or arr.shape[1] < 8:
        raise InputError(f"{where}: maps must be cubic and at least 8 voxels wide, got {arr.shape[1:]} "
                         "(z, y, x); pad or resample the map to a cube first")
    if not np.isfinite(arr).all():
        raise InputError(f"{where}: the map holds NaN or infinite values")
    for k, m in enumerate(arr):
        if not np.any(m):
            raise InputError(f"{where}: map {k} is empty (all zeros)")
    return arr


def _check_mix(mix, K: int) -> np.ndarray:
    if mix is None:
        return np.full(K, 1.0 / K)
    p = np.asarray(mix, dtype=np.float64).reshape(-1)
    if len(p) != K:
        raise InputError(f"--mix has {len(p)} fractions for {K} maps/states; give one fraction per state")
    if np.any(p < 0) or abs(p.sum() - 1.0) > 1e-6:
        raise InputError(f"--mix fractions must be >= 0 and sum to 1, got {p.tolist()} (sum {p.sum():g})")
    return p


def simulate(maps, n: int, *, mix=None, snr: float = 0.1, shift_px: float = 4.0,
             defocus_um: tuple[float, float] = (1.0, 2.5), pixel_size_A: float, seed: int,
             voltage_kv: float = 300.0, cs_mm: float = 2.7, amplitude_contrast: float = 0.1,
             astigmatism_A: float = 500.0, bfactor_A2: float = 0.0, device=None,
             batch_size: int = 256) -> SimulatedDataset:
    """Simulate `n` particles of the maps `(K, D, D, D)` (or one `(D, D, D)` map) -> `SimulatedDataset`.

    mix: `(K,)` state fractions summing to 1 (default uniform). snr: signal variance / noise
    variance (> 0; `inf` = noise-free). shift_px: origins uniform in `[-shift_px, shift_px]`
    per axis. defocus_um: (low, high) range for defocus U, micrometres (positive = underfocus).
    """
    maps = check_maps(maps)
    K, D = maps.shape[0], maps.shape[1]
    if int(n) != n or n <= 0:
        raise InputError(f"the number of particles must be a positive integer, got {n}")
    n = int(n)
    p = _check_mix(mix, K)
    if not snr > 0:
        raise InputError(f"--snr must be > 0 (signal variance / noise variance), got {snr}")
    if not pixel_size_A > 0:
        raise InputError(f"the pixel size must be > 0 A, got {pixel_size_A}")
    if shift_px < 0:
        raise InputError(f"--shift-px must be >= 0, got {shift_px}")
    lo, hi = (float(x) for x in defocus_um)
    if not 0 < lo <= hi:
        raise InputError(f"--defocus-um must be a range low-high with 0 < low <= high (micrometres), got {lo}-{hi}")
    if D % 2:
        log.warning("odd box %d: relion_project puts odd-box image centres one pixel off (D+1)/2; "
                    "even boxes are safer for RELION round trips", D)
    rng = np.random.default_rng(seed)
    state = rng.choice(K, size=n, p=p).astype(np.int64)
    A = random_rotations(n, rng)
    shifts_A = rng.uniform(-shift_px, shift_px, size=(n, 2)) * pixel_size_A
    du = rng.uniform(lo, hi, size=n) * 1e4
    dv = du - rng.uniform(0.0, astigmatism_A, size=n)
    ang = rng.uniform(0.0, math.pi, size=n)
    ctf = CTFParams(du, dv, ang, voltage_kv, cs_mm, amplitude_contrast, 0.0, bfactor_A2, 1.0)
    clean = np.zeros((n, D, D), dtype=np.float32)
    for k in range(K):
        sel = np.flatnonzero(state == k)
        if len(sel) == 0:
            continue
        proj = Projector(torch.from_numpy(maps[k]), device=device)
        for start in range(0, len(sel), batch_size):
            idx = sel[start:start + batch_size]
            c = ctf_on_lattice(ctf.subset(idx).as_array(), D, pixel_size_A, device=proj.device)
            t = torch.from_numpy(shifts_A[idx] / pixel_size_A)
            clean[idx] = proj.project(torch.from_numpy(A[idx]), t, c).cpu().numpy()
    signal_var = float(clean.astype(np.float64).var())
    sigma = 0.0 if math.isinf(snr) else math.sqrt(signal_var / snr)
    noise = rng.standard_normal(size=clean.shape).astype(np.float32) * np.float32(sigma)
    images = clean + noise
    names = np.asarray([f"{i + 1:06d}@{STACK_NAME}" for i in range(n)])
    particles = ParticleStack(ids=np.asarray([str(i + 1) for i in range(n)]), pixel_size_A=float(pixel_size_A),
                              box=D, ctf=ctf, images=ArrayImages(images), A=A.copy(), shifts_A=shifts_A.copy(),
                              class_id=state.copy(), image_names=names)
    log.info("simulated %d particles of %d state(s), box %d, %.3g A/px, SNR %.3g (noise sigma %.3g)",
             n, K, D, pixel_size_A, snr, sigma)
    return SimulatedDataset(images=images, particles=particles, A=A, shifts_A=shifts_A, state=state, maps=maps,
                            pixel_size_A=float(pixel_size_A), snr=float(snr), signal_variance=signal_var,
                            noise_sigma=sigma, seed=int(seed) if seed is not None else -1)


def simulate_states(map_, states: int = 2, *, angle_deg: float = 30.0, axis=None, fraction: float = 0.35,
                    edge_px: float = 2.0) -> np.ndarray:
    """`states` conformations `(K, D, D, D)` float32 of one map by a smooth rigid motion of part of it.

    The moving part is the density beyond a plane normal to the map's longest principal axis
    that leaves about `fraction` of the mass on the far side, blended in over `edge_px`
    pixels (a sigmoid). State `s` rotates that part by `s / (K - 1) * angle_deg` about an axis
    through the plane's centre of mass (default: the second principal axis), trilinear
    resampling. State 0 is the input map.
    """
    m = check_maps(map_, "map")
    if m.shape[0] != 1:
        raise InputError(f"simulate_states takes one map, got {m.shape[0]}")
    if states < 1:
        raise InputError(f"--states must be >= 1, got {states}")
    vol = m[0].astype(np.float64)
    D = vol.shape[0]
    grid = np.stack(np.meshgrid(*(np.arange(D, dtype=np.float64),) * 3, indexing="ij"))  # (3 = z, y, x, D, D, D)
    w = np.clip(vol, 0, None)
    w = w / w.sum()
    com = (grid * w).reshape(3, -1).sum(1)
    rel = grid.reshape(3, -1) - com[:, None]
    cov = (rel * w.reshape(1, -1)) @ rel.T
    evals, evecs = np.linalg.eigh(cov)
    normal = evecs[:, -1]
    proj = normal @ rel  # coordinate along the long axis
    order = np.argsort(proj)
    cum = np.cumsum(w.reshape(-1)[order])
    cut = proj[order][np.searchsorted(cum, 1.0 - fraction)]
    soft = 1.0 / (1.0 + np.exp(-(proj - cut) / max(edge_px, 1e-3)))
    moving = (vol.reshape(-1) * soft).reshape(vol.shape)
    fixed = vol - moving
    near = np.abs(proj - cut) < 1.5 * max(edge_px, 1.0)
    pivot = com + (rel[:, near] * w.reshape(-1)[near]).sum(1) / max(w.reshape(-1)[near].sum(), 1e-12) \
        if near.any() else com + cut * normal
    ax = np.asarray(axis, dtype=np.float64)[::-1] if axis is not None else evecs[:, -2]  # axis given (x, y, z)
    ax = ax / np.linalg.norm(ax)
    out = [vol]
    for s in range(1, states):
        theta = math.radians(angle_deg) * s / max(states - 1, 1)
        R = Rotation.from_rotvec(ax * theta).as_matrix()  # acts on (z, y, x) vectors
        # resample: moved(x) = moving(R^T (x - pivot) + pivot)
        src = R.T @ (grid.reshape(3, -1) - pivot[:, None]) + pivot[:, None]
        moved = map_coordinates(moving, src, order=1, mode="constant", cval=0.0).reshape(vol.shape)
        out.append(fixed + moved)
    return np.stack(out).astype(np.float32)
