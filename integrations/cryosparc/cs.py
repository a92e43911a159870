"""Read cryoSPARC particle `.cs` files into a `ParticleStack`, through cryosparc-tools' `Dataset`.

Field meanings (checked on real files, see ../shared/CONVENTIONS.md):
- `blob/path` project-relative (exported jobs prefix it with `>`), `blob/idx` 0-based,
  `blob/shape` `[ny, nx]`, `blob/psize_A` the images' pixel size.
- `ctf/df1_A` = defocus U, `ctf/df2_A` = V (Angstrom, positive underfocus), `ctf/df_angle_rad`
  (no sign change), `ctf/exp_group_id` 0-based optics group.
- `alignments3D/pose` axis-angle (radians) with `A = Rodrigues(pose)^T`; `alignments3D/shift`
  `(x, y)` with RELION's origin sign, in pixels of `alignments3D/psize_A`; `split` 0/1; `class` 0-based.
- `alignments2D/pose` one in-plane angle theta (radians). We read it as the 3D pose `(0, 0, theta)`,
  i.e. `A = Rz(theta)^T`, which is RELION's `rlnAnglePsi = degrees(theta)` with rot = tilt = 0
  (pyem's csparc2star makes the same choice); `alignments2D/shift` as the 3D shift.
  Not checked on images (no 2D-classified stack among the fixtures).
- Heterogeneous refinement (cryoSPARC <= 4.4) without alignments3D: `alignments_class_K/*`, the
  pose of each particle's most probable class (`class_posterior`), class_id = K. The v4.5+
  `alignments3D_multi` slot is not read.
- A job's output is often two files, its own slots and `<job>_passthrough_<output>.cs`; they are
  joined on `uid` (the main file's fields win where both have one).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
from cryosparc.dataset import Dataset

from cryofire_ext.ctf import CTFParams, check_ctf_values, check_pixel_size
from cryofire_ext.errors import InputError, MissingImagesError, brief
from cryofire_ext.images import MrcImages
from cryofire_ext.particles import ParticleStack
from cryofire_ext.poses import cryosparc_pose_to_matrix

log = logging.getLogger(__name__)

BLOB_FIELDS = ("blob/path", "blob/idx", "blob/shape", "blob/psize_A")
CTF_REQUIRED = ("ctf/df1_A", "ctf/df2_A", "ctf/df_angle_rad", "ctf/accel_kv", "ctf/cs_mm", "ctf/amp_contrast")
# Placeholders for a zero-row file, which has no pixel size or box to report.
EMPTY_PIXEL_SIZE_A = 1.0
EMPTY_BOX = 0  # unknown (the contract allows 0 for metadata-only stacks)


def load_dataset(path: str | os.PathLike) -> Dataset:
    """`Dataset.load` with an InputError naming the file when it is missing or not a .cs table."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: cryoSPARC .cs file not found")
    try:
        return Dataset.load(str(path))
    except Exception as exc:  # numpy/cryosparc raise many kinds for a bad file
        raise InputError(f"{path}: not a readable cryoSPARC .cs file ({brief(exc)})") from None


_JOB_FILE = re.compile(r"^(?:cryosparc_)?(?:(P\d+)_)?(J\d+)_(?:\d+_)?(.+)\.cs$")


