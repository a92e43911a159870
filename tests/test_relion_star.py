"""RELION STAR reading/writing: the shared contract on every real particle STAR fixture, RELION's
conventions (3.0 pixel origins, Magnification/DetectorPixelSize, block order, optics groups, image
names, path resolution), bad input, and the real relion_reconstruct on our exports."""

from __future__ import annotations

import os
import shutil
import subprocess
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from cryofire_ext.ctf import CTFParams
from cryofire_ext.errors import InputError
from cryofire_ext.images import MrcImages
from cryofire_ext.particles import ParticleStack
from cryofire_ext.poses import random_rotations
from integrations.relion import export as relion_export
from integrations.relion import read_latents, read_star, write_star
from tests.conftest import require_relion, shared_fixture
from tests.contract import ParticleFormatContract, assert_same_particles

STAR_FIXTURES = [
    "aspire/rln_proj_64.star", "aspire/rln_proj_64_centered.star", "aspire/rln_proj_64_shifted.star",
    "aspire/rln_proj_65.star", "aspire/rln_proj_65_centered.star", "aspire/rln_proj_65_shifted.star",
    "aspire/sample_particles_relion30.star", "aspire/sample_particles_relion31.star",
    "aspire/sample_relion_symmetry_group_D4.star",
    "cryodrgn/FinalRefinement-OriginalParticles-PfCRT.star", "cryodrgn/empiar_10076_7.star",
    "cryodrgn/relion31.6opticsgroups.star", "cryodrgn/relion31.star", "cryodrgn/relion31.v2.star",
    "cryodrgn/relion5.star",
    "relion/ap_s_c2d_red.star", "relion/ref_it002_data.star",
]


class TestRelionContract(ParticleFormatContract):
    fmt = "relion"
    fixtures = STAR_FIXTURES

    def read_latents(self, path):
        return read_latents(path)


# ---------------------------------------------------------------- helpers

def make_stack(path: Path, data: np.ndarray, voxel_size=0.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.asarray(data, dtype=np.float32))
        mrc.set_image_stack()
        mrc.voxel_size = voxel_size
    return path


def images(n, box=8, seed=0):
    return np.random.default_rng(seed).standard_normal((n, box, box)).astype(np.float32)


def write_31(path: Path, names, groups=None, optics=None, extra=None) -> Path:
    """A minimal RELION 3.1 particle file (optics + particles) written with starfile."""
    n = len(names)
    optics = optics if optics is not None else pd.DataFrame(
        {"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["og1"], "rlnVoltage": [300.0],
         "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1], "rlnImagePixelSize": [2.0],
         "rlnImageSize": [8], "rlnImageDimensionality": [2]})
    parts = pd.DataFrame({"rlnImageName": list(names), "rlnOpticsGroup": groups if groups is not None else [1] * n,
                          "rlnDefocusU": np.linspace(10000, 20000, n), "rlnDefocusV": np.linspace(9000, 19000, n),
                          "rlnDefocusAngle": np.full(n, 30.0), "rlnAngleRot": np.linspace(-170, 170, n),
                          "rlnAngleTilt": np.linspace(5, 175, n), "rlnAnglePsi": np.linspace(-90, 90, n),
                          "rlnOriginXAngst": np.linspace(-3, 3, n), "rlnOriginYAngst": np.linspace(2, -2, n)})
    for k, v in (extra or {}).items():
        parts[k] = v
    path.parent.mkdir(parents=True, exist_ok=True)
    starfile.write({"optics": optics, "particles": parts}, path)
    return path


def star_text_rows(path: Path, block: str) -> tuple[list[str], list[list[str]]]:
    """(labels, rows of raw text fields) of a loop block, read without any parser's type guessing."""
    lines = Path(path).read_text().splitlines()
    start = lines.index(f"data_{block}")
    labels, rows, i = [], [], start + 1
    while i < len(lines) and not lines[i].startswith("_"):
        i += 1
    while i < len(lines) and lines[i].startswith("_"):
        labels.append(lines[i].split()[0][1:])
        i += 1
    while i < len(lines) and lines[i].strip() and not lines[i].startswith(("data_", "#")):
        rows.append(lines[i].split())
        i += 1
    return labels, rows


