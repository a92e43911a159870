"""What `analyze` reads from a training run folder: predictions, particle files, the loss curve."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cryofire_ext import run_layout
from cryofire_ext.errors import InputError
from cryofire_ext.results import Predictions

log = logging.getLogger(__name__)


# --------------------------------------------------------------------- run folders
@dataclass
class Run:
    """What `analyze` reads from a training run folder.

    path: the run folder; predictions: its `predictions.npz`; particle_files: the run's
    `particles.star` / `particles.cs` that exist (subsets are written in the same formats);
    loss_history: (x `(m,)`, loss `(m,)`, x label) or None when the run kept none.
    """

    path: Path
    predictions: Predictions
    particle_files: list[Path]
    loss_history: tuple[np.ndarray, np.ndarray, str] | None = None

    @property
    def pixel_size_A(self) -> float | None:
        v = self.predictions.meta.get("pixel_size_A")
        return None if v is None else float(v)


def loss_history(run_dir: Path) -> tuple[np.ndarray, np.ndarray, str] | None:
    """The training loss curve from `run_dir/history.json` (the trainer's list of records with `loss` and
    `images` seen, or `epoch`/`step`), or None when the run kept none."""
    path = run_dir / run_layout.HISTORY
    if not path.is_file():
        return None
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError):
        log.warning("%s: not readable JSON; no loss curve", path)
        return None
    if isinstance(records, dict):
        records = records.get("history", [])
    records = [r for r in records if isinstance(r, dict) and "loss" in r] if isinstance(records, list) else []
    if not records:
        return None
    xkey = next((k for k in ("images", "step", "epoch") if all(k in r for r in records)), None)
    x = np.array([r[xkey] for r in records], dtype=np.float64) if xkey else np.arange(1, len(records) + 1.0)
    label = {"images": "images seen", None: "record"}.get(xkey, xkey)
    return x, np.array([r["loss"] for r in records], dtype=np.float64), label


def load_run(run_dir: str | os.PathLike) -> Run:
    """Read a run folder: `predictions.npz` (required), the particle files and the loss curve."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: run folder not found (expected the output folder of `cryofire train`)")
    pred_path = run_dir / run_layout.PREDICTIONS
    if not pred_path.is_file():
        raise InputError(f"{run_dir}: no predictions.npz in this run folder; it is written at the end of "
                         "`cryofire train` (or by `cryofire predict`). Give the folder of a finished run.")
    predictions = Predictions.load(pred_path)
    files = [run_dir / name for name in (run_layout.PARTICLES_STAR, run_layout.PARTICLES_CS) if (run_dir / name).is_file()]
    return Run(path=run_dir, predictions=predictions, particle_files=files, loss_history=loss_history(run_dir))
