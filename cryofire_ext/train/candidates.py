"""Candidates the trainer and `predict` add to the encoder's: each particle's searched (pose, shift, class) against
the fixed warm maps (`SearchCache`), and the z code of each warm class (`class_targets`) at which the searched
pose competes in the winner-take-all loss (`candidates_at_codes`).
"""

from __future__ import annotations

import numpy as np
import torch

from cryofire_ext.refine.search import WarmMap, search


def class_targets(warm: "WarmMap | None", zdim: int, device) -> torch.Tensor | None:
    """The z target of each warm class `(K, zdim)` on `device`, or None without classes (or zdim 0)."""
    if warm is None or warm.n_classes < 2 or zdim < 1:
        return None
    return class_codes(warm.n_classes, zdim).to(device)


def class_codes(n_classes: int, zdim: int) -> torch.Tensor:
    """Latent targets `(K, zdim)` for K classes: the vertices of a regular simplex of unit radius
    (class k -> a point as far from the others as the dimensions allow; truncated when zdim < K-1)."""
    K = int(n_classes)
    centred = torch.eye(K, dtype=torch.float64) - 1.0 / K
    basis = torch.linalg.svd(centred, full_matrices=False).Vh[: max(K - 1, 0)]  # (K-1, K)
    pts = centred @ basis.T  # (K, K-1)
    pts = pts / pts.norm(dim=1, keepdim=True).clamp_min(1e-12)
    out = torch.zeros(K, zdim, dtype=torch.float64)
    m = min(zdim, K - 1)
    out[:, :m] = pts[:, :m]
    return out.float()


def candidates_at_codes(A: torch.Tensor, t: torch.Tensor, codes: torch.Tensor):
    """The searched pose `A` `(n, 3, 3)` and shift `t` `(n, 2)` once per class code `(K, d)` ->
    ((A `(n, K, 3, 3)`, t `(n, K, 2)`), z `(n, K, d)`): the decoder then picks the class (winner-take-all)."""
    n, K = A.shape[0], codes.shape[0]
    return (A[:, None].expand(-1, K, -1, -1), t[:, None].expand(-1, K, -1)), codes[None].expand(n, -1, -1)


class SearchCache:
    """Each particle's searched (pose, shift, class) against the fixed warm maps, computed when the
    particle is first seen and kept (checkpointed, so a resumed run reuses the same values).

    `get(idx, img, ctf)`: particle indices `(n,)` and their training images -> A `(n, 3, 3)`,
    shifts `(n, 2)` px of the training box, class `(n,)`.
    """

    def __init__(self, warm: WarmMap, n: int, saved: dict | None = None):
        self.warm = warm
        self.A = torch.zeros(n, 3, 3)
        self.t = torch.zeros(n, 2)
        self.cls = torch.zeros(n, dtype=torch.long)
        self.known = torch.zeros(n, dtype=torch.bool)
        if saved is not None:
            self.A, self.t, self.cls, self.known = saved["A"], saved["t"], saved["cls"], saved["known"]

    def get(self, idx, img: torch.Tensor, ctf: torch.Tensor):
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        todo = torch.nonzero(~self.known[idx]).squeeze(-1)
        if len(todo):
            A, t, c = search(self.warm, img[todo.to(img.device)], ctf[todo.to(ctf.device)])
            j = idx[todo]
            self.A[j], self.t[j] = A.cpu(), t.cpu()
            self.cls[j], self.known[j] = c.cpu(), True
        return self.A[idx].to(img.device), self.t[idx].to(img.device), self.cls[idx].to(img.device)

    def state(self) -> dict:
        return {"A": self.A, "t": self.t, "cls": self.cls, "known": self.known}
