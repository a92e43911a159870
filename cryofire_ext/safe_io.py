"""Safe writes: refuse to overwrite unless asked; write to a temporary name, then rename.

Every writer in the package goes through `atomic_path` (one file) so that a crash
or an error never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from cryofire_ext.errors import InputError


def check_writable(path: str | os.PathLike, force: bool) -> Path:
    """Return `path` as a Path; raise InputError if it exists and `force` is False."""
    path = Path(path)
    if path.exists() and not force:
        raise InputError(
            f"{path}: the output exists already. Choose another name or pass --force to overwrite it."
        )
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The temporary file keeps `path`'s suffix (some writers look at it). On any
    exception the temporary file is removed and `path` is left untouched.
    """
    path = check_writable(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
