"""Lazy image sources: .mrcs/.mrc stacks and .txt lists of stacks, read in batches.

An image source is anything with `__len__`, `box` (pixels, square images) and
`read(indices) -> (n, box, box) float32`. `MrcImages` holds one reference
`(file, 0-based index)` per particle; it reads each file's header once (cheap,
no data), opens the file on first use and reads the images asked for (one read per
run of consecutive images), keeping at most `max_open` files open at a time (least
recently used closed first). Nothing is memory-mapped: a mapped page once read stays
in the process's resident memory, which then grows with the stack read (3 GiB for
200,000 images of 64 px); read this way, memory and file handles stay bounded by the
batch, not by the dataset.

MRC facts handled here: the header is 1024 bytes plus `nsymbt` bytes of
extended header; modes 0 (int8), 1 (int16), 2 (float32), 6 (uint16) and 12
(float16) are read; byte order comes from the header; a 2D image is a stack of
one; a file flagged as a volume (ispg 1, RELION writes .mrcs that way) is read
as a stack of its sections; the MAP id and machine stamp may be missing
(permissive); the header voxel size may be 0 (unset: `StackInfo.voxel_size_A`
is then None and the pixel size must come from the metadata).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import sys
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import mrcfile
import mrcfile.utils
import numpy as np

from cryofire_ext.errors import InputError

log = logging.getLogger(__name__)

MRC_HEADER_BYTES = 1024
SUPPORTED_MODES = {0: "int8", 1: "int16", 2: "float32", 6: "uint16", 12: "float16"}
STACK_SUFFIXES = (".mrcs", ".mrc", ".st", ".map")


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


@dataclass(frozen=True)
class StackInfo:
    """What an MRC header says about a stack: `n` images of `ny` x `nx` pixels.

    offset: byte offset of the data (1024 + extended header). voxel_size_A: the header's
    pixel size in Angstrom, or None when unset (0).
    """

    path: str
    n: int
    ny: int
    nx: int
    dtype: np.dtype
    offset: int
    voxel_size_A: float | None
    ispg: int = 0

    @property
    def is_volume(self) -> bool:
        """The header says one 3D map: a cube whose space group is a volume's (not 0, not a volume stack),
        as mrcfile's `is_volume()` decides from the same header."""
        return self.ispg != 0 and not 401 <= self.ispg <= 630 and self.n == self.ny == self.nx and self.n > 1


