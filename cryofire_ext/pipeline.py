"""The reconstruction in the order it runs, each stage in its one home:

warm start (`refine.warmstart`: ab initio maps, classes) -> training (`train.trainer`: the amortized model learns
poses, shifts and z, with the warm start's searched poses as targets and candidates) -> the model pass
(`predict.model_pass`) -> per-particle refinement of pose, shift and class against the particles' own class maps
(`refine.polish`, settings in `RefineConfig`) -> `Predictions` (with each particle's class) -> with `z_mode`
"continuous", where the refinement ends with rounds against one map of all particles and decides the classes
again at their poses, the landscape (`landscape`: z as a continuous coordinate at the refined poses) -> the
references (`refine.references`: the final class maps, saved in the run, with each particle's pose confidence
and class probability).

Training is `train.trainer.train`, then `fit_landscape` and `fit_references` on the training particles' inferred
poses. `infer` (a trained run over any particles) aligns particles the run was not trained on to its references
(`refine.references.align`); the training particles (and, for runs without references, any) take the model pass
and the refinement. z comes from the landscape at the final poses when the run has one. The integrations' jobs
call them and write the files.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cryofire_ext import landscape, run_layout
from cryofire_ext.particles import ParticleStack
from cryofire_ext.poses import random_rotations
from cryofire_ext.predict import TrainedModel, is_training_stack, load_trained, model_pass, run_meta
from cryofire_ext.refine import references
from cryofire_ext.refine.config import RefineConfig
from cryofire_ext.refine.polish import polish
from cryofire_ext.refine.search import shift_grid
from cryofire_ext.results import Predictions
from cryofire_ext.train.candidates import class_targets
from cryofire_ext.train import distributed
from cryofire_ext.train.data import TrainingImages

log = logging.getLogger(__name__)


@torch.no_grad()
def infer(run: "TrainedModel | str | Path", stack: ParticleStack, refine: RefineConfig | None = None, *,
          batch_size: int = 256, device: str | None = "auto") -> Predictions:
    """Poses, shifts, z and classes of every particle of `stack` from a trained run (a folder or a loaded
    `TrainedModel`).

    Particles the run was not trained on, with a run that has references and `refine.new_particles`
    "references": aligned to the references (`_align`; meta `inference` "references"). Otherwise (meta
    `inference` "refine"): the model pass, then `refine.polish_rounds` rounds of per-particle refinement of pose,
    shift and class against class maps back-projected from these particles (a particle whose class changes gets
    that class's z code; `loss` stays the model's). z is then the particle's position along the landscape, at
    its final pose, when the run has one (`landscape.pt`). `refine` None: `RefineConfig()` defaults. The settings
    that ran are in the result's meta (`refine`)."""
    refine = refine or RefineConfig()
    tm = run if isinstance(run, TrainedModel) else load_trained(run, device=device)
    if tm.references is not None and refine.new_particles == "references" and not is_training_stack(tm, stack):
        preds = _align(tm, stack)
    else:
        preds = model_pass(tm, stack, batch_size=batch_size)
        if refine.polish_rounds > 0:
            preds = _refine(tm, stack, preds, refine)
        preds.meta["inference"] = "refine"
        if tm.references is not None and preds.n_classes > tm.references.n_classes:
            log.warning("%s holds %d class map(s) but the refinement gave %d classes (references built from other "
                        "classes, e.g. by a continuous run of an earlier release): no pose confidences; `cryofire "
                        "train %s --resume` rebuilds the references", tm.run_dir / run_layout.REFERENCES,
                        tm.references.n_classes, preds.n_classes, tm.run_dir)
        elif tm.references is not None:
            preds = _confidences(tm, TrainingImages(stack, tm.box, tm.stats), preds)
    preds.meta["refine"] = refine.to_dict()
    return _landscape_z(tm, stack, preds) if tm.landscape is not None else preds


