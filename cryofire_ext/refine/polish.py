"""Per-particle refinement ("polish") of predicted poses, shifts and classes.

After the amortized pass, each round back-projects class maps from every particle at its
predicted (pose, shift, class), then hill-climbs each particle's rotation and shift against
every class map (`search.refine_local`) and keeps the class whose map explains it best.
This is the per-particle refinement of an encoder's poses of cryoSPIN (arXiv 2406.10455),
done as projection matching against the particles' own reconstruction. Images are streamed
in chunks, so memory holds the class maps and one chunk, not the stack.

With classes, the first round refines every particle against one consensus map (after turning the model's
classes into one frame) and the classes are decided after it, at the refined poses: consensus refinement,
then classification, then refinement per class, as in RELION or cryoSPARC practice. The later rounds refine
against the class maps, each first turned into one frame (`frames.class_frames`). With a global grid, every
round first searches every particle over it, coarse to fine (`global_research`), for the particles the model or
the class maps put too far from their pose for local steps. Before a continuous landscape, more rounds against
one map of all particles follow (`one_map_rounds`) and the classes are decided again at their poses. The class
maps are filtered by their half-set FSC
(`recon.classmaps.class_maps_fsc`, as RELION's gold-standard refinement weights its references) and reconstructed
on a 2x oversampled Fourier grid (`recon.classmaps.RECONSTRUCT_PAD`); what each of these choices gained is in
CHANGELOG.md and benchmarks/results.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import numpy as np
import torch

from cryofire_ext.ctf import evaluate_ctf
from cryofire_ext.recon.classmaps import class_maps_fsc, fsc_resolution_A, on_box_lattice, signal_radius
from cryofire_ext.recon.lattice import Lattice, SubLattice
from cryofire_ext.refine.classify import class_scores, classify_at_poses, low_resolution
from cryofire_ext.refine.frames import REGISTER_BOX, one_frame
from cryofire_ext.refine.search import GRID_KEEP, WarmMap, best_class, refine_local, search

log = logging.getLogger(__name__)

#: shift steps of the refinement, pixels of the model box (`REFINE_SHIFT_STEPS` fractions of this pitch)
SHIFT_PITCH_PX = 1.0
#: fewer particles per class than this and the class maps are too noisy to refine against
MIN_PARTICLES_PER_CLASS = 50

Reader = Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def polish(read: Reader, n: int, A: torch.Tensor, shifts_px: torch.Tensor, labels: torch.Tensor, n_classes: int,
           box: int, pixel_size_A: float, rounds: int, chunk: int = 256,
           global_grid: tuple[torch.Tensor, torch.Tensor] | None = None, one_map_rounds: int = 0):
    """`rounds` of (back-project class maps filtered by their half-set FSC (`recon.classmaps.class_maps_fsc`), turn
    them into one frame (`frames.class_frames`), refine every particle's pose and shift against each class
    map (on the shells the round's maps hold, `recon.classmaps.signal_radius`), keep the class that explains it
    best up to `classify.CLASSIFY_RESOLUTION_A`, then, with classes, hard-EM classification at the refined poses
    (`classify.classify_at_poses`)). With classes the first round
    refines against one consensus map of all particles instead (the classes, in one frame, kept until its
    classification): `labels` are then only where the classification starts. A `(n, 3, 3)` RELION
    matrices, shifts_px `(n, 2)` pixels of `box` (RELION origin sign), labels `(n,)` int64 in `[0, n_classes)`.

    With `global_grid` (rotations `(M, 3, 3)`, shifts `(S, 2)` px of `box`), every round first searches every
    particle over that grid against the round's maps (`search.search`) and keeps the searched pose and class
    where they explain the image better than the current ones (`global_research`): this rescues particles that
    the model or the last round's maps put far from their pose, which local steps cannot reach.

    `one_map_rounds` (a continuous landscape follows, `pipeline._refine`): that many more rounds against one map of
    all particles after the class rounds, then the classes are decided once more at the poses they gave
    (`classify.classify_at_poses`, from the class rounds' labels). Class maps of a continuum are arbitrary cuts
    of it, and one of them can gather the particles that sit half-turned in the other's frame; rounds against
    one map bring them into the frame the landscape is fitted in (the class rounds before them give the rest
    sharper poses than one map does from the model's), and the classes decided after them are classes of
    conformations at those poses, not of frames. Without class rounds the given classes are
    not registered into one frame first (with the registration the same pose errors gave a landscape that missed
    the motion, landscape_continuous_refinement.json; that landscape started from one variability component only,
    `landscape.STARTS`, so the registration's part in it is not settled).

    Returns (A, shifts_px, labels) refined; the inputs when there are too few particles per map
    (fewer than `MIN_PARTICLES_PER_CLASS`). Deterministic.
    """
    total = max(rounds, 0) + one_map_rounds
    maps = n_classes if rounds > 0 else 1
    if total <= 0 or n < MIN_PARTICLES_PER_CLASS * maps:
        if total > 0:
            log.info("pose refinement skipped: %d particles for %d map(s) (it needs %d per map)", n, maps,
                     MIN_PARTICLES_PER_CLASS)
        return A, shifts_px, labels
    device = A.device
    A, shifts_px, labels = A.float().clone(), shifts_px.float().clone(), labels.long().clone()
    for r in range(total):
        t0 = time.perf_counter()
        # the first round refines every particle against one consensus map: the classes it starts from are a
        # guess (the model's), and a map of all particles gives the majority better poses than two of a split
        consensus = n_classes > 1 and (r == 0 or r >= rounds)
        if consensus and r == 0 and rounds > 0:  # the classes into one frame (maps as far as registration reads)
            V, _ = class_maps_fsc(read, n, A, shifts_px, labels, n_classes, box, pixel_size_A, chunk,
                                  max_radius=min(1.0, REGISTER_BOX / box))
            A, _ = one_frame(on_box_lattice(V, box), A, labels)
        if consensus:
            K, lab = 1, torch.zeros_like(labels)
        else:  # `lab` is `labels` itself: refined in place
            K, lab = n_classes, labels
        V, fsc = class_maps_fsc(read, n, A, shifts_px, lab, K, box, pixel_size_A, chunk)
        if not consensus:  # one frame for all classes, so each particle starts from its pose in every map
            A, moved_frame = one_frame(on_box_lattice(V, box), A, lab)
            if moved_frame:
                V, fsc = class_maps_fsc(read, n, A, shifts_px, lab, K, box, pixel_size_A, chunk)
        # the particles are scored on the shells the round's maps hold
        radius = signal_radius(fsc, box)
        lat = Lattice(box, pixel_size_A, device, radius)
        low = low_resolution(lat, pixel_size_A)
        sub = SubLattice(lat, low)
        moved = replaced = 0
        for s in range(0, n, chunk):
            idx = np.arange(s, min(n, s + chunk))
            img, ctf = read(idx)
            Y = lat.observe(img.to(device))
            C = evaluate_ctf(ctf.double().to(device), lat.freqs).float()
            # the global search in every round: in the first, so that far-off particles do not corrupt the first
            # classes; in the later ones for those the class maps put far off, and because each round's maps
            # hold fewer misplaced particles (a half-turned elongated particle is found only by a search)
            if global_grid is not None:
                better = global_research(V, img.to(device), ctf, Y, C, lat, A[idx], shifts_px[idx], lab[idx],
                                         global_grid, pixel_size_A, radius)
                replaced += int(better[0].sum())
                A[idx], shifts_px[idx], lab[idx] = better[1:]
            per_class = [refine_local(V[k], Y, C, lat, A[idx], shifts_px[idx], SHIFT_PITCH_PX) for k in range(K)]
            # the class is decided where classes differ (low resolution), each at its own refined pose
            per_class = [(Ak, tk, class_scores(V[k:k + 1], Y[:, low], C[:, low], sub, Ak, tk)[:, 0])
                         for k, (Ak, tk, _) in enumerate(per_class)]
            A[idx], shifts_px[idx], cls = best_class(per_class)
            moved += int((lab[idx] != cls).sum())
            lab[idx] = cls
        if n_classes > 1 and r < rounds:  # so the next round refines against maps of states, not the model's classes
            labels = classify_at_poses(read, n, A, shifts_px, labels, n_classes, box, pixel_size_A, chunk=chunk)
        log.info("pose refinement round %d/%d: %s at %s A (half-set FSC 0.143), %s%d particle(s) changed "
                 "class in the refinement, %.1f s", r + 1, total, "one map" if K == 1 else "class maps",
                 ", ".join(f"{fsc_resolution_A(f, box, pixel_size_A):.1f}" for f in fsc),
                 f"global search took {replaced} pose(s), " if global_grid is not None else "", moved,
                 time.perf_counter() - t0)
    if one_map_rounds and n_classes > 1:  # the classes again, at the poses the one-map rounds gave
        labels = classify_at_poses(read, n, A, shifts_px, labels, n_classes, box, pixel_size_A, chunk=chunk)
    return A, shifts_px, labels


def global_research(V: torch.Tensor, img: torch.Tensor, ctf: torch.Tensor, Y: torch.Tensor, C: torch.Tensor,
                    lat: Lattice, A: torch.Tensor, shifts_px: torch.Tensor, labels: torch.Tensor,
                    grid: tuple[torch.Tensor, torch.Tensor], pixel_size_A: float, max_radius: float = 1.0):
    """Search images `img` `(n, box, box)` (observed `Y`, CTF `C` on `lat`) over `grid` (rotations `(M, 3, 3)`,
    shifts `(S, 2)` px; coarse to fine, `search.GRID_KEEP`) against class maps `V` `(K, G, G, G)` (refined on the
    lattice up to `max_radius`), then keep, per image, whichever of the searched (pose, shift, class) and the
    current (`A`, `shifts_px`, `labels`) has the higher log-likelihood on `lat` -> (taken `(n,)` bool, A,
    shifts_px, labels)."""
    box = img.shape[-1]
    rotations, shifts = grid
    As, ts, cs = search(WarmMap(V, rotations.float(), shifts.float(), box, pixel_size_A, 1.0), img, ctf,
                        max_radius=max_radius, keep=GRID_KEEP)
    ar = torch.arange(len(labels), device=labels.device)
    now = class_scores(V, Y, C, lat, A, shifts_px)[ar, labels]
    new = class_scores(V, Y, C, lat, As, ts)[ar, cs]
    take = new > now
    return (take, torch.where(take[:, None, None], As, A), torch.where(take[:, None], ts, shifts_px),
            torch.where(take, cs, labels))
