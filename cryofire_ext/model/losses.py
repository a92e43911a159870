"""Losses of the cryoFIRE forward model: Fourier-domain L2, winner-take-all, pose distillation.

The data term compares the observed image's transform, re-centred by undoing the
candidate shift as a phase ramp, with `CTF * V(A^T k, z)` on the half lattice. For a
real image `H(k)^2 + H(-k)^2 = 2 |F(k)|^2`, so the Hartley L2 over the full circle is
computed exactly as the complex L2 over the half lattice (each pair counted once).
"""

from __future__ import annotations

import math

import torch


def undo_shift(F_obs: torch.Tensor, k_xy: torch.Tensor, shift_px: torch.Tensor) -> torch.Tensor:
    """F_obs `(n, m)` complex on lattice points `k_xy` `(m, 2)` (Nyquist units); shift_px `(n, C, 2)`
    RELION origins in pixels -> `(n, C, m)`: `F * exp(-i pi k.t)` (the centred image's transform)."""
    phi = math.pi * torch.einsum("ncj,mj->ncm", shift_px.float(), k_xy.float())
    return F_obs[:, None, :] * torch.polar(torch.ones_like(phi), -phi)


def candidate_losses(F_obs: torch.Tensor, F_pred: torch.Tensor, ctf: torch.Tensor, k_xy: torch.Tensor,
                     shift_px: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-candidate mean squared error `(n, C)`.

    F_obs `(n, m)` complex; F_pred `(n, C, m, 2)` (real, imaginary); ctf `(n, m)`;
    weight `(m,)` frequency-marching mask (0/1 or soft), normalised inside. Computed in float32 under
    autocast too (the loss of a bf16 training step is a float32 loss).
    """
    # in float32 whatever autocast is on: bf16 phases are too coarse for the shift ramp, and CUDA has no
    # bf16 complex kernels (torch.polar refuses them)
    with torch.autocast(F_obs.device.type, enabled=False):
        Fc = undo_shift(F_obs, k_xy, shift_px)
        F_pred = F_pred.float()
        pred = torch.complex(F_pred[..., 0], F_pred[..., 1]) * ctf.float()[:, None, :]
        err = (Fc - pred).abs().square()
        return (err * weight.float()).sum(-1) / weight.float().sum().clamp_min(1e-8)


def winner_take_all(losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """losses `(n, C)` -> (min loss `(n,)`, winning candidate index `(n,)`); only winners get gradients."""
    best, idx = losses.min(dim=1)
    return best, idx


def chordal_pose_loss(R: torch.Tensor, shift_px: torch.Tensor, R_target: torch.Tensor,
                      shift_target_px: torch.Tensor, shift_weight: float = 0.1) -> torch.Tensor:
    """Distillation loss `(n,)`: min over heads of `||R - R_t||_F^2 + w ||t - t_t||^2`.

    R `(n, K, 3, 3)`, shift_px `(n, K, 2)`, targets `(n, 3, 3)` and `(n, 2)`.
    """
    d = (R - R_target[:, None]).square().sum((-1, -2)) + shift_weight * (shift_px - shift_target_px[:, None]).square().sum(-1)
    return d.min(dim=1).values