# ---------------------------------------------------------------- RELION conventions on real files

def test_relion30_pixel_size_and_pixel_origins_to_angstrom():
    path = shared_fixture("aspire/sample_particles_relion30.star")
    stack = read_star(path)
    raw = starfile.read(path)
    assert stack.pixel_size_A == pytest.approx(1e4 * 5.0 / 37369.207031, rel=1e-9)
    assert stack.pixel_size_A == pytest.approx(1.338, abs=5e-4)
    np.testing.assert_allclose(stack.shifts_A[:, 0], raw["rlnOriginX"] * stack.pixel_size_A, rtol=1e-12)
    np.testing.assert_allclose(stack.shifts_A[:, 1], raw["rlnOriginY"] * stack.pixel_size_A, rtol=1e-12)
    assert stack.box == 200 and stack.images is not None  # box from sample.mrcs (3.0 has no rlnImageSize)
    np.testing.assert_allclose(stack.ctf.defocus_angle_rad, np.deg2rad(raw["rlnDefocusAngle"]))
    np.testing.assert_array_equal(stack.subset, raw["rlnRandomSubset"] - 1)
    pf = read_star(shared_fixture("cryodrgn/FinalRefinement-OriginalParticles-PfCRT.star"))
    assert pf.pixel_size_A == pytest.approx(1.035)  # Magnification 10000, DetectorPixelSize 1.035


def test_relion30_export_writes_angstrom_origins_and_optics(tmp_path):
    stack = read_star(shared_fixture("aspire/sample_particles_relion30.star"))
    out = write_star(stack, tmp_path / "p.star")
    blocks = starfile.read(out, always_dict=True)
    assert list(blocks) == ["optics", "particles"]
    assert Path(out).read_text().count("# version 30001") == 2
    parts, optics = blocks["particles"], blocks["optics"]
    assert "rlnOriginX" not in parts and "rlnOriginY" not in parts
    assert "rlnMagnification" not in parts and "rlnVoltage" not in parts  # moved to the optics table
    np.testing.assert_allclose(optics["rlnImagePixelSize"], stack.pixel_size_A, rtol=1e-6)
    assert set(optics["rlnImageSize"]) == {200}
    np.testing.assert_allclose(np.c_[parts["rlnOriginXAngst"], parts["rlnOriginYAngst"]], stack.shifts_A, atol=1e-6)
    volt = optics.set_index("rlnOpticsGroup").loc[parts["rlnOpticsGroup"], "rlnVoltage"].to_numpy()
    np.testing.assert_allclose(volt, stack.ctf.voltage_kv)
    assert_same_particles(stack, read_star(out))


def test_particles_before_optics_reads_the_same():
    a = read_star(shared_fixture("cryodrgn/relion31.star"), require_images=True)
    b = read_star(shared_fixture("cryodrgn/relion31.v2.star"), require_images=True)
    assert_same_particles(a, b, rot_atol=0, shift_atol=0)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.class_id, b.class_id)
    np.testing.assert_array_equal(a.images.read([4, 0, 2]), b.images.read([4, 0, 2]))


def test_relion31_real_stack_without_map_id_reads():
    path = shared_fixture("cryodrgn/relion31.star")
    stack = read_star(path, require_images=True)
    assert (len(stack), stack.box, stack.pixel_size_A) == (5, 256, 2.806)  # STAR wins over the header's 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no MAP id / machine stamp in this real file
        with mrcfile.open(shared_fixture("cryodrgn/relion31.mrcs"), permissive=True) as mrc:
            ref = np.array(mrc.data)
    np.testing.assert_array_equal(stack.images.read([3, 1]), ref[[3, 1]])
    assert stack.ctf.cs_mm[0] == pytest.approx(0.01)
    # found stacks name each image through the image source, not a second (n,) str table of names
    assert stack.image_names is None
    assert os.path.samefile(stack.images.paths[3], shared_fixture("cryodrgn/relion31.mrcs"))
    assert stack.images.indices[3] == int(stack.ids[3].split("@")[0]) - 1