def find_passthrough(path: str | os.PathLike) -> Path | None:
    """The `*_passthrough_*.cs` file cryoSPARC wrote beside `path` for the same output, or None.

    cryoSPARC names a job's outputs `[cryosparc_][P<p>_]J<j>_[<iter>_]<output>.cs` (e.g.
    `J24_020_particles.cs`, `cryosparc_P12_J24_001_particles.cs`, `particles_selected.cs`) and the
    inherited slots `[cryosparc_][P<p>_]J<j>_passthrough_<output>.cs`. We look in the same folder
    for that name (job from the file name, else from the folder name `J<j>`), else for a single
    `*_passthrough_<output>.cs`.
    """
    path = Path(path)
    if "_passthrough_" in path.name:
        return None
    m = _JOB_FILE.match(path.name)
    if m:
        job, output = m.group(2), m.group(3)
    else:
        job = path.parent.name if re.fullmatch(r"J\d+", path.parent.name) else None
        output = path.stem
    candidates = sorted(path.parent.glob(f"*_passthrough_{output}.cs"))
    if job is not None:
        named = [c for c in candidates if re.match(rf"^(?:cryosparc_)?(?:P\d+_)?{job}_passthrough_", c.name)]
        if named:
            candidates = named
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1:
        log.warning("%s: several passthrough files could belong to it (%s); joining none. Pass one explicitly.",
                    path, ", ".join(c.name for c in candidates))
    return None


def join_passthrough(main: Dataset, passthrough: Dataset, main_path, passthrough_path) -> Dataset:
    """`main` with the fields only `passthrough` has, matched on `uid`, in `main`'s row order."""
    extra = [d for d in passthrough.descr() if d[0] not in set(main.fields())]
    if not extra:
        return main
    main_uid = np.asarray(main["uid"])
    pt_uid = np.asarray(passthrough["uid"])
    order = np.argsort(pt_uid, kind="stable")
    if len(pt_uid):
        pos = np.minimum(np.searchsorted(pt_uid[order], main_uid), len(pt_uid) - 1)
        found = pt_uid[order][pos] == main_uid
    else:
        pos, found = np.zeros(len(main_uid), dtype=np.int64), np.zeros(len(main_uid), dtype=bool)
    if not np.all(found):
        bad = int(np.nonzero(~found)[0][0])
        raise InputError(
            f"{passthrough_path}: the passthrough file lacks {int((~found).sum())} of the {len(main_uid)} particles of "
            f"{main_path} (first: row {bad + 1}, uid {main_uid[bad]}); the two files must come from the same cryoSPARC "
            "job output. Pass the matching passthrough file or none.")
    rows = order[pos]
    out = main.copy()
    out.add_fields(extra)
    for name, *_ in extra:
        out[name] = np.asarray(passthrough[name])[rows]
    return out


def _resolve(raw: str, datadir, cs_dir: Path) -> tuple[str | None, list[Path]]:
    """Find a blob path: absolute as is; else under datadir, then the .cs folder and each parent."""
    p = Path(raw)
    if p.is_absolute():
        tried = [p]
    else:
        roots = ([Path(datadir)] if datadir is not None else []) + [cs_dir, *cs_dir.parents]
        tried = [root / p for root in roots]
    for t in tried:
        if t.is_file():
            return os.path.abspath(t), tried
    return None, tried


#: What cryoSPARC stores in the fields we read (named in the error when a file holds something else).
FIELD_DTYPES = {"uid": "uint64", "blob/idx": "uint32", "blob/shape": "uint32 (2 values)", "blob/psize_A": "float32",
                "ctf/exp_group_id": "uint32", "alignments3D/split": "uint32", "alignments3D/class": "uint32"}
_KIND_WORDS = {"S": "bytes (text)", "U": "text", "O": "Python objects (text)", "V": "raw records", "M": "dates",
               "m": "time spans", "c": "complex numbers"}


def numeric_field(dset: Dataset, name: str, source, dtype=np.float64) -> np.ndarray:
    """Field `name` as a `dtype` array; InputError naming the field when it holds text/bytes (expected
    dtype said) or, for floats, a value that is not finite (row 1-based)."""
    raw = np.asarray(dset[name])
    if raw.dtype.kind not in "biuf":
        expected = FIELD_DTYPES.get(name, "float32")
        raise InputError(f"{source}: field {name} holds {_KIND_WORDS.get(raw.dtype.kind, str(raw.dtype))} "
                         f"(dtype {raw.dtype.str}); expected numbers ({expected}). Re-export the particles from "
                         "cryoSPARC or repair the field.")
    if raw.dtype.kind == "f":
        finite = np.isfinite(raw).reshape(len(raw), -1).all(axis=1) if len(raw) else np.ones(0, bool)
        if not finite.all():
            row = int(np.flatnonzero(~finite)[0])
            raise InputError(f"{source}: row {row + 1} field {name} = {_show(raw[row])}; expected a finite number")
    return raw.astype(dtype)


