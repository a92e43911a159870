"""Simulator: truth, noise level, bad input, the CLI's files, the phantom, and relion_reconstruct agreement."""

import subprocess

import mrcfile
import numpy as np
import pytest
import torch

from cli.main import main
from cryofire_ext.errors import InputError
from cryofire_ext.phantom import phantom_maps
from cryofire_ext.recon.projection import correlation, project
from cryofire_ext.recon.reconstruct import fsc, reconstruct
from cryofire_ext.simulate import simulate, simulate_states
from integrations.simulated import load_truth, write_dataset
from tests.conftest import require_relion

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def maps():
    return phantom_maps(32)


def test_truth_noise_and_reproducibility(maps):
    vols, apix = maps
    ds = simulate(vols, 300, mix=[0.8, 0.2], snr=0.5, shift_px=3.0, pixel_size_A=apix, seed=7)
    assert ds.images.shape == (300, 32, 32) and ds.images.dtype == np.float32
    assert abs(np.mean(ds.state == 0) - 0.8) < 0.08
    assert np.abs(ds.shifts_A / apix).max() <= 3.0
    # images are truth projections + noise of variance signal_variance / snr
    clean = np.concatenate([project(vols[k], ds.A[ds.state == k], ds.shifts_A[ds.state == k],
                                    ds.particles.ctf.subset(ds.state == k), pixel_size_A=apix).numpy()
                            for k in (0, 1)])
    noisy = np.concatenate([ds.images[ds.state == k] for k in (0, 1)])
    assert clean.var() == pytest.approx(ds.signal_variance, rel=1e-3)
    assert (noisy - clean).var() == pytest.approx(ds.signal_variance / 0.5, rel=0.02)
    assert ds.particles.class_id.tolist() == ds.state.tolist()
    again = simulate(vols, 300, mix=[0.8, 0.2], snr=0.5, shift_px=3.0, pixel_size_A=apix, seed=7)
    np.testing.assert_array_equal(again.images, ds.images)
    other = simulate(vols, 300, mix=[0.8, 0.2], snr=0.5, shift_px=3.0, pixel_size_A=apix, seed=8)
    assert not np.allclose(other.A, ds.A)


@pytest.mark.parametrize("kwargs, match", [
    (dict(maps=np.zeros((2, 16, 16, 17))), "cubic"),
    (dict(maps=np.zeros((16, 16, 16))), "empty"),
    (dict(maps=np.zeros((0, 16, 16, 16))), "map"),
    (dict(n=0), "positive"),
    (dict(n=-3), "positive"),
    (dict(mix=[0.5, 0.4]), "sum to 1"),
    (dict(mix=[1.0]), "one fraction per state"),
    (dict(snr=0.0), "snr"),
    (dict(snr=-1.0), "snr"),
    (dict(defocus_um=(2.0, 1.0)), "defocus"),
])
def test_bad_input_is_an_input_error(maps, kwargs, match):
    vols, apix = maps
    args = dict(maps=vols, n=10, pixel_size_A=apix, seed=0)
    args.update(kwargs)
    with pytest.raises(InputError, match=match):
        simulate(args.pop("maps"), args.pop("n"), **args)


def test_cli_phantom_writes_readable_formats_and_refuses_overwrite(tmp_path, capsys):
    from integrations.cryosparc import read_cs
    from integrations.relion import read_star

    out = tmp_path / "sim"
    assert main(["simulate", "--phantom", "-o", str(out), "-n", "40", "--mix", "0.5,0.5", "--seed", "3"]) == 0
    truth = load_truth(out / "truth.npz")
    assert int(truth["version"]) == 1 and list(truth["map_files"]) == ["state_00.mrc", "state_01.mrc"]
    star = read_star(out / "particles.star")
    np.testing.assert_allclose(star.A, truth["A"], atol=1e-5)
    np.testing.assert_allclose(star.shifts_A, truth["shifts_A"], atol=1e-4)
    assert star.class_id.tolist() == truth["state"].tolist()
    cs = read_cs(out / "particles.cs")
    np.testing.assert_allclose(cs.A, truth["A"], atol=1e-5)
    np.testing.assert_allclose(cs.shifts_A, truth["shifts_A"], atol=1e-3)
    imgs = star.images.read(np.arange(40))
    np.testing.assert_array_equal(imgs, mrcfile.read(out / "particles.mrcs"))
    with mrcfile.open(out / "state_01.mrc") as m:
        assert m.voxel_size.x == pytest.approx(6.0) and m.data.shape == (32, 32, 32)
    before = (out / "particles.mrcs").stat().st_mtime_ns
    assert main(["simulate", "--phantom", "-o", str(out), "-n", "40"]) == 2
    assert "exists" in capsys.readouterr().err
    assert (out / "particles.mrcs").stat().st_mtime_ns == before
    assert main(["simulate", "--phantom", "-o", str(out), "-n", "40", "--force", "--seed", "4"]) == 0


@pytest.mark.parametrize("extra", [["-n", "0"], ["--mix", "0.7,0.2"], ["--snr", "0"], ["--snr", "-2"],
                                   ["--defocus-um", "2.5"]])
def test_cli_bad_input_exits_2(tmp_path, extra):
    args = ["simulate", "--phantom", "-o", str(tmp_path / "x"), "-n", "10"]
    assert main(args + extra) == 2
    assert not (tmp_path / "x" / "particles.mrcs").exists()