def stack_info(path: str | os.PathLike) -> StackInfo:
    """Read and check an MRC header (no data). InputError naming the file when it is missing,
    not MRC, in an unsupported mode or axis order, or shorter than its header says (truncated)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: image stack not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # permissive mode warns about a missing MAP id; we check below
            with mrcfile.open(path, mode="r", permissive=True, header_only=True) as mrc:
                header = mrc.header.copy()
    except Exception as exc:  # mrcfile raises ValueError/OSError variants
        raise InputError(f"{path}: not a readable MRC stack ({exc})") from exc
    if header is None:
        raise InputError(f"{path}: not a readable MRC stack (no 1024-byte header)")
    mode = int(header.mode)
    if mode not in SUPPORTED_MODES:
        raise InputError(f"{path}: MRC mode {mode} is not a supported image mode; expected one of "
                         + ", ".join(f"{k} ({v})" for k, v in SUPPORTED_MODES.items()))
    axes = (int(header.mapc), int(header.mapr), int(header.maps))
    if axes != (1, 2, 3) and axes != (0, 0, 0):
        raise InputError(f"{path}: header axis order mapc,mapr,maps = {axes}; only 1,2,3 (x fastest) is supported")
    nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
    if nx <= 0 or ny <= 0 or nz <= 0:
        raise InputError(f"{path}: header size nx,ny,nz = {nx},{ny},{nz}; expected positive sizes")
    dtype = mrcfile.utils.data_dtype_from_header(header)
    offset = MRC_HEADER_BYTES + int(header.nsymbt)
    expected = offset + nx * ny * nz * dtype.itemsize
    size = path.stat().st_size
    if size < expected:
        held = max(size - offset, 0) // (nx * ny * dtype.itemsize)
        raise InputError(f"{path}: the file is {size} bytes but its header (nx,ny,nz = {nx},{ny},{nz}, mode {mode}) "
                         f"needs {expected}; the stack is truncated (only {held} complete images)")
    mx = int(header.mx)
    voxel = float(header.cella.x) / mx if mx > 0 else 0.0
    return StackInfo(str(path), nz, ny, nx, dtype, offset, voxel if voxel > 0 else None, int(header.ispg))


def check_not_volume(info: StackInfo) -> None:
    """InputError when a `.mrc`/`.map` file given as particles is a 3D map by its header (`.mrcs` files are
    stacks by name, whatever their space group: RELION writes them with ispg 1)."""
    if info.is_volume and Path(info.path).suffix.lower() in (".mrc", ".map"):
        raise InputError(f"{info.path}: the header says this is a 3D map (space group {info.ispg}, "
                         f"{info.nx}x{info.ny}x{info.n} voxels), not a stack of "
                         "particle images. Give the particles (.mrcs/.star/.cs); if this file really is an image "
                         "stack, name it .mrcs (or set its space group to 0).")


@functools.cache
def _malloc_trim():
    """glibc's `malloc_trim`, or None where the C library has none (macOS, musl)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_heap() -> None:
    """Hand the heap pages freed since the previous read back to the OS: glibc's `malloc_trim(0)`, and the
    cached free memory of arrow's pool (pandas' string columns) when pyarrow is loaded.

    Each chunk of a streamed stage allocates and frees tensors of a few hundred kB to tens of MB;
    glibc keeps such freed blocks in its heap, fragmented, so without this the resident memory of a
    long pass creeps up with the number of particles instead of staying at one chunk's working set.
    Arrow's allocator (mimalloc) likewise keeps what pandas' string operations freed: after reading a STAR
    file, several hundred bytes per particle. Costs about a millisecond; a no-op without glibc or pyarrow.
    """
    arrow = sys.modules.get("pyarrow")  # never imported here: only a pool that exists can hold memory
    if arrow is not None and hasattr(arrow, "default_memory_pool"):
        arrow.default_memory_pool().release_unused()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class MrcImages:
    """Particles as `(file, 0-based index)` references into MRC stacks, opened lazily.

    `paths` `(n,)` of str and `indices` `(n,)` of int (0-based). Every file's header is
    checked at construction (exists, not truncated, square images, one box for all,
    indices within the stack). `read` groups requests by file and reads each file's
    images in index order; at most `max_open` files stay mapped.
    """

    def __init__(self, paths: Sequence[str], indices: Sequence[int] | np.ndarray, max_open: int = 64):
        self.paths = np.asarray([str(p) for p in paths], dtype=object)
        self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(self.paths) != len(self.indices):
            raise InputError(f"MrcImages: {len(self.paths)} paths but {len(self.indices)} indices")
        self.max_open = max(1, int(max_open))
        self._files: OrderedDict[int, np.ndarray] = OrderedDict()
        lookup: dict[str, int] = {}  # hashing, not sorting: fast for 1M particles
        self.file_of = np.fromiter((lookup.setdefault(p, len(lookup)) for p in self.paths), dtype=np.int64,
                                   count=len(self.paths))
        self.unique_paths = np.asarray(list(lookup), dtype=str)
        self.infos = [stack_info(p) for p in self.unique_paths]
        self.box = self._check()

    @classmethod
    def from_stacks(cls, stacks: Sequence[str | os.PathLike], **kwargs) -> "MrcImages":
        """Every image of each stack, in file order then image order."""
        paths, indices = [], []
        for stack in stacks:
            info = stack_info(stack)
            check_not_volume(info)
            n = info.n
            paths.extend([str(stack)] * n)
            indices.append(np.arange(n))
        return cls(paths, np.concatenate(indices) if indices else np.zeros(0, dtype=np.int64), **kwargs)

    def _check(self) -> int:
        if len(self.indices) == 0:
            raise InputError("no images: the particle list is empty")
        first = self.infos[0]
        for k, info in enumerate(self.infos):
            if info.ny != info.nx:
                raise InputError(f"{info.path}: images must be square, got {info.nx}x{info.ny} px")
            if info.nx != first.nx:
                raise InputError(f"{info.path}: box {info.nx} px differs from {first.nx} px in {first.path}; "
                                 "all particles must share one box size (mixed box sizes)")
        lo = np.full(len(self.infos), np.iinfo(np.int64).max)
        hi = np.full(len(self.infos), np.iinfo(np.int64).min)
        np.minimum.at(lo, self.file_of, self.indices)
        np.maximum.at(hi, self.file_of, self.indices)
        for k, info in enumerate(self.infos):
            if hi[k] >= info.n or lo[k] < 0:
                bad = int(hi[k]) if hi[k] >= info.n else int(lo[k])
                row = int(np.nonzero((self.file_of == k) & (self.indices == bad))[0][0])
                raise InputError(f"{info.path}: particle {row + 1} (1-based) asks for image {bad + 1} (1-based) but the stack "
                                 f"holds {info.n} images (index beyond the stack)")
        return int(first.nx)

    def _open(self, k: int):
        fh = self._files.get(k)
        if fh is None:
            fh = open(self.unique_paths[k], "rb", buffering=0)
            self._files[k] = fh
            while len(self._files) > self.max_open:
                self._files.popitem(last=False)[1].close()
        else:
            self._files.move_to_end(k)
        return fh

    def _read_file(self, k: int, local: np.ndarray) -> np.ndarray:
        """Images `(len(local), ny, nx)` float32 at 0-based positions `local` of file `k` (any order, repeats
        allowed; checked at construction): one read per run of consecutive positions."""
        info, fh = self.infos[k], self._open(k)
        out = np.empty((len(local), info.ny, info.nx), dtype=np.float32)
        order = np.argsort(local, kind="stable")
        pos = local[order]
        starts = np.flatnonzero(np.r_[True, np.diff(pos) != 1])
        ends = np.r_[starts[1:], len(pos)]
        image_bytes = info.ny * info.nx * info.dtype.itemsize
        for a, b in zip(starts, ends):
            buf = np.empty((b - a, info.ny, info.nx), dtype=info.dtype)
            fh.seek(info.offset + int(pos[a]) * image_bytes)
            if fh.readinto(memoryview(buf).cast("B")) != buf.nbytes:
                raise InputError(f"{info.path}: the file ended before image {int(pos[b - 1]) + 1} (1-based); "
                                 "was it truncated after it was opened?")
            out[order[a:b]] = buf
        return out

    def __len__(self) -> int:
        return len(self.indices)

    def take(self, index) -> "MrcImages":
        """The particles `index` (0-based, in that order) as a new source sharing the checked headers."""
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        sub = object.__new__(MrcImages)
        sub.paths, sub.indices, sub.max_open = self.paths[index], self.indices[index], self.max_open
        sub.unique_paths, sub.infos, sub.file_of, sub.box = self.unique_paths, self.infos, self.file_of[index], self.box
        sub._files = OrderedDict()
        return sub

    @property
    def voxel_size_A(self) -> float | None:
        """The first stack's header pixel size in Angstrom, or None when unset."""
        return self.infos[0].voxel_size_A

    def read(self, indices) -> np.ndarray:
        """Images `(len(indices), box, box)` float32 for particle `indices` (any order, repeats allowed). First
        returns the heap the previous chunk freed to the OS (`release_freed_heap`): every streamed stage reads its
        chunks through here."""
        release_freed_heap()
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(indices) == 0:
            return np.empty((0, self.box, self.box), dtype=np.float32)
        files = self.file_of[indices]
        local = self.indices[indices]
        if len(self.infos) == 1:
            return self._read_file(0, local)
        out = np.empty((len(indices), self.box, self.box), dtype=np.float32)
        order = np.argsort(files, kind="stable")
        files_sorted = files[order]
        starts = np.flatnonzero(np.r_[True, files_sorted[1:] != files_sorted[:-1]])
        ends = np.r_[starts[1:], len(order)]
        for s, e in zip(starts, ends):
            sel = order[s:e]
            out[sel] = self._read_file(int(files_sorted[s]), local[sel])
        return out

    def __getstate__(self):  # open files do not travel to worker processes; reopen there
        state = self.__dict__.copy()
        state["_files"] = OrderedDict()
        return state


