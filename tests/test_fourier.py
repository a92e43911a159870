"""Fourier helpers: inverses, Hermitian halves, RELION-sign phase shifts, cropping."""

import math

import numpy as np
import pytest
import torch

from cryofire_ext import fourier

torch.set_num_threads(1)


@pytest.mark.parametrize("box", [8, 9])
def test_transforms_invert_and_match_numpy(box):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, box, box, generator=g, dtype=torch.float64)
    F = fourier.fft2_centered(x)
    ref = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x.numpy(), axes=(-2, -1))), axes=(-2, -1))
    np.testing.assert_allclose(F.numpy(), ref, atol=1e-10)
    torch.testing.assert_close(fourier.ifft2_centered(F).real, x)
    # F(-k) = conj F(k) of a real image, on the centred lattice
    torch.testing.assert_close(fourier.negate_centered(F), F.conj())
    v = torch.randn(box, box, box, generator=g, dtype=torch.float64)
    F3 = fourier.fft3_centered(v)
    # zero frequency at the centre = sum of the map
    assert abs(F3[box // 2, box // 2, box // 2].real - v.sum()) < 1e-9
    torch.testing.assert_close(fourier.ifft3_centered(F3).real, v)


def test_slice_lattice_layout_and_rotation_rule():
    k = fourier.slice_lattice(8)
    assert k.shape == (8, 8, 3)
    # indexed [y, x]: x varies along the last axis; centre at 4; Nyquist units
    assert k[4, 4].tolist() == [0, 0, 0]
    assert k[4, 0].tolist() == [-1, 0, 0] and k[0, 4].tolist() == [0, -1, 0]
    assert k[4, 6, 0] == 0.5 and k[6, 4, 1] == 0.5
    A = torch.tensor([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])
    rotated = k @ A
    torch.testing.assert_close(rotated[3, 5], A.T @ k[3, 5])


@pytest.mark.parametrize("box", [8, 9, 16])
@pytest.mark.parametrize("radius", [1.0, 0.6])
def test_half_plane_expands_to_full_hermitian_transform(box, radius):
    circle = fourier.circular_mask(box, radius)
    half = fourier.half_plane_mask(box, radius)
    assert (half & ~circle).sum() == 0
    # half and its mirror cover the circle
    assert ((half | fourier.negate_centered(half)) == circle).all()
    k = fourier.slice_lattice(box)
    assert half[box // 2, box // 2]
    assert half[(k[..., 1] > 0) & circle].all() and not half[(k[..., 1] < 0) & (k[..., 1] > -1) & circle].any()
    x = torch.randn(3, box, box, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    F = fourier.fft2_centered(x) * circle
    full = fourier.expand_half(F[:, half], box, radius)
    torch.testing.assert_close(full, F)
    # real (even) input mirrors without conjugation
    r = fourier.radius_nyquist_grid(box, dtype=torch.float64)
    torch.testing.assert_close(fourier.expand_half(r[half], box, radius), r * circle)
    with pytest.raises(ValueError):
        fourier.expand_half(F[:, half][:, :-1], box, radius)


@pytest.mark.parametrize("box", [16, 17])
def test_phase_shift_undoes_relion_origin(box):
    g = torch.Generator().manual_seed(2)
    proj = torch.randn(2, box, box, generator=g, dtype=torch.float64)
    t = torch.tensor([[3.0, -2.0], [-5.0, 1.0]])  # (x, y) px, RELION origin
    # RELION: image(x) = projection(x + origin) -> image[i] = proj[i + t]
    img = torch.stack([torch.roll(p, shifts=(-int(ty), -int(tx)), dims=(0, 1)) for p, (tx, ty) in zip(proj, t)])
    Fc = fourier.phase_shift_centered(fourier.fft2_centered(img), t)
    torch.testing.assert_close(Fc, fourier.fft2_centered(proj).to(Fc.dtype))
    # applying -t puts the origin back
    torch.testing.assert_close(fourier.phase_shift_centered(Fc, -t), fourier.fft2_centered(img))


def test_fourier_crop_keeps_band_limited_content():
    box, new = 32, 16
    y, x = torch.meshgrid(torch.arange(box, dtype=torch.float64), torch.arange(box, dtype=torch.float64), indexing="ij")
    # a low-frequency cosine pattern (3 cycles per box) survives cropping exactly
    img = 2.0 + torch.cos(2 * math.pi * 3 * x / box) + 0.5 * torch.sin(2 * math.pi * 2 * y / box)
    small = fourier.fourier_crop(img[None], new)[0]
    ys, xs = torch.meshgrid(torch.arange(new, dtype=torch.float64), torch.arange(new, dtype=torch.float64), indexing="ij")
    expect = 2.0 + torch.cos(2 * math.pi * 3 * xs / new) + 0.5 * torch.sin(2 * math.pi * 2 * ys / new)
    torch.testing.assert_close(small, expect)
    with pytest.raises(ValueError):
        fourier.fourier_crop(img[None], 40)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_results_stay_on_the_input_device(device):
    from cryofire_ext.ctf import CTFParams, ctf_on_lattice
    from cryofire_ext.recon.projection import project

    x = torch.randn(2, 16, 16, device=device)
    assert fourier.fft2_centered(x).device.type == device
    assert fourier.phase_shift_centered(fourier.fft2_centered(x), torch.zeros(2, 2, device=device)).device.type == device
    assert fourier.expand_half(torch.ones(fourier.half_plane_mask(16).sum().item(), device=device), 16).device.type == device
    params = torch.as_tensor(CTFParams.constant(2).as_array(), device=device)
    assert ctf_on_lattice(params, 16, 2.0, device=device).device.type == device
    vol = torch.zeros(16, 16, 16, device=device)
    vol[6:9, 7:10, 5:8] = 1.0
    assert project(vol, torch.eye(3).expand(2, 3, 3), device=device).device.type == device