def _show(value) -> str:
    """A value as plain text (no numpy reprs such as np.float32(...))."""
    value = np.asarray(value)
    return str(value.tolist()) if value.ndim else f"{value.item()!s}"


def _single_value(values: np.ndarray, what: str, path, rtol: float = 1e-4) -> float:
    values = np.asarray(values, dtype=np.float64)
    lo, hi = float(values.min()), float(values.max())
    if not np.isclose(lo, hi, rtol=rtol):
        raise InputError(f"{path}: field {what} holds several values ({lo:g} to {hi:g}); one stack must share one "
                         "value. Split the particles by it (e.g. in cryoSPARC) and convert each part.")
    return float(np.median(values))


def _slot_poses(dset: Dataset, slot: str, blob_psize_A: float, source="<dataset>"):
    """(A, shifts_A, subset, class_id) of one alignment slot (2D slots: in-plane angle about z)."""
    fields = set(dset.fields())
    pose = numeric_field(dset, f"{slot}/pose", source)
    if slot == "alignments2D":
        pose = np.stack([np.zeros_like(pose), np.zeros_like(pose), pose.reshape(-1)], axis=1)
    A = cryosparc_pose_to_matrix(pose)
    psize = (numeric_field(dset, f"{slot}/psize_A", source) if f"{slot}/psize_A" in fields
             else np.full(len(dset), blob_psize_A))
    if f"{slot}/psize_A" in fields:
        check_pixel_size(psize, lambda i: f"{source}: row {i + 1} field {slot}/psize_A = {_show(psize[i])}")
    if f"{slot}/shift" in fields:
        shifts_A = numeric_field(dset, f"{slot}/shift", source).reshape(-1, 2) * psize[:, None]
    else:
        shifts_A = np.zeros((len(dset), 2))
    subset = numeric_field(dset, f"{slot}/split", source, np.int64) if f"{slot}/split" in fields else None
    class_id = numeric_field(dset, f"{slot}/class", source, np.int64) if f"{slot}/class" in fields else None
    return A, shifts_A, subset, class_id


def _poses(dset: Dataset, path, blob_psize_A: float):
    """(A, shifts_A, subset, class_id) from alignments3D; else, for a heterogeneous refinement
    (`alignments_class_K/*`, cryoSPARC <= 4.4), each particle's most probable class K (by
    `class_posterior`), class_id = K; else alignments2D; else Nones."""
    fields = set(dset.fields())
    if "alignments3D/pose" in fields:
        return _slot_poses(dset, "alignments3D", blob_psize_A, path)
    classes = sorted(int(m.group(1)) for f in fields if (m := re.fullmatch(r"alignments_class_(\d+)/pose", f)))
    if classes and all(f"alignments_class_{k}/class_posterior" in fields for k in classes):
        per_class = [_slot_poses(dset, f"alignments_class_{k}", blob_psize_A, path) for k in classes]
        post = np.stack([numeric_field(dset, f"alignments_class_{k}/class_posterior", path) for k in classes])
        best = np.argmax(post, axis=0)
        rows = np.arange(len(dset))
        A = np.stack([p[0] for p in per_class])[best, rows]
        shifts_A = np.stack([p[1] for p in per_class])[best, rows]
        subset = per_class[0][2]
        log.info("%s: poses of each particle's most probable class among alignments_class_%d..%d",
                 path, classes[0], classes[-1])
        return A, shifts_A, subset, np.asarray(classes, dtype=np.int64)[best]
    if "alignments2D/pose" in fields:
        return _slot_poses(dset, "alignments2D", blob_psize_A, path)
    return None, None, None, None