def read_stack_list(path: str | os.PathLike) -> MrcImages:
    """A `.txt` list of stacks (one path per line, relative paths from the .txt's folder;
    blank lines and `#` comments skipped) as one `MrcImages` over all their images in order."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: stack list not found")
    stacks = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        stack = Path(line) if os.path.isabs(line) else path.parent / line
        if not stack.is_file():
            raise InputError(f"{path}: line {lineno} names the stack '{line}', which was not found at {stack}")
        if stack.suffix.lower() == ".txt":
            raise InputError(f"{path}: line {lineno} names another list '{line}'; a list holds .mrcs/.mrc stacks only")
        stacks.append(stack)
    if not stacks:
        raise InputError(f"{path}: the stack list names no stacks (expected one .mrcs/.mrc path per line)")
    return MrcImages.from_stacks(stacks)


def open_particles_file(path: str | os.PathLike) -> MrcImages:
    """The images of a bare particle file: a `.mrcs`/`.mrc` stack or a `.txt` list of stacks
    (images only; metadata files such as .star/.cs go through `integrations`)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return read_stack_list(path)
    if suffix in STACK_SUFFIXES:
        return MrcImages.from_stacks([path])
    raise InputError(f"{path}: unknown extension '{path.suffix}' for an image file; expected .mrcs, .mrc or .txt "
                     "(a list of stacks), or read a .star/.cs file with its reader")


def write_mrc(path: str | os.PathLike, data: np.ndarray, voxel_size_A: float, force: bool = False,
              stack: bool = False) -> Path:
    """Write a float32 map `(D, D, D)` or image stack `(n, D, D)` (`stack=True`) with its voxel size in A.

    Atomic (temporary name, then rename); refuses to overwrite unless `force`.
    """
    from cryofire_ext.safe_io import atomic_path

    with atomic_path(path, force=force) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(np.ascontiguousarray(data, dtype=np.float32))
            if stack:
                mrc.set_image_stack()
            mrc.voxel_size = float(voxel_size_A)
    return Path(path)