def fit_landscape(tm: TrainedModel, stack: ParticleStack, preds: Predictions, *,
                  should_stop: Callable[[], bool] | None = None,
                  on_progress: Callable[[dict], None] | None = None) -> Predictions:
    """Fit the landscape stage of the run `tm` to `stack` at the poses and shifts of `preds` (the refined
    ones), save it in the run folder (`landscape.pt`) and attach it to `tm`; returns `preds` with the
    landscape's z."""
    lm, z = landscape.fit_landscape(stack, preds.A, preds.shifts_A, tm.config, map_box=tm.box,
                                    map_pixel_size_A=tm.pixel_size_A, device=tm.model.k_half.device,
                                    should_stop=should_stop, on_progress=on_progress)
    lm.save(tm.run_dir / run_layout.LANDSCAPE)
    tm.landscape = lm
    return _with_landscape_z(preds, z, lm)


def fit_references(tm: TrainedModel, stack: ParticleStack, preds: Predictions, refine: RefineConfig) -> Predictions:
    """Build the run's references from its training particles `stack` at their final poses and classes `preds`
    (`refine.references.build_references`, with the refinement's search grid, `_search_grid`), save them in the
    run folder (`references.pt`) and attach them to `tm`; returns `preds` with each particle's pose confidence and
    class probability against them."""
    data = TrainingImages(stack, tm.box, tm.stats)
    poses = _poses_px(tm, preds)
    refs = references.build_references(data.read, len(preds), *poses, preds.n_classes, tm.box, tm.pixel_size_A,
                                       _search_grid(tm, refine.search_rotations))
    refs.save(tm.run_dir / run_layout.REFERENCES)
    tm.references = refs
    return _confidences(tm, data, preds, poses)


def _confidences(tm: TrainedModel, data: TrainingImages, preds: Predictions,
                 poses: tuple[torch.Tensor, ...] | None = None) -> Predictions:
    """`preds` with each particle's pose confidence and class probability at its pose (`poses` = `_poses_px`)
    against the run's references (`refine.references.confidence_at`), the particles read from `data`."""
    conf, prob = references.confidence_at(tm.references, data.read, len(preds), *(poses or _poses_px(tm, preds)))
    preds.pose_confidence, preds.class_probability = conf.cpu().numpy(), prob.cpu().numpy()
    return preds


def _poses_px(tm: TrainedModel, preds: Predictions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A `(n, 3, 3)`, shifts `(n, 2)` px of the model box, classes `(n,)`) of `preds` as tensors on the model's
    device, for the stages that read the particles at the model box."""
    dev = tm.model.k_half.device
    return (torch.as_tensor(preds.A, device=dev).float(), torch.as_tensor(preds.shifts_A / tm.pixel_size_A,
            device=dev).float(), torch.as_tensor(preds.class_id, device=dev))


def _search_grid(tm: TrainedModel, n_rotations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global search grid after training (rotations `(M, 3, 3)`, shifts `(S, 2)` px of the model box, on the
    model's device): `n_rotations` random rotations (seeded by the run) and the warm start's shifts, or without a
    warm start shifts up to `warm_max_shift_px`."""
    dev = tm.model.k_half.device
    c = tm.config
    rots = torch.as_tensor(random_rotations(n_rotations, np.random.default_rng(c.seed))).float()
    shifts = tm.warm.shifts_px * (tm.box / tm.warm.box) if tm.warm is not None else \
        shift_grid(c.warm_max_shift_px * tm.box / tm.input_box)
    return rots.to(dev), shifts.float().to(dev)


