"""3D classification at fixed poses: hard EM over class maps (`recon.classmaps`), from random splits
(`classify`, the warm start's) or from given classes with gold-standard half maps (`classify_at_poses`, the
refinement's), and the class scores they decide on.

Units and grids as in `recon.lattice`: maps are complex Fourier grids `(K, G, G, G)`, shifts in pixels of the box
(RELION origin sign).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from cryofire_ext.ctf import evaluate_ctf
from cryofire_ext.recon.classmaps import class_maps, class_maps_fsc, half_set
from cryofire_ext.recon.lattice import Lattice, SubLattice, score_at, slices

log = logging.getLogger(__name__)


def class_scores(V: torch.Tensor, Y: torch.Tensor, C: torch.Tensor, lat: "Lattice", A: torch.Tensor,
                 t: torch.Tensor) -> torch.Tensor:
    """Log-likelihood `(n, K)` of each image under each class map `V` `(K, G, G, G)` at its pose `A`
    and shift `t`."""
    coords = torch.einsum("mi,nij->nmj", lat.k, A.float())[:, None]
    return torch.cat([score_at(Y, C, lat.k[:, :2], slices(Vk.to(A.device), coords), t[:, None].float())
                      for Vk in V], dim=1)


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
#: `CLASSIFY_TOL` of the particles change class, or once fewer than `CLASSIFY_SETTLED` change and the count no
#: longer falls (at least `CLASSIFY_PLATEAU` of the previous iteration's): on a continuum of states the
#: particles near a class boundary keep changing sides, and the iterations left only move them back and forth
CLASSIFY_ITERS = 20
CLASSIFY_TOL = 1e-3
CLASSIFY_SETTLED = 1e-2
CLASSIFY_PLATEAU = 0.9


def converged(changed: int, previous: int | None, n: int) -> bool:
    """Whether hard EM over `n` particles has converged when `changed` particles changed class in this iteration
    and `previous` in the one before (None in the first): `CLASSIFY_TOL`, or a plateau below `CLASSIFY_SETTLED`."""
    if changed < CLASSIFY_TOL * n:
        return True
    return previous is not None and changed < CLASSIFY_SETTLED * n and changed >= CLASSIFY_PLATEAU * previous


def low_resolution(lat: "Lattice", pixel_size_A: float) -> torch.Tensor:
    """Mask `(m,)` of the lattice points of `lat` up to `CLASSIFY_RESOLUTION_A`, where classes are compared."""
    return lat.r <= min(1.0, 2.0 * pixel_size_A / CLASSIFY_RESOLUTION_A) + 1e-6


@torch.no_grad()
def classify_at_poses(read, n: int, A: torch.Tensor, shifts_px: torch.Tensor, labels: torch.Tensor, n_classes: int,
                      box: int, pixel_size_A: float, *, max_iters: int = CLASSIFY_ITERS, chunk: int = 256
                      ) -> torch.Tensor:
    """Hard-EM classification of `n` streamed particles at fixed poses, from `labels` `(n,)`: back-project
    each class (`class_maps`), give each particle the class whose map explains it best up to
    `CLASSIFY_RESOLUTION_A`, until the classes settle (`converged`; at most `max_iters` times). `read`, A,
    shifts_px as in `class_maps`. Returns the labels `(n,)` (a new tensor).
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
    lat = Lattice(box, pixel_size_A, device)
    low = low_resolution(lat, pixel_size_A)
    low_radius = float(lat.r[low].max())  # the FSC-weighted maps are back-projected only as far as they are scored
    sub = SubLattice(lat, low)
    labels = labels.clone()
    ar = torch.arange(n, device=device)
    half = half_set(n, device)
    previous = None
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
        if converged(changed, previous, n):
            break
        previous = changed
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
