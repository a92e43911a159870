"""A run's predictions into cryoSPARC particle datasets that already exist (matched on uid).

`alignment_columns` / `apply_predictions` put a `Predictions` (poses, shifts, classes, latents) into a
cryoSPARC particle `Dataset` whose uids the run was trained on, keeping every input field (the external
job saves them as its output; the fields themselves come from `fields.alignment_fields`, as for
`write_cs`). `export_cs` does the same offline for `cryofire cryosparc export`: a `.cs` plus the `.csg`
result-group file cryoSPARC's "Import Result Group" job reads.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import cryosparc
import numpy as np
from cryosparc.dataset import Dataset

from cryofire_ext.errors import InputError, brief
from cryofire_ext.results import Predictions
from cryofire_ext.safe_io import atomic_path, check_not_inputs, check_writable
from integrations.cryosparc.fields import alignment_fields, drop_stale_components, field_spec, set_fields
from integrations.formats import input_files
from integrations.run_folder import PREDICTIONS

logger = logging.getLogger(__name__)


def alignment_columns(dset: Dataset, preds: Predictions, *, psize_A: np.ndarray | float | None = None
                      ) -> tuple[np.ndarray, dict[str, tuple[Any, np.ndarray]]]:
    """Columns that carry `preds` into a cryoSPARC particle dataset, matched on uid.

    Returns `(rows, columns)`: `rows` `(m,)` indices of the dataset rows that have a
    prediction, and `columns` mapping field name -> (dtype, values `(m, ...)`), built by
    `fields.alignment_fields`: `alignments3D/pose` `(m, 3)` f4 (-rotvec(A), radians),
    `alignments3D/shift` `(m, 2)` f4 (pixels of `alignments3D/psize_A`, RELION's origin sign),
    `alignments3D/psize_A` f4, `alignments3D/class_posterior` (the class probability, else 1),
    `alignments3D/class` u4 (`preds.class_id`, 0-based), `cryofire/pose_confidence` f4 when the predictions
    have it, and per latent dimension K `components_mode_K/component` u4 = K, `components_mode_K/value` f4 = z_K. `psize_A` defaults to each row's `blob/psize_A`.
    """
    uids = np.asarray(dset["uid"]).astype(np.uint64).astype(str)
    index = {str(u): i for i, u in enumerate(np.asarray(preds.ids).astype(str))}
    matched = np.array([index.get(u, -1) for u in uids], dtype=np.int64)
    rows = np.nonzero(matched >= 0)[0]
    if rows.size == 0:
        raise InputError(f"none of the {len(uids)} particle uids match the {len(preds)} predicted particle ids "
                         f"(e.g. {uids[:1].tolist()} vs {np.asarray(preds.ids)[:1].tolist()}); the run was not "
                         "trained on these particles")
    pick = matched[rows]
    if psize_A is None:
        if "blob/psize_A" not in dset.fields():
            raise InputError("the particle dataset has no blob/psize_A field; cannot express shifts in pixels")
        psize = np.asarray(dset["blob/psize_A"], dtype=np.float64)[rows]
    else:
        psize = np.broadcast_to(np.asarray(psize_A, dtype=np.float64), uids.shape)[rows]
    if not np.all(psize > 0):
        raise InputError("the particle dataset has a non-positive pixel size (blob/psize_A)")
    fields = alignment_fields(len(rows), A=preds.A[pick], shifts_A=preds.shifts_A[pick], psize_A=psize,
                              classes=preds.class_id[pick], class_posterior=1.0,
                              z=preds.z[pick] if preds.zdim else None,
                              confidences={k: v[pick] for k, v in preds.confidences().items()})
    return rows, {name: (field_spec(values), values) for name, values in fields.items()}


def apply_predictions(dset: Dataset, preds: Predictions, *, psize_A: np.ndarray | float | None = None,
                      keep_unmatched: bool = False) -> Dataset:
    """A copy of `dset` (every input field kept) with `alignments3D` (poses, shifts, `class` = `preds.class_id`)
    and `components_mode_K` from `preds` (see `alignment_columns`).

    Rows are matched on `uid`; rows without a prediction are dropped unless `keep_unmatched`
    (then they keep zeros). Existing alignment/component fields are overwritten; components_mode_K
    beyond the run's latent dimension (from an earlier analysis) are dropped.
    """
    rows, cols = alignment_columns(dset, preds, psize_A=psize_A)
    out = dset.copy() if keep_unmatched or len(rows) == len(dset) else dset.take(rows)
    target = np.arange(len(out)) if not keep_unmatched else rows
    if not keep_unmatched and len(rows) != len(dset):
        logger.warning("%d of %d particles have no prediction and were left out", len(dset) - len(rows), len(dset))
    if preds.zdim:
        drop_stale_components(out, preds.zdim)
    return set_fields(out, {name: values for name, (_, values) in cols.items()}, rows=target)


def export_cs(run_dir: str | os.PathLike, like: str | os.PathLike, out: str | os.PathLike, *,
              force: bool = False) -> Path:
    """Write `out` (.cs): the particles of `like` (every field kept) with the run's poses and latents.

    `run_dir` is a cryofire run folder (holding predictions.npz) or the predictions file itself;
    `like` a cryoSPARC particle .cs whose uids the run was trained on (e.g. the exported input
    job's particles). A `.csg` result-group file is written beside it: import both in cryoSPARC
    with an "Import Result Group" job (blob paths stay as in `like`, relative to its project).
    """
    run_dir = Path(run_dir)
    pred_path = run_dir / PREDICTIONS if run_dir.is_dir() else run_dir
    check_not_inputs([out, Path(out).with_suffix(".csg")], [pred_path, *input_files(like, twins=False)])
    check_writable(out, force)
    preds = Predictions.load(pred_path)
    like = Path(like)
    if not like.is_file():
        raise InputError(f"{like}: particle .cs file not found (--like)")
    try:
        dset = Dataset.load(like)
    except Exception as exc:
        raise InputError(f"{like}: not a cryoSPARC .cs dataset ({brief(exc)})") from None
    if "uid" not in dset.fields() or "blob/psize_A" not in dset.fields():
        raise InputError(f"{like}: a particle .cs with uid and blob/psize_A fields is expected (a particle "
                         "output of a cryoSPARC extract, import or refinement job)")
    csg = Path(out).with_suffix(".csg")
    check_writable(csg, force)
    result = apply_predictions(dset, preds)
    with atomic_path(out, force=force) as tmp:
        with open(tmp, "wb") as fh:
            result.save(fh)
    with atomic_path(csg, force=force) as tmp:
        tmp.write_text(result_group_text(result, Path(out).name))
    logger.info("wrote %s: %d particles with alignments3D and %d latent component(s), and %s for cryoSPARC's "
                "Import Result Group job", out, len(result), preds.zdim, csg.name)
    return Path(out)


def _slot_type(prefix: str) -> str:
    if prefix.startswith("components_mode_"):
        return "components"
    if prefix.startswith("alignments_class_"):
        return "alignments3D"
    return prefix


def result_group_text(dset: Dataset, cs_name: str, *, name: str = "particles",
                      title: str = "cryoFIRE particles") -> str:
    """A cryoSPARC result-group file (.csg) naming every slot of `dset` in `cs_name` (beside the .csg).

    cryoSPARC's "Import Result Group" job reads it; `>` marks a path relative to the .csg's folder,
    as in cryoSPARC's own exports.
    """
    lines = [f"created: {time.strftime('%Y-%m-%d %H:%M:%S')}", "group:",
             "  description: particles with cryoFIRE poses (alignments3D) and latent coordinates "
             "(components_mode_K)", f"  name: {name}", f"  title: {title}", "  type: particle", "results:"]
    for prefix in sorted(dset.prefixes()):
        lines += [f"  {prefix}:", f"    metafile: '>{cs_name}'", f"    num_items: {len(dset)}",
                  f"    type: particle.{_slot_type(prefix)}"]
    lines.append(f"version: v{cryosparc.__version__}")
    return "\n".join(lines) + "\n"