def _ctf(dset: Dataset, path) -> CTFParams:
    fields = set(dset.fields())
    missing = [f for f in CTF_REQUIRED if f not in fields]
    if missing:
        raise InputError(f"{path}: no CTF fields {', '.join(missing)}. Particles need the ctf slot; if this is a job "
                         "output, pass the job's *_passthrough_*.cs file beside it (passthrough=...).")
    n = len(dset)

    def get(name, default):
        return numeric_field(dset, name, path) if name in fields else np.full(n, default)

    ctf = CTFParams(defocus_u_A=get("ctf/df1_A", 0), defocus_v_A=get("ctf/df2_A", 0),
                     defocus_angle_rad=get("ctf/df_angle_rad", 0), voltage_kv=get("ctf/accel_kv", 0),
                     cs_mm=get("ctf/cs_mm", 0), amplitude_contrast=get("ctf/amp_contrast", 0),
                     phase_shift_rad=get("ctf/phase_shift_rad", 0.0), bfactor_A2=get("ctf/bfactor", 0.0),
                     scale=get("ctf/scale", 1.0))
    names = {"defocus_u_A": "ctf/df1_A", "defocus_v_A": "ctf/df2_A", "defocus_angle_rad": "ctf/df_angle_rad",
             "voltage_kv": "ctf/accel_kv", "cs_mm": "ctf/cs_mm", "amplitude_contrast": "ctf/amp_contrast",
             "phase_shift_rad": "ctf/phase_shift_rad", "bfactor_A2": "ctf/bfactor", "scale": "ctf/scale"}
    check_ctf_values(ctf, lambda name, i: f"{path}: row {i + 1} field {names[name]} = "
                                          f"{_show(dset[names[name]][i])}")
    return ctf


