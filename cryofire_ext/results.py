"""Predictions: one row per particle from the final inference pass; versioned .npz, no pickle."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cryofire_ext.errors import InputError, brief
from cryofire_ext.safe_io import atomic_path

FORMAT = "cryofire-predictions"
FORMAT_VERSION = 2
#: the optional per-particle confidences (written when present)
CONFIDENCES = ("pose_confidence", "class_probability")


@dataclass
class Predictions:
    """ids `(n,)` str; A `(n, 3, 3)` RELION matrices (left-multiply xyz column vectors);
    shifts_A `(n, 2)` RELION-sign origins in Angstrom; z `(n, d)` (d may be 0);
    loss `(n,)` per-particle loss; class_id `(n,)` int64, each particle's class, 0-based (the refinement's
    classes; all 0 for one class; None = all 0); meta: JSON-able run facts (pixel_size_A, box, ...).
    pose_confidence / class_probability `(n,)` in [0, 1] or None (`refine.references`: the posterior mass near
    each particle's pose, the probability of its class). Files of format version 1 (before classes) load with
    every particle in class 0; files without the confidences load with None."""

    ids: np.ndarray
    A: np.ndarray
    shifts_A: np.ndarray
    z: np.ndarray
    loss: np.ndarray
    meta: dict = field(default_factory=dict)
    class_id: np.ndarray | None = None
    pose_confidence: np.ndarray | None = None
    class_probability: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.ids)
        self.ids = np.asarray(self.ids, dtype=str)  # a str array is shared, not copied (the stack's ids)
        self.z = np.asarray(self.z, dtype=np.float32).reshape(n, -1)
        if self.class_id is None:
            self.class_id = np.zeros(n, dtype=np.int64)
        self.class_id = np.asarray(self.class_id)
        if self.class_id.shape != (n,) or not np.issubdtype(self.class_id.dtype, np.integer) or (
                n and self.class_id.min() < 0):
            raise InputError(f"Predictions.class_id must be {n} integers >= 0 (0-based classes), got shape "
                             f"{self.class_id.shape} of {self.class_id.dtype}")
        self.class_id = self.class_id.astype(np.int64)
        for name, shape in (("A", (n, 3, 3)), ("shifts_A", (n, 2)), ("loss", (n,))):
            if np.shape(getattr(self, name)) != shape:
                raise InputError(f"Predictions.{name} has shape {np.shape(getattr(self, name))}, expected {shape}")
        for name in CONFIDENCES:
            v = getattr(self, name)
            if v is None:
                continue
            v = np.asarray(v, dtype=np.float32)
            if v.shape != (n,) or not np.all((v >= 0) & (v <= 1)):
                raise InputError(f"Predictions.{name} must be {n} numbers in [0, 1], got shape {v.shape}")
            setattr(self, name, v)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def zdim(self) -> int:
        return int(self.z.shape[1])

    def confidences(self) -> dict[str, np.ndarray]:
        """{name: `(n,)`} of the confidences present (`CONFIDENCES`)."""
        return {name: getattr(self, name) for name in CONFIDENCES if getattr(self, name) is not None}

    @property
    def n_classes(self) -> int:
        """Number of classes: the largest class id + 1 (1 when empty)."""
        return int(self.class_id.max()) + 1 if len(self.class_id) else 1

    def save(self, path: str | os.PathLike, force: bool = False) -> Path:
        """Write a versioned `.npz` (atomic; refuses to overwrite unless `force`)."""
        header = {"format": FORMAT, "version": FORMAT_VERSION, "meta": self.meta}
        optional = self.confidences()
        with atomic_path(path, force=force) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, header=np.array(json.dumps(header)), ids=np.asarray(self.ids, dtype=str), A=self.A,
                         shifts_A=self.shifts_A, z=self.z, loss=self.loss,
                         class_id=self.class_id, **optional)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Predictions":
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: predictions file not found")
        try:
            with np.load(path, allow_pickle=False) as npz:
                header = json.loads(str(npz["header"]))
                arrays = {k: npz[k] for k in ("ids", "A", "shifts_A", "z", "loss")}
                for name in ("class_id",) + CONFIDENCES:
                    arrays[name] = npz[name] if name in npz.files else None
        except Exception as exc:  # zip, npy, JSON and key errors of a damaged or foreign file
            raise InputError(f"{path}: not a cryofire predictions file ({brief(exc)})") from None
        if header.get("format") != FORMAT or header.get("version", 0) > FORMAT_VERSION:
            raise InputError(f"{path}: format {header.get('format')} v{header.get('version')} is not "
                             f"{FORMAT} v<={FORMAT_VERSION}")
        return cls(meta=header.get("meta", {}), **arrays)