def _align(tm: TrainedModel, stack: ParticleStack) -> Predictions:
    """`refine.references.align` of `stack` to the run's references -> Predictions (z: the class's z code in the
    pose model's space, the landscape's after `infer`; loss: the residual against the class map in units of
    the noise power). Under torchrun each rank aligns a contiguous block of the particles and every rank gets
    all the results in input order (alignment is per particle, so the answer does not depend on the ranks)."""
    refs = tm.references
    data = TrainingImages(stack, tm.box, tm.stats)
    n = len(stack)
    env = distributed.current()  # under torchrun each rank aligns its block; all get every result
    lo, hi = distributed.block(n, env)
    t0 = time.perf_counter()
    done = [0]

    def progress(k: int) -> None:
        if k - done[0] >= 2000 or k == hi - lo:
            log.info("aligned %d of %d particles to the references (%.0f images/s)%s", k, hi - lo,
                     k / max(time.perf_counter() - t0, 1e-9), f" on rank {env.rank}" if env.world > 1 else "")
            done[0] = k

    aligned = references.align(refs, lambda idx: data.read(idx + lo), hi - lo, on_chunk=progress)
    out = distributed.gather_blocks({name: getattr(aligned, name).cpu().numpy()
                                     for name in references.Aligned.__dataclass_fields__}, env)
    labels = out["labels"].astype(np.int64)
    codes = class_targets(tm.warm, tm.model.zdim, "cpu")
    z = codes.numpy()[labels] if codes is not None and len(codes) == refs.n_classes else \
        np.zeros((n, tm.model.zdim), np.float32)
    meta = {**run_meta(tm, stack), "inference": "references",
            "loss": "residual power against the class map / noise power"}
    return Predictions(ids=stack.ids, A=out["A"].astype(np.float64),
                       shifts_A=out["shifts_px"].astype(np.float64) * tm.pixel_size_A,
                       z=z, loss=out["residual"].astype(np.float64), meta=meta, class_id=labels,
                       pose_confidence=out["pose_confidence"], class_probability=out["class_probability"])


def _landscape_z(tm: TrainedModel, stack: ParticleStack, preds: Predictions) -> Predictions:
    """`preds` with z from the run's landscape at their poses (under torchrun each rank computes a contiguous
    block and every rank gets all of them in input order, as `_align`)."""
    env = distributed.current()
    lo, hi = distributed.block(len(stack), env)
    block = stack if (lo, hi) == (0, len(stack)) else stack.take(np.arange(lo, hi))  # one rank: no copy
    z = tm.landscape.z_of(block, preds.A[lo:hi], preds.shifts_A[lo:hi])
    return _with_landscape_z(preds, distributed.gather_blocks({"z": z}, env)["z"], tm.landscape)


def _with_landscape_z(preds: Predictions, z: np.ndarray, lm: landscape.Landscape) -> Predictions:
    """`preds` with z `(n, 1)` along the landscape (recorded in its meta)."""
    preds.z = z
    preds.meta.update(z="landscape", zdim=lm.zdim)
    return preds


def _refine(tm: TrainedModel, stack: ParticleStack, preds: Predictions, refine: RefineConfig) -> Predictions:
    """`refine.polish` on the model's predictions, starting from their classes. A run whose z is a continuous
    landscape (`z_mode` "continuous") refines every particle `landscape_pose_rounds` more rounds against one map of
    all particles, then decides the classes again at those poses (`polish`'s `one_map_rounds`): z is the
    position along the landscape, and the classes stay beside it as discrete states."""
    codes = class_targets(tm.warm, tm.model.zdim, "cpu")
    K = 1 if codes is None else len(codes)
    one_map_rounds = tm.config.landscape_pose_rounds if tm.config.z_mode == "continuous" else 0
    data = TrainingImages(stack, tm.box, tm.stats)
    grid = _search_grid(tm, refine.search_rotations) if refine.polish_global_search and tm.warm is not None else None
    A, t, labels = polish(data.read, len(preds), *_poses_px(tm, preds), K, tm.box, tm.pixel_size_A,
                          refine.polish_rounds, global_grid=grid, one_map_rounds=one_map_rounds)
    labels = labels.cpu().numpy().astype(np.int64)
    z = preds.z.copy()
    if codes is not None and not one_map_rounds:  # the pose model's z is the class label: it follows the class
        moved = labels != preds.class_id
        z[moved] = codes.numpy()[labels[moved]]
    return Predictions(ids=preds.ids, A=A.double().cpu().numpy(), shifts_A=t.double().cpu().numpy() * tm.pixel_size_A,
                       z=z, loss=preds.loss, meta=preds.meta, class_id=labels)
