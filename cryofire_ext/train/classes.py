"""Classes at the training box: back-projection per class, hard-EM classification at fixed poses,
the lift of the coarse warm map to the training box (`refine_warm_map`) and the z targets of classes.

Units and grids as in `warmstart`: maps are complex Fourier grids `(K, G, G, G)`, `G = pad * box + 1`
(`pad` 1 unless stated: `class_maps_fsc` oversamples by `RECONSTRUCT_PAD`), shifts in pixels of the box
(RELION origin sign).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as Fn

from cryofire_ext.ctf import evaluate_ctf
from cryofire_ext.fourier import radius_grid_3d
from cryofire_ext.model.losses import undo_shift
from cryofire_ext.reconstruct import shell_correlation
from cryofire_ext.train.warmstart import WarmMap, _Lattice, _score_at, _slices, _solve, _splat, _Sub, search, shift_grid
from cryofire_ext.train.frames import one_frame

log = logging.getLogger(__name__)


def class_scores(V: torch.Tensor, Y: torch.Tensor, C: torch.Tensor, lat: "_Lattice", A: torch.Tensor,
                 t: torch.Tensor) -> torch.Tensor:
    """Log-likelihood `(n, K)` of each image under each class map `V` `(K, G, G, G)` at its pose `A`
    and shift `t`."""
    coords = torch.einsum("mi,nij->nmj", lat.k, A.float())[:, None]
    return torch.cat([_score_at(Y, C, lat.k[:, :2], _slices(Vk.to(A.device), coords), t[:, None].float())
                      for Vk in V], dim=1)


@torch.no_grad()
def class_maps(read, n: int, A: torch.Tensor, shifts_px: torch.Tensor, labels: torch.Tensor, n_classes: int,
               box: int, pixel_size_A: float, chunk: int = 256, reg: float = 0.05, pad: int = 1) -> torch.Tensor:
    """Wiener-like back-projection of each class -> `(K, G, G, G)` complex Fourier maps, `G = pad * box + 1`,
    from the `n` particles `read(idx)` -> (images `(m, box, box)` normalised, ctf `(m, 9)`), read in chunks, at
    poses `A` `(n, 3, 3)`, shifts `(n, 2)` px and class `labels` `(n,)`."""
    acc = _back_project(read, n, A, shifts_px, labels, n_classes, box, pixel_size_A, chunk, pad=pad)
    return torch.stack([_solve(acc[k], reg) for k in range(n_classes)])


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
    acc = _back_project(read, n, A, shifts_px, halves, 2 * n_classes, box, pixel_size_A, chunk,
                        pad=RECONSTRUCT_PAD, max_radius=max_radius)
    shell = _shells(box, acc.device, RECONSTRUCT_PAD)
    nshell = box // 2 + 1
    maps, curves = [], []
    for k in range(n_classes):
        V1, V2 = _solve(acc[2 * k], HALF_SET_REG), _solve(acc[2 * k + 1], HALF_SET_REG)
        f = shell_correlation(V1, V2, shell, nshell).clamp(0.0, 1.0)
        if half_maps:
            maps.append(torch.stack((V1, V2)) * f[shell])
        else:
            maps.append(_solve(acc[2 * k] + acc[2 * k + 1], HALF_SET_REG) * (2.0 * f / (1.0 + f))[shell])
        curves.append(f)
    return torch.stack(maps), torch.stack(curves)


def half_set(n: int, device) -> torch.Tensor:
    """Half-set `(n,)` int64 of each particle for the gold-standard halves (0: even index, 1: odd)."""
    return torch.as_tensor(np.arange(n) % 2, device=device)


def fsc_resolution_A(fsc: torch.Tensor, box: int, pixel_size_A: float, threshold: float = 0.143) -> float:
    """Resolution (A) of the first shell of `fsc` `(box//2 + 1,)` below `threshold` (of the last shell
    above it; Nyquist when none falls below)."""
    below = torch.nonzero(fsc[1:] < threshold).squeeze(-1)
    r = int(below[0]) if len(below) else len(fsc) - 1  # fsc[1 + r] is the first below: shell r the last above
    return float(box * pixel_size_A / max(r, 1))


def on_box_lattice(V: torch.Tensor, box: int) -> torch.Tensor:
    """Maps `(..., G, G, G)` on a grid `pad` times finer than `box`'s (`G = pad * box + 1`) -> their samples
    `(..., box+1, box+1, box+1)` at the lattice points of `box` (every `pad`-th voxel; the centres coincide)."""
    pad = (V.shape[-1] - 1) // box
    return V[..., ::pad, ::pad, ::pad]


def _shells(box: int, device, pad: int = 1) -> torch.Tensor:
    """Shell index `(G, G, G)` in Fourier pixels of `box` of each voxel of a `(pad * box + 1)^3` Fourier grid
    centred at `pad * box / 2`, at most `box // 2`."""
    G = pad * box + 1
    r = radius_grid_3d(G, pad * box / 2, device, torch.float32) / pad
    return torch.round(r).long().clamp_max(box // 2)


def _back_project(read, n: int, A: torch.Tensor, shifts_px: torch.Tensor, groups: torch.Tensor, n_groups: int,
                  box: int, pixel_size_A: float, chunk: int, pad: int = 1, max_radius: float = 1.0) -> torch.Tensor:
    """Splatted (Re, Im, CTF^2) sums `(n_groups, G, G, G, 3)`, `G = pad * box + 1`, of each group's CTF-weighted
    images, zero-padded to `pad * box` pixels first; lattice points beyond `max_radius` (Nyquist units) left out."""
    device = A.device
    lat = _Lattice(pad * box, pixel_size_A, device)
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
                _splat(acc[k], coords[sel].reshape(-1, 3), vals[sel].reshape(-1, 3))
    return acc


def reconstruct_classes(images: torch.Tensor, ctf_params: torch.Tensor, A: torch.Tensor, shifts_px: torch.Tensor,
                        labels: torch.Tensor, n_classes: int, pixel_size_A: float, reg: float = 0.05,
                        pad: int = 1) -> torch.Tensor:
    """`class_maps` of images `(n, B, B)` held in memory -> `(K, G, G, G)` complex Fourier maps, `G = pad * B + 1`."""
    return class_maps(lambda idx: (images[idx], ctf_params[idx]), images.shape[0], A, shifts_px, labels, n_classes,
                      images.shape[-1], pixel_size_A, reg=reg, pad=pad)


#: classification compares the class maps up to this resolution (the differences between states are
#: large-scale; finer shells mostly add noise to the decision: on the demo's 800 warm images a random
#: split stayed random when scored to Nyquist at 12 A and converged to the states when scored to 20 A)
CLASSIFY_RESOLUTION_A = 20.0


@torch.no_grad()
def classify(images: torch.Tensor, ctf_params: torch.Tensor, A: torch.Tensor, shifts_px: torch.Tensor,
             n_classes: int, pixel_size_A: float, seed: int, iters: int = 30, starts: int = 4) -> torch.Tensor:
    """Hard-EM 3D classification at fixed poses -> labels `(n,)` int64 (deterministic given `seed`).

    From `starts` random splits, each iterated to convergence; the split whose class maps explain
    the images best (summed log-likelihood) wins. Scores use lattice points up to
    `CLASSIFY_RESOLUTION_A`."""
    n, box = images.shape[0], images.shape[-1]
    read = lambda idx: (images[idx], ctf_params[idx])  # noqa: E731
    gen = torch.Generator().manual_seed(int(seed) * 7919 + 17)
    best, best_ll = None, -float("inf")
    for _ in range(starts):
        labels = torch.randint(0, n_classes, (n,), generator=gen).to(images.device)
        labels, ll = _hard_em(read, n, A, shifts_px, labels, n_classes, box, pixel_size_A, iters, n, logging.DEBUG,
                              fsc_weighted=False, shares=True)
        if ll > best_ll:
            best, best_ll = labels, ll
    return best


#: at most this many hard-EM iterations of `classify_at_poses`, which stops once fewer than
#: `CLASSIFY_TOL` of the particles change class
CLASSIFY_ITERS = 20
CLASSIFY_TOL = 1e-3


def low_resolution(lat: "_Lattice", pixel_size_A: float) -> torch.Tensor:
    """Mask `(m,)` of the lattice points of `lat` up to `CLASSIFY_RESOLUTION_A`, where classes are compared."""
    return lat.r <= min(1.0, 2.0 * pixel_size_A / CLASSIFY_RESOLUTION_A) + 1e-6


@torch.no_grad()
def classify_at_poses(read, n: int, A: torch.Tensor, shifts_px: torch.Tensor, labels: torch.Tensor, n_classes: int,
                      box: int, pixel_size_A: float, *, max_iters: int = CLASSIFY_ITERS, chunk: int = 256
                      ) -> torch.Tensor:
    """Hard-EM classification of `n` streamed particles at fixed poses, from `labels` `(n,)`: back-project
    each class (`class_maps`), give each particle the class whose map explains it best up to
    `CLASSIFY_RESOLUTION_A`, until fewer than `CLASSIFY_TOL` of the particles change (at most
    `max_iters` times). `read`, A, shifts_px as in `class_maps`. Returns the labels `(n,)` (a new tensor).
    The class maps are FSC-filtered half maps (`class_maps_fsc`): each particle is scored against the other
    half-set's, and goes to the class that explains it best, whatever the classes' shares (`_hard_em`).

    On the 20,000-particle target set (64 px, SNR 0.1, 90/10), at poses 2.5 deg off for the 90% state and
    8 deg for the 10% one (two consensus refinement rounds), a random split reached clustering error 0.056
    (1,631 particles in the small class), the same as the true labels did (0.057); weighing each decision by
    the classes' shares (classification EM) drained the small class to 839 particles from the random split
    (0.095) and was shrinking it from the true labels too.
    """
    return _hard_em(read, n, A, shifts_px, labels, n_classes, box, pixel_size_A, max_iters, chunk,
                    logging.INFO, fsc_weighted=True, shares=False)[0]


def _hard_em(read, n: int, A: torch.Tensor, shifts_px: torch.Tensor, labels: torch.Tensor, n_classes: int, box: int,
             pixel_size_A: float, max_iters: int, chunk: int, log_level: int, *, fsc_weighted: bool, shares: bool
             ) -> tuple[torch.Tensor, float]:
    """The loop of `classify_at_poses` -> (labels `(n,)` a new tensor, summed log-likelihood of the last
    assignment under the maps it was decided with: `class_maps_fsc` when `fsc_weighted`, else `class_maps`).

    Each particle goes to the class with the highest score; with `shares` (classification EM) to the class
    maximising `score / sigma2 + log(fraction)`, with `sigma2` the mean squared residual per lattice point at
    the current classes (the scores are log-likelihoods times `sigma2`) and `fraction` each class's share of
    the particles. With `fsc_weighted` each particle is scored against the half maps of the other half-set
    (`class_maps_fsc(half_maps=True)`), so that its own contribution to a map does not hold it in its class
    (which held most in a small class; a random split of one state then ends in one class without `shares`).
    On the 20,000-particle target set (90/10), at a run's final poses and from its classes (14,156 / 5,844,
    clustering error 0.20): scored against maps holding the particle, without shares, it stayed at 0.20;
    with shares 0.17; other-half maps with shares 0.013. At poorer poses the shares drain a small state
    (`classify_at_poses`), so `classify_at_poses` scores against the other half without them."""
    device = A.device
    lat = _Lattice(box, pixel_size_A, device)
    low = low_resolution(lat, pixel_size_A)
    low_radius = float(lat.r[low].max())  # the FSC-weighted maps are back-projected only as far as they are scored
    sub = _Sub(lat, low)
    labels = labels.clone()
    ar = torch.arange(n, device=device)
    half = half_set(n, device)
    for it in range(max_iters):
        if fsc_weighted:  # each particle scored against the half maps it is not in (no pull of its own)
            V = class_maps_fsc(read, n, A, shifts_px, labels, n_classes, box, pixel_size_A, chunk,
                               max_radius=low_radius, half_maps=True)[0]
            match = match_half_classes(V)
            if match is not None:  # class k of the odd half is the even half's class match[k]: relabel, redo
                odd = half == 1
                labels[odd] = torch.as_tensor(match, device=device)[labels[odd]]
                log.log(log_level, "classification at fixed poses: the odd half's classes renumbered %s to match "
                        "the even half's", match.tolist())
                V = class_maps_fsc(read, n, A, shifts_px, labels, n_classes, box, pixel_size_A, chunk,
                                   max_radius=low_radius, half_maps=True)[0]
        else:
            V = class_maps(read, n, A, shifts_px, labels, n_classes, box, pixel_size_A, chunk)
        scores = torch.empty(n, n_classes, dtype=torch.float64, device=device)
        power = 0.0
        for s in range(0, n, chunk):
            idx = np.arange(s, min(n, s + chunk))
            img, ctf = read(idx)
            Y = lat.observe(img.to(device))[:, low]
            C = evaluate_ctf(ctf.double().to(device), lat.freqs).float()[:, low]
            if fsc_weighted:
                for h in (0, 1):
                    m = half[idx] == h
                    scores[idx[m.cpu().numpy()]] = class_scores(V[:, 1 - h], Y[m], C[m], sub, A[idx][m],
                                                                shifts_px[idx][m]).double()
            else:
                scores[idx] = class_scores(V, Y, C, sub, A[idx], shifts_px[idx]).double()
            power += float(Y.abs().square().sum())
        sigma2 = max((power - float(scores[ar, labels].sum())) / (n * int(low.sum())), 1e-12)
        fraction = torch.bincount(labels, minlength=n_classes).double().clamp_min(1.0) / n
        new = (scores / sigma2 + fraction.log()).argmax(1) if shares else scores.argmax(1)
        changed = int((new != labels).sum())
        labels = new
        ll = float(scores[ar, labels].sum())
        log.log(log_level, "classification at fixed poses, iteration %d: %d particle(s) changed class, %s per class",
                it + 1, changed, torch.bincount(labels, minlength=n_classes).tolist())
        if changed < CLASSIFY_TOL * n:
            break
    return labels, ll


def match_half_classes(V: torch.Tensor) -> np.ndarray | None:
    """Half maps `(K, 2, ...)` -> `(K,)` the even half's class for each odd-half class (the assignment that
    maximises the summed correlation of matched maps), or None when class k already matches class k.

    Each particle is scored against the other half's maps, so the classes must mean the same in both halves:
    labels that are consistent within each half only (class 0 one state in the even half, the other state in
    the odd half) otherwise swap every particle at every iteration."""
    from scipy.optimize import linear_sum_assignment

    K = V.shape[0]
    if K < 2:
        return None
    even, odd = V[:, 0].reshape(K, -1), V[:, 1].reshape(K, -1)
    even = even / torch.linalg.vector_norm(even, dim=1, keepdim=True).clamp_min(1e-30)
    odd = odd / torch.linalg.vector_norm(odd, dim=1, keepdim=True).clamp_min(1e-30)
    corr = (odd @ even.conj().T).real.double().cpu().numpy()  # corr[j, k]: odd class j vs even class k
    rows, cols = linear_sum_assignment(-corr)
    match = cols[np.argsort(rows)]
    if np.array_equal(match, np.arange(K)) or corr[np.arange(K), match].sum() <= np.trace(corr) + 1e-9:
        return None
    return match


#: search rounds over (class, rotation, shift) after the classification
CLASS_ROUNDS = 2


@torch.no_grad()
def refine_warm_map(warm: WarmMap, images: torch.Tensor, ctf_params: torch.Tensor, pixel_size_A: float, *,
                    rounds: int, n_classes: int, max_shift_px: float, seed: int, callback=None) -> WarmMap:
    """Projection-matching rounds that lift the coarse warm map to the training box, then classes.

    images `(n, B, B)` normalised at the training box; pixel_size_A of these images; max_shift_px
    the search range in pixels of B. Each round back-projects the images at their current poses
    and searches again (global grid + local refinement of rotation and shift). With
    `n_classes` > 1, a hard-EM classification at fixed poses from random splits follows, then
    `CLASS_ROUNDS` rounds search over (class, rotation, shift), and the class maps are turned into one
    frame (`frames.class_frames`). Deterministic given `seed`.
    Returns the maps (one per class) at the training box, on a `RECONSTRUCT_PAD` times finer Fourier grid, for
    `search`. `callback()` (if given) is called between rounds (it may raise to stop, e.g. on an abort request).
    """
    box = images.shape[-1]
    step = callback or (lambda: None)
    A, t, _ = search(warm, images, ctf_params)
    shifts = shift_grid(max_shift_px).to(images.device)
    labels = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
    for r in range(rounds):
        step()
        V = reconstruct_classes(images, ctf_params, A, t, labels, 1, pixel_size_A, pad=RECONSTRUCT_PAD)
        A, t, _ = search(WarmMap(V, warm.rotations, shifts, box, pixel_size_A, 1.0), images, ctf_params)
        log.info("refinement round %d/%d at %d px", r + 1, rounds, box)
    K = 1
    if n_classes > 1:
        labels = classify(images, ctf_params, A, t, n_classes, pixel_size_A, seed)
        for _ in range(CLASS_ROUNDS):
            step()
            V = reconstruct_classes(images, ctf_params, A, t, labels, n_classes, pixel_size_A, pad=RECONSTRUCT_PAD)
            A, t, labels = search(WarmMap(V, warm.rotations, shifts, box, pixel_size_A, 1.0), images, ctf_params)
        K = n_classes
        log.info("classification into %d classes: %s images", K, torch.bincount(labels, minlength=K).tolist())
    V = reconstruct_classes(images, ctf_params, A, t, labels, K, pixel_size_A, pad=RECONSTRUCT_PAD)
    A_one, moved_frame = one_frame(on_box_lattice(V, box), A, labels)
    if moved_frame:  # classes split from one map inherit its frame; give them their common part's
        V = reconstruct_classes(images, ctf_params, A_one, t, labels, K, pixel_size_A, pad=RECONSTRUCT_PAD)
    return WarmMap(V, warm.rotations, shifts, box, float(pixel_size_A), 1.0)


def class_targets(warm: "WarmMap | None", zdim: int, device) -> torch.Tensor | None:
    """The z target of each warm class `(K, zdim)` on `device`, or None without classes (or zdim 0)."""
    if warm is None or warm.n_classes < 2 or zdim < 1:
        return None
    return class_codes(warm.n_classes, zdim).to(device)


def class_codes(n_classes: int, zdim: int) -> torch.Tensor:
    """Latent targets `(K, zdim)` for K classes: the vertices of a regular simplex of unit radius
    (class k -> a point as far from the others as the dimensions allow; truncated when zdim < K-1)."""
    K = int(n_classes)
    centred = torch.eye(K, dtype=torch.float64) - 1.0 / K
    basis = torch.linalg.svd(centred, full_matrices=False).Vh[: max(K - 1, 0)]  # (K-1, K)
    pts = centred @ basis.T  # (K, K-1)
    pts = pts / pts.norm(dim=1, keepdim=True).clamp_min(1e-12)
    out = torch.zeros(K, zdim, dtype=torch.float64)
    m = min(zdim, K - 1)
    out[:, :m] = pts[:, :m]
    return out.float()
