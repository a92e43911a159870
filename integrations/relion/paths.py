"""RELION image names (`N@path/stack.mrcs`) and where their stacks lie.

RELION resolves relative stack paths against the folder it runs in (the project
folder, usually a job output's grand-parent). Without that folder we look, in
order: the explicit `datadir` (the path as written, then its file name alone),
the STAR file's folder, then its parents (`SEARCH_PARENTS` levels up).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from cryofire_ext.errors import InputError

SEARCH_PARENTS = 3
# RELION's file-type override after a name (`stack.mrc:mrcs`): not part of the path
TYPE_SUFFIX = r":(?:mrcs|mrc|spi|tif|tiff|eer)$"


def relion_stack_name(path: str) -> str:
    """`path` as RELION must see it inside rlnImageName: `.mrc` stacks get the `:mrcs` type override
    (RELION 3.1 refuses `N@x.mrc`: ".mrc extensions are reserved for 3D maps")."""
    path = str(path)
    return path + ":mrcs" if path.lower().endswith(".mrc") else path


def split_image_names(names, star_path, block: str = "particles") -> tuple[np.ndarray, np.ndarray]:
    """`rlnImageName` values `(n,)` -> (1-based image index `(n,)` int64, stack path as written `(n,)` str).

    Accepts padded (`000001@x.mrcs`) and unpadded (`1@x.mrcs`) numbers and RELION's type override
    (`1@x.mrc:mrcs`, dropped from the path); a name without `@` is image 1 of that file. InputError naming the row when the number is not a positive integer.
    """
    s = pd.Series(np.asarray(names, dtype=object)).astype(str)
    if len(s) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=object)
    # the text before / after the first "@" by regular expressions (arrow's string kernels); `str.partition`
    # builds a Python tuple and three strings per name (~600 B per particle at once)
    has_at = s.str.contains("@", regex=False)
    number = pd.to_numeric(s.str.replace("@.*", "", regex=True).where(has_at, "1"), errors="coerce")
    stack = s.str.replace("^[^@]*@", "", regex=True).str.strip().str.replace(TYPE_SUFFIX, "", regex=True)
    bad = ~np.isfinite(number.astype(float)) | (number < 1) | (number != np.floor(number)) | (stack == "")
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise InputError(f"{star_path}: row {row + 1} of data_{block} has rlnImageName '{s.iloc[row]}'; expected "
                         "'N@path/stack.mrcs' with N the 1-based image number (e.g. 000001@Extract/job003/a.mrcs)")
    codes, stacks = pd.factorize(stack)  # one string per stack, shared by its rows (not one per row)
    return number.to_numpy(dtype=np.int64), np.asarray(stacks, dtype=object)[codes]


def stack_candidates(stack: str, star_dir: Path, datadir=None) -> list[Path]:
    """Where a stack named `stack` (as written in a STAR file) may lie, in the order tried."""
    if os.path.isabs(stack):
        return [Path(stack)]
    out = []
    if datadir is not None:
        out += [Path(datadir) / stack, Path(datadir) / Path(stack).name]
    folder = Path(os.path.abspath(star_dir))
    for level in range(SEARCH_PARENTS + 1):
        out.append(folder / stack)
        if folder.parent == folder:
            break
        folder = folder.parent
    seen, unique = set(), []
    for c in out:
        if str(c) not in seen:
            seen.add(str(c))
            unique.append(c)
    return unique


def resolve_stack(stack: str, star_dir: Path, datadir=None) -> tuple[str | None, list[Path]]:
    """(absolute path of the first candidate that is a file, or None; the candidates tried)."""
    tried = stack_candidates(stack, star_dir, datadir)
    for c in tried:
        if c.is_file():
            return os.path.abspath(c), tried
    return None, tried
