"""Pick the particle reader/writer by file suffix: one front door for the CLI and the jobs.

Readers: `.star` (RELION), `.cs` (cryoSPARC), `.mrcs`/`.mrc`/`.txt` (bare image stacks, or a
list of them, one path per line: images only, no CTF, no poses). Writers: `.star`, `.cs`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from cryofire_ext.ctf import CTFParams
from cryofire_ext.errors import InputError
from cryofire_ext.particles import ParticleStack

log = logging.getLogger(__name__)

READ_SUFFIXES = (".star", ".cs", ".mrcs", ".mrc", ".txt")
WRITE_SUFFIXES = (".star", ".cs")
DEFAULT_PIXEL_SIZE_A = 1.0


def _suffix(path: Path, accepted: tuple[str, ...], what: str) -> str:
    suffix = path.suffix.lower()
    if suffix not in accepted:
        raise InputError(f"{path}: unknown particle file extension '{path.suffix or '(none)'}' for {what}; "
                         f"accepted: {', '.join(accepted)}.")
    return suffix


def no_ctf(n: int) -> CTFParams:
    """`n` particles whose CTF is 1 everywhere (defocus 0, Cs 0, amplitude contrast 1, 300 kV)."""
    return CTFParams.constant(n, defocus_u_A=0.0, voltage_kv=300.0, cs_mm=0.0, amplitude_contrast=1.0)


def read_image_stack(path) -> ParticleStack:
    """A bare `.mrcs`/`.mrc` stack or a `.txt` list of them as a `ParticleStack` with no CTF and no poses.

    The images are the data here, so they are always opened (a missing stack is an InputError).
    Pixel size from the first stack's header voxel size (1.0 A with a warning when the header says 0).
    ids and image_names are `N@path` (1-based, absolute paths), as RELION would name the images.
    """
    from cryofire_ext.images import open_particles_file, stack_info

    path = Path(path)
    images = open_particles_file(path)
    first = str(images.paths[0]) if len(images) else str(path)
    pixel_size_A = stack_info(first).voxel_size_A
    if pixel_size_A is None:
        log.warning("%s: the header's voxel size is 0 (unset); assuming %.1f A/px. Give a STAR or .cs file "
                    "for the real pixel size.", first, DEFAULT_PIXEL_SIZE_A)
        pixel_size_A = DEFAULT_PIXEL_SIZE_A
    names = np.asarray([f"{i + 1}@{os.path.abspath(p)}" for p, i in zip(images.paths, images.indices)])
    return ParticleStack(ids=names, pixel_size_A=pixel_size_A, box=int(images.box), ctf=no_ctf(len(images)),
                         images=images, image_names=names)


def read_particles(path, datadir=None, require_images: bool = False) -> ParticleStack:
    """Read particles from a `.star`, `.cs`, `.mrcs`/`.mrc` or `.txt` file, chosen by its suffix.

    datadir: folder image paths are relative to (STAR/.cs). Missing stacks are a warning
    (`stack.missing_stacks`) unless `require_images`, then an InputError. The memory the reader freed (its
    tables' and strings' temporaries, hundreds of bytes per particle) goes back to the OS before the stack is
    returned (`release_freed_heap`), so it does not stay resident under every later stage.
    """
    from cryofire_ext.images import release_freed_heap

    path = Path(path)
    suffix = _suffix(path, READ_SUFFIXES, "reading")
    if not path.exists():
        raise InputError(f"{path}: particle file not found")
    if suffix == ".star":
        from integrations.relion import read_star

        stack = read_star(path, datadir=datadir, require_images=require_images)
    elif suffix == ".cs":
        from integrations.cryosparc import read_cs

        stack = read_cs(path, datadir=datadir, require_images=require_images)
    else:
        stack = read_image_stack(path)
    release_freed_heap()
    return stack


def input_files(source, stack: ParticleStack | None = None, twins: bool = True) -> list[Path]:
    """The files a command reads for its particles, which no output may replace: the metadata file, the
    cryoSPARC passthrough joined to it, the image stacks and (`twins`) the same-named `.star`/`.cs` beside it
    (the other half of a dataset written in both formats, e.g. by `cryofire simulate`)."""
    files: list[Path] = []
    if source is not None and not isinstance(source, ParticleStack):
        files.append(Path(source))
    passthrough = getattr(stack, "passthrough", None)
    star_path = getattr(passthrough, "star_path", None)  # RelionTables
    if star_path is not None:
        files.append(Path(star_path))
    for meta in list(files):
        if meta.suffix.lower() == ".cs":
            from integrations.cryosparc.cs import find_passthrough

            pt = find_passthrough(meta)
            if pt is not None:
                files.append(pt)
        if twins and meta.suffix.lower() in WRITE_SUFFIXES:
            files += [meta.with_suffix(s) for s in WRITE_SUFFIXES if meta.with_suffix(s).exists()]
    images = getattr(stack, "images", None)
    files += [Path(p) for p in getattr(images, "unique_paths", [])]
    return files


def write_particles(stack: ParticleStack, path, z=None, force: bool = False, classes=None,
                    confidences: dict | None = None) -> Path:
    """Write `stack` (and latent coordinates `z` `(n, d)`, 0-based `classes` `(n,)`, `confidences` {name:
    `(n,)` in [0, 1]} of `results.CONFIDENCES`) as `.star` (RELION 3.1) or `.cs` (cryoSPARC) by suffix; see
    `relion.write_star` / `cryosparc.write_cs`."""
    path = Path(path)
    suffix = _suffix(path, WRITE_SUFFIXES, "writing")
    if suffix == ".star":
        from integrations.relion import write_star

        return write_star(stack, path, z=z, force=force, classes=classes, confidences=confidences)
    from integrations.cryosparc import write_cs

    return write_cs(stack, path, z=z, force=force, classes=classes, confidences=confidences)


#: the largest class id a writer accepts (cryoSPARC stores alignments3D/class as uint32)
MAX_CLASS_ID = 2**32 - 2


def check_confidence(values, n: int, field: str) -> np.ndarray:
    """`values` as `(n,)` float32 in [0, 1] (a per-particle confidence or probability); InputError naming `field`
    (the file field they are written to) otherwise."""
    v = np.asarray(values, dtype=np.float64)
    if v.shape != (n,):
        raise InputError(f"{field}: {v.shape} values; expected {n}, one per particle")
    bad = ~((v >= 0) & (v <= 1))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(f"{field}[{i}] = {v[i]}; expected a number in [0, 1]")
    return v.astype(np.float32)


def check_classes(classes, n: int, field: str) -> np.ndarray:
    """`classes` as `(n,)` int64, 0-based (each particle's class); InputError naming `field` (the file field
    they are written to) when they are not `n` whole numbers in [0, MAX_CLASS_ID]."""
    values = np.asarray(classes)
    expected = (f"expected {n} class numbers, one per particle, as whole numbers >= 0 (0-based classes, "
                f"written as {field})")
    if values.shape != (n,):
        raise InputError(f"classes have shape {values.shape}; {expected}")
    if values.dtype.kind == "f":
        whole = np.isfinite(values) & (values == np.round(values))
        if not whole.all():
            raise InputError(f"classes[{int(np.flatnonzero(~whole)[0])}] = {values[~whole][0].item()}; {expected}")
    elif values.dtype.kind not in "iu":
        raise InputError(f"classes hold {values.dtype} values; {expected}")
    if n and (values.min() < 0 or values.max() > MAX_CLASS_ID):
        bad = int(np.flatnonzero((values < 0) | (values > MAX_CLASS_ID))[0])
        raise InputError(f"classes[{bad}] = {values[bad].item()}; {expected}")
    return values.astype(np.int64)


def convert_particles(src, dst, datadir=None, force: bool = False) -> tuple[ParticleStack, Path]:
    """Metadata conversion `src` -> `dst` (any readable suffix -> `.star`/`.cs`); returns (stack read, path written).

    Absent stacks are not an error here (exports often travel without them): they are logged and
    listed in `stack.missing_stacks`. The output is checked before reading so a refused overwrite costs nothing.
    """
    from cryofire_ext.safe_io import check_not_inputs, check_writable

    src, dst = Path(src), Path(dst)
    _suffix(dst, WRITE_SUFFIXES, "writing")
    check_not_inputs([dst], [src])
    check_writable(dst, force)
    stack = read_particles(src, datadir=datadir, require_images=False)
    check_not_inputs([dst], input_files(src, stack, twins=False))
    return stack, write_particles(stack, dst, force=force)


def summarize_particles(stack: ParticleStack) -> dict:
    """Plain facts about a stack for `cryofire inspect`: counts, sizes, optics groups, CTF ranges, what is present."""
    n = len(stack)

    def rng(values, scale=1.0):
        values = np.asarray(values, dtype=np.float64) * scale
        return (float(values.min()), float(values.max())) if len(values) else (float("nan"), float("nan"))

    groups = {}
    for g in np.unique(stack.optics_group) if n else []:
        sel = stack.optics_group == g
        groups[int(g)] = {"count": int(sel.sum()), "voltage_kv": sorted(set(np.round(stack.ctf.voltage_kv[sel], 3))),
                          "cs_mm": sorted(set(np.round(stack.ctf.cs_mm[sel], 4))),
                          "amplitude_contrast": sorted(set(np.round(stack.ctf.amplitude_contrast[sel], 4)))}
    return {
        "count": n,
        "box_px": int(stack.box),
        "pixel_size_A": float(stack.pixel_size_A),
        "optics_groups": groups,
        "defocus_u_A": rng(stack.ctf.defocus_u_A),
        "defocus_v_A": rng(stack.ctf.defocus_v_A),
        "defocus_angle_deg": rng(stack.ctf.defocus_angle_rad, 180.0 / np.pi),
        "phase_shift_deg": rng(stack.ctf.phase_shift_rad, 180.0 / np.pi),
        "bfactor_A2": rng(stack.ctf.bfactor_A2),
        "has_poses": stack.A is not None,
        "shift_A_max_abs": float(np.abs(stack.shifts_A).max()) if stack.shifts_A is not None and n else None,
        "classes": int(len(np.unique(stack.class_id))) if stack.class_id is not None else None,
        "subsets": sorted(int(s) for s in np.unique(stack.subset)) if stack.subset is not None else None,
        "images_available": stack.images is not None,
        "missing_stacks": list(stack.missing_stacks),
    }


def describe_particles(path, datadir=None) -> dict:
    """`summarize_particles` of the file at `path` (metadata only: absent stacks are listed, not an error)."""
    return summarize_particles(read_particles(path, datadir=datadir, require_images=False))
