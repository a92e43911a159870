"""Neural-field decoder `V(k, z)` (seed Fig. S2): the 3D Fourier transform of the map.

`k` is a 3D frequency in units of Nyquist (`|k| <= 1` inside the slice's circle);
it is encoded with `n_freqs` random Gaussian frequencies (a fixed buffer drawn from
a seeded generator), concatenated with `z`, and passed through `layers` hidden
layers of `hidden` units to 2 outputs read as the real and imaginary parts of the
transform.

Hermitian symmetry is built in: points with `k_z < 0` are evaluated at `-k` and
conjugated, so `V(-k, z) = conj V(k, z)` exactly and the map is real.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class GaussianEncoding(nn.Module):
    """`k` `(..., 3)` -> `(..., 2 * n_freqs)` features `[sin(2 pi k.B), cos(2 pi k.B)]`.

    B `(3, n_freqs)` ~ N(0, (sigma * box / 2)^2): with `k` in units of Nyquist a map of
    diameter `box/2` px varies on the scale of `2 / (box/2)`; `sigma = 0.5` covers it.
    """

    def __init__(self, n_freqs: int, box: int, sigma: float, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(int(seed))
        B = torch.randn(3, n_freqs, generator=gen) * (sigma * box / 2.0)
        self.register_buffer("B", B)

    def forward(self, k: torch.Tensor) -> torch.Tensor:
        phase = 2.0 * math.pi * (k @ self.B)
        return torch.cat((torch.sin(phase), torch.cos(phase)), dim=-1)


class NeuralField(nn.Module):
    """`forward(k (..., 3) Nyquist units, z (..., d) or None) -> F (..., 2)` = (real, imaginary).

    `zdim = 0` is the homogeneous model (z ignored).
    """

    def __init__(self, box: int, zdim: int, hidden: int = 256, layers: int = 4, n_freqs: int | None = None,
                 sigma: float = 0.5, seed: int = 0):
        super().__init__()
        self.box, self.zdim = int(box), int(zdim)
        n_freqs = int(n_freqs or box // 2)
        self.pe = GaussianEncoding(n_freqs, box, sigma, seed)
        dims = [2 * n_freqs + self.zdim] + [hidden] * layers
        mods: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            mods += [nn.Linear(a, b), nn.ReLU()]
        mods.append(nn.Linear(dims[-1], 2))
        self.mlp = nn.Sequential(*mods)

    def forward(self, k: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        flip = k[..., 2:3] < 0
        k = torch.where(flip, -k, k)
        feats = self.pe(k)
        if self.zdim:
            feats = torch.cat((feats, z.to(feats.dtype).expand(*feats.shape[:-1], self.zdim)), dim=-1)
        out = self.mlp(feats).float()
        re, im = out[..., 0], out[..., 1]
        im = torch.where(flip[..., 0], -im, im)
        return torch.stack((re, im), dim=-1)

    def flops_per_point(self) -> int:
        """Multiply-adds x 2 of one forward evaluation (for throughput accounting)."""
        n = 3 * self.pe.B.shape[1] * 2
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                n += 2 * m.in_features * m.out_features
        return n