def stack_from_dataset(dset: Dataset, datadir=None, require_images: bool = False,
                       source: str = "<dataset>") -> ParticleStack:
    """A `ParticleStack` from a cryoSPARC particle `Dataset` (already joined with its passthrough).

    `source` names the file in messages and is where relative `blob/path`s are looked up
    (its folder and parents, after `datadir`). The Dataset becomes `stack.passthrough`.
    """
    n = len(dset)
    fields = set(dset.fields())
    src = Path(source)
    if n == 0:
        log.info("%s: zero particles", source)
        return ParticleStack(ids=np.zeros(0, dtype=str), pixel_size_A=EMPTY_PIXEL_SIZE_A, box=EMPTY_BOX,
                             ctf=CTFParams.constant(0), passthrough=dset, image_names=np.zeros(0, dtype=str))
    missing = [f for f in BLOB_FIELDS if f not in fields]
    if missing:
        raise InputError(f"{source}: no particle image fields {', '.join(missing)} (the blob slot). A particle .cs "
                         "must say where each image is; if this is a job output, pass its *_passthrough_*.cs file "
                         "(passthrough=...) or export the particles from cryoSPARC.")
    shape = numeric_field(dset, "blob/shape", source, np.int64).reshape(n, -1)
    if np.any(shape[:, 0] != shape[:, -1]) or np.any(shape != shape[0]):
        bad = int(np.nonzero(np.any(shape != shape[0], axis=1) | (shape[:, 0] != shape[:, -1]))[0][0])
        raise InputError(f"{source}: row {bad + 1} field blob/shape is {shape[bad].tolist()} but row 1 has "
                         f"{shape[0].tolist()}; all particles must share one square box size.")
    box = int(shape[0, 0])
    psize = numeric_field(dset, "blob/psize_A", source)
    check_pixel_size(psize, lambda i: f"{source}: row {i + 1} field blob/psize_A = {_show(psize[i])}")
    pixel_size_A = _single_value(psize, "blob/psize_A", source)

    raw_paths = np.asarray([str(p) for p in dset["blob/path"]], dtype=object)
    raw_paths = np.asarray([p[1:] if p.startswith(">") else p for p in raw_paths], dtype=object)
    idx = numeric_field(dset, "blob/idx", source, np.int64)
    unique, inverse = np.unique(raw_paths.astype(str), return_inverse=True)
    resolved, missing_stacks, tried_first = [], [], None
    for raw in unique:
        found, tried = _resolve(raw, datadir, src.parent)
        resolved.append(found)
        if found is None:
            missing_stacks.append(raw)
            tried_first = tried_first or (raw, tried)
    names_paths = np.asarray([r if r is not None else u for r, u in zip(resolved, unique)], dtype=object)[inverse]
    images = image_names = None  # with the stacks found, the image source names each image (paths, indices)
    if missing_stacks:
        image_names = np.asarray([f"{i + 1}@{p}" for i, p in zip(idx, names_paths)])
        raw, tried = tried_first
        where = (f"{tried[0]}" if len(tried) == 1 else
                 f"{', '.join(str(t) for t in tried[:2])}" + (f" and {len(tried) - 2} more up to {tried[-1]}"
                                                              if len(tried) > 2 else ""))
        msg = (f"{source}: {len(missing_stacks)} of {len(unique)} particle stacks not found (first: blob/path "
               f"'{raw}', tried {where})")
        if require_images:
            raise MissingImagesError(msg + ". Pass --datadir with the cryoSPARC project folder that holds them.")
        log.warning("%s; reading metadata only.", msg)
    else:
        images = MrcImages(names_paths, idx)
        if images.box != box:
            raise InputError(f"{source}: field blob/shape says {box} px but the stack {unique[0]} holds "
                             f"{images.box} px images.")

    A, shifts_A, subset, class_id = _poses(dset, source, pixel_size_A)
    optics = (numeric_field(dset, "ctf/exp_group_id", source, np.int64) if "ctf/exp_group_id" in fields
              else np.zeros(n, dtype=np.int64))
    return ParticleStack(ids=numeric_field(dset, "uid", source, np.uint64).astype(str), pixel_size_A=pixel_size_A,
                         box=box, ctf=_ctf(dset, source), images=images, A=A, shifts_A=shifts_A, class_id=class_id,
                         subset=subset, optics_group=optics, source_rows=np.arange(n), passthrough=dset,
                         missing_stacks=missing_stacks, image_names=image_names)


def read_cs(path, datadir=None, require_images: bool = False, passthrough=None) -> ParticleStack:
    """Read a cryoSPARC particle `.cs` file (optionally joined with its passthrough file) into a `ParticleStack`.

    path: the .cs file. datadir: the cryoSPARC project folder `blob/path`s are relative to (tried first;
    then the .cs folder and its parents). passthrough: the job's `*_passthrough_*.cs`; when None, one
    named like cryoSPARC names it is looked for beside `path`.
    Missing stacks: `images` None and `missing_stacks` listed (a warning), or an InputError when
    `require_images`. ids are the uids as text; `passthrough` is the joined `Dataset`.
    """
    path = Path(path)
    dset = load_dataset(path)
    pt_path = Path(passthrough) if passthrough is not None else find_passthrough(path)
    if pt_path is not None:
        log.info("%s: joining passthrough %s on uid", path, pt_path)
        dset = join_passthrough(dset, load_dataset(pt_path), path, pt_path)
    return stack_from_dataset(dset, datadir=datadir, require_images=require_images, source=str(path))


def read_latents(path) -> np.ndarray:
    """Latent coordinates `(n, d)` float32 from `components_mode_K/value`, K = 0..d-1 (cryoSPARC 3DVA layout)."""
    dset = load_dataset(path)
    cols = []
    while f"components_mode_{len(cols)}/value" in dset.fields():
        cols.append(numeric_field(dset, f"components_mode_{len(cols)}/value", path, np.float32))
    if not cols:
        raise InputError(f"{path}: no components_mode_0/value field; the file holds no latent coordinates.")
    return np.stack(cols, axis=1)
