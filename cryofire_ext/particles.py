"""ParticleStack: what the core knows about a set of particles.

No STAR or .cs column names here. Adapters in `integrations` build a stack and
may attach an opaque `passthrough` (their own table) so that their exporters can
keep every input column; the core never looks inside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from cryofire_ext.ctf import CTFParams
from cryofire_ext.errors import InputError, MissingImagesError
from cryofire_ext.images import ImageSource


@dataclass
class ParticleStack:
    """A set of `n` particles.

    ids: `(n,)` stable particle ids (str; e.g. RELION image names or cryoSPARC uids as text).
    pixel_size_A: Angstrom per pixel of the images (one value for the stack).
    box: image size in pixels (square).
    ctf: per-particle CTF parameters in internal units.
    images: lazy image source, or None when only metadata was read.
    A: `(n, 3, 3)` RELION rotation matrices (left-multiply xyz column vectors), or None.
    shifts_A: `(n, 2)` RELION-sign origins in Angstrom, (x, y), or None.
    class_id: `(n,)` 0-based class, or None.  subset: `(n,)` half-set 0/1, or None.
    optics_group: `(n,)` 0-based optics group.
    source_rows: `(n,)` row of each particle in `passthrough`.
    passthrough: the adapter's own table (opaque to the core).
    missing_stacks: stack files named by the metadata that could not be found (images is then None).
    image_names: `(n,)` str, where each particle's image lives in RELION's `N@path` form (N 1-based), for
        particles whose image source does not name them: readers fill it when stacks are absent (metadata-only
        conversion; cryoSPARC: `blob/idx + 1 @ blob/path`), and writers use it for rlnImageName / blob/path when
        `images` has no `paths` / `indices`. The path is absolute when the stack was found, else as the source
        wrote it. None when the image source names every image (a `(n,)` str array of names is hundreds of bytes
        per particle) or when unknown.
    """

    ids: np.ndarray
    pixel_size_A: float
    box: int
    ctf: CTFParams
    images: ImageSource | None = None
    A: np.ndarray | None = None
    shifts_A: np.ndarray | None = None
    class_id: np.ndarray | None = None
    subset: np.ndarray | None = None
    optics_group: np.ndarray | None = None
    source_rows: np.ndarray | None = None
    passthrough: Any = field(default=None, repr=False)
    missing_stacks: list[str] = field(default_factory=list)
    image_names: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.ids)
        # str arrays are kept, not copied: `with_poses` / `take` / Predictions share them (n x 4 bytes per character)
        self.ids = np.asarray(self.ids, dtype=str)
        if self.source_rows is None:
            self.source_rows = np.arange(n)
        if self.optics_group is None:
            self.optics_group = np.zeros(n, dtype=np.int64)
        if self.image_names is not None:
            self.image_names = np.asarray(self.image_names, dtype=str)
        if len(self.ctf) != n:
            raise InputError(f"{len(self.ctf)} CTF rows for {n} particles")
        for name, shape in (("A", (n, 3, 3)), ("shifts_A", (n, 2)), ("class_id", (n,)), ("subset", (n,)),
                            ("optics_group", (n,)), ("source_rows", (n,)), ("image_names", (n,))):
            value = getattr(self, name)
            if value is not None and np.shape(value) != shape:
                raise InputError(f"ParticleStack.{name} has shape {np.shape(value)}, expected {shape}")
        if self.images is not None and len(self.images) != n:
            raise InputError(f"{len(self.images)} images for {n} particles")
        if not self.pixel_size_A > 0:
            raise InputError(f"pixel size must be positive, got {self.pixel_size_A} A")

    def __len__(self) -> int:
        return len(self.ids)

    def require_images(self) -> ImageSource:
        """The image source, or an InputError listing the stacks that could not be found."""
        if self.images is None:
            listed = ", ".join(self.missing_stacks[:5]) or "(none named)"
            more = f" and {len(self.missing_stacks) - 5} more" if len(self.missing_stacks) > 5 else ""
            raise MissingImagesError(f"the particle images are not available: missing stack files {listed}{more}. "
                             "Pass --datadir with the folder that holds them.")
        return self.images

    def take(self, index) -> "ParticleStack":
        """The particles selected by `index` (0-based ints, in that order, or a boolean mask).

        The passthrough table is shared, not copied: `source_rows` keep pointing at the selected
        particles' rows in it, so exporters write every input column of exactly those rows.
        """
        idx = np.asarray(index)
        idx = np.nonzero(idx)[0] if idx.dtype == bool else idx.astype(np.int64).reshape(-1)
        if len(idx) and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise InputError(f"particle index out of range for a stack of {len(self)} particles")

        def pick(value):
            return None if value is None else np.asarray(value)[idx]

        images = self.images
        if images is not None:
            images = images.take(idx) if hasattr(images, "take") else _ImageSubset(images, idx)
        return replace(self, ids=self.ids[idx], ctf=self.ctf.subset(idx), images=images, A=pick(self.A),
                       shifts_A=pick(self.shifts_A), class_id=pick(self.class_id), subset=pick(self.subset),
                       optics_group=pick(self.optics_group), source_rows=pick(self.source_rows),
                       image_names=pick(self.image_names))

    def with_poses(self, A: np.ndarray, shifts_A: np.ndarray) -> "ParticleStack":
        """A copy with new poses (the passthrough is shared, not copied)."""
        return replace(self, A=np.asarray(A, dtype=np.float64), shifts_A=np.asarray(shifts_A, dtype=np.float64))


class _ImageSubset:
    """The images `index` of another image source (for `ParticleStack.take`); keeps `paths`/`indices`
    when the source has them so exporters can still name each image."""

    def __init__(self, source: ImageSource, index: np.ndarray):
        self.source, self.index, self.box = source, np.asarray(index, dtype=np.int64), source.box
        if hasattr(source, "paths") and hasattr(source, "indices"):
            self.paths = np.asarray(source.paths)[self.index]
            self.indices = np.asarray(source.indices)[self.index]

    def __len__(self) -> int:
        return len(self.index)

    def read(self, indices) -> np.ndarray:
        return self.source.read(self.index[np.asarray(indices, dtype=np.int64)])
