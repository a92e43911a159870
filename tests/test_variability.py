"""3D variability at fixed poses (cryofire_ext.analysis.variability): physics on the phantom's states."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryofire_ext.errors import InputError
from cryofire_ext.images import ArrayImages
from cryofire_ext.phantom import phantom_maps
from cryofire_ext.simulate import simulate
from cryofire_ext.analysis.variability import variability

torch.set_num_threads(2)


def _crop3(vol: np.ndarray, box: int) -> np.ndarray:
    """Fourier-crop a real map `(D, D, D)` to `(box, box, box)` (centred transform, our grid convention)."""
    D = vol.shape[0]
    F = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(vol)))
    s = D // 2 - box // 2
    return np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(F[s:s + box, s:s + box, s:s + box]))).real


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.fixture(scope="module")
def continuum():
    maps, apix = phantom_maps(32, states=5)  # the arm swings through 40 deg over the five states
    ds = simulate(maps, 1500, snr=1.0, shift_px=2.0, pixel_size_A=apix, seed=0)
    return ds, variability(ArrayImages(ds.images), ds.A, ds.shifts_A, ds.particles.ctf, apix, n_components=2)


def test_first_component_follows_the_continuum_and_moves_the_map_along_it(continuum):
    ds, v = continuum
    r = np.corrcoef(v.coords[:, 0], ds.state)[0, 1]
    print(f"corr(coordinate 1, state) {r:.3f}, coordinate 2 {np.corrcoef(v.coords[:, 1], ds.state)[0, 1]:.3f}")
    assert abs(r) > 0.6 and v.variance[0] >= v.variance[1]
    assert v.box == 20 and v.pixel_size_A == pytest.approx(6.0 * 32 / 20)  # Nyquist at the 20 A default
    lo, hi = np.percentile(v.coords[:, 0], [5, 95])
    step = v.maps_along(0, np.array([hi])) - v.maps_along(0, np.array([lo]))  # the motion the component makes
    truth_step = _crop3(ds.maps[-1] - ds.maps[0], v.box) * np.sign(r)
    print(f"corr(map step along component 1, true state 5 - state 1) {_corr(step, truth_step):.3f}")
    assert _corr(step, truth_step) > 0.5
    for j in range(2):  # orthogonal to the mean and to each other
        assert abs(_corr(v.components[j], v.mean)) < 0.1
    assert abs(_corr(v.components[0], v.components[1])) < 0.1


def test_components_reproduce_between_halves_only_when_the_states_differ(continuum):
    """Signal, not fitted noise: the first component of each half of the particles agrees with the other
    half's for the continuum, not for one state (where the top component is whatever the noise makes it)."""
    torch.set_num_threads(2)  # an earlier test (relion-external --j N) may have changed it; the one-state value moves
    ds, _ = continuum
    one = simulate(ds.maps[:1], 1500, snr=1.0, shift_px=2.0, pixel_size_A=ds.pixel_size_A, seed=0)
    agree = {}
    for name, d in (("five states", ds), ("one state", one)):
        halves = [np.arange(0, 750), np.arange(750, 1500)]
        # each half from its own random start: a shared start the iterations have not forgotten would agree
        comps = [variability(ArrayImages(d.images[h]), d.A[h], d.shifts_A[h], d.particles.ctf.subset(h),
                             d.pixel_size_A, n_components=1, seed=i).components[0] for i, h in enumerate(halves)]
        agree[name] = abs(_corr(*comps))
    print(f"|corr| of component 1 between halves: {agree}")
    assert agree["five states"] > 0.7 and agree["one state"] < 0.3


def test_bad_settings_are_refused(continuum):
    ds, _ = continuum
    args = (ArrayImages(ds.images[:50]), ds.A[:50], ds.shifts_A[:50], ds.particles.ctf.subset(np.arange(50)),
            ds.pixel_size_A)
    with pytest.raises(InputError, match="at least 1"):
        variability(*args, n_components=0)
    with pytest.raises(InputError, match="finer than Nyquist"):
        variability(*args, resolution_A=5.0)
    with pytest.raises(InputError, match="too few"):
        variability(ArrayImages(ds.images[:3]), ds.A[:3], ds.shifts_A[:3], ds.particles.ctf.subset(np.arange(3)),
                    ds.pixel_size_A)
