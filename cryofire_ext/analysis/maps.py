"""Maps of a trained run at points of its latent space, and the FSC between maps.

Maps are `(D, D, D)` float32 `[z, y, x]` with a voxel size in Angstrom; latent points `(m, d)`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from cryofire_ext.errors import InputError
from cryofire_ext.images import write_mrc

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------- maps
class VolumeSource(Protocol):
    """What makes maps from latent points (the trained model: `cryofire_ext.predict.TrainedModel`)."""

    pixel_size_A: float

    def volumes(self, z: np.ndarray) -> np.ndarray:
        """`(m, d)` -> `(m, D, D, D)` float32 maps."""


def write_maps(source: VolumeSource, z: np.ndarray, out_dir: str | os.PathLike, names: Sequence[str],
               force: bool = False, batch: int = 4) -> list[Path]:
    """Maps at latent points `z` `(m, d)` written as `out_dir/<name>.mrc` with the model's voxel size."""
    z = np.asarray(z, dtype=np.float32).reshape(len(names), -1)
    out_dir = Path(out_dir)
    paths = []
    for start in range(0, len(z), batch):
        vols = np.asarray(source.volumes(z[start:start + batch]))
        for j, vol in enumerate(vols):
            paths.append(write_mrc(out_dir / f"{names[start + j]}.mrc", vol, source.pixel_size_A, force=force))
    return paths


def map_fsc(a: np.ndarray, b: np.ndarray, pixel_size_A: float) -> tuple[np.ndarray, np.ndarray]:
    """FSC between two `(D, D, D)` maps (`cryofire_ext.recon.reconstruct.fsc`, shells of one Fourier voxel):
    (frequency_per_A `(D//2 + 1,)` up to Nyquist, fsc `(D//2 + 1,)`)."""
    from cryofire_ext.recon.reconstruct import fsc

    freq, values = fsc(a, b, pixel_size_A)
    return np.asarray(freq), np.asarray(values)


def load_volume_source(run_dir: str | os.PathLike, device: str = "cpu") -> VolumeSource:
    """The trained model of a run, as a `VolumeSource` (`cryofire_ext.predict.load_trained`)."""
    from cryofire_ext.predict import load_trained

    try:
        return load_trained(run_dir, device=device)
    except FileNotFoundError as exc:
        raise InputError(f"{run_dir}: no trained model to make maps with ({exc}); give the folder of a finished "
                         "`cryofire train` run, or pass --no-maps") from exc


def read_z_points(text: str | None = None, path: str | os.PathLike | None = None,
                  zdim: int | None = None, data_z: np.ndarray | None = None) -> np.ndarray:
    """Latent points `(m, zdim)` from `text` ("0.1,0.2;0.3,-1": points separated by ';', values by ','
    or spaces) or from a file (`.npy`, or text with one point per line); checks the dimension. With the
    particles' z `data_z` `(n, zdim)`, warns of points outside their range (a map there is the model's
    extrapolation, or the landscape's end: no particle supports it)."""
    if (text is None) == (path is None):
        raise InputError("give exactly one of --z \"z1,z2,...\" and --z-file FILE")
    where = "--z" if text is not None else str(path)
    if text is not None:
        try:
            rows = [[float(v) for v in row.replace(",", " ").split()] for row in text.split(";") if row.strip()]
        except ValueError:
            raise InputError(f"--z {text!r}: expected numbers separated by commas, points separated by ';'") from None
        if not rows or len({len(r) for r in rows}) != 1:
            raise InputError(f"--z {text!r}: every point must have the same number of values")
        z = np.array(rows, dtype=np.float64)
    else:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: z file not found")
        try:
            z = np.load(path, allow_pickle=False) if path.suffix == ".npy" else np.loadtxt(path, ndmin=2, comments="#")
        except (ValueError, OSError) as exc:
            raise InputError(f"{path}: not a z file (.npy, or text with one point per line): {exc}") from exc
        z = np.atleast_2d(np.asarray(z, dtype=np.float64))
    if z.ndim != 2:
        raise InputError(f"{where}: latent points must be a 2D table (points x {zdim}), got shape {z.shape}")
    if zdim is not None and z.shape[1] != zdim:
        raise InputError(f"{where}: points have {z.shape[1]} values each but the model's latent space has "
                         f"dimension {zdim}; give {zdim} values per point")
    if not np.all(np.isfinite(z)):
        raise InputError(f"{where}: latent points must be finite numbers")
    if data_z is not None and len(data_z) and np.shape(data_z)[1] == z.shape[1]:
        lo, hi = np.min(data_z, axis=0), np.max(data_z, axis=0)
        outside = np.nonzero(np.any((z < lo - 1e-6) | (z > hi + 1e-6), axis=1))[0]
        if len(outside):
            log.warning("%s: %d of %d latent point(s) lie outside the particles' z range (%s) to (%s), e.g. point %d "
                        "(%s); no particle supports a map there", where, len(outside), len(z), _numbers(lo), _numbers(hi),
                        outside[0] + 1, _numbers(z[outside[0]]))
    return z


def _numbers(v: np.ndarray) -> str:
    return ", ".join(f"{x:.3g}" for x in v)


def eval_volumes(run_dir: str | os.PathLike, z: np.ndarray, out_dir: str | os.PathLike, force: bool = False,
                 source: VolumeSource | None = None, prefix: str = "vol") -> list[Path]:
    """Maps of a run's model at latent points `z` `(m, d)`: `out_dir/<prefix>_001.mrc`, ... (1-based)."""
    source = source if source is not None else load_volume_source(run_dir)
    zdim = getattr(source, "zdim", None)
    if zdim is not None and np.shape(z)[1] != zdim:
        raise InputError(f"latent points have {np.shape(z)[1]} values each but the model of {run_dir} has "
                         f"zdim {zdim}")
    names = [f"{prefix}_{i + 1:03d}" for i in range(len(z))]
    return write_maps(source, z, out_dir, names, force=force)
