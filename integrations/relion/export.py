"""Write a `ParticleStack` as a RELION 3.1 particle STAR file.

Layout: `# version 30001`, `data_optics` then `data_particles`. Written by us:
rlnAngleRot/Tilt/Psi from `stack.A`, rlnOriginXAngst/YAngst from `stack.shifts_A`
(pixel rlnOriginX/Y are dropped: RELION 3.1+ ignores them beside an optics
table), rlnClassNumber (1-based: `classes` + 1 when given, else the stack's
class_id) and rlnRandomSubset (1/2) when the stack has them, and latent
coordinates as `cryofireZ1..cryofireZd`. Every other column of a stack read
by `read_star` is kept as read, CTF columns included (a 3.0 file's per-particle
optics columns move to the optics table; an optics table without
rlnImageSize/rlnImageDimensionality/rlnImagePixelSize gets them). A stack from elsewhere (cryoSPARC) gets an
optics table built from it: one group per (optics group, voltage, Cs, amplitude
contrast).

Image names: a name read from a STAR file is kept when, from the output STAR's
folder, it resolves (same rules as reading: the folder, then its parents) to the
same stack it came from; otherwise it is rewritten as `NNNNNN@/absolute/path`, so
RELION finds the images from any working directory. Names of stacks that were
not found on reading are kept as they were. RELION refuses `N@x.mrc` (".mrc is reserved for 3D
maps"), so names of `.mrc` stacks get RELION's type override: `N@x.mrc:mrcs`.

Floats are written as RELION does (`%.6f`, or `%.6e` below 1e-3 and above 1e5; latents `%.9e`);
integer columns stay integers. Writes are atomic and refuse to overwrite unless
`force`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
from starfile.writer import StarWriter

from cryofire_ext import __version__
from cryofire_ext.errors import InputError
from cryofire_ext.particles import ParticleStack
from cryofire_ext.poses import matrix_to_relion_euler
from cryofire_ext.safe_io import atomic_path
from integrations.formats import check_classes, check_confidence
from integrations.relion.paths import relion_stack_name, resolve_stack, split_image_names
from integrations.relion.star import LATENT_LABEL, RelionTables

log = logging.getLogger(__name__)

STAR_VERSION = "30001"
#: our per-particle confidences (`Predictions.CONFIDENCES`) as STAR columns
CONFIDENCE_LABELS = {"pose_confidence": "cryofirePoseConfidence", "class_probability": "cryofireClassProbability"}
# per-particle columns of a 3.0 file that live in the optics table in 3.1
OPTICS_LEVEL_LABELS = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnMagnification",
                       "rlnDetectorPixelSize", "rlnImagePixelSize", "rlnImageSize", "rlnImageDimensionality")
PIXEL_ORIGIN_LABELS = ("rlnOriginX", "rlnOriginY")
#: rows formatted and written at a time: the text of a whole table (a Python string per value, then the joined
#: lines) would hold about a kilobyte per particle at once
STAR_CHUNK_ROWS = 10_000


def _build_optics(stack: ParticleStack, pixel_each: np.ndarray | None) -> tuple[pd.DataFrame, np.ndarray]:
    """An optics table from the stack: one group per (optics group, voltage, Cs, amplitude contrast, pixel size).

    Returns (table, 1-based group number of each particle `(n,)`).
    """
    n = len(stack)
    pixel = pixel_each if pixel_each is not None else np.full(n, stack.pixel_size_A)
    pixel = np.where(np.isfinite(pixel), pixel, stack.pixel_size_A)
    keys = pd.DataFrame({"g": np.asarray(stack.optics_group), "kv": stack.ctf.voltage_kv, "cs": stack.ctf.cs_mm,
                         "q0": stack.ctf.amplitude_contrast, "px": np.round(pixel, 6)})
    codes, uniq = pd.factorize(pd.MultiIndex.from_frame(keys), sort=True)
    first = np.array([np.flatnonzero(codes == k)[0] for k in range(len(uniq))], dtype=np.int64)
    optics = pd.DataFrame({
        "rlnOpticsGroup": np.arange(1, len(uniq) + 1, dtype=np.int64),
        "rlnOpticsGroupName": [f"opticsGroup{k}" for k in range(1, len(uniq) + 1)],
        "rlnVoltage": stack.ctf.voltage_kv[first],
        "rlnSphericalAberration": stack.ctf.cs_mm[first],
        "rlnAmplitudeContrast": stack.ctf.amplitude_contrast[first],
        "rlnImagePixelSize": pixel[first],
    })
    if stack.box > 0:
        optics["rlnImageSize"] = np.full(len(uniq), stack.box, dtype=np.int64)
    else:
        log.warning("box size unknown: writing no rlnImageSize (RELION needs it; it reads it from the images only "
                    "when converting older files)")
    optics["rlnImageDimensionality"] = np.full(len(uniq), 2, dtype=np.int64)
    return optics, codes.astype(np.int64) + 1


def _complete_optics(optics: pd.DataFrame, stack: ParticleStack) -> pd.DataFrame:
    """A copy of a read optics table with the labels RELION 3.1 needs added when missing."""
    optics = optics.copy()
    if "rlnImagePixelSize" not in optics.columns:
        if {"rlnDetectorPixelSize", "rlnMagnification"} <= set(optics.columns):
            optics["rlnImagePixelSize"] = 1e4 * pd.to_numeric(optics["rlnDetectorPixelSize"]) / pd.to_numeric(
                optics["rlnMagnification"])
        else:
            optics["rlnImagePixelSize"] = float(stack.pixel_size_A)
    if "rlnImageSize" not in optics.columns and stack.box > 0:
        optics["rlnImageSize"] = np.full(len(optics), stack.box, dtype=np.int64)
    if "rlnImageDimensionality" not in optics.columns:
        optics["rlnImageDimensionality"] = np.full(len(optics), 2, dtype=np.int64)
    return optics


def _fill_missing_optics_values(optics: pd.DataFrame, stack: ParticleStack, group_of: np.ndarray) -> pd.DataFrame:
    """Voltage, Cs and amplitude contrast for groups whose table lacks them (from the stack's CTF)."""
    for label, values in (("rlnVoltage", stack.ctf.voltage_kv), ("rlnSphericalAberration", stack.ctf.cs_mm),
                          ("rlnAmplitudeContrast", stack.ctf.amplitude_contrast)):
        if label not in optics.columns:
            groups = pd.to_numeric(optics["rlnOpticsGroup"]).to_numpy()
            col = np.full(len(optics), float(values[0]) if len(values) else 0.0)
            for i, g in enumerate(groups):
                sel = np.flatnonzero(group_of == g)
                if len(sel):
                    col[i] = values[sel[0]]
            optics[label] = col
    return optics


def _image_names_from_tables(tables: RelionTables, names: np.ndarray, out_dir: Path) -> np.ndarray:
    """Names as read, rewritten to absolute paths where they would not resolve from `out_dir` to the same stack."""
    number, stacks = split_image_names(names, tables.star_path)
    stack_of, stack_names = pd.factorize(stacks)
    out = names.astype(object).copy()
    for k, stack_name in enumerate(stack_names):
        src = tables.stack_files.get(stack_name)
        if src is None:
            continue  # not found on reading: keep the name as it was
        there, _ = resolve_stack(stack_name, out_dir)
        if there is not None and os.path.samefile(there, src):
            continue
        sel = np.flatnonzero(stack_of == k)
        out[sel] = [f"{k:06d}@{relion_stack_name(src)}" for k in number[sel]]
    return _with_type_override(out)


def _with_type_override(names: np.ndarray) -> np.ndarray:
    """Names whose stack ends in `.mrc` get RELION's `:mrcs` override (else RELION refuses them); names as
    str in an object array (one name at a time: a str table of all of them would be a second copy of the column)."""
    names = np.asarray(names, dtype=object)
    out = np.empty(len(names), dtype=object)
    for i, name in enumerate(names):
        name = str(name)
        out[i] = f"{name}:mrcs" if name.lower().endswith(".mrc") else name
    return out


def _image_names_foreign(stack: ParticleStack) -> np.ndarray:
    """rlnImageName for a stack read from another format."""
    if stack.images is not None and hasattr(stack.images, "paths") and hasattr(stack.images, "indices"):
        return _with_type_override([f"{k + 1:06d}@{os.path.abspath(p)}"
                                    for p, k in zip(stack.images.paths, stack.images.indices)])
    names = stack.image_names
    if names is not None and len(names) == len(stack) and all("@" in str(x) for x in names):
        return _with_type_override(names)
    if all("@" in str(x) for x in stack.ids):
        return _with_type_override(stack.ids)
    raise InputError("cannot write rlnImageName: the particles have no image stack (images were not found) and their "
                     f"ids (e.g. '{stack.ids[0] if len(stack) else ''}') are not 'N@stack.mrcs' names. Read them with "
                     "--datadir so their stacks are found.")


def star_tables(stack: ParticleStack, out_path, z: np.ndarray | None = None, classes: np.ndarray | None = None,
                confidences: dict | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(optics, particles) tables of the RELION 3.1 file that `write_star` writes for `stack` at `out_path`."""
    n = len(stack)
    if classes is not None:
        classes = check_classes(classes, n, "rlnClassNumber (= class + 1)")
    elif stack.class_id is not None:
        classes = stack.class_id
    out_dir = Path(os.path.abspath(Path(out_path).parent))
    tables = stack.passthrough if isinstance(stack.passthrough, RelionTables) else None
    if tables is not None:
        rows = np.asarray(stack.source_rows, dtype=np.int64)
        particles = tables.particles.iloc[rows].reset_index(drop=True)  # a new table: the read one is not changed
        if tables.optics is not None:
            group_of = pd.to_numeric(particles["rlnOpticsGroup"]).to_numpy().astype(np.int64)
            particles["rlnOpticsGroup"] = group_of
            optics = _fill_missing_optics_values(_complete_optics(tables.optics, stack), stack, group_of)
        else:
            optics, group_of = _build_optics(stack, tables.pixel_size_A[rows])
            particles = particles.drop(columns=[c for c in OPTICS_LEVEL_LABELS if c in particles.columns])
            particles["rlnOpticsGroup"] = group_of
        particles["rlnImageName"] = _image_names_from_tables(tables, particles["rlnImageName"].astype(str).to_numpy(),
                                                             out_dir)
    else:
        optics, group_of = _build_optics(stack, None)
        c = stack.ctf
        particles = pd.DataFrame({
            "rlnImageName": _image_names_foreign(stack),
            "rlnOpticsGroup": group_of,
            "rlnDefocusU": c.defocus_u_A, "rlnDefocusV": c.defocus_v_A,
            "rlnDefocusAngle": np.rad2deg(c.defocus_angle_rad), "rlnPhaseShift": np.rad2deg(c.phase_shift_rad),
            "rlnCtfBfactor": c.bfactor_A2, "rlnCtfScalefactor": c.scale,
        })
    if stack.A is not None:
        euler = matrix_to_relion_euler(stack.A) if n else np.zeros((0, 3))
        for i, label in enumerate(("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")):
            particles[label] = euler[:, i]
    if stack.shifts_A is not None:
        particles["rlnOriginXAngst"] = np.asarray(stack.shifts_A)[:, 0]
        particles["rlnOriginYAngst"] = np.asarray(stack.shifts_A)[:, 1]
    particles = particles.drop(columns=[c for c in PIXEL_ORIGIN_LABELS if c in particles.columns])
    if classes is not None:
        particles["rlnClassNumber"] = np.asarray(classes, dtype=np.int64) + 1
    if stack.subset is not None:
        subset = np.asarray(stack.subset, dtype=np.int64)
        if np.any((subset != 0) & (subset != 1)):
            raise InputError(f"half-set labels must be 0 or 1 (written as rlnRandomSubset 1/2); got "
                             f"{sorted(set(subset.tolist()))}")
        particles["rlnRandomSubset"] = subset + 1
    particles = particles.drop(columns=[c for c in particles.columns if LATENT_LABEL.match(str(c))])
    if z is not None:
        z = np.asarray(z, dtype=np.float64)
        if z.ndim != 2 or z.shape[0] != n:
            raise InputError(f"latent coordinates have shape {z.shape}; expected ({n}, d) for {n} particles")
        for j in range(z.shape[1]):
            particles[f"cryofireZ{j + 1}"] = z[:, j]
    for name, values in (confidences or {}).items():
        particles[CONFIDENCE_LABELS[name]] = check_confidence(values, n, CONFIDENCE_LABELS[name])
    return optics, particles


def relion_text(df: pd.DataFrame) -> pd.DataFrame:
    """Float columns as text the way RELION writes them; other columns unchanged."""
    out = df.copy()
    for col in df.columns:
        if pd.api.types.is_float_dtype(df[col].dtype):
            v = df[col].to_numpy(dtype=np.float64)
            if LATENT_LABEL.match(str(col)):  # latents keep float32 precision (relative 1e-9)
                out[col] = np.char.mod("%.9e", v).astype(object)
                continue
            small = (np.abs(v) > 0) & (np.abs(v) < 1e-3) | (np.abs(v) > 1e5)
            text = np.char.mod("%.6f", v).astype(object)
            if small.any():
                text[small] = np.char.mod("%.6e", v[small])
            out[col] = text
    return out


def loop_lines(name: str, table: pd.DataFrame, chunk_rows: int = STAR_CHUNK_ROWS) -> Iterator[str]:
    """The lines of `table` as the loop block `data_<name>`: starfile's writer on `relion_text`, `chunk_rows` rows
    at a time (each row's text depends on that row alone), so the text of the whole table never exists at once."""

    def lines(rows: pd.DataFrame) -> list[str]:
        return list(StarWriter({name: relion_text(rows)}).data_block_generator())

    empty = lines(table.iloc[:0])  # the header, then the two blank lines that end the block
    head, tail = empty[:-2], empty[-2:]
    yield from head
    for start in range(0, len(table), chunk_rows):
        block = lines(table.iloc[start:start + chunk_rows])
        yield from block[len(head):len(block) - len(tail)]
    yield from tail


def write_star(stack: ParticleStack, path, z: np.ndarray | None = None, force: bool = False,
               classes: np.ndarray | None = None, confidences: dict | None = None) -> Path:
    """Write `stack` (+ latent coordinates `z` `(n, d)`) as a RELION 3.1 particle STAR file; returns the path.

    `classes` `(n,)` 0-based: written as `rlnClassNumber = classes + 1` (replacing any input value); None: the
    stack's own `class_id`, else the input's column as read. `confidences`: {"pose_confidence" or
    "class_probability": `(n,)` in [0, 1]}, written as `CONFIDENCE_LABELS` columns. InputError when `classes` are not n whole
    numbers >= 0. Refuses to overwrite an existing file unless `force`; nothing is left under `path` when
    writing fails.
    """
    path = Path(path)
    optics, particles = star_tables(stack, path, z, classes=classes, confidences=confidences)
    with atomic_path(path, force=force) as tmp, open(tmp, "w") as fh:
        fh.write(f"# written by cryofire-ext {__version__}\n\n")
        for name, table in (("optics", optics), ("particles", particles)):
            fh.write(f"# version {STAR_VERSION}\n\n")
            for line in loop_lines(name, table):
                fh.write(line + "\n")
    log.info("wrote %d particles to %s", len(stack), path)
    return path
