"""The run folder a command writes into: locked while in use, left as it was when the command fails.

`run_folder(out)` makes the folder (refusing a file in its place), takes `FolderLock` (a second
`train` into the same folder refuses while the first runs; a lock left by a killed process is taken
over with a warning), and on failure removes what this command added unless the folder now holds
resumable state (`checkpoints/last.pt`): a failed command leaves nothing behind, a stopped training
leaves what `--resume` needs. Files that were there before are never removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator

# the run folder's file names are defined once, in the core (the trainer writes some of them); integrations/ and
# cli/ take them from here
from cryofire_ext.run_layout import (CHECKPOINTS, CLASSES, CONFIG, HISTORY, LAST_CHECKPOINT, LOSS_PLOT, MAPS,
                                     PARTICLES_CS, PARTICLES_STAR, PREDICTIONS, REFINE, TRAIN_LOG)
from cryofire_ext.safe_io import LOCK_NAME, FolderLock, check_output_folder

__all__ = ["CHECKPOINTS", "CLASSES", "CONFIG", "HISTORY", "LAST_CHECKPOINT", "LOSS_PLOT", "MAPS", "PARTICLES_CS",
           "PARTICLES_STAR", "PREDICTIONS", "REFINE", "TRAIN_LOG", "RESUMABLE", "RUN_FILES", "RUN_SUBFOLDERS",
           "run_folder", "check_inputs_kept"]

log = logging.getLogger(__name__)

#: what makes a run folder resumable (kept, with everything beside it, when a command fails)
RESUMABLE = (LAST_CHECKPOINT,)


def _entries(folder: Path) -> set[str]:
    try:
        return set(os.listdir(folder))
    except OSError:
        return set()


@contextlib.contextmanager
def run_folder(out, *, what: str = "run", resumable: Iterable[str] = RESUMABLE) -> Iterator[Path]:
    """Lock `out` (created with its parents when absent) for the block; on an exception remove what the block
    added there (and the folders it created) unless one of `resumable` exists then."""
    out = check_output_folder(out)
    made = [p for p in (out, *out.parents) if not p.exists()]  # deepest first
    before = _entries(out)
    lock = FolderLock(out, what)
    lock.acquire()  # before anything is written; raises (having written nothing) when another run holds it
    try:
        yield out
    except BaseException:
        if not any((out / r).exists() for r in resumable):
            for name in sorted(_entries(out) - before - {LOCK_NAME}):
                path = out / name
                with contextlib.suppress(OSError):
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path)
                    else:
                        path.unlink()
        raise
    finally:
        lock.release()
        for folder in made:  # only those this command made, and only when empty
            with contextlib.suppress(OSError):
                folder.rmdir()


#: files a run folder receives (exports and the run's own), and the folders it writes into
RUN_FILES = (PREDICTIONS, PARTICLES_STAR, PARTICLES_CS, LOSS_PLOT, CLASSES, REFINE, CONFIG, HISTORY, TRAIN_LOG)
RUN_SUBFOLDERS = (MAPS, CHECKPOINTS)


def check_inputs_kept(out, inputs: Iterable) -> None:
    """InputError when writing a run into `out` would replace one of `inputs` (with or without --force)."""
    from cryofire_ext.errors import InputError
    from cryofire_ext.safe_io import check_not_inputs, same_file

    out = Path(out)
    inputs = [Path(p) for p in inputs]
    check_not_inputs([out / n for n in RUN_FILES], inputs)
    for inp in inputs:
        for sub in RUN_SUBFOLDERS:
            if same_file(inp.parent, out / sub):
                raise InputError(f"{inp}: this input lies in {out / sub}, which the run writes into; cryofire never "
                                 "writes over its inputs. Choose another output folder.")
