"""The reconstruction in the order it runs, each stage in its one home:

warm start (`refine.warmstart`: ab initio maps, classes) -> training (`train.trainer`: the amortized model learns
poses, shifts and z, with the warm start's searched poses as targets and candidates) -> the model pass
(`predict.model_pass`) -> per-particle refinement of pose, shift and class against the particles' own class maps
(`refine.polish`, settings in `RefineConfig`) -> `Predictions` (with each particle's class) -> with `z_mode`
"continuous", the landscape (`landscape`: z as a continuous coordinate at the refined poses).

Training is `train.trainer.train`, then `fit_landscape` on the training particles' inferred poses; `infer` (a
trained run over any particles) does the rest, z from the landscape at the refined poses when the run has one. The
integrations' jobs call them and write the files.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cryofire_ext import landscape, run_layout
from cryofire_ext.particles import ParticleStack
from cryofire_ext.predict import TrainedModel, load_trained, model_pass
from cryofire_ext.refine.config import RefineConfig
from cryofire_ext.refine.polish import polish
from cryofire_ext.results import Predictions
from cryofire_ext.train.candidates import class_targets
from cryofire_ext.train.data import TrainingImages

log = logging.getLogger(__name__)


@torch.no_grad()
def infer(run: "TrainedModel | str | Path", stack: ParticleStack, refine: RefineConfig | None = None, *,
          batch_size: int = 256, device: str | None = "auto") -> Predictions:
    """Poses, shifts, z and classes of every particle of `stack` from a trained run (a folder or a loaded
    `TrainedModel`): the model pass, then `refine.polish_rounds` rounds of per-particle refinement of pose, shift
    and class against class maps back-projected from these particles (a particle whose class changes gets that
    class's z code); z is then the particle's position along the landscape, at its refined pose, when the run has
    one (`landscape.pt`). `loss` stays the
    model's. `refine` None: `RefineConfig()` defaults. The settings that ran are in the result's meta
    (`refine`)."""
    refine = refine or RefineConfig()
    tm = run if isinstance(run, TrainedModel) else load_trained(run, device=device)
    preds = model_pass(tm, stack, batch_size=batch_size)
    if refine.polish_rounds > 0:
        preds = _refine(tm, stack, preds, refine)
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


def _landscape_z(tm: TrainedModel, stack: ParticleStack, preds: Predictions) -> Predictions:
    """`preds` with z from the run's landscape at their poses."""
    return _with_landscape_z(preds, tm.landscape.z_of(stack, preds.A, preds.shifts_A), tm.landscape)


def _with_landscape_z(preds: Predictions, z: np.ndarray, lm: landscape.Landscape) -> Predictions:
    """`preds` with z `(n, 1)` along the landscape (recorded in its meta)."""
    preds.z = z
    preds.meta.update(z="landscape", zdim=lm.zdim)
    return preds


def _refine(tm: TrainedModel, stack: ParticleStack, preds: Predictions, refine: RefineConfig) -> Predictions:
    """`refine.polish` on the model's predictions, starting from their classes."""
    dev = tm.model.k_half.device
    codes = class_targets(tm.warm, tm.model.zdim, "cpu")
    K = 1 if codes is None else len(codes)
    data = TrainingImages(stack, tm.box, tm.stats)
    grid = None  # the warm start's global grid, its shifts in pixels of the model box
    if refine.polish_global_search and tm.warm is not None:
        grid = (tm.warm.rotations.to(dev), tm.warm.shifts_px.to(dev) * (tm.box / tm.warm.box))
    A, t, labels = polish(data.read, len(preds), torch.as_tensor(preds.A, device=dev),
                          torch.as_tensor(preds.shifts_A / tm.pixel_size_A, device=dev),
                          torch.as_tensor(preds.class_id, device=dev), K, tm.box, tm.pixel_size_A,
                          refine.polish_rounds, global_grid=grid)
    labels = labels.cpu().numpy().astype(np.int64)
    z = preds.z.copy()
    if codes is not None:  # the pose model's z is the class label: it follows the class
        moved = labels != preds.class_id
        z[moved] = codes.numpy()[labels[moved]]
    return Predictions(ids=preds.ids, A=A.double().cpu().numpy(), shifts_A=t.double().cpu().numpy() * tm.pixel_size_A,
                       z=z, loss=preds.loss, meta=preds.meta, class_id=labels)
