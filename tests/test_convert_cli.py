"""`cryofire convert` / `cryofire inspect` and the suffix dispatcher, including real RELION on our STAR output."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import mrcfile
import numpy as np
import pytest
from cryosparc.dataset import Dataset

from cli.main import main
from cryofire_ext.errors import InputError
from integrations.formats import convert_particles, read_particles, summarize_particles, write_particles
from tests.conftest import require_relion, shared_fixture

P12 = "cryodrgn/cryosparc_P12_J24_001_particles.cs"


def run_cli(*args) -> int:
    return main([str(a) for a in args])


def one_paragraph_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    return " ".join(err.split())


# ---------------------------------------------------------------- convert, both directions


def test_convert_cs_to_star_to_cs_keeps_poses_and_warns_about_missing_stacks(tmp_path, capsys):
    src = shared_fixture(P12)
    star, back = tmp_path / "p.star", tmp_path / "back.cs"
    assert run_cli("convert", src, star) == 0
    captured = capsys.readouterr()
    out, err = " ".join(captured.out.split()), " ".join(captured.err.split())
    assert "wrote 2019 particles" in out and "50 image stacks not found" in out
    assert "not found" in err  # the reader's warning reaches the user
    assert run_cli("convert", star, back) == 0
    a, b = read_particles(src), read_particles(back)
    np.testing.assert_allclose(b.A, a.A, atol=1e-5)
    np.testing.assert_allclose(b.shifts_A, a.shifts_A, atol=1e-4)
    np.testing.assert_allclose(b.ctf.defocus_u_A, a.ctf.defocus_u_A, rtol=1e-6)
    np.testing.assert_array_equal(b.subset, a.subset)
    # same particles, same order: image references survive the trip without the stacks
    np.testing.assert_array_equal([n.lstrip("0") for n in b.image_names], a.image_names)


def test_convert_same_format_and_star_to_star(tmp_path):
    src = shared_fixture("aspire/sample_particles_relion30.star")
    out = tmp_path / "sample31.star"
    stack, path = convert_particles(src, out)
    assert path == out and out.read_text().count("data_optics") == 1
    again = read_particles(out)
    np.testing.assert_allclose(again.A, stack.A, atol=1e-5)
    np.testing.assert_allclose(again.pixel_size_A, 1.338, atol=1e-3)
    cs_out = tmp_path / "copy.cs"
    convert_particles(shared_fixture(P12), cs_out)
    assert Dataset.load(str(cs_out)).fields() == Dataset.load(str(shared_fixture(P12))).fields()


# ---------------------------------------------------------------- bad input: one paragraph, exit 2, nothing written


def test_unknown_extension(tmp_path, capsys):
    assert run_cli("convert", shared_fixture(P12), tmp_path / "out.xyz") == 2
    msg = one_paragraph_error(capsys)
    assert "'.xyz'" in msg and ".star, .cs" in msg
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "in.pkl").write_bytes(b"x")
    with pytest.raises(InputError, match=r"'\.pkl'.*\.star, \.cs, \.mrcs, \.mrc, \.txt"):
        read_particles(tmp_path / "in.pkl")


def test_output_exists_without_force(tmp_path, capsys):
    out = tmp_path / "out.star"
    out.write_text("the user's file")
    assert run_cli("convert", shared_fixture(P12), out) == 2
    assert "--force" in one_paragraph_error(capsys)
    assert out.read_text() == "the user's file"
    assert run_cli("convert", shared_fixture(P12), out, "--force") == 0
    assert "data_optics" in out.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.star"]  # no temporary left behind


def test_cs_without_blob_fields(tmp_path, capsys):
    dset = Dataset.load(str(shared_fixture(P12))).take(np.arange(4))
    dset.drop_fields(["blob/path", "blob/idx", "blob/shape", "blob/psize_A"])
    dset.save(str(tmp_path / "noblob.cs"))
    assert run_cli("convert", tmp_path / "noblob.cs", tmp_path / "out.star") == 2
    msg = one_paragraph_error(capsys)
    assert "noblob.cs" in msg and "blob/path, blob/idx, blob/shape, blob/psize_A" in msg
    assert not (tmp_path / "out.star").exists()


def test_missing_input_file(tmp_path, capsys):
    assert run_cli("inspect", tmp_path / "nope.cs") == 2
    assert "nope.cs" in one_paragraph_error(capsys)


def _cs_with_stack(tmp_path, n=20, box=32, seed=0):
    """A real .cs's metadata (first n rows of the P12 refinement) pointed at a small generated stack.

    The images are Gaussian blobs plus noise; the point is that RELION accepts the files, not the map.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:box, :box] - box / 2
    images = np.exp(-(xx ** 2 + yy ** 2) / (2 * 4.0 ** 2))[None] + 0.1 * rng.standard_normal((n, box, box))
    stack_path = tmp_path / "J19" / "extract" / "blobs.mrcs"
    stack_path.parent.mkdir(parents=True)
    with mrcfile.new(stack_path) as mrc:
        mrc.set_data(images.astype(np.float32))
        mrc.voxel_size = 2.95
    dset = Dataset.load(str(shared_fixture(P12))).take(np.arange(n))
    dset["blob/path"] = np.array(["J19/extract/blobs.mrcs"] * n, dtype=object)
    dset["blob/idx"] = np.arange(n, dtype=np.uint32)
    dset["blob/shape"] = np.tile(np.array([box, box], dtype=np.uint32), (n, 1))
    dset["alignments3D/shift"] = np.clip(np.asarray(dset["alignments3D/shift"]), -3, 3)
    cs = tmp_path / "J24" / "J24_001_particles.cs"
    cs.parent.mkdir()
    dset.save(str(cs))
    return cs


