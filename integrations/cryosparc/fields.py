"""The one owner of the cryoSPARC fields cryoFIRE writes: `alignments3D/*` and `components_mode_K/*`.

Both .cs paths use it: `export.write_cs` / `dataset_from_stack` (a ParticleStack -> .cs) and
`predictions.apply_predictions` / the external job (a run's Predictions into a cryoSPARC particle
Dataset matched on uid). Conventions (../shared/CONVENTIONS.md):
- `alignments3D/pose` `(n, 3)` f4: axis-angle in radians, `pose = -rotvec(A)` (A left-multiplies xyz
  column vectors, RELION's matrix);
- `alignments3D/shift` `(n, 2)` f4: `(x, y)` with RELION's origin sign, in pixels of
  `alignments3D/psize_A` (f4, Angstrom);
- `alignments3D/split` u4 (half set 0/1), `alignments3D/class` u4 (0-based),
  `alignments3D/class_posterior` f4;
- `components_mode_K/component` u4 = K and `components_mode_K/value` f4 = z_K, K = 0..d-1 (the layout
  of cryoSPARC's 3D Variability).
"""

from __future__ import annotations

import re

import numpy as np
from cryosparc.dataset import Dataset

from cryofire_ext.errors import InputError
from cryofire_ext.poses import matrix_to_cryosparc_pose
from integrations.formats import check_confidence

COMPONENT_FIELD = re.compile(r"^components_mode_(\d+)/")


#: our per-particle confidences (`results.CONFIDENCES`) as .cs fields; the class probability is cryoSPARC's own
#: class posterior
CONFIDENCE_FIELDS = {"pose_confidence": "cryofire/pose_confidence", "class_probability": "alignments3D/class_posterior"}


def alignment_fields(n: int, *, A: np.ndarray | None = None, shifts_A: np.ndarray | None = None,
                     psize_A: np.ndarray | float | None = None, split: np.ndarray | None = None,
                     classes: np.ndarray | None = None, class_posterior: np.ndarray | float | None = None,
                     z: np.ndarray | None = None, confidences: dict | None = None) -> dict[str, np.ndarray]:
    """Field name -> values `(n, ...)` in cryoSPARC's dtypes, for `n` particles; only what is given.

    `A` `(n, 3, 3)` with `shifts_A` `(n, 2)` (Angstrom; zeros when None) and `psize_A` (scalar or `(n,)`,
    Angstrom, > 0): pose, shift and psize_A. `split` `(n,)` 0/1; `classes` `(n,)` 0-based (checked by the
    caller); `class_posterior` scalar or `(n,)`; `z` `(n, d)`: components_mode_0..d-1; `confidences` {name of
    `results.CONFIDENCES`: `(n,)` in [0, 1]}: `CONFIDENCE_FIELDS` (the class probability replaces
    `class_posterior`).
    """
    out: dict[str, np.ndarray] = {}
    if A is not None:
        psize = np.broadcast_to(np.asarray(psize_A, dtype=np.float64), (n,))
        if not np.all(psize > 0):
            raise InputError("a non-positive pixel size for alignments3D/psize_A; cannot express shifts in pixels")
        shifts = np.zeros((n, 2)) if shifts_A is None else np.asarray(shifts_A, dtype=np.float64)
        out["alignments3D/pose"] = matrix_to_cryosparc_pose(np.asarray(A)).astype(np.float32).reshape(n, 3)
        out["alignments3D/shift"] = (shifts / psize[:, None]).astype(np.float32)
        out["alignments3D/psize_A"] = psize.astype(np.float32)
    if split is not None:
        out["alignments3D/split"] = np.asarray(split).astype(np.uint32)
    if class_posterior is not None:
        out["alignments3D/class_posterior"] = np.broadcast_to(np.asarray(class_posterior, np.float32), (n,)).copy()
    if classes is not None:
        out["alignments3D/class"] = np.asarray(classes).astype(np.uint32)
    if z is not None:
        z = np.asarray(z, dtype=np.float32)
        if z.ndim != 2 or z.shape[0] != n:
            raise InputError(f"latent coordinates have shape {z.shape}; expected ({n}, d), one row per particle")
        for k in range(z.shape[1]):
            out[f"components_mode_{k}/component"] = np.full(n, k, dtype=np.uint32)
            out[f"components_mode_{k}/value"] = z[:, k]
    for name, values in (confidences or {}).items():
        out[CONFIDENCE_FIELDS[name]] = check_confidence(values, n, CONFIDENCE_FIELDS[name])
    return out


def field_spec(values: np.ndarray):
    """The Dataset field dtype of `values` `(n, ...)`: "<u4", or ("<f4", (3,)) for per-row vectors."""
    values = np.asarray(values)
    return values.dtype.str if values.ndim == 1 else (values.dtype.str, values.shape[1:])


def drop_stale_components(dset: Dataset, d: int) -> None:
    """Remove `components_mode_K/*` with K >= d (left from an earlier latent space) from `dset`, in place."""
    stale = [f for f in dset.fields() if (m := COMPONENT_FIELD.match(f)) and int(m.group(1)) >= d]
    if stale:
        dset.drop_fields(stale)


def set_fields(dset: Dataset, fields: dict[str, np.ndarray], rows: np.ndarray | None = None) -> Dataset:
    """Write `fields` (from `alignment_fields`) into `dset` in place, adding the fields it lacks; `rows` `(m,)`:
    the rows the values belong to (default: all). Returns `dset`."""
    missing = [name for name in fields if name not in dset.fields()]
    if missing:
        dset.add_fields(missing, [field_spec(fields[name]) for name in missing])
    for name, values in fields.items():
        if rows is None:
            dset[name] = values
        else:
            column = dset[name]
            column[rows] = values
    return dset
