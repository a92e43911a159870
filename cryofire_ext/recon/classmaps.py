"""Class maps at the training box: back-projection per class (and per half-set), FSC-weighted maps and the
FSC resolution, on the `recon.lattice` engine.

Maps are complex Fourier grids `(K, G, G, G)`, `G = pad * box + 1` (`pad` 1 unless stated: `class_maps_fsc`
oversamples by `RECONSTRUCT_PAD`), shifts in pixels of the box (RELION origin sign).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as Fn

from cryofire_ext.ctf import evaluate_ctf
from cryofire_ext.fourier import radius_grid_3d
from cryofire_ext.model.losses import undo_shift
from cryofire_ext.recon.lattice import Lattice, insert, solve
from cryofire_ext.recon.reconstruct import shell_correlation


@torch.no_grad()
def class_maps(read, n: int, A: torch.Tensor, shifts_px: torch.Tensor, labels: torch.Tensor, n_classes: int,
               box: int, pixel_size_A: float, chunk: int = 256, reg: float = 0.05, pad: int = 1) -> torch.Tensor:
    """Wiener-like back-projection of each class -> `(K, G, G, G)` complex Fourier maps, `G = pad * box + 1`,
    from the `n` particles `read(idx)` -> (images `(m, box, box)` normalised, ctf `(m, 9)`), read in chunks, at
    poses `A` `(n, 3, 3)`, shifts `(n, 2)` px and class `labels` `(n,)`."""
    acc = back_project(read, n, A, shifts_px, labels, n_classes, box, pixel_size_A, chunk, pad=pad)
    return torch.stack([solve(acc[k], reg) for k in range(n_classes)])


#: Tikhonov term of the half-set maps (`class_maps_fsc`), a fraction of the mean weight as in `class_maps`;
#: lower than its 0.05, since the FSC filter does the damping of the noisy shells
HALF_SET_REG = 0.01


#: `class_maps_fsc` reconstructs on a Fourier grid this many times finer than the images' (the images
#: zero-padded in real space, as RELION's padding factor 2), so that slices interpolated from it match the
#: data: trilinear interpolation on the images' own grid is the larger error at small boxes. Demo (2,000
#: images, 32 px, SNR 1), maps from the true poses and classes, local refinement from the true poses: 1.72
#: deg from the truth unpadded, 1.07 deg padded; three refinement rounds from the model's poses: 2.70 deg
#: and clustering error 0.0155 unpadded, 2.19 deg and 0.007 padded, at about the same time at 32 px (at 64 px
#: the back-projection costs about 5x: 10.3 s vs 2.0 s per 1,024 images on one thread).
RECONSTRUCT_PAD = 2


@torch.no_grad()
def class_maps_fsc(read, n: int, A: torch.Tensor, shifts_px: torch.Tensor, labels: torch.Tensor, n_classes: int,
                   box: int, pixel_size_A: float, chunk: int = 256, max_radius: float = 1.0, half_maps: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """`class_maps` filtered by each class's gold-standard FSC -> (maps `(K, G, G, G)`, `G = RECONSTRUCT_PAD *
    box + 1`, FSC `(K, box//2 + 1)`); only lattice points up to `max_radius` (Nyquist units) are back-projected
    (beyond it the maps are 0 and their FSC 0). `on_box_lattice` gives the maps on the images' own grid.

    Each class is back-projected as two halves (even and odd particle index); each shell of the map of
    all its particles is multiplied by `2 FSC / (1 + FSC)`, the FSC of the halves clipped to [0, 1]: the
    full map's SNR / (1 + SNR) in that shell (the Wiener factor), so shells that are mostly noise no longer
    steer the pose refinement and the classification. Shell `r` holds the voxels whose radius in Fourier
    pixels of the box rounds to `r` (beyond `box // 2`: the last shell's factor). On the demo's raw
    predictions (2,000 images, 32 px, SNR 1) three refinement rounds with these maps gave 2.70 deg /
    clustering 0.0135 (plain `class_maps`: 2.83 deg / 0.0165), before padding (`RECONSTRUCT_PAD`).

    With `half_maps`, the maps are each class's two half maps `(K, 2, G, G, G)` (half 0: even particle index),
    each shell multiplied by the FSC itself (a half map's SNR / (1 + SNR))."""
    halves = 2 * labels + half_set(n, labels.device)
    acc = back_project(read, n, A, shifts_px, halves, 2 * n_classes, box, pixel_size_A, chunk,
                        pad=RECONSTRUCT_PAD, max_radius=max_radius)
    shell = shell_index(box, acc.device, RECONSTRUCT_PAD)
    nshell = box // 2 + 1
    maps, curves = [], []
    for k in range(n_classes):
        V1, V2 = solve(acc[2 * k], HALF_SET_REG), solve(acc[2 * k + 1], HALF_SET_REG)
        f = shell_correlation(V1, V2, shell, nshell).clamp(0.0, 1.0)
        if half_maps:
            maps.append(torch.stack((V1, V2)) * f[shell])
        else:
            maps.append(solve(acc[2 * k] + acc[2 * k + 1], HALF_SET_REG) * (2.0 * f / (1.0 + f))[shell])
        curves.append(f)
    return torch.stack(maps), torch.stack(curves)


def half_set(n: int, device) -> torch.Tensor:
    """Half-set `(n,)` int64 of each particle for the gold-standard halves (0: even index, 1: odd)."""
    return torch.as_tensor(np.arange(n) % 2, device=device)


def fsc_resolution_A(fsc: torch.Tensor, box: int, pixel_size_A: float, threshold: float = 0.143) -> float:
    """Resolution (A) of the first shell of `fsc` `(box//2 + 1,)` below `threshold` (of the last shell
    above it; Nyquist when none falls below)."""
    r = _last_above(fsc, threshold)
    return float(box * pixel_size_A / max(r, 1))


def fsc_radius(fsc: torch.Tensor, box: int, threshold: float) -> float:
    """Lattice radius (Nyquist units of `box`, at most 1) up to the first shell of `fsc` `(box//2 + 1,)` below
    `threshold`, that shell included: the shells a map filtered by that FSC holds."""
    return min(1.0, (_last_above(fsc, threshold) + 1.5) / (box / 2))


#: `signal_radius`: the shells up to the first where every class's half-set FSC is below this hold the maps'
#: signal; the maps are FSC-weighted (`2 FSC / (1 + FSC)`), so the shells beyond are about 0 and scoring images
#: there costs time and adds only noise
SIGNAL_FSC = 0.05


def signal_radius(fsc: torch.Tensor, box: int) -> float:
    """Lattice radius (Nyquist units of `box`, at most 1) of the shells FSC-weighted maps with FSCs `fsc`
    `(K, box // 2 + 1)` hold: `fsc_radius` at `SIGNAL_FSC` of the best class in each shell."""
    return fsc_radius(fsc.reshape(-1, fsc.shape[-1]).max(0).values, box, SIGNAL_FSC)


def _last_above(fsc: torch.Tensor, threshold: float) -> int:
    """The shell before the first (after the origin's) below `threshold`; the last shell when none is."""
    below = torch.nonzero(fsc[1:] < threshold).squeeze(-1)
    return int(below[0]) if len(below) else len(fsc) - 1  # fsc[1 + r] is the first below: shell r the last above


def on_box_lattice(V: torch.Tensor, box: int) -> torch.Tensor:
    """Maps `(..., G, G, G)` on a grid `pad` times finer than `box`'s (`G = pad * box + 1`) -> their samples
    `(..., box+1, box+1, box+1)` at the lattice points of `box` (every `pad`-th voxel; the centres coincide)."""
    pad = (V.shape[-1] - 1) // box
    return V[..., ::pad, ::pad, ::pad]


def shell_index(box: int, device, pad: int = 1) -> torch.Tensor:
    """Shell index `(G, G, G)` in Fourier pixels of `box` of each voxel of a `(pad * box + 1)^3` Fourier grid
    centred at `pad * box / 2`, at most `box // 2`."""
    G = pad * box + 1
    r = radius_grid_3d(G, pad * box / 2, device, torch.float32) / pad
    return torch.round(r).long().clamp_max(box // 2)


def back_project(read, n: int, A: torch.Tensor, shifts_px: torch.Tensor, groups: torch.Tensor, n_groups: int,
                  box: int, pixel_size_A: float, chunk: int, pad: int = 1, max_radius: float = 1.0) -> torch.Tensor:
    """Splatted (Re, Im, CTF^2) sums `(n_groups, G, G, G, 3)`, `G = pad * box + 1`, of each group's CTF-weighted
    images, zero-padded to `pad * box` pixels first; lattice points beyond `max_radius` (Nyquist units) left out."""
    device = A.device
    lat = Lattice(pad * box, pixel_size_A, device)
    keep = lat.r <= max_radius + 2.0 / (pad * box)  # a voxel's margin so that slices up to max_radius see no edge
    kp, freqs = lat.k[keep], lat.freqs[keep]
    G = pad * box + 1
    acc = torch.zeros(n_groups, G, G, G, 3, dtype=torch.float32, device=device)
    edge = (pad * box - box) // 2
    for s in range(0, n, chunk):
        idx = np.arange(s, min(n, s + chunk))
        img, ctf = read(idx)
        img = Fn.pad(img.to(device).float(), (edge, edge, edge, edge))
        Y = lat.observe(img)[:, keep] * pad  # the padded transform, scaled as the unpadded one (same pixel sum)
        C = evaluate_ctf(ctf.double().to(device), freqs).float()
        YC = undo_shift(Y, kp[:, :2], shifts_px[idx][:, None].float())[:, 0] * C
        coords = torch.einsum("mi,nij->nmj", kp, A[idx].float())
        vals = torch.stack((YC.real, YC.imag, C * C), -1)
        for k in range(n_groups):
            sel = torch.nonzero(groups[idx] == k).squeeze(-1)
            if len(sel):
                insert(acc[k], coords[sel].reshape(-1, 3), vals[sel].reshape(-1, 3))
    return acc


def reconstruct_classes(images: torch.Tensor, ctf_params: torch.Tensor, A: torch.Tensor, shifts_px: torch.Tensor,
                        labels: torch.Tensor, n_classes: int, pixel_size_A: float, reg: float = 0.05,
                        pad: int = 1) -> torch.Tensor:
    """`class_maps` of images `(n, B, B)` held in memory -> `(K, G, G, G)` complex Fourier maps, `G = pad * B + 1`."""
    return class_maps(lambda idx: (images[idx], ctf_params[idx]), images.shape[0], A, shifts_px, labels, n_classes,
                      images.shape[-1], pixel_size_A, reg=reg, pad=pad)
