"""Write a `ParticleStack` (poses, latent coordinates) as a cryoSPARC particle `.cs` file.

Two cases:
- the stack came from a .cs (its passthrough is a cryosparc-tools `Dataset`): every input field is
  kept; `alignments3D/pose` (= -rotvec(A)), `alignments3D/shift` (pixels of `alignments3D/psize_A`),
  `alignments3D/psize_A` (the stack's pixel size), `alignments3D/split`/`class` (when the stack has
  them) are set, added when absent; `classes` given to `write_cs` set `alignments3D/class` (0-based)
  and `alignments3D/class_posterior` (1.0) whatever the input held;
- otherwise (a STAR file, a simulation): a new Dataset with `uid`, `blob/*`, `ctf/*` and
  `alignments3D/*`.
The alignments3D and components_mode_K fields are built by `fields.alignment_fields` (shared with the
external job's `apply_predictions`). Latent coordinates `z` `(n, d)` go to `components_mode_K/component` (u4, = K) and
`components_mode_K/value` (f4), K = 0..d-1, the layout cryoSPARC's 3D Variability writes.

uids of a new Dataset: the ids themselves when every id is an integer in [0, 2^64) and they are
unique (a .cs read back); otherwise `uid = int.from_bytes(blake2b(id.encode(), digest_size=8).digest(), "little")`,
so converting the same STAR twice gives the same uids (a repeated id gets `id + "#k"` hashed instead).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
from cryosparc.dataset import Dataset

from cryofire_ext.errors import InputError
from cryofire_ext.particles import ParticleStack
from cryofire_ext.safe_io import atomic_path, check_writable
from integrations.cryosparc.fields import alignment_fields, drop_stale_components, set_fields
from integrations.formats import check_classes

log = logging.getLogger(__name__)



def uids_for_ids(ids: np.ndarray) -> np.ndarray:
    """`(n,)` u8 uids for particle ids: the ids when they are unique integers < 2^64, else their blake2b-64 hashes."""
    ids = np.asarray(ids, dtype=str)  # a str array as it is, not copied
    if len(ids) and all(s.isdigit() for s in ids):
        values = [int(s) for s in ids]
        if max(values) < 2**64 and len(set(values)) == len(values):
            return np.asarray(values, dtype=np.uint64)
    out = np.fromiter((_blake2b_u8(s) for s in ids), dtype=np.uint64, count=len(ids))
    if len(np.unique(out)) == len(out):  # unique hashes: unique ids, each hashed as itself
        return out
    seen: dict[str, int] = {}  # a repeated id gets `id#k` hashed instead (kept off the common path: a key per id)
    for i, s in enumerate(ids):
        k = seen.get(s, 0)
        seen[s] = k + 1
        out[i] = _blake2b_u8(s if k == 0 else f"{s}#{k}")
    if len(np.unique(out)) != len(out):  # 2^-64 per pair: would mean a bug, not bad luck
        raise InputError("particle ids hash to repeated cryoSPARC uids; give the particles unique ids")
    return out


def _blake2b_u8(key: str) -> int:
    """The uid of a particle id `key`: blake2b-64 of its UTF-8 bytes, little-endian."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def _image_refs(stack: ParticleStack) -> tuple[np.ndarray, np.ndarray]:
    """(paths `(n,)` str, 0-based indices `(n,)`) of each particle's image.

    From `stack.image_names` (`N@path`), else the image source's paths, else ids of the `N@path` form.
    Paths of files that exist are made absolute; others are kept as the source wrote them.
    """
    names = stack.image_names
    if names is None and stack.images is not None and hasattr(stack.images, "paths"):
        paths = np.asarray(stack.images.paths).astype(str)
        idx = np.asarray(stack.images.indices, dtype=np.int64)
    else:
        if names is None:
            names = np.asarray(stack.ids, dtype=str)
        # one name at a time into the index and a code per stack: a list of split names, or a str array of
        # their paths, would hold hundreds of bytes per particle
        idx = np.empty(len(names), dtype=np.int64)
        code = np.empty(len(names), dtype=np.int64)
        lookup: dict[str, int] = {}
        for k, s in enumerate(names):
            number, at, path = s.partition("@")
            if not at or not number.strip().isdigit():
                raise InputError(f"particle {k + 1} (1-based; id '{stack.ids[k]}') has no image file reference "
                                 "(expected 'N@path'); a cryoSPARC .cs needs blob/path and blob/idx for every particle.")
            idx[k] = int(number) - 1
            code[k] = lookup.setdefault(str(path), len(lookup))
        unique = np.asarray(list(lookup), dtype=object)
        return _absolute_where_found(unique)[code], idx
    unique, inverse = np.unique(paths, return_inverse=True)
    return _absolute_where_found(unique)[inverse], idx


