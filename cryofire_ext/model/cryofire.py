"""CryoFIRE: encoder + neural field + forward model, on a fixed image box.

Forward model per image and pose candidate: the half slice lattice `k` (inside the
unit circle, one point of each `{k, -k}` pair) rotated to `A^T k` (row vectors
`k @ A`), the decoder at `(A^T k, z)`, times the CTF; compared with the observed
transform after undoing the candidate shift.

Candidates per image: the encoder's `K` pose heads, and with `symmetric` also the
heads of the copy rotated 180 deg in-plane, mapped back to the original image
(`A = Rz(pi) A'`, `t = -t'`); the smallest loss wins (winner-take-all).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cryofire_ext import fourier
from cryofire_ext.ctf import evaluate_ctf
from cryofire_ext.model.decoder import NeuralField
from cryofire_ext.model.encoder import Encoder
from cryofire_ext.model.losses import candidate_losses, winner_take_all
from cryofire_ext.recon.lattice import Lattice

RZ_PI = torch.diag(torch.tensor([-1.0, -1.0, 1.0]))


@dataclass
class StepOutput:
    """loss `(n,)` per image (winner); R `(n, 3, 3)`; shift_px `(n, 2)`; z `(n, d)` the encoder's;
    R_all `(n, C, 3, 3)`, shift_all `(n, C, 2)` every candidate (for distillation); z_win `(n, d)` the
    z the winning candidate was rendered with."""

    loss: torch.Tensor
    R: torch.Tensor
    shift_px: torch.Tensor
    z: torch.Tensor
    R_all: torch.Tensor
    shift_all: torch.Tensor
    z_win: torch.Tensor


class CryoFIRE(nn.Module):
    def __init__(self, box: int, pixel_size_A: float, zdim: int, *, enc_channels=(32, 64, 128, 256, 256),
                 hidden: int = 256, dec_hidden: int = 256, dec_layers: int = 4, pe_freqs: int | None = None,
                 pe_sigma: float = 0.15, n_pose_heads: int = 1, symmetric: bool = True, seed: int = 0):
        super().__init__()
        self.box, self.zdim, self.symmetric = int(box), int(zdim), bool(symmetric)
        self.encoder = Encoder(box, zdim, enc_channels, hidden, n_pose_heads)
        self.decoder = NeuralField(box, zdim, dec_hidden, dec_layers, pe_freqs, pe_sigma, seed)
        lat = Lattice(box, pixel_size_A, "cpu")  # the engine's half lattice, as buffers that follow the device
        self.register_buffer("half_idx", lat.idx)
        self.register_buffer("k_half", lat.k.contiguous())
        self.register_buffer("k_radius", lat.r)
        self.register_buffer("pixel_size_A", torch.tensor(float(pixel_size_A), dtype=torch.float64))
        self.register_buffer("img_scale", torch.tensor(1.0))  # std of raw pixels, set before training

    # ---- pieces
    def observed(self, img: torch.Tensor) -> torch.Tensor:
        """Normalised images `(n, D, D)` -> centred transform on the half lattice `(n, m)` complex (scaled 1/D)."""
        F = fourier.fft2_centered(img.float()) / self.box
        return F.reshape(F.shape[0], -1)[:, self.half_idx]

    def ctf(self, ctf_params: torch.Tensor) -> torch.Tensor:
        """`(n, 9)` CTFParams.as_array() order -> `(n, m)` on the half lattice."""
        freqs = self.k_half[:, :2].double() / (2.0 * self.pixel_size_A)
        return evaluate_ctf(ctf_params.double(), freqs).float()

    def render(self, R: torch.Tensor, z: torch.Tensor, points: torch.Tensor | None = None) -> torch.Tensor:
        """R `(n, C, 3, 3)`, z `(n, d)` (or `(n, C, d)`, one per candidate) -> decoder values
        `(n, C, m, 2)` on `A^T k` for the half lattice."""
        k = self.k_half if points is None else points
        coords = torch.einsum("mi,ncij->ncmj", k, R.to(k.dtype))
        zz = None
        if self.zdim:
            zz = z[:, None, None, :] if z.dim() == 2 else z[:, :, None, :]
        return self.decoder(coords, zz)

    def candidates(self, img: torch.Tensor):
        """Pose candidates `(n, C, 3, 3)`, shifts `(n, C, 2)` px, and z `(n, d)` from the encoder."""
        out = self.encoder(img)
        R, t = out.R, out.shift_px
        if self.symmetric:
            rot = torch.roll(torch.flip(img, dims=(-2, -1)), shifts=(1, 1), dims=(-2, -1))
            o2 = self.encoder(rot)
            R = torch.cat((R, RZ_PI.to(R) @ o2.R), dim=1)
            t = torch.cat((t, -o2.shift_px), dim=1)
        return R, t, out.z

    # ---- the training/inference step
    def forward(self, img: torch.Tensor, ctf_params: torch.Tensor, march_radius: float = 1.0,
                z_override: torch.Tensor | None = None, extra_R: torch.Tensor | None = None,
                extra_shift_px: torch.Tensor | None = None, only_extra: bool = False,
                extra_z: torch.Tensor | None = None) -> StepOutput:
        """img `(n, D, D)` normalised; ctf_params `(n, 9)`; z_override `(n, d)` replaces the encoder's z
        in the decoder (pose-only phase); extra_R `(n, E, 3, 3)` / extra_shift_px `(n, E, 2)` are more pose
        candidates (e.g. from a global search), placed after the encoder's, rendered at `extra_z`
        `(n, E, d)` when given (else like the encoder's); with `only_extra` only they enter the loss
        (the encoder still gives z and its candidates in `R_all` for distillation)."""
        R_enc, t_enc, z = self.candidates(img)
        R, t = R_enc, t_enc
        z_dec = z if z_override is None else z_override.to(z)
        z_cand = z_dec[:, None].expand(-1, R_enc.shape[1], -1)
        if extra_R is not None:
            R = torch.cat((R_enc, extra_R.to(R_enc)), dim=1)
            t = torch.cat((t_enc, extra_shift_px.to(t_enc)), dim=1)
            ez = z_dec[:, None].expand(-1, extra_R.shape[1], -1) if extra_z is None else extra_z.to(z)
            z_cand = torch.cat((z_cand, ez), dim=1)
        first = R_enc.shape[1] if (only_extra and extra_R is not None) else 0
        F_pred = self.render(R[:, first:], z_cand[:, first:])
        weight = (self.k_radius <= march_radius + 1e-6).float()
        losses = candidate_losses(self.observed(img), F_pred, self.ctf(ctf_params), self.k_half[:, :2],
                                  t[:, first:], weight)
        best, idx = winner_take_all(losses)
        idx = idx + first
        ar = torch.arange(len(idx), device=idx.device)
        return StepOutput(best, R[ar, idx], t[ar, idx], z, R, t, z_cand[ar, idx])

    # ---- maps
    @torch.no_grad()
    def volume(self, z: torch.Tensor | None = None, chunk: int = 65536) -> torch.Tensor:
        """Real-space map `(D, D, D)` float32 (index [z, y, x]) at conformation z `(d,)`, in the
        images' units (its projection matches a raw image), from the field inside `|k| < 1`."""
        D = self.box
        ax = (torch.arange(D, device=self.k_half.device, dtype=torch.float32) - D // 2) / (D / 2)
        kz, ky, kx = torch.meshgrid(ax, ax, ax, indexing="ij")
        pts = torch.stack((kx, ky, kz), dim=-1).reshape(-1, 3)
        inside = torch.nonzero(torch.linalg.vector_norm(pts, dim=-1) < 1.0).squeeze(-1)
        F = torch.zeros(D ** 3, dtype=torch.complex64, device=pts.device)
        zz = None
        if self.zdim:
            zz = torch.as_tensor(z, dtype=torch.float32, device=pts.device).reshape(1, self.zdim)
        for s in range(0, len(inside), chunk):
            sel = inside[s:s + chunk]
            out = self.decoder(pts[sel], None if zz is None else zz.expand(len(sel), -1))
            F[sel] = torch.complex(out[:, 0], out[:, 1])
        F = F.reshape(D, D, D) * (D * self.img_scale.float())
        return fourier.ifft3_centered(F).real.float()

    def flops_per_image(self, march_radius: float = 1.0) -> int:
        """Forward FLOPs of one training image (encoder(s) + decoder on the masked half lattice, all candidates)."""
        n_pts = int((self.k_radius <= march_radius + 1e-6).sum())
        copies = 2 if self.symmetric else 1
        return copies * (self.encoder.flops_per_image()
                         + self.encoder.n_heads * n_pts * self.decoder.flops_per_point())


def build_model(config, box: int, pixel_size_A: float) -> CryoFIRE:
    """The model a `TrainConfig` describes, for `box`-pixel training images."""
    return CryoFIRE(box, pixel_size_A, config.zdim, enc_channels=config.enc_channels, hidden=config.hidden,
                    dec_hidden=config.dec_hidden, dec_layers=config.dec_layers, pe_freqs=config.pe_freqs,
                    pe_sigma=config.pe_sigma, n_pose_heads=config.n_pose_heads, symmetric=config.symmetric,
                    seed=config.seed)