def test_cli_maps_non_cubic_and_states(tmp_path):
    bad = tmp_path / "bad.mrc"
    with mrcfile.new(bad) as m:
        m.set_data(np.ones((16, 16, 20), dtype=np.float32))
        m.voxel_size = 2.0
    assert main(["simulate", str(bad), "-o", str(tmp_path / "o1"), "-n", "5"]) == 2
    good = tmp_path / "good.mrc"
    vol, apix = phantom_maps(24, states=1)
    with mrcfile.new(good) as m:
        m.set_data(vol[0])
    # header voxel size 0: must be given
    assert main(["simulate", str(good), "-o", str(tmp_path / "o2"), "-n", "5"]) == 2
    assert main(["simulate", str(good), "-o", str(tmp_path / "o3"), "-n", "12", "--states", "3", "--apix",
                 str(apix)]) == 0
    truth = load_truth(tmp_path / "o3" / "truth.npz")
    assert len(truth["map_files"]) == 3 and set(truth["state"]) <= {0, 1, 2}


def test_simulate_states_moves_part_of_the_map():
    vol, _ = phantom_maps(32, states=1)
    st = simulate_states(vol[0], 3, angle_deg=30.0)
    assert st.shape == (3, 32, 32, 32)
    np.testing.assert_allclose(st[0], vol[0], atol=1e-6)
    c01 = np.corrcoef(st[0].ravel(), st[1].ravel())[0, 1]
    c02 = np.corrcoef(st[0].ravel(), st[2].ravel())[0, 1]
    assert 0.5 < c02 < c01 < 0.999  # a smooth, growing motion
    assert st[2].sum() == pytest.approx(vol[0].sum(), rel=0.02)  # a rigid motion keeps the mass


def test_phantom_is_deterministic_chiral_and_two_state():
    a, apix = phantom_maps(32)
    b, _ = phantom_maps(32)
    np.testing.assert_array_equal(a, b)
    assert apix == 6.0 and a.shape == (2, 32, 32, 32)
    assert np.corrcoef(a[0].ravel(), a[1].ravel())[0, 1] < 0.97
    # the mirror image is a different molecule: no rotation by 90-degree steps brings it back
    m = a[0][::-1]
    best = max(np.corrcoef(np.rot90(m, k, axes).ravel(), a[0].ravel())[0, 1]
               for k in range(4) for axes in ((0, 1), (1, 2), (0, 2)))
    assert best < 0.9


def test_reconstruction_agrees_with_relion_reconstruct(tmp_path, maps):
    """High-SNR simulated data, true poses: our Wiener reconstruction vs relion_reconstruct --ctf, FSC >= 0.9 to 2/3 Nyquist."""
    require_relion("relion_reconstruct")
    vols, apix = maps
    ds = simulate(vols[:1], 1000, snr=1000.0, pixel_size_A=apix, seed=2)
    write_dataset(ds, tmp_path)
    subprocess.run(["relion_reconstruct", "--i", "particles.star", "--o", "rln.mrc", "--ctf"], cwd=tmp_path,
                   check=True, capture_output=True)
    rln = mrcfile.read(tmp_path / "rln.mrc")
    ours = reconstruct(ds.images, ds.A, ds.shifts_A, ds.particles.ctf, apix, wiener=0.01)
    freqs, values = fsc(ours, rln)
    assert freqs[-1] == pytest.approx(1.0)  # Nyquist units
    assert values[freqs <= 2 / 3].min() >= 0.9, values
    assert float(ours.std() / rln.std()) == pytest.approx(1.0, abs=0.05)  # same amplitude convention
    # and both are the truth: shifted poses (a sign slip) would not be
    _, vs_truth = fsc(ours, vols[0])
    assert vs_truth[freqs <= 2 / 3].min() >= 0.9
    few = slice(0, 300)
    wrong = reconstruct(ds.images[few], ds.A[few], -ds.shifts_A[few], ds.particles.ctf.subset(few), apix, wiener=0.01)
    assert fsc(wrong, vols[0])[1][freqs <= 2 / 3].min() < 0.5
    assert correlation(torch.from_numpy(rln[None]), ours[None]).item() > 0.99


def test_reconstruction_from_a_lazy_image_source_equals_the_in_memory_one(maps):
    """`reconstruct` reads an image source (a stack's `images`, e.g. a cluster's subset) batch by batch."""
    vols, apix = maps
    ds = simulate(vols[:1], 90, snr=10.0, pixel_size_A=apix, seed=4)
    sub = ds.particles.take(np.arange(5, 90, 2))
    whole = reconstruct(sub.images.read(np.arange(len(sub))), sub.A, sub.shifts_A, sub.ctf, apix)
    lazy = reconstruct(sub.images, sub.A, sub.shifts_A, sub.ctf, apix, batch_size=16)
    assert torch.allclose(lazy, whole, atol=1e-5 * float(whole.abs().max()))


def test_noise_free_simulation_matches_relion_project_on_our_star(tmp_path, maps):
    """`simulate` at infinite SNR, written with our STAR writer, re-rendered by relion_project --ctf from that STAR."""
    require_relion("relion_project")
    vols, apix = maps
    ds = simulate(vols[1:], 12, snr=float("inf"), shift_px=5.0, pixel_size_A=apix, seed=9)
    assert ds.noise_sigma == 0.0
    write_dataset(ds, tmp_path)
    subprocess.run(["relion_project", "--i", "state_00.mrc", "--o", "rln", "--ang", "particles.star", "--ctf",
                    "--angpix", str(apix)], cwd=tmp_path, check=True, capture_output=True)
    rln = mrcfile.read(tmp_path / "rln.mrcs").astype(np.float64)
    corr = correlation(torch.from_numpy(ds.images), torch.from_numpy(rln))
    assert corr.min() >= 0.99, corr
