"""3D variability at fixed poses: the directions in which the particles' maps differ from their mean.

A cryoSPARC-3DVA-style analysis on our poses, independent of the neural decoder and of z. Images
are Fourier-cropped so that their Nyquist is `resolution_A` (large-scale motions live there; finer
shells add noise). The mean map `V0` is the Wiener back-projection of every particle; each image's
residual `r_i = Y_i - s_i C_i P_i V0` (observed minus predicted at the particle's least-squares scale
`s_i`, on the slice lattice; without `s_i` a reproducible scale mode leads even for one state) then
drives a subspace iteration for the leading eigenvectors of

    W^-1 sum_i P_i^T C_i r_i r_i^H C_i P_i,   W = sum_i P_i^T C_i^2 P_i (sampling weight of each voxel),

whose noise part is `sigma^2 I` (so the noise does not pick the directions), kept orthogonal to
`V0` (a component along the mean is only a change of scale). Each particle's coordinates are the
least-squares amplitudes of the components in its residual.

On the ten-state phantom (the arm swings through 40 degrees; 4,000 images, 32 px, SNR 1) the first
coordinate correlates about 0.8 with the state at the true poses and 0.7 with 4 deg random pose errors;
at a trained run's poses (7.1 deg median error, 18% beyond 15 deg, errors growing with the state) only
0.12-0.17: pose errors then dominate the residuals. Our z (class codes) gave 0.009 there.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cryofire_ext import fourier
from cryofire_ext.ctf import evaluate_ctf
from cryofire_ext.errors import InputError
from cryofire_ext.model.losses import undo_shift
from cryofire_ext.safe_io import atomic_path
from cryofire_ext.recon.lattice import Lattice, insert, slices, solve

log = logging.getLogger(__name__)

#: extra components iterated beyond those asked for (the usual oversampling of subspace iteration, which
#: separates close eigenvalues slowly; only the leading `n_components` are returned)
OVERSAMPLE = 2


@dataclass
class Variability:
    """mean `(b, b, b)` and components `(c, b, b, b)` real-space maps (index [z, y, x]) at `box` b and
    `pixel_size_A` (the Fourier-cropped grid whose Nyquist is `resolution_A`); each component has unit
    norm in Fourier space, and `mean + a * components[j]` is the map at coordinate `a` along component j.
    coords `(n, c)`: each particle's coordinates (same order as the input). variance `(c,)`: variance
    of the coordinates (components are sorted by it, largest first)."""

    mean: np.ndarray
    components: np.ndarray
    coords: np.ndarray
    variance: np.ndarray
    box: int
    pixel_size_A: float
    resolution_A: float
    iterations: int

    def maps_along(self, j: int, coords: np.ndarray) -> np.ndarray:
        """Maps `(m, b, b, b)` float32 at coordinates `(m,)` along component `j` (0-based)."""
        return (self.mean[None] + np.asarray(coords, np.float32)[:, None, None, None] * self.components[j][None]
                ).astype(np.float32)


def crop_box(box: int, pixel_size_A: float, resolution_A: float) -> int:
    """The even box (at most `box`, at least 8) whose Nyquist is `resolution_A` at this pixel size."""
    b = int(np.ceil(box * 2.0 * pixel_size_A / resolution_A))
    return int(min(box - box % 2, max(8, b + b % 2)))


@dataclass
class Observed:
    """Particles on the slice lattice of a Fourier-cropped box, at their poses: Y `(n, m)` complex64 observed
    transforms with the shifts undone, C `(n, m)` float32 CTF, A `(n, 3, 3)` float32 poses (RELION matrices);
    `lat` the lattice, `pixel_size_A` the cropped grid's. The slice points are computed when asked
    (`coords`): kept, they would take more memory than Y and C together."""

    lat: Lattice
    Y: torch.Tensor
    C: torch.Tensor
    A: torch.Tensor
    box: int
    pixel_size_A: float

    def __len__(self) -> int:
        return self.Y.shape[0]

    def coords(self, rows) -> torch.Tensor:
        """The slice points `(r, m, 3)` `k @ A` (Nyquist units of `box`) of the particles `rows` (indices or a
        slice)."""
        return torch.einsum("mi,nij->nmj", self.lat.k, self.A[rows])


@torch.no_grad()
def observe_at_poses(images, A, shifts_A, ctf, pixel_size_A: float, resolution_A: float, chunk: int = 256,
                     device: torch.device | str = "cpu") -> Observed:
    """Read `images` (an image source: `len`, `.box`, `.read(indices)` -> `(m, D, D)`) once in chunks onto the
    lattice of the box whose Nyquist is `resolution_A` (`crop_box`). A `(n, 3, 3)` RELION matrices; shifts_A
    `(n, 2)` RELION origins in Angstrom (or None); ctf: a `CTFParams` or `(n, 9)` array; pixel_size_A of the
    images. Memory: 12 bytes per lattice point and particle, about `n * b^2 * 5` bytes for the cropped box b."""
    n = len(images)
    if not resolution_A > 2 * pixel_size_A * 0.999:
        raise InputError(f"resolution {resolution_A} A is finer than Nyquist ({2 * pixel_size_A:.3g} A)")
    A = torch.as_tensor(np.asarray(A), dtype=torch.float32).reshape(n, 3, 3).to(device)
    ctf_rows = torch.as_tensor(np.asarray(ctf.as_array() if hasattr(ctf, "as_array") else ctf), dtype=torch.float64)
    box = crop_box(int(images.box), pixel_size_A, resolution_A)
    apix = pixel_size_A * images.box / box
    t = (torch.zeros(n, 2) if shifts_A is None
         else torch.as_tensor(np.asarray(shifts_A), dtype=torch.float32).reshape(n, 2) / apix).to(device)
    lat = Lattice(box, apix, device)
    Y = torch.empty(n, len(lat.r), dtype=torch.complex64, device=device)
    C = torch.empty(n, len(lat.r), dtype=torch.float32, device=device)
    for s in range(0, n, chunk):
        idx = np.arange(s, min(n, s + chunk))
        img = fourier.fourier_crop(torch.as_tensor(images.read(idx)).float(), box).to(device)
        Y[s:s + len(idx)] = undo_shift(lat.observe(img), lat.k[:, :2], t[idx][:, None])[:, 0]
        C[s:s + len(idx)] = evaluate_ctf(ctf_rows[idx].to(device), lat.freqs).float()
    return Observed(lat, Y, C, A, box, float(apix))


@torch.no_grad()
def variability(images, A, shifts_A, ctf, pixel_size_A: float, *, n_components: int = 2,
                resolution_A: float = 20.0, iters: int = 50, tol: float = 1e-6, seed: int = 0,
                chunk: int = 256, reg: float = 0.05) -> Variability:
    """Leading 3D variability components and each particle's coordinates along them.

    images, A, shifts_A, ctf, pixel_size_A as in `observe_at_poses` (memory likewise). Deterministic given
    `seed`."""
    n = len(images)
    if n_components < 1:
        raise InputError(f"variability components must be at least 1, got {n_components}")
    if n < 2 * (n_components + 1):
        raise InputError(f"{n} particles are too few for {n_components} variability component(s)")
    obs = observe_at_poses(images, A, shifts_A, ctf, pixel_size_A, resolution_A, chunk)
    return variability_of(obs, n_components=n_components, resolution_A=resolution_A, iters=iters, tol=tol,
                          seed=seed, reg=reg)


@torch.no_grad()
def variability_of(obs: Observed, *, n_components: int, resolution_A: float, iters: int = 50, tol: float = 1e-6,
                   seed: int = 0, reg: float = 0.05, chunk: int = 1024) -> Variability:
    """`variability` of particles already on the lattice (`observe_at_poses`), worked through `chunk`
    particles at a time."""
    Y, C, box = obs.Y.cpu(), obs.C.cpu(), obs.box

    def coords(s: int) -> torch.Tensor:  # the slice points of particles s .. s + chunk, on the CPU
        return obs.coords(slice(s, s + chunk)).cpu()

    n = len(obs)
    G = box + 1
    acc = torch.zeros(G, G, G, 3)
    for s in range(0, n, chunk):
        YC, Cs = Y[s:s + chunk] * C[s:s + chunk], C[s:s + chunk]
        insert(acc, coords(s).reshape(-1, 3), torch.stack((YC.real, YC.imag, Cs * Cs), -1).reshape(-1, 3))
    V0 = solve(acc, reg)
    W = acc[..., 2]
    lam = reg * W[W > 0].mean()
    R = torch.empty_like(Y)  # residuals (n, m) after each particle's scaled mean
    for s in range(0, n, chunk):
        Ys, pred = Y[s:s + chunk], C[s:s + chunk] * slices(V0, coords(s))
        scale = (Ys.conj() * pred).real.sum(1) / pred.abs().square().sum(1).clamp_min(1e-12)  # per-particle scale
        R[s:s + chunk] = Ys - scale[:, None] * pred
    u0 = V0 / V0.abs().square().sum().sqrt()
    gen = torch.Generator().manual_seed(int(seed))
    block = n_components + OVERSAMPLE  # iterate a larger block: close eigenvalues converge in it, then keep the top
    V = torch.complex(torch.randn(block, G, G, G, generator=gen), torch.randn(block, G, G, G, generator=gen))
    V = _orthonormal(V, u0)
    it = 0
    for it in range(1, iters + 1):
        acc = torch.zeros(G, G, G, block, 3)  # the block's maps in one insertion
        for s in range(0, n, chunk):
            Rs, Cs, ks = R[s:s + chunk], C[s:s + chunk], coords(s)
            vals = []
            for j in range(block):
                P = Cs * slices(V[j], ks)
                a = (Rs.conj() * P).real.sum(1)  # correlation of each residual with the component
                vals.append(Rs * Cs * a[:, None])
            vals = torch.stack(vals, -1)  # (c, m, block)
            insert(acc, ks.reshape(-1, 3),
                   torch.stack((vals.real, vals.imag, torch.zeros_like(vals.real)), -1).reshape(-1, block, 3))
        new = torch.complex(acc[..., 0], acc[..., 1]).permute(3, 0, 1, 2) / (W + lam)
        new = _orthonormal(new, u0)
        change = float(1.0 - torch.linalg.svdvals(_flat(new).conj() @ _flat(V).T).abs().min().clamp(max=1.0))
        V = new
        if change < tol:
            break
    a = torch.empty(n, block)  # each particle's amplitudes: least squares on the block's slices
    for s in range(0, n, chunk):
        P = torch.stack([C[s:s + chunk] * slices(V[j], coords(s)) for j in range(block)], 1)
        gram = torch.einsum("ncm,ndm->ncd", P.conj(), P).real + 1e-6 * torch.eye(block)
        rhs = torch.einsum("ncm,nm->nc", P.conj(), R[s:s + chunk]).real
        a[s:s + chunk] = torch.linalg.solve(gram, rhs)
    var = a.var(0)
    order = torch.argsort(var, descending=True)[:n_components]
    V, a, var = V[order], a[:, order], var[order]
    comps = torch.stack([fourier.ifft3_centered(V[j, :box, :box, :box]).real for j in range(n_components)])
    sign = torch.sign(comps.flatten(1).gather(1, comps.flatten(1).abs().argmax(1, keepdim=True)))[:, 0]
    comps, a = comps * sign[:, None, None, None], a * sign[None]  # deterministic sign: largest voxel positive
    mean = fourier.ifft3_centered(V0[:box, :box, :box]).real
    log.info("variability: %d particles at %d px (%.2f A/px, %.0f A), %d component(s) in %d iterations",
             n, box, obs.pixel_size_A, resolution_A, n_components, it)
    return Variability(mean.numpy().astype(np.float32), comps.numpy().astype(np.float32), a.numpy().astype(np.float64),
                       var.numpy().astype(np.float64), box, float(obs.pixel_size_A), float(resolution_A), it)


def _flat(V: torch.Tensor) -> torch.Tensor:
    return V.reshape(V.shape[0], -1)


def _orthonormal(V: torch.Tensor, u0: torch.Tensor) -> torch.Tensor:
    """Gram-Schmidt of the maps `V` `(c, G, G, G)` against the unit mean `u0` and each other."""
    out = []
    for v in V:
        for u in [u0, *out]:
            v = v - (u.conj() * v).sum() * u
        out.append(v / v.abs().square().sum().sqrt().clamp_min(1e-30))
    return torch.stack(out)


VARIABILITY_FORMAT, VARIABILITY_VERSION = "cryofire-variability", 1


def save_variability(v: Variability, ids: np.ndarray, path, force: bool = False):
    """Write `variability.npz`: a JSON header (format, version, box, pixel size, resolution), ids `(n,)`,
    coords `(n, c)`, variance `(c,)` (atomic; refuses to overwrite unless `force`)."""
    header = {"format": VARIABILITY_FORMAT, "version": VARIABILITY_VERSION, "box": v.box,
              "pixel_size_A": v.pixel_size_A, "resolution_A": v.resolution_A, "iterations": v.iterations,
              "components": int(v.coords.shape[1]),
              "meaning": "coords[i, j]: amplitude of component j in particle i (maps: mean + a * component)"}
    with atomic_path(path, force=force) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, header=np.array(json.dumps(header)), ids=np.asarray(ids).astype("U"), coords=v.coords,
                     variance=v.variance)
    return Path(path)