def test_six_optics_groups(tmp_path):
    path = shared_fixture("cryodrgn/relion31.6opticsgroups.star")
    stack = read_star(path)
    raw = starfile.read(path)
    assert len(stack) == 139 and len(np.unique(stack.optics_group)) == 6
    assert stack.pixel_size_A == 1.25 and stack.box == 196 and stack.images is None
    assert len(stack.missing_stacks) > 1
    groups = raw["optics"].set_index("rlnOpticsGroup")
    np.testing.assert_allclose(stack.ctf.voltage_kv, groups.loc[raw["particles"]["rlnOpticsGroup"], "rlnVoltage"])
    out = write_star(stack, tmp_path / "six.star")
    back = starfile.read(out)
    pd.testing.assert_frame_equal(back["optics"][raw["optics"].columns], raw["optics"], check_dtype=False)
    # names of absent stacks stay as written
    np.testing.assert_array_equal(back["particles"]["rlnImageName"], raw["particles"]["rlnImageName"])


def test_relion5_version_and_optics_extras(tmp_path):
    path = shared_fixture("cryodrgn/relion5.star")
    stack = read_star(path)
    assert stack.passthrough.version == "50001"
    assert stack.pixel_size_A == 0.89 and stack.box == 448 and stack.ctf.voltage_kv[0] == 100
    out = write_star(stack, tmp_path / "r5.star")
    labels, rows = star_text_rows(out, "optics")
    orig_labels, orig_rows = star_text_rows(path, "optics")
    for label in ("rlnOddZernike", "rlnEvenZernike", "rlnMagMat00", "rlnCtfDataAreCtfPremultiplied"):
        assert rows[0][labels.index(label)] == orig_rows[0][orig_labels.index(label)]


def test_export_keeps_every_input_column(tmp_path):
    path = shared_fixture("cryodrgn/relion31.star")
    stack = read_star(path)
    out = write_star(stack, tmp_path / "keep.star", z=np.ones((5, 2)))
    labels, rows = star_text_rows(out, "particles")
    orig_labels, orig_rows = star_text_rows(path, "particles")
    replaced = {"rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnImageName", "rlnOriginXAngst", "rlnOriginYAngst"}
    assert labels[:len(orig_labels)] == orig_labels and labels[len(orig_labels):] == ["cryofireZ1", "cryofireZ2"]
    for j, label in enumerate(orig_labels):
        mine = [r[labels.index(label)] for r in rows]
        theirs = [r[j] for r in orig_rows]
        if label in replaced:
            continue
        if label in ("rlnImageOriginalName", "rlnMicrographName", "rlnClassNumber", "rlnRandomSubset",
                     "rlnNrOfSignificantSamples", "rlnGroupNumber", "rlnOpticsGroup"):
            assert mine == theirs, label  # text and integers untouched
        else:
            np.testing.assert_allclose(np.asarray(mine, float), np.asarray(theirs, float), rtol=1e-6, err_msg=label)
    for label in ("rlnClassNumber", "rlnRandomSubset", "rlnOpticsGroup", "rlnNrOfSignificantSamples"):
        assert all("." not in r[labels.index(label)] for r in rows), f"{label} must stay integer"
    # written elsewhere: names point at the same images, now by absolute path
    names = [r[labels.index("rlnImageName")] for r in rows]
    assert names[0] == "000001@" + str(shared_fixture("cryodrgn/relion31.mrcs"))
    np.testing.assert_array_equal(read_star(out, require_images=True).images.read([0, 4]), stack.images.read([0, 4]))


