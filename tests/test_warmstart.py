"""The search behind the warm start: global + local search, classification, refinement rounds, class codes.

Physics on the bundled two-state phantom (box 32, 6 A/px): against maps back-projected at
the true poses the search must find poses to a few degrees, shifts to sub-pixel and the
state of each image; from a random split, classification at fixed poses must find the states.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryofire_ext.metrics import clustering_error, geodesic_deg, rotation_error_deg, shift_error_px
from cryofire_ext.phantom import phantom_maps
from cryofire_ext.poses import random_rotations
from cryofire_ext.simulate import simulate
from cryofire_ext.train.data import StackStats, TrainingImages
from cryofire_ext.recon.classmaps import reconstruct_classes
from cryofire_ext.refine.classify import classify
from cryofire_ext.ctf import evaluate_ctf
from cryofire_ext.poses import axis_angle_matrix
from cryofire_ext.recon.lattice import Lattice
from cryofire_ext.refine import search as search_module
from cryofire_ext.refine.search import WarmMap, refine_local, search, shift_grid
from cryofire_ext.refine.warmstart import build_warm_map_online, refine_warm_map
from cryofire_ext.train.candidates import class_codes

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def two_states():
    maps, apix = phantom_maps(32, states=2)
    ds = simulate(maps, 500, mix=[0.5, 0.5], snr=3.0, shift_px=2.0, pixel_size_A=apix, seed=1)
    img = np.asarray(ds.particles.images.read(np.arange(500)), dtype=np.float64)
    data = TrainingImages(ds.particles, 32, StackStats(float(img.mean()), float(img.std())))
    images, ctf = data.read(np.arange(500))
    return ds, images, ctf, apix


def _truth(ds):
    return (torch.as_tensor(ds.A, dtype=torch.float32), torch.as_tensor(ds.shifts_A / ds.pixel_size_A, dtype=torch.float32),
            torch.as_tensor(ds.state, dtype=torch.long))


def test_search_against_true_class_maps_finds_pose_shift_and_state(two_states):
    ds, images, ctf, apix = two_states
    A, t, state = _truth(ds)
    V = reconstruct_classes(images, ctf, A, t, state, 2, apix)
    rots = torch.as_tensor(random_rotations(3000, np.random.default_rng(3)), dtype=torch.float32)
    warm = WarmMap(V, rots, shift_grid(2.0), 32, apix, 1.0)
    A_s, t_s, c_s = search(warm, images, ctf)
    err = geodesic_deg(A_s.double().numpy(), ds.A)  # same frame as the maps: no global alignment
    assert np.median(err) < 5.0 and np.mean(err < 20) > 0.9
    assert np.median(np.linalg.norm(t_s.numpy() - t.numpy(), axis=1)) < 0.5
    assert np.mean(c_s.numpy() == ds.state) > 0.95
    # without the local refinement the grid (about 15 deg apart) caps the accuracy
    A_g, _, _ = search(warm, images, ctf, refine=False)
    assert np.median(geodesic_deg(A_g.double().numpy(), ds.A)) > np.median(err) + 2.0


def test_local_refinement_climbs_back_to_the_pose_in_blocks_of_any_size(two_states, monkeypatch):
    """Poses 10 deg and 0.7 px off climb back against the map made at the true poses (to its floor here, about
    4 deg: the map of 250 images at 32 px; the search test's bound); the answer is the same whether the images are
    refined together or a few at a time (the blocks that bound the working set change nothing)."""
    ds, images, ctf, apix = two_states
    A, t, state = _truth(ds)
    sel = state == 0
    V = reconstruct_classes(images, ctf, A, t, state, 2, apix)[0]
    lat = Lattice(32, apix, "cpu")
    Y, C = lat.observe(images[sel]), evaluate_ctf(ctf[sel].double(), lat.freqs).float()
    gen = torch.Generator().manual_seed(5)
    axes = torch.nn.functional.normalize(torch.randn(int(sel.sum()), 3, generator=gen), dim=-1)
    A0 = axis_angle_matrix(axes * np.deg2rad(10.0)) @ A[sel]
    t0 = t[sel] + 0.5
    together = refine_local(V, Y, C, lat, A0, t0, 1.0)
    monkeypatch.setattr(search_module, "REFINE_POINTS", 7 * 17 * lat.k.shape[0])  # blocks of 7 images
    in_blocks = refine_local(V, Y, C, lat, A0, t0, 1.0)
    for a, b in zip(together, in_blocks):
        assert torch.equal(a, b)
    before = geodesic_deg(A0.double().numpy(), ds.A[sel.numpy()])
    after = geodesic_deg(together[0].double().numpy(), ds.A[sel.numpy()])
    assert np.median(before) > 9.9 and np.median(after) < 5.0
    assert np.median(np.linalg.norm(together[1].numpy() - t[sel].numpy(), axis=1)) < 0.05


def test_classify_at_true_poses_splits_the_states_from_a_random_start(two_states):
    ds, images, ctf, apix = two_states
    A, t, _ = _truth(ds)
    labels = classify(images, ctf, A, t, 2, apix, seed=0)
    assert clustering_error(labels.numpy(), ds.state) < 0.05
    assert torch.equal(labels, classify(images, ctf, A, t, 2, apix, seed=0))  # deterministic


def test_refinement_rounds_lift_the_coarse_map_and_find_the_states(two_states):
    ds, images, ctf, apix = two_states
    from cryofire_ext.fourier import fourier_crop

    coarse = build_warm_map_online(fourier_crop(images, 24), ctf, apix * 32 / 24, n_rotations=3000, steps=300,
                                   max_shift_px=1.5, seed=0)
    before, _, _ = search(coarse, fourier_crop(images, 24), ctf)
    warm = refine_warm_map(coarse, images, ctf, apix, rounds=2, n_classes=2, max_shift_px=2.0, seed=0)
    assert warm.box == 32 and warm.n_classes == 2 and warm.V.shape == (2, 65, 65, 65)  # RECONSTRUCT_PAD 2
    A, t, c = search(warm, images, ctf)
    rot = rotation_error_deg(A.double().numpy(), ds.A)
    assert rot.median_deg < 8.0
    assert rot.median_deg < rotation_error_deg(before.double().numpy(), ds.A).median_deg
    sh, _ = shift_error_px(t.double().numpy(), ds.shifts_A / apix, A.double().numpy())
    assert np.median(sh) < 0.5
    assert clustering_error(c.numpy(), ds.state) < 0.15  # 0.004 at the true poses; ~7% of poses are wrong here
    # the state survives a round trip through the checkpoint's form
    again = WarmMap.from_state(warm.state())
    assert torch.equal(again.V, warm.V) and again.n_classes == 2


@pytest.mark.parametrize("K,zdim", [(2, 1), (2, 8), (3, 2), (5, 8), (4, 1)])
def test_class_codes_are_distinct_unit_targets(K, zdim):
    codes = class_codes(K, zdim).double()
    assert codes.shape == (K, zdim)
    d = torch.cdist(codes, codes)
    if zdim >= K - 1:  # a regular simplex: unit radius, centred, all pairs equally far apart
        assert torch.allclose(codes.norm(dim=1), torch.ones(K, dtype=torch.float64), atol=1e-6)
        assert torch.allclose(codes.sum(0), torch.zeros(zdim, dtype=torch.float64), atol=1e-6)
        off = d[~torch.eye(K, dtype=torch.bool)]
        assert torch.allclose(off, off[0].expand_as(off), atol=1e-6) and float(off[0]) > 1.0
    else:  # truncated: still one distinct target per class
        assert float(d[~torch.eye(K, dtype=torch.bool)].min()) > 1e-3
