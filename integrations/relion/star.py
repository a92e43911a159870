"""Read RELION particle STAR files (3.0, 3.1, 4, 5) into a `ParticleStack`.

Layouts: 3.0 is one table (any block name: `data_`, `data_images`,
`data_model_class_1`, ...) with optics per particle and pixel size
`1e4 * rlnDetectorPixelSize / rlnMagnification`; 3.1/4/5 have `data_optics` and
`data_particles` in either order, `# version 30001` or `50001`. Parsing is
`starfile`'s, with the checks in `star_file` (blocks, text encoding, row
lengths, numbers); this module maps columns to the internal units (see
../shared/CONVENTIONS.md) and keeps the tables as `RelionTables` (the stack's
passthrough) so `export.write_star` can keep every input column.

Origins: `rlnOriginX/YAngst` are used when present. Pixel `rlnOriginX/Y` are
converted with the particle's pixel size; beside an optics table RELION 3.1+
ignores them, which we log as a warning (our exports always write `*Angst`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cryofire_ext.ctf import CTFParams, check_ctf_values, check_pixel_size
from cryofire_ext.errors import InputError, MissingImagesError
from cryofire_ext.images import MrcImages
from cryofire_ext.particles import ParticleStack
from cryofire_ext.poses import relion_euler_to_matrix
from integrations.relion.paths import resolve_stack, split_image_names
from integrations.relion.star_file import OPTICS_BLOCK, numeric_column, particle_block, read_blocks

log = logging.getLogger(__name__)

# optics values with RELION-like defaults used (with a warning) when a file has none
OPTICS_DEFAULTS = {"rlnVoltage": 300.0, "rlnSphericalAberration": 2.7, "rlnAmplitudeContrast": 0.1}
DEFAULT_PIXEL_SIZE_A = 1.0
LATENT_LABEL = re.compile(r"^cryofireZ(\d+)$")


@dataclass
class RelionTables:
    """The STAR tables a stack was read from (the stack's `passthrough`).

    particles: the particle table as parsed (every column). optics: the optics table, or None (3.0).
    version: the `# version` number written in the file, or None. pixel_size_A: `(n,)` each
    particle's pixel size from its optics (NaN when the file has none). stack_files: stack name
    as written in rlnImageName -> absolute path where it was found (found ones only).
    """

    particles: pd.DataFrame
    optics: pd.DataFrame | None
    version: str | None
    particles_block: str
    star_path: Path
    pixel_size_A: np.ndarray
    stack_files: dict[str, str] = field(default_factory=dict)


def _optics_rows(table, optics, path, block) -> tuple[np.ndarray, np.ndarray]:
    """(optics-table row of each particle `(n,)`, group number of each particle `(n,)`)."""
    if "rlnOpticsGroup" not in optics.columns:
        raise InputError(f"{path}: data_optics has no field rlnOpticsGroup; expected one row per optics group "
                         "numbered from 1")
    if "rlnOpticsGroup" not in table.columns:
        raise InputError(f"{path}: data_{block} has no field rlnOpticsGroup but the file has an optics table; "
                         "every particle needs its optics group (row 1 has none)")
    groups = numeric_column(optics, "rlnOpticsGroup", path, OPTICS_BLOCK, np.int64)
    labels = pd.to_numeric(table["rlnOpticsGroup"], errors="coerce").to_numpy(dtype=np.float64)
    lookup = pd.Index(groups).get_indexer(labels)
    if np.any(lookup < 0):
        row = int(np.flatnonzero(lookup < 0)[0])
        raise InputError(f"{path}: row {row + 1} of data_{block} has rlnOpticsGroup = "
                         f"'{table['rlnOpticsGroup'].iloc[row]}', which is not in data_optics (groups "
                         f"{', '.join(map(str, groups))}); the particle has no optics group")
    return lookup, groups[lookup]


def _per_particle(table, optics, rows, label, path, block):
    """`(n,)` values of an optics-level label from the optics table or (3.0) the particle table, or None."""
    if optics is not None:
        if label in optics.columns:
            return numeric_column(optics, label, path, OPTICS_BLOCK)[rows]
        return None
    if label in table.columns:
        return numeric_column(table, label, path, block)
    return None


def _pixel_sizes(table, optics, rows, path, block) -> np.ndarray:
    """`(n,)` pixel size in Angstrom from rlnImagePixelSize or 1e4 * DetectorPixelSize / Magnification (NaN: none)."""
    n = len(table)
    px = _per_particle(table, optics, rows, "rlnImagePixelSize", path, block)
    if px is None:
        det = _per_particle(table, optics, rows, "rlnDetectorPixelSize", path, block)
        mag = _per_particle(table, optics, rows, "rlnMagnification", path, block)
        if det is not None and mag is not None:
            with np.errstate(divide="ignore", invalid="ignore"):
                px = 1e4 * det / mag
    if px is None:
        return np.full(n, np.nan)

    def where(i):
        row = f"row {rows[i] + 1} of data_optics" if optics is not None else f"row {i + 1} of data_{block}"
        return (f"{path}: {row} gives a pixel size of {px[i]:g} A (rlnImagePixelSize, or 1e4 * "
                "rlnDetectorPixelSize / rlnMagnification)")

    check_pixel_size(px, where)
    return px


def _one_value(values: np.ndarray, groups: np.ndarray, what: str, unit: str, path, strict: bool) -> float:
    """The value shared by all particles; when groups differ: InputError if `strict`, else a warning and the
    value most particles have."""
    uniq, counts = np.unique(np.round(values, 6), return_counts=True)
    if len(uniq) == 1:
        return float(values[0])
    pairs = sorted({(int(g), float(v)) for g, v in zip(groups, np.round(values, 6))})
    listing = ", ".join(f"group {g}: {v:g} {unit}" for g, v in pairs[:8]) + (" ..." if len(pairs) > 8 else "")
    msg = f"{path}: optics groups differ in {what} ({listing}); one {what} per particle stack is supported"
    if strict:
        raise InputError(msg + ". Split the file by optics group (or rescale the images) before reading images.")
    chosen = float(uniq[np.argmax(counts)])
    log.warning("%s; metadata only, so using %g %s (most particles) for the stack and keeping each group's value "
                "in the RELION tables.", msg, chosen, unit)
    return chosen


def _ctf(table, optics, rows, path, block) -> tuple[CTFParams, list[str]]:
    n = len(table)
    defaulted = []
    optics_values = {}
    for label, default in OPTICS_DEFAULTS.items():
        v = _per_particle(table, optics, rows, label, path, block)
        if v is None:
            defaulted.append(f"{label}={default:g}")
            v = np.full(n, default)
        optics_values[label] = v

    def col(label, default):
        return numeric_column(table, label, path, block) if label in table.columns else np.full(n, default)

    du = col("rlnDefocusU", 0.0)
    dv = numeric_column(table, "rlnDefocusV", path, block) if "rlnDefocusV" in table.columns else du.copy()
    ctf = CTFParams(defocus_u_A=du, defocus_v_A=dv, defocus_angle_rad=np.deg2rad(col("rlnDefocusAngle", 0.0)),
                    voltage_kv=optics_values["rlnVoltage"], cs_mm=optics_values["rlnSphericalAberration"],
                    amplitude_contrast=optics_values["rlnAmplitudeContrast"],
                    phase_shift_rad=np.deg2rad(col("rlnPhaseShift", 0.0)), bfactor_A2=col("rlnCtfBfactor", 0.0),
                    scale=col("rlnCtfScalefactor", 1.0))
    labels = {"defocus_u_A": "rlnDefocusU", "defocus_v_A": "rlnDefocusV", "defocus_angle_rad": "rlnDefocusAngle",
              "voltage_kv": "rlnVoltage", "cs_mm": "rlnSphericalAberration",
              "amplitude_contrast": "rlnAmplitudeContrast", "phase_shift_rad": "rlnPhaseShift",
              "bfactor_A2": "rlnCtfBfactor", "scale": "rlnCtfScalefactor"}

    def where(name, i):
        label = labels[name]
        if name == "defocus_v_A" and label not in table.columns:
            label = "rlnDefocusU"
        if label in OPTICS_DEFAULTS and optics is not None:
            source, row, blk = optics, int(rows[i]), OPTICS_BLOCK
        else:
            source, row, blk = table, i, block
        return f"{path}: row {row + 1} of data_{blk} has {label} = '{source[label].iloc[row]}'"

    check_ctf_values(ctf, where)
    return ctf, defaulted


def _poses(table, has_optics, pixel_A, path, block):
    """(A `(n, 3, 3)` or None, shifts_A `(n, 2)` or None)."""
    n = len(table)
    cols = set(table.columns)
    A = None
    if {"rlnAngleRot", "rlnAngleTilt"} <= cols:
        psi = numeric_column(table, "rlnAnglePsi", path, block) if "rlnAnglePsi" in cols else np.zeros(n)
        A = relion_euler_to_matrix(numeric_column(table, "rlnAngleRot", path, block),
                                   numeric_column(table, "rlnAngleTilt", path, block), psi)
    shifts = None
    px_cols = {"rlnOriginX", "rlnOriginY"} <= cols
    if {"rlnOriginXAngst", "rlnOriginYAngst"} <= cols:
        shifts = np.stack([numeric_column(table, "rlnOriginXAngst", path, block),
                           numeric_column(table, "rlnOriginYAngst", path, block)], axis=1)
        if px_cols:
            px = np.stack([numeric_column(table, c, path, block) for c in ("rlnOriginX", "rlnOriginY")], axis=1)
            if not np.allclose(px * pixel_A[:, None], shifts, atol=1e-3):
                log.warning("%s: pixel rlnOriginX/Y disagree with rlnOriginX/YAngst; using the Angstrom ones "
                            "(as RELION does)", path)
    elif px_cols:
        px = np.stack([numeric_column(table, c, path, block) for c in ("rlnOriginX", "rlnOriginY")], axis=1)
        shifts = px * pixel_A[:, None]
        if has_optics and np.any(px != 0):
            log.warning("%s: pixel origins rlnOriginX/Y beside an optics table; RELION 3.1+ ignores them (it reads "
                        "only rlnOriginX/YAngst). Converting them with each group's pixel size; exports write "
                        "rlnOriginX/YAngst.", path)
    if A is not None and shifts is None:
        shifts = np.zeros((n, 2))
    return A, shifts


def _labels(table, label, allowed, path, block):
    """0-based labels from a 1-based integer column, or None (absent, or values outside `allowed`: warned)."""
    if label not in table.columns:
        return None
    values = pd.to_numeric(table[label], errors="coerce").to_numpy(dtype=np.float64)
    ok = np.isfinite(values) & (values == np.round(values)) & (values >= 1)
    if allowed is not None:
        ok &= np.isin(values, allowed)
    if not ok.all():
        row = int(np.flatnonzero(~ok)[0])
        log.warning("%s: row %d of data_%s has %s = %s (expected %s); ignoring the column (kept as is on export)",
                    path, row + 1, block, label, table[label].iloc[row],
                    "1 or 2" if allowed is not None else "a 1-based integer")
        return None
    return values.astype(np.int64) - 1


def read_star(path, datadir=None, require_images: bool = False, *, pixel_size_A: float | None = None) -> ParticleStack:
    """Read a RELION particle STAR file (3.0/3.1/4/5) into a `ParticleStack`.

    datadir: folder tried first for relative stack paths (then the STAR's folder and its parents).
    require_images: InputError when a stack is missing (listing what was tried); otherwise the stack
    has `images=None`, `missing_stacks` lists them and a warning is logged.
    pixel_size_A: used when given; otherwise from the optics (rlnImagePixelSize, else
    1e4*rlnDetectorPixelSize/rlnMagnification), else the stacks' header, else 1.0 A with a warning.
    ids are the rlnImageName values as written; where a stack is missing, `image_names` are `NNNNNN@path` with
    the path made absolute where the stack was found (None when all are found: the image source names them);
    `passthrough` is a `RelionTables`; `source_rows` index its particles.
    Optics groups differing in pixel size or box: InputError with `require_images`, else a warning.
    """
    path = Path(path)
    blocks, version = read_blocks(path)
    block, table = particle_block(blocks, path)
    table = table.reset_index(drop=True)
    optics = blocks.get(OPTICS_BLOCK) if isinstance(blocks.get(OPTICS_BLOCK), pd.DataFrame) else None
    n = len(table)
    if optics is not None:
        optics = optics.reset_index(drop=True)
        rows, group_numbers = _optics_rows(table, optics, path, block)
    else:
        rows = np.zeros(n, dtype=np.int64)
        group_numbers = (numeric_column(table, "rlnOpticsGroup", path, block, np.int64)
                         if "rlnOpticsGroup" in table.columns else np.ones(n, dtype=np.int64))

    pixel_each = _pixel_sizes(table, optics, rows, path, block)
    pixel = None
    if pixel_size_A is not None:
        pixel = float(pixel_size_A)
    elif n and np.all(np.isfinite(pixel_each)):
        pixel = _one_value(pixel_each, group_numbers, "pixel size", "A", path, require_images)
    elif n and np.any(np.isfinite(pixel_each)):
        bad = sorted(set(group_numbers[~np.isfinite(pixel_each)].tolist()))
        raise InputError(f"{path}: optics groups {bad} have no pixel size (rlnImagePixelSize or "
                         "rlnDetectorPixelSize/rlnMagnification) while others have one")
    box = 0
    sizes = _per_particle(table, optics, rows, "rlnImageSize", path, block)
    if sizes is not None and n:
        box = int(round(_one_value(sizes, group_numbers, "box size", "px", path, require_images)))
    if n == 0 and optics is not None and len(optics):  # no particles: the first optics group's values
        first = _pixel_sizes(optics.iloc[:1], optics.iloc[:1], np.zeros(1, dtype=np.int64), path, OPTICS_BLOCK)
        pixel = pixel if pixel is not None or not np.isfinite(first[0]) else float(first[0])
        if "rlnImageSize" in optics.columns:
            box = int(numeric_column(optics, "rlnImageSize", path, OPTICS_BLOCK)[0])

    ids = table["rlnImageName"].astype(str).to_numpy()
    number, stack_names = split_image_names(ids, path, block)
    stack_of, uniq_stacks = pd.factorize(pd.Series(stack_names, dtype=object))  # hashing: fast on 1M names
    found, missing, first_tried = {}, [], None
    for name in uniq_stacks:
        where, tried = resolve_stack(name, path.parent, datadir)
        if where is None:
            missing.append(name)
            first_tried = first_tried or (name, tried)
        else:
            found[name] = where
    where_each = pd.Series([found.get(s, s) for s in uniq_stacks], dtype=object).iloc[stack_of].to_numpy()
    images = image_names = None  # with the stacks found, the image source names each image (paths, indices)
    if missing:
        # numpy string ops build the str array directly (no per-name Python string objects)
        image_names = np.char.add(np.char.add(np.char.zfill(np.asarray(number).astype(str), 6), "@"),
                                  np.asarray(where_each, dtype=str))
        name, tried = first_tried
        msg = (f"{path}: {len(missing)} of {len(uniq_stacks)} particle stacks not found (first: rlnImageName stack "
               f"'{name}', tried {', '.join(map(str, tried))})")
        if require_images:
            raise MissingImagesError(msg + ". Pass --datadir with the folder (RELION project) that holds them.")
        log.warning("%s; reading metadata only.", msg)
    elif n:
        images = MrcImages(where_each, number - 1)

    if pixel is None and images is not None and images.voxel_size_A:
        pixel = float(images.voxel_size_A)
        log.info("%s: no pixel size in the STAR file; using the stacks' header value %g A", path, pixel)
    elif pixel is None:
        pixel = DEFAULT_PIXEL_SIZE_A
        if n:
            log.warning("%s: no pixel size in the STAR file nor in the stack headers; assuming %g A "
                        "(pass pixel_size_A / --angpix to set it)", path, pixel)
    pixel_for_shifts = np.where(np.isfinite(pixel_each), pixel_each, pixel)
    if images is not None:
        if box and images.box != box:
            raise InputError(f"{path}: rlnImageSize says {box} px but the stack {images.unique_paths[0]} holds "
                             f"{images.box} px images")
        box = images.box
    if box == 0 and n:
        log.info("%s: box size unknown (no rlnImageSize and no stacks); metadata only", path)

    ctf, defaulted = _ctf(table, optics, rows, path, block)
    if defaulted and n:
        log.warning("%s: no %s in the file; assuming %s", path, ", ".join(d.split("=")[0] for d in defaulted),
                    ", ".join(defaulted))
    A, shifts_A = _poses(table, optics is not None, pixel_for_shifts, path, block)
    class_id = _labels(table, "rlnClassNumber", None, path, block)
    subset = _labels(table, "rlnRandomSubset", [1, 2], path, block)
    n_unique = pd.Series(ids).nunique()
    if n_unique != n:
        log.warning("%s: rlnImageName repeats (%d unique of %d rows); ids are not unique", path, n_unique, n)
    tables = RelionTables(particles=table, optics=optics, version=version, particles_block=block, star_path=path,
                          pixel_size_A=pixel_each, stack_files=found)
    optics_group = pd.factorize(group_numbers, sort=True)[0].astype(np.int64)
    return ParticleStack(ids=ids, pixel_size_A=pixel, box=box, ctf=ctf, images=images, A=A, shifts_A=shifts_A,
                         class_id=class_id, subset=subset, optics_group=optics_group, source_rows=np.arange(n),
                         passthrough=tables, missing_stacks=[str(m) for m in missing], image_names=image_names)


def read_latents(path) -> np.ndarray:
    """Latent coordinates `(n, d)` float64 from the `cryofireZ1..cryofireZd` columns of a particle STAR file."""
    path = Path(path)
    blocks, _ = read_blocks(path)
    block, table = particle_block(blocks, path)
    found = sorted(((int(m.group(1)), c) for c in table.columns if (m := LATENT_LABEL.match(str(c)))))
    if not found:
        raise InputError(f"{path}: data_{block} has no latent columns cryofireZ1..cryofireZd")
    if [k for k, _ in found] != list(range(1, len(found) + 1)):
        raise InputError(f"{path}: latent columns {[c for _, c in found]} are not numbered 1..{len(found)}")
    return np.stack([numeric_column(table, c, path, block) for _, c in found], axis=1)
