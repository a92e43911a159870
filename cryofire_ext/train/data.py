"""Streaming training data: a checked, normalised view of a lazy stack and a prefetching loader.

Memory stays bounded by `prefetch` batches: images are read from the stack's lazy
source (positioned file reads) batch by batch in a background thread while the model
works on the previous batch.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from cryofire_ext import fourier
from cryofire_ext.errors import InputError
from cryofire_ext.particles import ParticleStack

log = logging.getLogger(__name__)


@dataclass
class StackStats:
    """Mean and std of the raw pixels over the whole stack (after Fourier cropping)."""

    mean: float
    std: float


def scan_stack(stack: ParticleStack, train_box: int, chunk: int = 512) -> StackStats:
    """Read every image once (chunked): refuse NaN/inf pixels, return pixel mean/std at `train_box`.

    Raises InputError naming the first bad particle (id and 0-based row).
    """
    images = stack.require_images()
    n = len(stack)
    s1 = s2 = 0.0
    count = 0
    for start in range(0, n, chunk):
        idx = np.arange(start, min(n, start + chunk))
        raw = images.read(idx)
        finite = np.isfinite(raw).all(axis=(1, 2))
        if not finite.all():
            bad = int(idx[np.argmin(finite)])
            where = ""
            paths = getattr(images, "paths", None)
            if paths is not None:
                where = f" in {paths[bad]} (image {int(images.indices[bad]) + 1}, 1-based)"
            raise InputError(f"particle '{stack.ids[bad]}' (particle {bad + 1}, 1-based){where} has NaN or infinite pixels; "
                             "remove it or fix the stack before training")
        x = crop(torch.from_numpy(raw), train_box).double()
        s1 += float(x.sum())
        s2 += float((x * x).sum())
        count += x.numel()
    mean = s1 / count
    std = float(np.sqrt(max(s2 / count - mean * mean, 0.0)))
    if not std > 0:
        raise InputError("the particle images are constant (zero variance); nothing to learn from")
    return StackStats(mean, std)


def stack_fingerprint(stack: ParticleStack) -> str:
    """A short digest of the particles' identity: ids, CTF parameters and the first, middle and last
    image's pixels. Equal fingerprints mean "the same particles in the same order" for reusing
    per-particle results (simulated sets share ids "1".."n", so ids alone are not enough)."""
    h = hashlib.sha256()
    h.update("\n".join(stack.ids.tolist()).encode())
    h.update(np.ascontiguousarray(stack.ctf.as_array(), dtype=np.float64).tobytes())
    n = len(stack)
    if n:
        h.update(np.ascontiguousarray(stack.require_images().read(np.array([0, n // 2, n - 1])),
                                      dtype=np.float32).tobytes())
    return h.hexdigest()[:32]


def crop(img: torch.Tensor, box: int) -> torch.Tensor:
    """Fourier-crop `(n, D, D)` to `(n, box, box)` (no-op when equal)."""
    return img if img.shape[-1] == box else fourier.fourier_crop(img, box)


class TrainingImages:
    """`read(indices)` -> normalised `(n, box, box)` float32 tensor at the training box, plus CTF `(n, 9)`."""

    def __init__(self, stack: ParticleStack, box: int, stats: StackStats):
        self.source = stack.require_images()
        self.ctf = torch.from_numpy(stack.ctf.as_array())
        self.box, self.stats = int(box), stats
        self.ids = stack.ids

    def __len__(self) -> int:
        return len(self.source)

    def read(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Images `(n, box, box)` float32 and CTF `(n, 9)`."""
        raw = torch.from_numpy(self.source.read(np.asarray(indices)))
        if not torch.isfinite(raw).all():
            bad = int(np.asarray(indices)[int(torch.nonzero(~torch.isfinite(raw).flatten(1).all(1))[0])])
            raise InputError(f"particle '{self.ids[bad]}' (particle {bad + 1}, 1-based) has NaN or infinite pixels")
        img = (crop(raw, self.box) - self.stats.mean) / self.stats.std
        return img.float(), self.ctf[torch.as_tensor(np.asarray(indices))]


class PrefetchLoader:
    """Iterate `(batch_number, indices, images, ctf)` over `batches`, reading ahead in a thread.

    `prefetch` = batches held in the queue (bounded memory). Errors in the reader are
    re-raised in the consumer.
    """

    def __init__(self, data: TrainingImages, batches: Sequence[tuple[int, np.ndarray]], prefetch: int = 2):
        self.data, self.batches, self.prefetch = data, list(batches), max(1, int(prefetch))

    def __iter__(self) -> Iterator[tuple[int, np.ndarray, torch.Tensor, torch.Tensor]]:
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def work():
            try:
                for b, idx in self.batches:
                    if stop.is_set():
                        return
                    img, ctf = self.data.read(idx)
                    q.put((b, idx, img, ctf))
                q.put(None)
            except BaseException as exc:  # handed to the consumer
                q.put(exc)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while thread.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.05)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The epoch's global batches: a permutation from `(seed, epoch)`, full batches only
    (all of them when `n < batch_size`)."""
    perm = np.random.default_rng([int(seed), int(epoch), 7]).permutation(n)
    if n < batch_size:
        return [perm]
    return [perm[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
