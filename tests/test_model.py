"""Physics contracts of the cryoFIRE model: Hermitian field, encoder shapes, forward-model conventions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cryofire_ext import fourier
from cryofire_ext.ctf import CTFParams
from cryofire_ext.errors import InputError
from cryofire_ext.model.cryofire import RZ_PI, CryoFIRE
from cryofire_ext.model.decoder import NeuralField
from cryofire_ext.model.encoder import Encoder
from cryofire_ext.phantom import phantom_maps
from cryofire_ext.poses import random_rotations
from cryofire_ext.recon.projection import project

torch.set_num_threads(2)
SMALL = dict(enc_channels=(8, 16, 16, 32, 32), hidden=32, dec_hidden=32)


class ExactField(torch.nn.Module):
    """The true map's centred 3D transform (scaled 1/D) sampled trilinearly: a decoder with no error but interpolation."""

    zdim = 0

    def __init__(self, vol: np.ndarray, pad: int = 2):
        super().__init__()
        D = vol.shape[0]
        big = np.zeros((pad * D,) * 3, np.float64)
        s = (pad * D - D) // 2
        big[s:s + D, s:s + D, s:s + D] = vol
        Fv = fourier.fft3_centered(torch.as_tensor(big)) / D
        self.register_buffer("grid", torch.stack((Fv.real, Fv.imag)).float()[None])
        self.D, self.pad = D, pad

    def forward(self, k, z=None):
        n = self.pad * self.D
        idx = k * (self.D / 2) * self.pad + n // 2  # voxel index in the padded grid (x, y, z)
        g = (2.0 * idx + 1.0) / n - 1.0
        out = F.grid_sample(self.grid, g.reshape(1, 1, 1, -1, 3), align_corners=False).reshape(2, -1)
        return out.T.reshape(*k.shape[:-1], 2)


def test_neural_field_is_hermitian():
    nf = NeuralField(32, zdim=3, hidden=32, layers=2, seed=1)
    k = torch.rand(50, 3) * 2 - 1
    z = torch.randn(1, 3).expand(50, 3)
    a, b = nf(k, z), nf(-k, z)
    assert torch.allclose(a[:, 0], b[:, 0], atol=1e-6) and torch.allclose(a[:, 1], -b[:, 1], atol=1e-6)
    assert not torch.allclose(nf(k, z), nf(k, z + 1.0))  # z conditions the map


def test_encoder_outputs_rotations_and_refuses_small_boxes():
    enc = Encoder(64, zdim=4, channels=(8, 16, 16, 32, 256), hidden=32, n_heads=3)
    out = enc(torch.randn(5, 64, 64))
    assert out.R.shape == (5, 3, 3, 3) and out.shift_px.shape == (5, 3, 2) and out.z.shape == (5, 4)
    eye = torch.eye(3).expand(5, 3, 3, 3)
    assert torch.allclose(out.R @ out.R.transpose(-1, -2), eye, atol=1e-5)
    assert torch.allclose(torch.linalg.det(out.R), torch.ones(5, 3), atol=1e-5)
    # the 256 channels of (D/32)^2 feed the shared MLP
    assert enc.shared[0].in_features == 256 * 2 * 2
    with pytest.raises(InputError, match="multiple of 32"):
        Encoder(24, zdim=0)


def _images(n=12, box=32, seed=0, shifts=True):
    rng = np.random.default_rng(seed)
    vol, apix = phantom_maps(box, states=1)
    A = random_rotations(n, rng)
    t_A = rng.uniform(-2, 2, (n, 2)) * apix if shifts else np.zeros((n, 2))
    ctf = CTFParams.constant(n, defocus_u_A=15000.0, defocus_v_A=14000.0, defocus_angle_rad=0.3)
    img = project(vol[0], A, t_A, ctf.as_array(), apix)
    return vol[0], apix, A, t_A, ctf, img


def test_forward_model_conventions_with_the_exact_field():
    """At the true pose, shift and CTF the exact field explains the image; A instead of A^T, the opposite
    shift sign or the opposite CTF sign do not (conventions of ../shared/CONVENTIONS.md)."""
    vol, apix, A, t_A, ctf, img = _images()
    m = CryoFIRE(32, apix, 0, symmetric=False, **SMALL)
    m.decoder = ExactField(vol)
    Fo, C = m.observed(img), m.ctf(torch.as_tensor(ctf.as_array()))
    kxy = m.k_half[:, :2]
    At = torch.as_tensor(A, dtype=torch.float32)[:, None]
    t = torch.as_tensor(t_A / apix, dtype=torch.float32)[:, None]
    from cryofire_ext.model.losses import candidate_losses

    w = torch.ones(len(kxy))
    def loss(R, t, C):
        return candidate_losses(Fo, m.render(R, torch.zeros(len(img), 0)), C, kxy, t, w).mean()
    power = (Fo.abs().square()).mean()
    good = loss(At, t, C)
    assert good < 0.02 * power
    assert loss(At.transpose(-1, -2), t, C) > 10 * good
    assert loss(At, -t, C) > 10 * good
    assert loss(At, t, -C) > 10 * good