def _absolute_where_found(paths: np.ndarray) -> np.ndarray:
    """`paths` `(m,)` as an object array, each made absolute when it is a file, else kept as written."""
    return np.asarray([os.path.abspath(p) if os.path.isfile(p) else p for p in paths], dtype=object)


def _new_dataset(stack: ParticleStack) -> Dataset:
    n = len(stack)
    paths, idx = _image_refs(stack)
    ctf = stack.ctf
    cols = [
        ("uid", uids_for_ids(stack.ids)),
        ("blob/path", np.asarray(paths, dtype=object)),
        ("blob/idx", idx.astype(np.uint32)),
        ("blob/shape", np.tile(np.asarray([stack.box, stack.box], dtype=np.uint32), (n, 1))),
        ("blob/psize_A", np.full(n, stack.pixel_size_A, dtype=np.float32)),
        ("ctf/type", np.asarray(["imported"] * n, dtype=object)),
        ("ctf/exp_group_id", np.asarray(stack.optics_group, dtype=np.uint32)),
        ("ctf/accel_kv", ctf.voltage_kv.astype(np.float32)),
        ("ctf/cs_mm", ctf.cs_mm.astype(np.float32)),
        ("ctf/amp_contrast", ctf.amplitude_contrast.astype(np.float32)),
        ("ctf/df1_A", ctf.defocus_u_A.astype(np.float32)),
        ("ctf/df2_A", ctf.defocus_v_A.astype(np.float32)),
        ("ctf/df_angle_rad", ctf.defocus_angle_rad.astype(np.float32)),
        ("ctf/phase_shift_rad", ctf.phase_shift_rad.astype(np.float32)),
        ("ctf/scale", ctf.scale.astype(np.float32)),
        ("ctf/bfactor", ctf.bfactor_A2.astype(np.float32)),
    ]
    return Dataset(cols) if n else Dataset.allocate(0, [(name, _dtype_of(v)) for name, v in cols])


def _dtype_of(v: np.ndarray):
    v = np.asarray(v)
    return ("O" if v.dtype == object else v.dtype.str) if v.ndim == 1 else (v.dtype.str, v.shape[1:])


def dataset_from_stack(stack: ParticleStack, z: np.ndarray | None = None, classes: np.ndarray | None = None,
                       confidences: dict | None = None) -> Dataset:
    """The cryoSPARC `Dataset` that `write_cs` saves for `stack` (latent coordinates `z` `(n, d)`, 0-based
    `classes` `(n,)`, `confidences` as `write_cs`'s).

    Pure: builds the table only. A Dataset passthrough is copied (rows in `stack.source_rows`
    order), never modified. The alignments3D and components_mode_K fields come from `fields.alignment_fields`.
    """
    n = len(stack)
    posed = stack.A is not None and n > 0
    posterior = None
    if classes is not None:  # the caller's classes (a refinement's): replace the input's
        classes, posterior = check_classes(classes, n, "alignments3D/class"), 1.0
    elif posed:
        classes = stack.class_id  # the stack's own classes, beside its poses (None: the input's are kept)
    if isinstance(stack.passthrough, Dataset):
        dset = stack.passthrough.take(np.asarray(stack.source_rows, dtype=np.int64))
    else:
        dset = _new_dataset(stack)
    fields = alignment_fields(n, A=stack.A if posed else None, shifts_A=stack.shifts_A,
                              psize_A=float(stack.pixel_size_A), split=stack.subset if posed else None,
                              classes=classes, class_posterior=posterior, z=z, confidences=confidences)
    if z is not None:
        drop_stale_components(dset, np.shape(z)[1])
    return set_fields(dset, fields)


def write_cs(stack: ParticleStack, path, z: np.ndarray | None = None, force: bool = False,
             classes: np.ndarray | None = None, confidences: dict | None = None) -> Path:
    """Save `stack` (poses, and `z` `(n, d)` when given) as a cryoSPARC `.cs` file; returns the path.

    `classes` `(n,)` 0-based: written as `alignments3D/class` (replacing any input value) with
    `alignments3D/class_posterior` 1.0 (the `confidences` "class_probability" when given); None: the stack's own
    `class_id` (when it has poses), or the input's. `confidences` {"pose_confidence": `(n,)` in [0, 1], ...}: our
    per-particle confidences as `CONFIDENCE_FIELDS`.
    InputError when `classes` are not n whole numbers >= 0.
    Refuses to overwrite unless `force`; writes to a temporary name beside `path`, then renames.
    """
    path = check_writable(path, force)
    dset = dataset_from_stack(stack, z, classes=classes, confidences=confidences)
    with atomic_path(path, force=force) as tmp:
        with open(tmp, "wb") as fh:
            dset.save(fh)
    log.info("wrote %d particles to %s", len(dset), path)
    return path
