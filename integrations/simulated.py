"""Write (and read back the truth of) a simulated dataset in the formats users have.

An output folder holds:
  particles.mrcs   the noisy images (float32 stack, voxel size = pixel size)
  particles.star   RELION 3.1 STAR with the TRUE poses, origins, CTF and classes
  particles.cs     cryoSPARC .cs with the same (alignments3D/pose, shift, class)
  state_NN.mrc     the map of each state (voxel size set)
  truth.npz        versioned truth: A, shifts_A, state, map file names, pixel size, SNR, seed
Image names in the STAR are relative (`NNNNNN@particles.mrcs`: run RELION in the folder,
or read the STAR from anywhere with our reader); the .cs names the stack by absolute path.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import mrcfile
import numpy as np

from cryofire_ext import __version__
from cryofire_ext.ctf import check_pixel_size
from cryofire_ext.errors import InputError, brief
from cryofire_ext.images import write_mrc
from cryofire_ext.particles import ParticleStack
from cryofire_ext.phantom import phantom_maps
from cryofire_ext.safe_io import atomic_path, check_output_folder, check_writable
from cryofire_ext.simulate import STACK_NAME, SimulatedDataset, check_maps, simulate, simulate_states
from integrations.cryosparc import write_cs
from integrations.relion import write_star

log = logging.getLogger(__name__)

TRUTH_FORMAT = "cryofire-ext simulated truth"
TRUTH_VERSION = 1


def read_map(path, pixel_size_A: float | None = None) -> tuple[np.ndarray, float]:
    """A cubic map `(D, D, D)` float32 (z, y, x) and its voxel size in A (`pixel_size_A` overrides the header)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: map file not found")
    try:
        with mrcfile.open(path, mode="r", permissive=True) as mrc:
            if mrc.data is None:
                raise InputError(f"{path}: the MRC file holds no data")
            data = np.asarray(mrc.data, dtype=np.float32).copy()
            header_apix = float(mrc.voxel_size.x)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{path}: not a readable MRC map ({exc})") from exc
    if data.ndim != 3 or len(set(data.shape)) != 1:
        raise InputError(f"{path}: a map must be a cube (D, D, D); this one has shape {data.shape} (z, y, x)")
    check_maps(data, str(path))
    apix = float(pixel_size_A) if pixel_size_A else header_apix
    if not apix > 0:
        raise InputError(f"{path}: the header's voxel size is unset (0); pass the pixel size with --apix")
    return data, apix


def check_outputs(out_dir, n_maps: int, force: bool = False) -> list[str]:
    """InputError if any output of `write_dataset` exists in `out_dir` (unless `force`); returns the map file names."""
    out = Path(out_dir)
    map_files = [f"state_{k:02d}.mrc" for k in range(n_maps)]
    for name in [STACK_NAME, "particles.star", "particles.cs", "truth.npz", *map_files]:
        check_writable(out / name, force)
    return map_files


def with_absolute_names(ds: SimulatedDataset, out_dir) -> ParticleStack:
    """`ds.particles` naming each image in the stack `write_dataset` writes into `out_dir`, by absolute path."""
    stack_abs = os.path.abspath(Path(out_dir) / STACK_NAME)
    return replace(ds.particles, image_names=np.asarray([f"{i + 1:06d}@{stack_abs}" for i in range(len(ds.images))]))


def write_dataset(ds: SimulatedDataset, out_dir, *, map_names: list[str] | None = None,
                  force: bool = False) -> dict[str, Path]:
    """Write `ds` into `out_dir` (created); refuses to overwrite any existing output unless `force`.

    Returns the paths by role: images, star, cs, truth, maps (list).
    """
    out = check_output_folder(out_dir)
    K = ds.maps.shape[0]
    map_files = check_outputs(out, K, force)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    paths["images"] = write_mrc(out / STACK_NAME, ds.images, ds.pixel_size_A, force=force, stack=True)
    paths["maps"] = [write_mrc(out / f, m, ds.pixel_size_A, force=force) for f, m in zip(map_files, ds.maps)]
    paths["star"] = write_star(ds.particles, out / "particles.star", force=force)
    # the .cs names the stack by absolute path (cryoSPARC resolves blob/path from its project, not from the file)
    paths["cs"] = write_cs(with_absolute_names(ds, out), out / "particles.cs", force=force)
    with atomic_path(out / "truth.npz", force=force) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, format=np.array(TRUTH_FORMAT), version=np.array(TRUTH_VERSION),
                     software=np.array(f"cryofire-ext {__version__}"),
                     ids=ds.particles.ids.astype(str), A=ds.A, shifts_A=ds.shifts_A, state=ds.state,
                     map_files=np.asarray(map_files), source_maps=np.asarray(map_names or [""] * K),
                     pixel_size_A=np.array(ds.pixel_size_A), snr=np.array(ds.snr), seed=np.array(ds.seed),
                     signal_variance=np.array(ds.signal_variance), noise_sigma=np.array(ds.noise_sigma),
                     ctf=ds.particles.ctf.as_array())
    paths["truth"] = out / "truth.npz"
    log.info("wrote %d particles to %s", len(ds.images), out)
    return paths


