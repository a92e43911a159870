"""Map series along the latent space of a run, as files to look at: the maps, a montage, a ChimeraX command file.

`write_series` owns the names in the analysis folder: a series `NAME` (`pc1_traversal`, `cluster_path`) is
`maps/NAME/step_XX.mrc` (1-based), its montage `plots/NAME.png` and its ChimeraX file `maps/NAME.cxc`.

ChimeraX syntax used, as documented in the ChimeraX User Guide (commands `open`, `volume`, `vseries`):
`open FILE1 FILE2 ... vseries true` opens same-sized maps as one volume series; `volume #1 style surface
level L` draws an isosurface at L; `vseries play #1 loop true` / `vseries stop #1` play and stop it. ChimeraX
runs a .cxc with the file's own folder as the working directory and treats lines starting with `#` as
comments, so the map paths below are relative to the .cxc and the file moves with the analysis folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import mrcfile
import numpy as np

from cryofire_ext import analysis
from cryofire_ext.analysis import plots
from cryofire_ext.safe_io import atomic_path

#: the isosurface level written to the .cxc, as a fraction of the series' largest voxel value
LEVEL_FRACTION = 0.3


@dataclass
class SeriesViews:
    """One map series and the files to look at it: its `title`, `maps` in order, the montage `picture`, the
    ChimeraX command file `chimerax` and the isosurface `level` it sets."""

    title: str
    maps: list[Path]
    picture: Path
    chimerax: Path
    level: float


def read_maps(paths: Sequence[str | os.PathLike]) -> np.ndarray:
    """The maps of `paths` as one float32 array `(m, D, D, D)` (`[z, y, x]` each)."""
    vols = []
    for p in paths:
        with mrcfile.open(p, permissive=True) as m:
            vols.append(np.asarray(m.data, dtype=np.float32))
    return np.stack(vols)


def contour_level(volumes: np.ndarray, fraction: float = LEVEL_FRACTION) -> float:
    """An isosurface level for a series `(m, D, D, D)`: `fraction` of its largest value (one level for every
    map, so growing or shrinking density shows); halfway between the extremes when no value is positive."""
    lo, hi = float(np.min(volumes)), float(np.max(volumes))
    return fraction * hi if hi > 0 else lo + 0.5 * (hi - lo)


def chimerax_script(map_paths: Sequence[str | os.PathLike], cxc_path: str | os.PathLike, level: float, *,
                    title: str = "", run_from: str | os.PathLike | None = None) -> str:
    """The text of a ChimeraX command file at `cxc_path` that opens `map_paths` in order as one volume series
    (model #1 in a fresh session) drawn as a surface at `level` (`series_views` takes `contour_level`). Map paths are written relative to the
    .cxc's folder; the comment tells how to run it from `run_from` (default: the .cxc's folder)."""
    here = Path(cxc_path).parent
    rel = [Path(os.path.relpath(p, here)).as_posix() for p in map_paths]
    bad = [r for r in rel if any(ch.isspace() or ch in "\"';#" for ch in r)]
    if bad:
        raise ValueError(f"map paths for ChimeraX must not hold spaces, quotes, ';' or '#': {bad}")
    show = Path(os.path.relpath(cxc_path, run_from if run_from is not None else here)).as_posix()
    lines = [f"# cryofire analyze: {title or Path(cxc_path).stem}, {len(rel)} maps as one volume series (#1)",
             f"# Run from {'the analysis folder' if run_from is not None else 'this folder'}:  chimerax {show}",
             "# Play it with:  vseries play #1 loop true    stop:  vseries stop #1",
             "# Another surface level:  volume #1 level L",
             "open " + " ".join(rel) + " vseries true",
             f"volume #1 style surface level {level:.6g}"]
    return "\n".join(lines) + "\n"


def write_chimerax_script(map_paths: Sequence[str | os.PathLike], path: str | os.PathLike, level: float, *,
                          title: str = "", run_from: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Write `chimerax_script` to `path` (atomic; refuses to overwrite unless `force`)."""
    text = chimerax_script(map_paths, path, level, title=title, run_from=run_from)
    with atomic_path(path, force=force) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def series_views(map_paths: Sequence[str | os.PathLike], picture: str | os.PathLike, chimerax: str | os.PathLike,
                 *, title: str = "", labels=None, run_from: str | os.PathLike | None = None,
                 force: bool = False) -> SeriesViews:
    """Read a series' maps back and write its montage (`plots.map_montage`) and ChimeraX command file."""
    vols = read_maps(map_paths)
    level = contour_level(vols)
    plots.map_montage(vols, picture, title=title, labels=labels, force=force)
    write_chimerax_script(map_paths, chimerax, level, title=title, run_from=run_from, force=force)
    return SeriesViews(title=title, maps=[Path(p) for p in map_paths], picture=Path(picture), chimerax=Path(chimerax),
                       level=level)


def write_series(source: analysis.VolumeSource, z: np.ndarray, out_dir: str | os.PathLike, name: str, *,
                 title: str = "", force: bool = False) -> SeriesViews:
    """Maps at latent points `z` `(m, d)` in order as `out_dir/maps/NAME/step_XX.mrc`, with their montage
    `out_dir/plots/NAME.png` and ChimeraX command file `out_dir/maps/NAME.cxc` (run from `out_dir`)."""
    out = Path(out_dir)
    names = [f"step_{s + 1:02d}" for s in range(len(z))]
    maps = analysis.write_maps(source, z, out / "maps" / name, names, force=force)
    return series_views(maps, out / "plots" / f"{name}.png", out / "maps" / f"{name}.cxc", title=title,
                        run_from=out, force=force)


def cluster_path_points(centres_z: np.ndarray, pc1: np.ndarray, n_points: int) -> np.ndarray:
    """`n_points` latent points `(n_points, d)` evenly spaced along the polyline through the cluster centres
    `centres_z` `(k, d)` taken in the order of their PC1 coordinates `pc1` `(k,)`; the first and last
    points are the centres with the lowest and highest PC1."""
    order = np.argsort(np.asarray(pc1), kind="stable")
    return analysis.polyline_points(np.asarray(centres_z)[order], n_points)
