"""Image encoder (seed Fig. S1): real-space image -> rotation(s), shift(s), conformation z.

CNN: 5 levels of 3x3 conv + BatchNorm + ReLU + 2x2 max-pool, so a `D`-pixel image
ends as `channels[-1]` (256) maps of `(D/32)^2`; flattened; shared MLP (4 hidden x
`hidden`) -> `y`; conformation MLP (3 hidden x `hidden`) -> `z` `(n, zdim)`;
`(y, z)` -> rotation MLP (6D per head, Gram-Schmidt) and translation MLP.

Translation unit: pixels of the model's box (RELION origin sign: the shift that
re-centres the particle), `(x, y)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cryofire_ext.errors import InputError
from cryofire_ext.poses import sixd_to_matrix

MIN_BOX = 32


def mlp(n_in: int, hidden: int, n_hidden: int, n_out: int) -> nn.Sequential:
    dims = [n_in] + [hidden] * n_hidden
    mods: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        mods += [nn.Linear(a, b), nn.ReLU()]
    mods.append(nn.Linear(dims[-1], n_out))
    return nn.Sequential(*mods)


@dataclass
class EncoderOutput:
    """R `(n, K, 3, 3)` RELION matrices (left-multiply xyz columns); shift_px `(n, K, 2)`; z `(n, zdim)`."""

    R: torch.Tensor
    shift_px: torch.Tensor
    z: torch.Tensor


class Encoder(nn.Module):
    def __init__(self, box: int, zdim: int, channels=(32, 64, 128, 256, 256), hidden: int = 256, n_heads: int = 1):
        super().__init__()
        if box < MIN_BOX or box % 32:
            raise InputError(f"box {box} px does not suit the encoder: it pools 5 times by 2, so the box must be "
                             f"a multiple of 32 px and at least {MIN_BOX} px (set train_box, e.g. 32 or 64)")
        self.box, self.zdim, self.n_heads = int(box), int(zdim), int(n_heads)
        convs: list[nn.Module] = []
        c_in = 1
        for c in channels:
            convs += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c
        self.cnn = nn.Sequential(*convs)
        n_flat = c_in * (box // 32) ** 2
        self.shared = mlp(n_flat, hidden, 4, hidden)
        self.conf = mlp(hidden, hidden, 3, zdim) if zdim else None
        self.rot = mlp(hidden + zdim, hidden, 2, 6 * n_heads)
        self.trans = mlp(hidden + zdim, hidden, 2, 2 * n_heads)
        # start the 6D heads at spread-out rotations (one random rotation per head)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(12345)
            q = torch.nn.functional.normalize(torch.randn(n_heads, 4, generator=gen), dim=-1)
            self.rot[-1].bias.copy_(_quat_to_sixd(q).reshape(-1))
            self.rot[-1].weight.mul_(0.1)
            self.trans[-1].weight.mul_(0.1)
            self.trans[-1].bias.zero_()

    def forward(self, img: torch.Tensor) -> EncoderOutput:
        """img `(n, D, D)` normalised real-space images."""
        n = img.shape[0]
        y = self.shared(self.cnn(img[:, None]).flatten(1))
        z = self.conf(y) if self.conf is not None else y.new_zeros(n, 0)
        yz = torch.cat((y, z), dim=-1)
        R = sixd_to_matrix(self.rot(yz).float().reshape(n, self.n_heads, 6))
        t = self.trans(yz).float().reshape(n, self.n_heads, 2)
        return EncoderOutput(R, t, z.float())

    def flops_per_image(self) -> int:
        """Multiply-adds x 2 of one forward pass."""
        n, side = 0, self.box
        for m in self.cnn:
            if isinstance(m, nn.Conv2d):
                n += 2 * side * side * 9 * m.in_channels * m.out_channels
            elif isinstance(m, nn.MaxPool2d):
                side //= 2
        for seq in (self.shared, self.conf, self.rot, self.trans):
            if seq is not None:
                n += sum(2 * m.in_features * m.out_features for m in seq if isinstance(m, nn.Linear))
        return n


def _quat_to_sixd(q: torch.Tensor) -> torch.Tensor:
    w, x, y, z = q.unbind(-1)
    R = torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], dim=-1).reshape(*q.shape[:-1], 3, 3)
    return torch.cat((R[..., :, 0], R[..., :, 1]), dim=-1)