def test_names_kept_when_written_beside_the_stacks(tmp_path):
    for name in ("relion31.star", "relion31.mrcs"):
        shutil.copy(shared_fixture(f"cryodrgn/{name}"), tmp_path / name)
    stack = read_star(tmp_path / "relion31.star")
    out = write_star(stack, tmp_path / "again.star")
    assert list(starfile.read(out)["particles"]["rlnImageName"]) == list(stack.ids)
    assert list(stack.ids)[0] == "000001@relion31.mrcs"


def test_poses_classes_and_subsets_written_from_the_stack(tmp_path):
    stack = read_star(shared_fixture("cryodrgn/relion31.star"))
    rng = np.random.default_rng(3)
    A, shifts = random_rotations(5, rng), rng.normal(0, 4, (5, 2))
    new = stack.with_poses(A, shifts)
    new.class_id = np.array([0, 1, 2, 1, 0])
    new.subset = np.array([0, 1, 1, 0, 1])
    out = write_star(new, tmp_path / "poses.star")
    back = read_star(out)
    np.testing.assert_allclose(back.A, A, atol=1e-5)
    np.testing.assert_allclose(back.shifts_A, shifts, atol=1e-5)
    np.testing.assert_array_equal(back.class_id, new.class_id)
    np.testing.assert_array_equal(back.subset, new.subset)
    # a subset exports exactly those rows with their own columns
    sub = stack.take([4, 1])
    rows = starfile.read(write_star(sub, tmp_path / "sub.star"))["particles"]
    np.testing.assert_allclose(rows["rlnLogLikeliContribution"], stack.passthrough.particles[
        "rlnLogLikeliContribution"].to_numpy()[[4, 1]])


