"""Metrics recover known global rotations, mirror flips and offsets exactly; the mirror rule is checked by projection."""

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from cryofire_ext import metrics
from cryofire_ext.errors import InputError
from cryofire_ext.poses import random_rotations

torch.set_num_threads(2)
M = np.diag([1.0, 1.0, -1.0])


def test_global_rotation_is_removed_exactly():
    rng = np.random.default_rng(0)
    A = random_rotations(200, rng)
    G = Rotation.from_rotvec([0.3, -1.2, 0.7]).as_matrix()
    res = metrics.rotation_error_deg(A @ G, A)
    assert not res.flipped
    assert res.errors_deg.max() < 1e-5
    np.testing.assert_allclose(res.global_rotation, G, atol=1e-9)
    # a real per-particle error survives the alignment
    axes = rng.standard_normal((200, 3))
    E = Rotation.from_rotvec(axes / np.linalg.norm(axes, axis=1, keepdims=True) * np.radians(5.0)).as_matrix()
    noisy = E @ A @ G
    assert metrics.rotation_error_deg(noisy, A).median_deg == pytest.approx(5.0, abs=0.5)
    # unrelated poses give large errors
    assert metrics.rotation_error_deg(random_rotations(200, rng), A).median_deg > 40


def test_mirrored_copy_is_recognised_exactly():
    rng = np.random.default_rng(1)
    A = random_rotations(100, rng)
    G = Rotation.from_rotvec([-0.5, 0.4, 2.0]).as_matrix()
    res = metrics.rotation_error_deg(M @ A @ M @ G, A)
    assert res.flipped
    assert res.errors_deg.max() < 1e-5


def test_mirror_rule_holds_for_projections():
    """The z-mirrored map at poses M A M gives the same images as the map at A (why `flipped` is a hand flip)."""
    from cryofire_ext.phantom import phantom_maps
    from cryofire_ext.recon.projection import correlation, project

    maps, _ = phantom_maps(32)
    vol = torch.from_numpy(maps[0])
    D = vol.shape[0]
    mirrored = vol[(2 * (D // 2) - torch.arange(D)) % D]  # z -> -z about the centre voxel D//2
    assert not torch.allclose(mirrored, vol)
    A = random_rotations(4, np.random.default_rng(2))
    same = correlation(project(mirrored, M @ A @ M), project(vol, A))
    assert same.min() > 0.999
    # ... and the same poses on the mirrored map do not
    assert correlation(project(mirrored, A), project(vol, A)).mean() < 0.9


def test_global_3d_offset_is_removed_exactly():
    rng = np.random.default_rng(3)
    A = random_rotations(50, rng)
    t = rng.uniform(-4, 4, (50, 2))
    r = np.array([1.5, -2.0, 0.75])
    pred = t + np.einsum("nij,j->ni", A[:, :2, :], r)
    err, fitted = metrics.shift_error_px(pred, t, A_pred=A)
    assert err.max() < 1e-9
    np.testing.assert_allclose(fitted, r, atol=1e-9)
    err2, off = metrics.shift_error_px(t + [3.0, -1.0], t)
    assert err2.max() < 1e-9 and np.allclose(off, [3.0, -1.0])
    err3, _ = metrics.shift_error_px(pred + [[0.5, 0.0]] + 0 * pred, t, A_pred=A)
    assert err3.max() > 0.05  # a 2D constant is not a 3D offset: it must show up


def test_clustering_error_and_pc1():
    truth = np.array([0] * 60 + [1] * 30 + [2] * 10)
    labels = np.where(truth == 0, 2, np.where(truth == 1, 0, 1))  # permuted names
    assert metrics.clustering_error(labels, truth) == 0.0
    labels[:6] = 0  # 6 of the 60 wrong
    assert metrics.clustering_error(labels, truth) == pytest.approx(0.06)
    rng = np.random.default_rng(4)
    s = rng.uniform(0, 1, 500)
    z = np.stack([-3 * s + 0.01 * rng.standard_normal(500), 0.1 * rng.standard_normal(500)], 1)
    assert metrics.pc1_correlation(z, s) > 0.99
    assert metrics.pc1_correlation(rng.standard_normal((500, 2)), s) < 0.2
    with pytest.raises(InputError):
        metrics.clustering_error([0, 1], [0])
    with pytest.raises(InputError):
        metrics.rotation_error_deg(np.eye(3)[None], np.eye(3)[None].repeat(2, 0))