def test_symmetric_candidate_maps_back_to_the_original_image():
    """The copy rotated by 180 deg in-plane is the projection at Rz(pi) A with origin -t."""
    vol, apix, A, t_A, ctf, img = _images(n=6)
    rot = torch.roll(torch.flip(img, dims=(-2, -1)), shifts=(1, 1), dims=(-2, -1))
    A2 = (RZ_PI.double().numpy() @ A)
    img2 = project(vol, A2, -t_A, ctf.as_array(), apix)
    assert torch.allclose(rot, img2, atol=1e-4 * float(img.abs().max()))


def test_winner_take_all_keeps_the_best_candidate_and_volume_round_trip():
    vol, apix, A, t_A, ctf, img = _images(n=4, shifts=False)
    m = CryoFIRE(32, apix, 0, n_pose_heads=3, symmetric=True, **SMALL)
    m.decoder = ExactField(vol)
    out = m(img, torch.as_tensor(ctf.as_array()))
    assert out.R_all.shape == (4, 6, 3, 3)
    # the winner's loss is the minimum over the 6 candidates
    from cryofire_ext.model.losses import candidate_losses

    allc = candidate_losses(m.observed(img), m.render(out.R_all, out.z), m.ctf(torch.as_tensor(ctf.as_array())),
                            m.k_half[:, :2], out.shift_all, torch.ones(m.k_half.shape[0]))
    assert torch.allclose(out.loss, allc.min(1).values, rtol=1e-5)
    # the map from the field inside |k| < 1 is the true map, low-passed to Nyquist
    rec = m.volume().numpy()
    c = np.corrcoef(rec.ravel(), vol.ravel())[0, 1]
    assert c > 0.98


class ScaledByZ(ExactField):
    """The true map's transform times z[0]: only z = +1 renders the images (a decoder with two 'classes')."""

    zdim = 1

    def forward(self, k, z=None):
        return super().forward(k) * z[..., :1].expand(*k.shape[:-1], 1)


def test_extra_candidates_at_their_own_z_let_the_decoder_pick_the_class():
    vol, apix, A, t_A, ctf, img = _images(n=5, shifts=False)
    m = CryoFIRE(32, apix, 1, symmetric=False, **SMALL)
    m.decoder = ScaledByZ(vol)
    A_t = torch.as_tensor(A, dtype=torch.float32)
    codes = torch.tensor([[-1.0], [1.0]])
    extra_R = A_t[:, None].expand(-1, 2, -1, -1)
    out = m(img, torch.as_tensor(ctf.as_array()), 1.0, None, extra_R, torch.zeros(5, 2, 2), False,
            codes[None].expand(5, -1, -1))
    assert torch.equal(out.z_win, torch.ones(5, 1))  # the +1 candidate (the true class) wins every image
    assert torch.allclose(out.R, A_t) and out.z.shape == (5, 1)  # z stays the encoder's own output


def test_flop_count_is_positive_and_grows_with_heads():
    a = CryoFIRE(32, 5.0, 2, n_pose_heads=1, **SMALL).flops_per_image()
    b = CryoFIRE(32, 5.0, 2, n_pose_heads=4, **SMALL).flops_per_image()
    assert 0 < a < b


def test_bf16_autocast_training_step_keeps_a_float32_loss_close_to_fp32():
    """The mixed-precision step (bf16 autocast, on CUDA with CRYOFIRE_DEVICE=cuda) runs and its loss is
    float32 and within bf16 rounding of the fp32 loss: the shift's phase ramp and the L2 stay in float32."""
    from cryofire_ext.train.trainer import training_autocast
    from tests.conftest import TEST_DEVICE

    dev = torch.device(TEST_DEVICE)
    torch.manual_seed(0)
    m = CryoFIRE(box=32, pixel_size_A=6.0, zdim=2, enc_channels=(4, 8, 8, 16, 16), hidden=32, dec_hidden=32,
                 dec_layers=2).to(dev)
    img = torch.randn(6, 32, 32, device=dev)
    ctf = torch.as_tensor(CTFParams.constant(6).as_array()).to(dev)
    extra = (torch.as_tensor(random_rotations(6, np.random.default_rng(1)), dtype=torch.float32, device=dev)[:, None],
             torch.full((6, 1, 2), 1.7, device=dev))
    ref = m(img, ctf, 1.0, None, *extra).loss
    ac = torch.autocast(dev.type, dtype=torch.bfloat16) if dev.type == "cpu" else training_autocast("bf16", dev)
    with ac:
        out = m(img, ctf, 1.0, None, *extra)
    out.loss.mean().backward()
    assert out.loss.dtype == torch.float32
    assert torch.allclose(out.loss.detach(), ref.detach(), rtol=0.05)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in m.parameters())