def load_truth(path) -> dict:
    """The arrays of a `truth.npz` written by `write_dataset`; InputError if it is not one or its version is newer."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except FileNotFoundError as exc:
        raise InputError(f"{path}: truth file not found") from exc
    except Exception as exc:
        raise InputError(f"{path}: not a readable .npz truth file ({brief(exc)})") from None
    if str(data.get("format", "")) != TRUTH_FORMAT:
        raise InputError(f"{path}: not a cryofire-ext simulated truth file (field 'format' is missing or different)")
    if int(data["version"]) > TRUTH_VERSION:
        raise InputError(f"{path}: truth version {int(data['version'])} is newer than this cryofire-ext reads "
                         f"({TRUTH_VERSION}); upgrade cryofire-ext")
    return data


@dataclass
class SimulateConfig:
    """What `cryofire simulate` does. maps: MRC paths (empty with `phantom`)."""

    out_dir: str
    n: int
    maps: list[str] = field(default_factory=list)
    phantom: bool = False
    box: int = 32
    states: int | None = None
    mix: list[float] | None = None
    snr: float = 0.1
    shift_px: float = 4.0
    defocus_um: tuple[float, float] = (1.0, 2.5)
    seed: int = 0
    pixel_size_A: float | None = None
    force: bool = False


def run_simulate(cfg: SimulateConfig) -> dict[str, Path]:
    """Read or make the maps, simulate, write the dataset; returns `write_dataset`'s paths."""
    if cfg.phantom and cfg.maps:
        raise InputError("give either map files or --phantom, not both")
    if not cfg.phantom and not cfg.maps:
        raise InputError("give one or more map files (MRC), or --phantom for the bundled phantom molecule")
    if cfg.states is not None and cfg.states < 1:
        raise InputError(f"--states must be >= 1, got {cfg.states}")
    if cfg.phantom:
        maps, apix = phantom_maps(box=cfg.box, states=cfg.states or 2)
        if cfg.pixel_size_A:
            apix = float(cfg.pixel_size_A)
        names = [f"phantom state {k}" for k in range(len(maps))]
    else:
        read = [read_map(p, cfg.pixel_size_A) for p in cfg.maps]
        shapes = {m.shape for m, _ in read}
        sizes = {round(a, 4) for _, a in read}
        if len(shapes) > 1 or len(sizes) > 1:
            raise InputError(f"all maps must share one box and pixel size; got shapes {sorted(shapes)} and pixel "
                             f"sizes {sorted(sizes)} A for {', '.join(cfg.maps)}")
        apix = read[0][1]
        maps = np.stack([m for m, _ in read])
        names = [str(p) for p in cfg.maps]
        if cfg.states and cfg.states > 1:
            if len(maps) != 1:
                raise InputError(f"--states {cfg.states} makes states from ONE map; got {len(maps)} maps")
            maps = simulate_states(maps[0], cfg.states)
            names = names * cfg.states
    check_pixel_size(apix, lambda i: f"pixel size {apix:g} A (from --apix or the map header)")
    check_output_folder(cfg.out_dir)
    check_outputs(cfg.out_dir, len(maps), cfg.force)  # before the (slow) simulation
    ds = simulate(maps, cfg.n, mix=cfg.mix, snr=cfg.snr, shift_px=cfg.shift_px, defocus_um=cfg.defocus_um,
                  pixel_size_A=apix, seed=cfg.seed)
    return write_dataset(ds, cfg.out_dir, map_names=names, force=cfg.force)
