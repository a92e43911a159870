"""One frame for all class maps: registration on the common part, and poses turned with their class.

Physics on the bundled phantom, whose arm (about a quarter of the mass) swings 40 deg between its two
states: a whole-map fit of one state onto the other is pulled towards the arm; the trimmed fit must
find the core's frame. Then refinement must bring a class whose particles sit in a rotated frame back
into the frame of the others.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryofire_ext.metrics import geodesic_deg
from cryofire_ext.phantom import phantom_maps
from cryofire_ext.recon.classmaps import class_maps
from cryofire_ext.refine.frames import class_frames, register, rotate_map, turn_poses, turned
from cryofire_ext.refine.polish import polish
from cryofire_ext.poses import axis_angle_matrix
from tests.conftest import phantom_training_set

torch.set_num_threads(2)
N = 400


def _rotation(deg: float, axis=(0.3, -0.5, 0.8)) -> torch.Tensor:
    v = torch.tensor(axis, dtype=torch.float32)
    return axis_angle_matrix(v / v.norm() * np.radians(deg))


def _angle_deg(R: torch.Tensor, Q: torch.Tensor) -> float:
    return float(geodesic_deg(R.double().numpy()[None], Q.double().numpy()[None])[0])


def test_register_recovers_a_rotation_of_the_same_map():
    maps, _ = phantom_maps(32, states=1)
    v = torch.as_tensor(maps[0])
    Q = _rotation(7.0)
    R = register(v, rotate_map(v, Q))  # v(Q R x) = v(x)  ->  R = Q^T
    # within the bias of interpolating the test map twice at 32 px (0.5-0.8 deg; 0.1-0.4 deg at 48 px)
    assert _angle_deg(R, Q.T) < 1.0


def test_trimmed_registration_finds_the_core_frame_where_a_whole_map_fit_follows_the_arm():
    maps, _ = phantom_maps(32, states=2)
    v0, v1 = torch.as_tensor(maps[0]), torch.as_tensor(maps[1])
    Q = _rotation(6.0)
    R = register(v0, rotate_map(v1, Q))
    assert _angle_deg(R, Q.T) < 1.0
    whole = register(v0, rotate_map(v1, Q), trim_rounds=0)
    assert _angle_deg(whole, Q.T) > 3.0


@pytest.fixture(scope="module")
def two_states():
    return phantom_training_set(N, seed=4)


def test_a_class_in_a_rotated_frame_is_turned_back(two_states):
    ds, data, apix = two_states
    A = torch.as_tensor(ds.A, dtype=torch.float32)
    t = torch.as_tensor(ds.shifts_A / apix, dtype=torch.float32)
    labels = torch.as_tensor(ds.state, dtype=torch.long)
    Q = _rotation(8.0)
    ref = int(torch.bincount(labels).argmax())  # the most populated class sets the frame
    moved = labels != ref
    A_off = A.clone()
    A_off[moved] = A[moved] @ Q  # the other class reconstructs in a frame turned by Q
    V = class_maps(data.read, N, A_off, t, labels, 2, 32, apix)
    rotations = class_frames(V, labels)
    assert turned(rotations)
    assert torch.equal(rotations[ref], torch.eye(3))
    back = turn_poses(A_off, labels, rotations)
    err = geodesic_deg(back.double().numpy(), ds.A)
    assert np.median(geodesic_deg(A_off.double().numpy(), ds.A)[moved.numpy()]) == pytest.approx(8.0, abs=0.01)
    assert np.median(err[moved.numpy()]) < 1.5
    assert torch.equal(back[~moved], A_off[~moved])  # the reference class keeps its poses
    # classes already in one frame are left alone
    same = class_frames(class_maps(data.read, N, A, t, labels, 2, 32, apix), labels)
    assert not turned(same)


def test_polish_brings_every_class_into_one_frame(two_states):
    ds, data, apix = two_states
    labels = torch.as_tensor(ds.state, dtype=torch.long)
    A = torch.as_tensor(ds.A, dtype=torch.float32)
    moved = (labels != int(torch.bincount(labels).argmax())).numpy()
    A[moved] = A[moved] @ _rotation(8.0)
    t = torch.as_tensor(ds.shifts_A / apix, dtype=torch.float32)
    A2, _, lab2 = polish(data.read, N, A, t, labels, 2, 32, apix, rounds=2)
    before = geodesic_deg(A.double().numpy(), ds.A)
    after = geodesic_deg(A2.double().numpy(), ds.A)  # both classes in the truth's frame: no alignment
    assert np.median(before[moved]) > 7.9
    assert np.median(after) < 2.5
    assert float((lab2 != labels).float().mean()) < 0.03