def test_classes_replace_the_input_rlnClassNumber_and_stay_integers(tmp_path):
    """An input file with rlnClassNumber 7 everywhere, written with the refinement's 0-based classes."""
    n = 6
    src = write_31(tmp_path / "in.star", [f"{i + 1:06d}@s.mrcs" for i in range(n)], extra={"rlnClassNumber": [7] * n})
    stack = read_star(src)
    np.testing.assert_array_equal(stack.class_id, 6)
    classes = np.arange(n) % 2
    out = write_star(stack, tmp_path / "out.star", classes=classes)
    labels, rows = star_text_rows(out, "particles")
    assert [r[labels.index("rlnClassNumber")] for r in rows] == ["1", "2"] * (n // 2)
    assert labels.count("rlnClassNumber") == 1
    assert relion_export.star_tables(stack, out, classes=classes)[1]["rlnClassNumber"].dtype == np.int64
    # without classes: the input's stay
    _, rows = star_text_rows(write_star(stack, tmp_path / "kept.star"), "particles")
    assert {r[labels.index("rlnClassNumber")] for r in rows} == {"7"}


def test_foreign_stack_builds_optics_and_image_names(tmp_path):
    data = images(4, box=8)
    src = make_stack(tmp_path / "data" / "s.mrcs", data)
    ctf = CTFParams.constant(4, defocus_u_A=12000.0)
    ctf = CTFParams(**{**{f: getattr(ctf, f) for f in CTFParams.field_names()},
                       "voltage_kv": np.array([300.0, 300.0, 200.0, 200.0])})
    rng = np.random.default_rng(1)
    stack = ParticleStack(ids=["u1", "u2", "u3", "u4"], pixel_size_A=1.7, box=8, ctf=ctf,
                          images=MrcImages([src] * 4, [3, 2, 1, 0]), A=random_rotations(4, rng),
                          shifts_A=rng.normal(size=(4, 2)), optics_group=np.array([0, 0, 1, 1]))
    out = write_star(stack, tmp_path / "out" / "f.star")
    blocks = starfile.read(out)
    assert list(blocks["optics"]["rlnVoltage"]) == [300.0, 200.0]
    assert list(blocks["optics"]["rlnImageSize"]) == [8, 8]
    back = read_star(out, require_images=True)
    assert_same_particles(stack, back)
    np.testing.assert_array_equal(back.images.read([0, 3]), data[[3, 0]])
    names_only = ParticleStack(ids=["a", "b"], pixel_size_A=1.0, box=8, ctf=CTFParams.constant(2),
                               image_names=["1@x.mrcs", "2@x.mrcs"])
    assert list(starfile.read(write_star(names_only, tmp_path / "n.star"))["particles"]["rlnImageName"]) == \
        ["1@x.mrcs", "2@x.mrcs"]
    with pytest.raises(InputError, match="rlnImageName"):
        write_star(ParticleStack(ids=["a"], pixel_size_A=1.0, box=8, ctf=CTFParams.constant(1)), tmp_path / "x.star")


def test_empiar_star_and_cs_agree():
    from integrations.cryosparc import read_cs

    star = read_star(shared_fixture("cryodrgn/empiar_10076_7.star"), require_images=True)
    cs = read_cs(shared_fixture("cryodrgn/empiar_10076_7.cs"), require_images=True)
    assert star.pixel_size_A == pytest.approx(cs.pixel_size_A, rel=1e-6) and star.box == cs.box == 320
    for name in ("defocus_u_A", "defocus_v_A", "defocus_angle_rad", "voltage_kv", "cs_mm", "amplitude_contrast",
                 "phase_shift_rad"):
        np.testing.assert_allclose(getattr(star.ctf, name), getattr(cs.ctf, name), rtol=1e-6, atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(star.images.read([6, 0]), cs.images.read([6, 0]))


def test_mrc_stack_names_get_relion_type_override(tmp_path):
    stack = read_star(shared_fixture("cryodrgn/empiar_10076_7.star"))
    out = write_star(stack, tmp_path / "e.star")
    names = list(starfile.read(out)["particles"]["rlnImageName"])
    assert names[0] == f"000001@{shared_fixture('cryodrgn/empiar_10076_7.mrc')}:mrcs"
    back = read_star(out, require_images=True)
    np.testing.assert_array_equal(back.images.read([1, 5]), stack.images.read([1, 5]))


def test_zero_particles(tmp_path):
    src = tmp_path / "empty.star"
    src.write_text("# version 30001\n\ndata_optics\n\nloop_\n_rlnOpticsGroup #1\n_rlnImagePixelSize #2\n"
                   "_rlnImageSize #3\n_rlnVoltage #4\n1 1.5 64 300\n\n# version 30001\n\ndata_particles\n\n"
                   "loop_\n_rlnImageName #1\n_rlnOpticsGroup #2\n")
    stack = read_star(src)
    assert (len(stack), stack.pixel_size_A, stack.box, stack.images) == (0, 1.5, 64, None)
    back = read_star(write_star(stack, tmp_path / "out.star"))
    assert (len(back), back.pixel_size_A, back.box) == (0, 1.5, 64)


# ---------------------------------------------------------------- image names and paths

def test_unpadded_and_padded_names(tmp_path):
    data = images(3)
    make_stack(tmp_path / "x.mrcs", data)
    path = write_31(tmp_path / "p.star", ["1@x.mrcs", "000003@x.mrcs", "2@x.mrcs"])
    stack = read_star(path, require_images=True)
    np.testing.assert_array_equal(stack.images.read([0, 1, 2]), data[[0, 2, 1]])
    assert list(stack.ids) == ["1@x.mrcs", "000003@x.mrcs", "2@x.mrcs"]


def test_path_resolution_order_and_error(tmp_path):
    proj = tmp_path / "project"
    make_stack(proj / "Extract" / "a.mrcs", np.full((2, 8, 8), 1.0))          # project dir (grand-parent)
    star = write_31(proj / "Refine3D" / "job1" / "p.star", ["1@Extract/a.mrcs", "2@Extract/a.mrcs"])
    assert read_star(star).images.read([0])[0, 0, 0] == 1.0
    make_stack(star.parent / "Extract" / "a.mrcs", np.full((2, 8, 8), 2.0))   # the STAR's folder beats parents
    assert read_star(star).images.read([0])[0, 0, 0] == 2.0
    dd = tmp_path / "datadir"
    make_stack(dd / "a.mrcs", np.full((2, 8, 8), 3.0))                        # datadir + file name
    assert read_star(star, datadir=dd).images.read([0])[0, 0, 0] == 3.0
    make_stack(dd / "Extract" / "a.mrcs", np.full((2, 8, 8), 4.0))            # datadir + path as written first
    assert read_star(star, datadir=dd).images.read([0])[0, 0, 0] == 4.0

    missing = write_31(proj / "Refine3D" / "job1" / "m.star", ["1@Extract/b.mrcs"])
    stack = read_star(missing)
    assert stack.images is None and stack.missing_stacks == ["Extract/b.mrcs"]
    with pytest.raises(InputError) as err:
        read_star(missing, datadir=dd, require_images=True)
    msg = str(err.value)
    assert "\n" not in msg and str(missing) in msg and "Extract/b.mrcs" in msg
    for tried in (dd / "Extract/b.mrcs", dd / "b.mrcs", star.parent / "Extract/b.mrcs", proj / "Extract/b.mrcs"):
        assert str(tried) in msg


# ---------------------------------------------------------------- bad input

def test_index_beyond_the_stack(tmp_path):
    make_stack(tmp_path / "x.mrcs", images(3))
    with pytest.raises(InputError, match=r"x\.mrcs.*image 9 .*holds 3 images"):
        read_star(write_31(tmp_path / "p.star", ["1@x.mrcs", "9@x.mrcs"]))


def test_truncated_stack(tmp_path):
    stack_path = make_stack(tmp_path / "x.mrcs", images(3))
    raw = stack_path.read_bytes()
    stack_path.write_bytes(raw[:-100])
    with pytest.raises(InputError, match=r"x\.mrcs.*truncated"):
        read_star(write_31(tmp_path / "p.star", ["1@x.mrcs"]))


def test_mixed_box_sizes(tmp_path):
    make_stack(tmp_path / "a.mrcs", images(2, box=8))
    make_stack(tmp_path / "b.mrcs", images(2, box=10))
    optics = pd.DataFrame({"rlnOpticsGroup": [1, 2], "rlnVoltage": [300.0] * 2, "rlnSphericalAberration": [2.7] * 2,
                           "rlnAmplitudeContrast": [0.1] * 2, "rlnImagePixelSize": [2.0] * 2,
                           "rlnImageSize": [8, 10], "rlnImageDimensionality": [2, 2]})
    path = write_31(tmp_path / "p.star", ["1@a.mrcs", "1@b.mrcs"], groups=[1, 2], optics=optics)
    with pytest.raises(InputError, match=r"group 1: 8 px, group 2: 10 px"):
        read_star(path, require_images=True)
    with pytest.raises(InputError, match="box"):
        read_star(path)  # stacks found: their boxes differ
    path2 = write_31(tmp_path / "q.star", ["1@a.mrcs", "1@b.mrcs"])
    with pytest.raises(InputError, match=r"b\.mrcs: box 10 px differs from 8 px"):
        read_star(path2)


def test_optics_groups_differing_in_pixel_size(tmp_path):
    make_stack(tmp_path / "a.mrcs", images(2))
    optics = pd.DataFrame({"rlnOpticsGroup": [1, 2], "rlnVoltage": [300.0, 200.0], "rlnSphericalAberration": [2.7] * 2,
                           "rlnAmplitudeContrast": [0.1] * 2, "rlnImagePixelSize": [1.0, 1.1], "rlnImageSize": [8, 8],
                           "rlnImageDimensionality": [2, 2]})
    path = write_31(tmp_path / "p.star", ["1@a.mrcs", "2@a.mrcs"], groups=[1, 2], optics=optics)
    with pytest.raises(InputError, match=r"pixel size \(group 1: 1 A, group 2: 1.1 A\)"):
        read_star(path, require_images=True)
    stack = read_star(path)  # metadata: a warning; different voltages are fine
    np.testing.assert_allclose(stack.ctf.voltage_kv, [300, 200])


def test_particle_without_optics_group(tmp_path):
    make_stack(tmp_path / "a.mrcs", images(2))
    path = write_31(tmp_path / "p.star", ["1@a.mrcs", "2@a.mrcs"], groups=[1, 2])
    with pytest.raises(InputError, match=r"p\.star: row 2 of data_particles has rlnOpticsGroup = '2'.*not in data_optics"):
        read_star(path)
    path = write_31(tmp_path / "q.star", ["1@a.mrcs"])
    parts = starfile.read(path)
    parts["particles"] = parts["particles"].drop(columns=["rlnOpticsGroup"])
    starfile.write(parts, path, overwrite=True)
    with pytest.raises(InputError, match="no field rlnOpticsGroup"):
        read_star(path)


def test_star_without_image_name(tmp_path):
    path = tmp_path / "noname.star"
    starfile.write(pd.DataFrame({"rlnAngleRot": [1.0], "rlnDefocusU": [1e4]}), path)
    with pytest.raises(InputError, match=r"noname\.star: no particle table.*rlnImageName"):
        read_star(path)
    with pytest.raises(InputError, match="rlnImageName"):
        read_star(shared_fixture("aspire/sample_data_model.star"))
    with pytest.raises(InputError, match="not found"):
        read_star(tmp_path / "absent.star")


def test_bad_image_name(tmp_path):
    path = write_31(tmp_path / "p.star", ["1@a.mrcs", "x@a.mrcs"])
    with pytest.raises(InputError, match=r"row 2 of data_particles has rlnImageName 'x@a.mrcs'"):
        read_star(path)


def test_refuses_overwrite_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    stack = read_star(shared_fixture("cryodrgn/relion31.star"))
    out = tmp_path / "out.star"
    out.write_text("keep me")
    with pytest.raises(InputError, match="exists"):
        write_star(stack, out)
    assert out.read_text() == "keep me"
    calls = []
    real = relion_export.relion_text

    def failing(df):  # the optics block is already in the temporary file when the particles fail
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(df)

    monkeypatch.setattr(relion_export, "relion_text", failing)
    with pytest.raises(OSError):
        write_star(stack, out, force=True)
    assert out.read_text() == "keep me"
    calls.clear()
    with pytest.raises(OSError):
        write_star(stack, tmp_path / "new.star")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.star"]
    with pytest.raises(InputError, match=r"latent coordinates have shape \(3, 2\)"):
        write_star(stack, tmp_path / "z.star", z=np.zeros((3, 2)))
    assert not (tmp_path / "z.star").exists()


def test_read_latents_errors(tmp_path):
    with pytest.raises(InputError, match="no latent columns"):
        read_latents(shared_fixture("cryodrgn/relion31.star"))


# ---------------------------------------------------------------- the real RELION

def _reconstruct(star: Path, out: Path, cwd: Path, *extra) -> np.ndarray:
    res = subprocess.run(["relion_reconstruct", "--i", str(star), "--o", str(out), *extra], cwd=cwd,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0 and out.exists(), res.stdout[-2000:] + res.stderr[-2000:]
    with mrcfile.open(out) as mrc:
        return np.array(mrc.data, dtype=np.float64)


def _corr(a, b):
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.mark.relion
def test_relion_reconstruct_on_reexport_matches(tmp_path):
    """rln_proj_65_centered (Angstrom origins): ours and the original reconstruct the same map.

    rln_proj_65_shifted carries PIXEL origins beside an optics table, which RELION 3.1 ignores, so its
    original STAR reconstructs a blurred map; our export converts them to rlnOriginX/YAngst, and the
    reconstruction then matches RELION's own from the unshifted images of the same views.
    """
    require_relion("relion_reconstruct")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    centred = shared_fixture("aspire/rln_proj_65_centered.star")
    ours_c = write_star(read_star(centred), tmp_path / "out" / "centred.star")
    ref = _reconstruct(centred, tmp_path / "ref.mrc", centred.parent)
    assert _corr(_reconstruct(ours_c, tmp_path / "ours_c.mrc", elsewhere), ref) >= 0.99

    shifted = shared_fixture("aspire/rln_proj_65_shifted.star")
    ours_s = write_star(read_star(shifted), tmp_path / "out" / "shifted.star")
    mine = _reconstruct(ours_s, tmp_path / "ours_s.mrc", elsewhere)  # absolute names: any cwd works
    assert _corr(mine, ref) >= 0.99
    original = _reconstruct(shifted, tmp_path / "orig_s.mrc", shifted.parent)
    assert _corr(original, ref) < 0.5  # RELION ignored the pixel origins of the original


@pytest.mark.relion
def test_relion_reconstruct_ctf_on_exports_of_relion30_and_of_cs(tmp_path):
    """`cryofire convert` 3.0 STAR -> STAR, and 3.0 STAR -> .cs -> STAR: RELION reconstructs both with --ctf,
    to the same map."""
    require_relion("relion_reconstruct")
    from cli.main import main

    src = shared_fixture("aspire/sample_particles_relion30.star")
    direct, cs, via_cs = tmp_path / "direct" / "p.star", tmp_path / "cs" / "p.cs", tmp_path / "via_cs" / "p.star"
    for a, b in ((src, direct), (src, cs), (cs, via_cs)):
        b.parent.mkdir(exist_ok=True)
        assert main(["convert", str(a), str(b)]) == 0
    a = _reconstruct(direct, tmp_path / "a.mrc", tmp_path, "--ctf", "--pad", "1")  # --pad 1: 10x faster
    b = _reconstruct(via_cs, tmp_path / "b.mrc", tmp_path / "via_cs", "--ctf", "--pad", "1")
    assert a.shape == (200, 200, 200) and np.isfinite(a).all() and a.std() > 0
    assert _corr(a, b) >= 0.99


@pytest.mark.relion
def test_relion_reads_our_names_of_mrc_stacks(tmp_path):
    """RELION refuses `N@x.mrc`; our export writes `N@x.mrc:mrcs`, which it reads (and so do we)."""
    require_relion("relion_reconstruct")
    shutil.copy(shared_fixture("aspire/rln_proj_65_centered.mrcs"), tmp_path / "views.mrc")
    orig = starfile.read(shared_fixture("aspire/rln_proj_65_centered.star"))
    orig["particles"]["rlnImageName"] = [f"{k}@views.mrc" for k in range(1, 5)]
    src = tmp_path / "in.star"
    starfile.write(orig, src)
    stack = read_star(src, require_images=True)
    out = write_star(stack, tmp_path / "out" / "p.star")
    names = list(starfile.read(out)["particles"]["rlnImageName"])
    assert names[0] == "1@views.mrc:mrcs"  # resolves from out/'s parent, the project folder RELION runs in
    np.testing.assert_array_equal(read_star(out, require_images=True).images.read([0, 3]), stack.images.read([0, 3]))
    vol = _reconstruct(out, tmp_path / "rec.mrc", tmp_path)
    ref = _reconstruct(shared_fixture("aspire/rln_proj_65_centered.star"), tmp_path / "ref.mrc",
                       shared_fixture("aspire/rln_proj_65_centered.star").parent)
    assert _corr(vol, ref) >= 0.99
