"""CTF evaluation: golden values from independent numpy code, astigmatism angle, batching."""

import math

import numpy as np
import pytest
import torch

from cryofire_ext import fourier
from cryofire_ext.ctf import CTFParams, ctf_on_lattice, evaluate_ctf
from cryofire_ext.errors import InputError

torch.set_num_threads(1)


def _numpy_ctf(sx, sy, du, dv, ang_rad, kv, cs_mm, q0, phase_rad, bfac, scale):
    """Independent RELION CTF (ctf.h): -sin(K1*deltaf*u2 + K2*u4 - K5 - K3), deltaf = -(defocus)."""
    volt = kv * 1e3
    lam = 12.2643247 / math.sqrt(volt * (1.0 + volt * 0.978466e-6))
    u2 = sx * sx + sy * sy
    ell = math.atan2(sy, sx) - ang_rad
    deltaf = -(du + dv) / 2 - (du - dv) / 2 * math.cos(2 * ell)
    k1, k2 = math.pi * lam, math.pi / 2 * cs_mm * 1e7 * lam ** 3
    k3 = math.atan(q0 / math.sqrt(1 - q0 * q0))
    arg = k1 * deltaf * u2 + k2 * u2 * u2 - phase_rad - k3
    return -math.sin(arg) * scale * math.exp(-bfac / 4 * u2)


GOLDEN = [
    # (params, (sx, sy))
    ((15000, 15000, 0.0, 300, 2.7, 0.1, 0.0, 0.0, 1.0), (0.0, 0.0)),
    ((15000, 12000, 0.4, 300, 2.7, 0.07, 0.0, 0.0, 1.0), (0.05, 0.02)),
    ((8000, 9000, -1.1, 200, 2.0, 0.1, 0.5, 50.0, 0.8), (-0.11, 0.07)),
    ((22000, 20000, 2.0, 300, 0.01, 0.1, 1.5708, 100.0, 1.0), (0.2, -0.15)),
]


@pytest.mark.parametrize("params, s", GOLDEN)
def test_golden_values_match_independent_formula(params, s):
    got = evaluate_ctf(torch.tensor([params], dtype=torch.float64), torch.tensor(s, dtype=torch.float64))
    assert got.shape == (1,)
    assert got.item() == pytest.approx(_numpy_ctf(*s, *params), abs=2e-5)


def test_zero_frequency_is_amplitude_contrast_and_sign_is_relions():
    p = CTFParams.constant(1, defocus_u_A=15000.0, amplitude_contrast=0.1)
    c = ctf_on_lattice(p, 16, 2.0, dtype=torch.float64)
    assert c[0, 8, 8].item() == pytest.approx(0.1)
    # first lobe just off the origin is positive for underfocus (RELION's -sin(gamma))
    assert c[0, 8, 9] > 0.1
    # hand value: 300 kV, Cs 2.7 mm, df 1.5 um, s = 0.05/A along x; no Cs term sign confusion possible
    lam = 0.0196875
    chi = math.pi * lam * 15000 * 0.05 ** 2 - math.pi / 2 * 2.7e7 * lam ** 3 * 0.05 ** 4 + math.atan(0.1 / math.sqrt(0.99))
    got = evaluate_ctf(p.as_array(), torch.tensor([0.05, 0.0], dtype=torch.float64)).item()
    assert got == pytest.approx(math.sin(chi), abs=1e-4)


def test_astigmatism_angle_rotates_the_pattern():
    # defocus U along the angle direction: frequencies along angle see U, perpendicular see V
    ang = 0.6
    p = torch.tensor([[20000.0, 10000.0, ang, 300, 2.7, 0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    iso_u = torch.tensor([[20000.0, 20000.0, 0.0, 300, 2.7, 0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    iso_v = torch.tensor([[10000.0, 10000.0, 0.0, 300, 2.7, 0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    s = 0.04
    along = torch.tensor([s * math.cos(ang), s * math.sin(ang)], dtype=torch.float64)
    perp = torch.tensor([-s * math.sin(ang), s * math.cos(ang)], dtype=torch.float64)
    assert evaluate_ctf(p, along).item() == pytest.approx(evaluate_ctf(iso_u, along).item(), abs=1e-9)
    assert evaluate_ctf(p, perp).item() == pytest.approx(evaluate_ctf(iso_v, perp).item(), abs=1e-9)


def test_batched_lattice_and_bad_shape():
    p = CTFParams.constant(3, defocus_u_A=12000.0)
    p = CTFParams.from_array(p.as_array() * np.array([1, 1, 1, 1, 1, 1, 1, 1, 1.0]))
    c = ctf_on_lattice(p, 12, 1.5)
    assert c.shape == (3, 12, 12) and c.dtype == torch.float32
    k = fourier.slice_lattice(12, dtype=torch.float64)[..., :2] / 3.0
    torch.testing.assert_close(c, evaluate_ctf(p.as_array(), k).float())
    # a CTF is even: C(-k) = C(k)
    torch.testing.assert_close(fourier.negate_centered(c)[:, 1:, 1:], c[:, 1:, 1:])
    with pytest.raises(InputError):
        evaluate_ctf(torch.zeros(2, 8), k)


def test_sign_angle_and_phase_shift_match_relion_project(tmp_path):
    """relion_project --ctf images: our CTF beats its sign flip, a mirrored astigmatism angle and a negated phase shift."""
    from cryofire_ext.poses import random_rotations
    from cryofire_ext.recon.projection import correlation, project
    from tests.conftest import require_relion
    from tests.test_projection import relion_project_images

    require_relion("relion_project")
    rng = np.random.default_rng(11)
    # a white-spectrum map (random voxels in a ball) so that high frequencies, where the conventions differ, carry signal
    c = np.arange(32) - 16
    ball = (c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2) < 12 ** 2
    maps, apix = (rng.standard_normal((1, 32, 32, 32)) * ball).astype(np.float32), 3.0
    n = 5
    A = random_rotations(n, rng)
    shifts = np.zeros((n, 2))
    # strong astigmatism at an oblique angle, and a phase plate, so each convention is tested
    ang = np.radians([25.0, 60.0, 110.0, 140.0, 35.0])
    ctf = CTFParams(np.full(n, 20000.0), np.full(n, 8000.0), ang, 300.0, 2.7, 0.1, np.full(n, 0.8), 0.0, 1.0)
    rln = relion_project_images(tmp_path, maps[0], A, shifts, ctf, apix)

    def corr(c: CTFParams):
        return correlation(project(maps[0], A, shifts, c, pixel_size_A=apix), rln)

    right = corr(ctf)
    assert right.min() > 0.99
    arr = ctf.as_array()
    flipped = arr.copy()
    flipped[:, 8] = -1.0
    assert corr(CTFParams.from_array(flipped)).max() < -0.99
    mirrored = arr.copy()
    mirrored[:, 2] = -arr[:, 2]
    assert (corr(CTFParams.from_array(mirrored)) < right - 0.05).all()
    negphase = arr.copy()
    negphase[:, 6] = -arr[:, 6]
    assert (corr(CTFParams.from_array(negphase)) < right - 0.05).all()