def test_missing_stack_is_an_error_when_images_are_required(tmp_path):
    cs = _cs_with_stack(tmp_path, n=4, box=8)
    assert read_particles(cs, require_images=True).images.read([0]).shape == (1, 8, 8)
    (tmp_path / "J19" / "extract" / "blobs.mrcs").unlink()
    with pytest.raises(InputError, match=r"J24_001_particles\.cs: 1 of 1 particle stacks not found.*blobs\.mrcs"):
        read_particles(cs, require_images=True)
    assert convert_particles(cs, tmp_path / "meta.star")[0].missing_stacks == ["J19/extract/blobs.mrcs"]


# ---------------------------------------------------------------- inspect


def test_inspect_summarises(capsys):
    assert run_cli("inspect", shared_fixture(P12)) == 0
    out = " ".join(capsys.readouterr().out.split())
    for text in ("2019", "180 px", "2.9500 A", "200.0 kV", "poses", "missing: 50 stacks"):
        assert text in out, text
    s = summarize_particles(read_particles(shared_fixture("cryodrgn/relion31.6opticsgroups.star")))
    assert len(s["optics_groups"]) == 6 and sum(g["count"] for g in s["optics_groups"].values()) == 139
    lo, hi = s["defocus_u_A"]
    assert 0 < lo <= hi


def test_inspect_bare_stack_and_zero_rows(capsys):
    assert run_cli("inspect", shared_fixture("cryodrgn/empiar_10076_7.mrc")) == 0
    out = capsys.readouterr().out
    assert "320 px" in out and "available" in out
    assert run_cli("inspect", shared_fixture("cryosparc-tools/4k_dataset.cs")) == 0
    assert "│ 0 " in capsys.readouterr().out


def test_console_script_exit_status(tmp_path):
    exe = shutil.which("cryofire")
    cmd = [exe] if exe else [sys.executable, "-m", "cli.main"]
    res = subprocess.run(cmd + ["convert", str(shared_fixture(P12)), str(tmp_path / "x.bad")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "'.bad'" in res.stderr


def test_write_particles_dispatch(tmp_path):
    stack = read_particles(shared_fixture("cryodrgn/empiar_10076_7.cs"))
    assert write_particles(stack, tmp_path / "a.cs").exists()
    assert write_particles(stack, tmp_path / "a.star").exists()
    with pytest.raises(InputError, match="'.mrcs' for writing"):
        write_particles(stack, tmp_path / "a.mrcs")


# ---------------------------------------------------------------- the real RELION accepts what convert writes


def _reconstruct(star, cwd, out, fast=False):
    """relion_reconstruct --ctf in `cwd` (image paths resolve from there); the map it wrote."""
    cmd = ["relion_reconstruct", "--i", str(star), "--o", str(out), "--ctf"] + (["--pad", "1", "--iter", "1"] if fast else [])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    with mrcfile.open(out, permissive=True) as mrc:
        return np.asarray(mrc.data, dtype=np.float64)


def test_relion_reconstruct_runs_on_star_converted_from_cs(tmp_path):
    require_relion("relion_reconstruct")
    cs = _cs_with_stack(tmp_path)
    star = tmp_path / "from_cs.star"
    assert run_cli("convert", cs, star) == 0
    vol = _reconstruct(star, tmp_path, tmp_path / "rec.mrc")
    assert vol.shape == (32, 32, 32) and np.all(np.isfinite(vol)) and np.abs(vol).max() > 0


def test_relion_reconstruct_on_star_converted_from_relion30_matches_the_original(tmp_path):
    """17 real particles (200 px) with poses, pixel origins and CTF in a RELION 3.0 table.

    RELION reconstructs from the original and from our 3.1 conversion; the maps must agree.
    (--pad 1 --iter 1 keeps it to about a second; the comparison is between two equal runs.)
    """
    require_relion("relion_reconstruct")
    src = shared_fixture("aspire/sample_particles_relion30.star")
    star = tmp_path / "from30.star"
    assert run_cli("convert", src, star, "--datadir", src.parent) == 0
    ours = _reconstruct(star, tmp_path, tmp_path / "ours.mrc", fast=True)
    ref = _reconstruct(src, src.parent, tmp_path / "ref.mrc", fast=True)
    assert ours.shape == ref.shape == (200, 200, 200) and np.abs(ref).max() > 0
    corr = np.corrcoef(ours.ravel(), ref.ravel())[0, 1]
    assert corr >= 0.99, corr


def test_bare_stacks_and_lists_convert_to_metadata(tmp_path):
    """A .txt list of .mrcs stacks reads as images with no CTF; convert names every image for RELION/cryoSPARC."""
    for k, n in ((0, 3), (1, 2)):
        with mrcfile.new(tmp_path / f"s{k}.mrcs") as mrc:
            mrc.set_data(np.full((n, 8, 8), k, dtype=np.float32))
            mrc.voxel_size = 2.5
    (tmp_path / "list.txt").write_text("s0.mrcs\ns1.mrcs\n")
    stack = read_particles(tmp_path / "list.txt")
    assert len(stack) == 5 and stack.box == 8 and stack.pixel_size_A == 2.5 and stack.A is None
    np.testing.assert_array_equal(stack.images.read([4, 0])[:, 0, 0], [1, 0])
    assert stack.image_names[3] == f"1@{tmp_path / 's1.mrcs'}"
    cs = convert_particles(tmp_path / "list.txt", tmp_path / "list.cs")[1]
    back = read_particles(cs, require_images=True)
    np.testing.assert_array_equal(back.images.read(np.arange(5)), stack.images.read(np.arange(5)))
    star = convert_particles(tmp_path / "list.txt", tmp_path / "list.star")[1]
    np.testing.assert_array_equal(read_particles(star, require_images=True).images.read([3])[0, 0, 0], 1)
