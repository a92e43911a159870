"""Safe writes: refuse to overwrite unless asked; write to a temporary name, then rename.

Every writer in the package goes through `atomic_path` (one file) so that a crash
or an error never leaves a half-written file under the final name. A failed write
(permission denied, disk full, a file where a folder should be) is raised as an
`OSError` that names the final path, never the temporary one; `describe_os_error`
turns it into one sentence. `FolderLock` keeps two runs out of one folder, and
`check_not_inputs` keeps outputs off the files a command reads.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator

from cryofire_ext.errors import InputError

log = logging.getLogger(__name__)

#: below this many free bytes a write that stopped short is reported as a full disk
NEARLY_FULL_BYTES = 16 << 20

_ERRNO_WORDS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted (read-only or immutable file or folder)",
    errno.EROFS: "the file system is read-only",
    errno.ENOSPC: "no space left on the device (disk full); free some space or choose another output folder",
    errno.EDQUOT: "disk quota exceeded; free some space or choose another output folder",
    errno.ENOTDIR: "not a folder (a file of that name is in the way)",
    errno.EISDIR: "is a folder, not a file",
    errno.ENOENT: "no such file or folder",
    errno.EEXIST: "exists already",
    errno.ENAMETOOLONG: "the name is too long",
    errno.EIO: "input/output error (the device failed)",
    errno.EFBIG: "the file is too large for the file system",
    errno.EMFILE: "too many open files",
}


def describe_os_error(exc: OSError) -> str:
    """One sentence for an OSError: the path it concerns and what happened in words."""
    what = _ERRNO_WORDS.get(exc.errno) if exc.errno is not None else None
    if what is None:
        what = exc.strerror or str(exc) or type(exc).__name__
    where = exc.filename if exc.filename is not None else None
    text = f"{where}: {what}" if where is not None else what
    if exc.filename2 is not None:
        text += f" (with {exc.filename2})"
    return text


def umask() -> int:
    """The process umask (read from /proc where possible, which does not change it even briefly)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _as_output_error(exc: BaseException, path: Path) -> OSError | None:
    """`exc` (raised while writing `path`) as an OSError naming `path`, or None when it is not an I/O failure.

    Covers plain OSErrors (their temporary file name replaced by `path`), numpy's errno-less
    "N requested and M written" and torch's "enforce fail at inline_container.cc" / "PytorchStreamWriter
    failed" (a short write). A short write with little free space left is reported as a full disk.
    """
    text = str(exc)
    short_write = (isinstance(exc, OSError) and exc.errno is None and "requested and" in text) or (
        isinstance(exc, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text
                                           or "file write failed" in text))
    if isinstance(exc, OSError) and not short_write:
        return OSError(exc.errno, exc.strerror or text, str(path))
    if not short_write:
        return None
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    if free is not None and free < NEARLY_FULL_BYTES:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return OSError(errno.EIO, f"the write stopped short ({' '.join(text.split())[:120]})", str(path))


def check_writable(path: str | os.PathLike, force: bool) -> Path:
    """Return `path` as a Path; raise InputError if it exists and `force` is False (or it is a folder)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: the output is a folder; expected a file name there")
    if path.exists() and not force:
        raise InputError(
            f"{path}: the output exists already. Choose another name or pass --force to overwrite it."
        )
    return path


def check_output_folder(path: str | os.PathLike) -> Path:
    """Return `path` as a Path; InputError when it (or a parent) exists and is not a folder."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise InputError(f"{p}: not a folder (a file of that name exists); the output folder "
                                 f"{path} cannot be made there. Choose another -o/--out.")
            break
    return path


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when `a` and `b` name one file (resolved paths, or the same inode when both exist)."""
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def check_not_inputs(outputs: Iterable[str | os.PathLike], inputs: Iterable[str | os.PathLike]) -> None:
    """InputError when any output would replace an input file (with or without --force)."""
    inputs = [Path(p) for p in inputs if p is not None]
    for out in outputs:
        for inp in inputs:
            if same_file(out, inp):
                raise InputError(f"{out}: this output would overwrite the input file {inp}; cryofire never "
                                 "writes over its inputs (--force or not). Choose another output folder/name.")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The temporary file keeps `path`'s suffix (some writers look at it) and gets the mode
    `open()` would give a new file (0o666 less the umask). On any exception the temporary file
    is removed and `path` is left untouched; an I/O failure is raised as an OSError naming `path`.
    """
    path = check_writable(path, force)
    check_output_folder(path.parent)
    tmp_path = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
        tmp_path = Path(tmp)
        try:
            os.fchmod(fd, 0o666 & ~umask())
        finally:
            os.close(fd)
        yield tmp_path
        os.replace(tmp_path, path)
    except (OSError, RuntimeError) as exc:
        err = _as_output_error(exc, path)
        if err is None:
            raise
        raise err from exc
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


LOCK_NAME = ".cryofire.lock"


class FolderLock:
    """An exclusive lock on a folder for one process: the file `LOCK_NAME` holding its pid and host.

    `acquire()` creates the folder if needed; raises InputError naming the holder when another live
    process holds the lock. A lock left by a process that died (same host, pid gone) is taken over
    with a warning; a lock from another host is never taken over (remove the file by hand once that
    run is gone). `release()` removes the file. Use as a context manager.
    """

    def __init__(self, folder: str | os.PathLike, what: str = "run"):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self.held = False

    @staticmethod
    def _alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, owned by someone else
            return True
        return True

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def _create(self) -> bool:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(me))
        return True

    def acquire(self) -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                self.held = True
                return self
            holder = self._read()
            pid, host = holder.get("pid"), holder.get("host")
            if not holder:  # being written this instant, or left empty by a crash
                try:
                    age = time.time() - self.path.stat().st_mtime
                except FileNotFoundError:
                    continue
                if age < 10:
                    time.sleep(0.2)
                    continue
            elif host != socket.gethostname():
                raise InputError(f"{self.folder}: another {self.what} (pid {pid} on host {host}, started "
                                 f"{holder.get('started', '?')}) is using this folder; wait for it to finish or "
                                 f"choose another output folder. If that run is gone, delete {self.path}.")
            elif isinstance(pid, int) and self._alive(pid):
                raise InputError(f"{self.folder}: another {self.what} (pid {pid}, started "
                                 f"{holder.get('started', '?')}) is using this folder; wait for it to finish or "
                                 f"choose another output folder. If pid {pid} is not cryofire, delete {self.path}.")
            log.warning("%s: taking over a stale lock left by pid %s on %s (that process is gone)",
                        self.folder, pid, host)
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        raise InputError(f"{self.folder}: could not lock the folder ({self.path} keeps reappearing); is another "
                         f"{self.what} starting there?")

    def release(self) -> None:
        if self.held:
            if self._read().get("pid") == os.getpid():
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
            self.held = False

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
