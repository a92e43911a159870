"""Lazy image sources: memory-mapped .mrcs/.mrc stacks, read in batches.

An image source is anything with `__len__`, `box` (pixels, square images) and
`read(indices) -> (n, box, box) float32`. `MrcImages` holds one reference
`(file, 0-based index)` per particle and opens each file once as a read-only
memory map, so memory stays bounded by the batch, not the dataset.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, Sequence

import mrcfile
import numpy as np

from cryofire_ext.errors import InputError


class ImageSource(Protocol):
    box: int

    def __len__(self) -> int: ...

    def read(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Images `(len(indices), box, box)` float32, in the order asked."""


class ArrayImages:
    """Images held in memory (or in a numpy memmap), `(n, box, box)`."""

    def __init__(self, data: np.ndarray):
        if data.ndim != 3 or data.shape[1] != data.shape[2]:
            raise InputError(f"images must be (n, box, box), got shape {data.shape}")
        self.data = data
        self.box = int(data.shape[1])

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def read(self, indices) -> np.ndarray:
        return np.asarray(self.data[np.asarray(indices)], dtype=np.float32)


def open_stack(path: str | os.PathLike) -> np.ndarray:
    """Open an MRC stack read-only as a memory map, `(n, ny, nx)`.

    Permissive: files whose header lacks the MAP id still open; a 2D image is
    returned as a stack of one; a file flagged as a volume is read as a stack
    (RELION writes .mrcs that way). Raises InputError naming the file when it is
    missing, truncated or not MRC.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: image stack not found")
    try:
        mrc = mrcfile.mmap(path, mode="r", permissive=True)
    except Exception as exc:  # mrcfile raises ValueError/OSError variants
        raise InputError(f"{path}: not a readable MRC stack ({exc})") from exc
    data = mrc.data
    if data is None:
        raise InputError(
            f"{path}: the file is shorter than its header says (truncated stack?); "
            f"header nx,ny,nz = {int(mrc.header.nx)},{int(mrc.header.ny)},{int(mrc.header.nz)}"
        )
    if data.ndim == 2:
        data = data[None]
    return data


class MrcImages:
    """Particles as `(file, 0-based index)` references into MRC stacks, opened lazily.

    `paths` `(n,)` of str and `indices` `(n,)` of int. Reads group requests by file.
    """

    def __init__(self, paths: Sequence[str], indices: Sequence[int] | np.ndarray):
        self.paths = np.asarray([str(p) for p in paths], dtype=object)
        self.indices = np.asarray(indices, dtype=np.int64)
        if len(self.paths) != len(self.indices):
            raise InputError("MrcImages: paths and indices differ in length")
        self._files: dict[str, np.ndarray] = {}
        self.unique_paths, self.file_of = np.unique(self.paths.astype(str), return_inverse=True)
        self.box = self._check()

    def _open(self, path: str) -> np.ndarray:
        if path not in self._files:
            self._files[path] = open_stack(path)
        return self._files[path]

    def _check(self) -> int:
        box = None
        for k, path in enumerate(self.unique_paths):
            data = self._open(path)
            if data.shape[1] != data.shape[2]:
                raise InputError(f"{path}: images must be square, got {data.shape[2]}x{data.shape[1]}")
            if box is None:
                box = int(data.shape[1])
            elif data.shape[1] != box:
                raise InputError(f"{path}: box {data.shape[1]} px differs from {box} px in {self.unique_paths[0]}; "
                                 "all particles must share one box size")
            idx = self.indices[self.file_of == k]
            if len(idx) and (idx.min() < 0 or idx.max() >= data.shape[0]):
                bad = int(idx.max()) if idx.max() >= data.shape[0] else int(idx.min())
                raise InputError(f"{path}: particle index {bad + 1} (1-based) is beyond the stack, "
                                 f"which holds {data.shape[0]} images")
        if box is None:
            raise InputError("no images: the particle list is empty")
        return box

    def __len__(self) -> int:
        return len(self.indices)

    def read(self, indices) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), self.box, self.box), dtype=np.float32)
        files = self.file_of[indices]
        for k in np.unique(files):
            sel = np.nonzero(files == k)[0]
            local = self.indices[indices[sel]]
            order = np.argsort(local, kind="stable")
            out[sel[order]] = self._open(self.unique_paths[k])[local[order]]
        return out

    def __getstate__(self):  # memory maps do not travel to worker processes; reopen there
        state = self.__dict__.copy()
        state["_files"] = {}
        return state
