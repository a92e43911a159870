"""cryoSPARC .cs reading/writing, checked on real cryoSPARC files and on small .cs files built with cryosparc-tools."""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest
from cryosparc.dataset import Dataset

from cryofire_ext.ctf import CTFParams
from cryofire_ext.errors import InputError
from cryofire_ext.particles import ParticleStack
from cryofire_ext.poses import random_rotations, relion_euler_to_matrix
from integrations.cryosparc import (dataset_from_stack, find_passthrough, read_cs, read_latents, stack_from_dataset,
                                    uids_for_ids, write_cs)
from tests.contract import ParticleFormatContract
from tests.conftest import shared_fixture

P12 = "cryodrgn/cryosparc_P12_J24_001_particles.cs"
J2 = "cryodrgn/cryosparc_J2_particles_exported.cs"
EMPIAR_CS = "cryodrgn/empiar_10076_7.cs"
EMPTY = "cryosparc-tools/4k_dataset.cs"


class TestCryosparcContract(ParticleFormatContract):
    fmt = "cryosparc"
    fixtures = [J2, P12, EMPIAR_CS, EMPTY]

    def read_latents(self, path):
        return read_latents(path)


def rodrigues(v: np.ndarray) -> np.ndarray:
    """Rotation matrices `(n, 3, 3)` from axis-angle vectors `(n, 3)` by the Rodrigues formula (no scipy)."""
    out = np.empty((len(v), 3, 3))
    for i, r in enumerate(np.asarray(v, dtype=np.float64)):
        theta = np.linalg.norm(r)
        k = r / theta if theta > 0 else np.zeros(3)
        K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
        out[i] = np.eye(3) + np.sin(theta) * K + (1 - np.cos(theta)) * K @ K
    return out


def write_stack(path, data, voxel_size=1.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(np.asarray(data, dtype=np.float32))
        mrc.voxel_size = voxel_size
    return path


# ---------------------------------------------------------------- real files: conventions


def test_p12_poses_are_rodrigues_transposed_and_shifts_use_alignment_pixels():
    path = shared_fixture(P12)
    dset = Dataset.load(str(path))
    stack = read_cs(path)
    assert len(stack) == 2019 and stack.box == 180
    np.testing.assert_allclose(stack.pixel_size_A, 2.95, rtol=1e-6)
    expected = np.swapaxes(rodrigues(np.asarray(dset["alignments3D/pose"])), 1, 2)
    np.testing.assert_allclose(stack.A, expected, atol=1e-6)
    shifts = np.asarray(dset["alignments3D/shift"], dtype=np.float64) * np.asarray(dset["alignments3D/psize_A"])[:, None]
    np.testing.assert_allclose(stack.shifts_A, shifts, rtol=1e-6)
    np.testing.assert_array_equal(stack.subset, np.asarray(dset["alignments3D/split"]))
    np.testing.assert_array_equal(stack.ids, np.asarray(dset["uid"]).astype(str))
    np.testing.assert_allclose(stack.ctf.defocus_u_A, np.asarray(dset["ctf/df1_A"]), rtol=1e-6)
    np.testing.assert_allclose(stack.ctf.defocus_v_A, np.asarray(dset["ctf/df2_A"]), rtol=1e-6)
    np.testing.assert_allclose(stack.ctf.defocus_angle_rad, np.asarray(dset["ctf/df_angle_rad"]), rtol=1e-6)
    assert stack.images is None and len(stack.missing_stacks) == 50
    assert stack.image_names[0].startswith("1@J19/extract/")


def test_shift_pixels_are_those_of_alignments3D_psize_not_blob_psize(tmp_path):
    """A refinement run on downsampled images stores shifts in its own pixels: we must scale by its psize."""
    dset = Dataset.load(str(shared_fixture(P12))).take(np.arange(20))
    dset["alignments3D/psize_A"] = 2 * np.asarray(dset["blob/psize_A"])
    dset.save(str(tmp_path / "binned.cs"))
    stack = read_cs(tmp_path / "binned.cs")
    np.testing.assert_allclose(stack.shifts_A, np.asarray(dset["alignments3D/shift"]) * 5.9, rtol=1e-5)
    # and the writer states the pixel size its shifts are in
    out = Dataset.load(str(write_cs(stack, tmp_path / "out.cs")))
    np.testing.assert_allclose(np.asarray(out["alignments3D/psize_A"]), 2.95, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out["alignments3D/shift"]) * 2.95, stack.shifts_A, atol=1e-4)


def test_2d_classification_file_in_plane_angle_is_relion_psi():
    path = shared_fixture(J2)
    dset = Dataset.load(str(path))
    stack = read_cs(path)
    theta = np.asarray(dset["alignments2D/pose"], dtype=np.float64)
    expected = relion_euler_to_matrix(0.0, 0.0, np.degrees(theta))  # A = Rz(theta)^T
    np.testing.assert_allclose(stack.A, expected, atol=1e-6)
    np.testing.assert_allclose(stack.shifts_A, np.asarray(dset["alignments2D/shift"]) * 1.345, rtol=1e-5)
    np.testing.assert_array_equal(stack.class_id, np.asarray(dset["alignments2D/class"]))
    assert stack.box == 300


def test_exported_paths_lose_the_gt_prefix():
    stack = read_cs(shared_fixture(J2))
    raw = str(Dataset.load(str(shared_fixture(J2)))["blob/path"][0])
    assert raw.startswith(">")
    assert stack.missing_stacks == [raw[1:]]
    assert all(not n.split("@", 1)[1].startswith(">") for n in stack.image_names)


def test_empiar_cs_agrees_with_its_star_on_ctf_and_pixel_size():
    from integrations.relion import read_star

    cs = read_cs(shared_fixture(EMPIAR_CS))
    star = read_star(shared_fixture("cryodrgn/empiar_10076_7.star"))
    assert len(cs) == len(star) == 7
    np.testing.assert_allclose(cs.pixel_size_A, star.pixel_size_A, rtol=1e-5)
    assert cs.box == star.box == 320
    for name in ("defocus_u_A", "defocus_v_A", "defocus_angle_rad", "voltage_kv", "cs_mm", "amplitude_contrast"):
        np.testing.assert_allclose(getattr(cs.ctf, name), getattr(star.ctf, name), rtol=1e-5, err_msg=name)
    # the .cs finds its real stack beside it (a .mrc holding 7 images), 0-based blob/idx
    assert cs.images is not None
    with mrcfile.open(shared_fixture("cryodrgn/empiar_10076_7.mrc"), permissive=True) as mrc:
        np.testing.assert_array_equal(cs.images.read([6, 0]), mrc.data[[6, 0]])


def test_zero_row_file_parses():
    stack = read_cs(shared_fixture(EMPTY))
    assert len(stack) == 0 and stack.A is None and stack.images is None


# ---------------------------------------------------------------- passthrough join


def _split_job(tmp_path, main_name, passthrough_name, folder="J24", n=50):
    """A real .cs split the way cryoSPARC writes a job's output: own slots + passthrough (shuffled)."""
    full = Dataset.load(str(shared_fixture(P12))).take(np.arange(n))
    own = ["uid"] + [f for f in full.fields() if f.startswith("alignments3D/")]
    main = full.filter_fields(own, copy=True)
    rest = full.filter_fields(["uid"] + [f for f in full.fields() if f not in own], copy=True)
    rest = rest.take(np.random.default_rng(1).permutation(n))
    job = tmp_path / folder
    job.mkdir(parents=True, exist_ok=True)
    main.save(str(job / main_name))
    rest.save(str(job / passthrough_name))
    return full, job / main_name, job / passthrough_name


@pytest.mark.parametrize("main_name, pt_name, folder", [
    ("J24_020_particles.cs", "J24_passthrough_particles.cs", "J24"),
    ("cryosparc_P12_J24_001_particles.cs", "P12_J24_passthrough_particles.cs", "downloads"),
    ("particles_selected.cs", "J419_passthrough_particles_selected.cs", "J419"),
])
def test_passthrough_found_by_cryosparc_naming_and_joined_on_uid(tmp_path, main_name, pt_name, folder):
    full, main_path, pt_path = _split_job(tmp_path, main_name, pt_name, folder)
    # a decoy passthrough of another output must not be taken
    Dataset([("uid", np.arange(3, dtype=np.uint64))]).save(str(main_path.parent / "J24_passthrough_volume.cs"))
    assert find_passthrough(main_path) == pt_path
    joined = read_cs(main_path)
    reference = stack_from_dataset(full, source=str(shared_fixture(P12)))
    np.testing.assert_array_equal(joined.ids, reference.ids)
    np.testing.assert_allclose(joined.ctf.as_array(), reference.ctf.as_array())
    np.testing.assert_allclose(joined.A, reference.A, atol=1e-12)
    np.testing.assert_array_equal(joined.image_names, reference.image_names)


def test_explicit_passthrough_and_missing_uid_is_an_error(tmp_path):
    full, main_path, pt_path = _split_job(tmp_path, "mine.cs", "other_name.cs")
    assert find_passthrough(main_path) is None
    with pytest.raises(InputError, match=r"blob/path.*blob/idx"):
        read_cs(main_path)  # alone it lacks the blob slot
    stack = read_cs(main_path, passthrough=pt_path)
    np.testing.assert_allclose(stack.ctf.defocus_u_A, np.asarray(full["ctf/df1_A"]), rtol=1e-6)
    short = Dataset.load(str(pt_path)).take(np.arange(40))
    short.save(str(tmp_path / "short.cs"))
    with pytest.raises(InputError, match=r"short\.cs.*lacks 10 of the 50 particles"):
        read_cs(main_path, passthrough=tmp_path / "short.cs")


# ---------------------------------------------------------------- stacks: paths and indices


def _project_with_stack(tmp_path, n=6, box=16, prefix=">"):
    """tmp/J1/imported/p.mrcs where image k is filled with k; a .cs in tmp/exports/groups naming it."""
    data = np.stack([np.full((box, box), k, dtype=np.float32) for k in range(n)])
    write_stack(tmp_path / "J1" / "imported" / "p.mrcs", data)
    idx = np.array([3, 0, 5, 1], dtype=np.uint32)
    full = Dataset.load(str(shared_fixture(EMPIAR_CS))).take(np.arange(4))
    full["blob/path"] = np.array([f"{prefix}J1/imported/p.mrcs"] * 4, dtype=object)
    full["blob/idx"] = idx
    full["blob/shape"] = np.tile(np.array([box, box], dtype=np.uint32), (4, 1))
    cs = tmp_path / "exports" / "groups" / "P1_J2_particles" / "exported.cs"
    cs.parent.mkdir(parents=True)
    full.save(str(cs))
    return cs, idx


def test_blob_paths_resolve_from_project_and_idx_is_zero_based(tmp_path):
    cs, idx = _project_with_stack(tmp_path)
    stack = read_cs(cs)  # found through the .cs folder's parents
    assert stack.images is not None and stack.missing_stacks == []
    np.testing.assert_array_equal(stack.images.read(np.arange(4))[:, 0, 0], idx)
    # the image source names each image; no second (n,) table of names is kept
    assert stack.image_names is None
    assert (stack.images.paths[0], stack.images.indices[0]) == (str(tmp_path / "J1" / "imported" / "p.mrcs"), 3)
    # datadir is tried first
    other = tmp_path / "elsewhere"
    write_stack(other / "J1" / "imported" / "p.mrcs", -np.ones((6, 16, 16)))
    assert read_cs(cs, datadir=other).images.read([0])[0, 0, 0] == -1


def test_missing_stack_is_a_warning_unless_images_are_required(tmp_path, caplog):
    cs, _ = _project_with_stack(tmp_path)
    (tmp_path / "J1" / "imported" / "p.mrcs").unlink()
    with caplog.at_level("WARNING"):
        stack = read_cs(cs)
    assert stack.images is None and stack.missing_stacks == ["J1/imported/p.mrcs"]
    assert "not found" in caplog.text
    with pytest.raises(InputError, match=r"exported\.cs.*J1/imported/p\.mrcs.*--datadir"):
        read_cs(cs, require_images=True)
    with pytest.raises(InputError, match="missing stack files J1/imported/p.mrcs"):
        stack.require_images()


def test_cs_without_blob_fields_names_the_file_and_fields(tmp_path):
    dset = Dataset.load(str(shared_fixture(P12))).take(np.arange(5))
    dset.drop_fields(["blob/path", "blob/shape"])
    dset.save(str(tmp_path / "noblob.cs"))
    with pytest.raises(InputError) as err:
        read_cs(tmp_path / "noblob.cs")
    msg = str(err.value)
    assert "noblob.cs" in msg and "blob/path" in msg and "blob/shape" in msg and "blob/idx" not in msg
    assert "\n" not in msg


def test_not_a_cs_file_is_an_input_error(tmp_path):
    (tmp_path / "bad.cs").write_text("not numpy")
    with pytest.raises(InputError, match=r"bad\.cs: not a readable cryoSPARC"):
        read_cs(tmp_path / "bad.cs")


# ---------------------------------------------------------------- writing


def test_write_keeps_every_input_field_and_sets_poses(tmp_path):
    src = Dataset.load(str(shared_fixture(P12)))
    stack = read_cs(shared_fixture(P12))
    A = random_rotations(len(stack), np.random.default_rng(0))
    shifts = np.random.default_rng(1).normal(scale=5.0, size=(len(stack), 2))
    out = Dataset.load(str(write_cs(stack.with_poses(A, shifts), tmp_path / "new.cs")))
    assert out.fields() == src.fields()
    for f in src.fields():
        if f not in ("alignments3D/pose", "alignments3D/shift", "alignments3D/psize_A"):
            a, b = np.asarray(src[f]), np.asarray(out[f])
            assert a.dtype == b.dtype and np.array_equal(a, b), f
    np.testing.assert_allclose(np.swapaxes(rodrigues(np.asarray(out["alignments3D/pose"])), 1, 2), A, atol=2e-6)
    np.testing.assert_allclose(np.asarray(out["alignments3D/shift"]) * 2.95, shifts, atol=1e-4)
    # and the input table was not touched (dataset_from_stack is pure)
    np.testing.assert_array_equal(np.asarray(stack.passthrough["alignments3D/pose"]), np.asarray(src["alignments3D/pose"]))


def test_latents_as_components_mode_with_cryosparc_dtypes(tmp_path):
    stack = read_cs(shared_fixture(EMPIAR_CS))
    z = np.random.default_rng(0).normal(size=(7, 4)).astype(np.float32)
    out = tmp_path / "z.cs"
    write_cs(stack, out, z=z)
    dset = Dataset.load(str(out))
    for k in range(4):
        assert np.asarray(dset[f"components_mode_{k}/component"]).dtype == np.uint32
        assert np.asarray(dset[f"components_mode_{k}/value"]).dtype == np.float32
        assert np.all(np.asarray(dset[f"components_mode_{k}/component"]) == k)
    np.testing.assert_array_equal(read_latents(out), z)
    # rewriting with fewer dimensions drops the stale ones
    write_cs(read_cs(out), out, z=z[:, :2], force=True)
    assert read_latents(out).shape == (7, 2)
    with pytest.raises(InputError, match=r"shape \(6, 2\)"):
        dataset_from_stack(stack, z=np.zeros((6, 2)))


def _star_like_stack(n=5, with_poses=True):
    rng = np.random.default_rng(3)
    return ParticleStack(
        ids=[f"{i + 1:06d}@Extract/job007/mic{i % 2}.mrcs" for i in range(n)], pixel_size_A=1.5, box=64,
        ctf=CTFParams.constant(n, defocus_u_A=12000.0, defocus_v_A=11000.0, defocus_angle_rad=0.3, voltage_kv=200.0),
        A=random_rotations(n, rng) if with_poses else None,
        shifts_A=rng.normal(size=(n, 2)) if with_poses else None,
        subset=np.arange(n) % 2, class_id=np.zeros(n, dtype=np.int64), optics_group=np.arange(n) % 2)


def test_stack_from_star_builds_a_new_dataset_with_deterministic_uids(tmp_path):
    stack = _star_like_stack()
    d1, d2 = dataset_from_stack(stack), dataset_from_stack(stack)
    np.testing.assert_array_equal(np.asarray(d1["uid"]), np.asarray(d2["uid"]))
    assert len(set(np.asarray(d1["uid"]).tolist())) == 5
    np.testing.assert_array_equal(np.asarray(d1["blob/idx"]), np.arange(5))
    assert list(d1["blob/path"][:2]) == ["Extract/job007/mic0.mrcs", "Extract/job007/mic1.mrcs"]
    np.testing.assert_array_equal(np.asarray(d1["ctf/exp_group_id"]), stack.optics_group)
    np.testing.assert_array_equal(np.asarray(d1["alignments3D/split"]), stack.subset)
    back = read_cs(write_cs(stack, tmp_path / "from_star.cs"))
    np.testing.assert_allclose(back.A, stack.A, atol=1e-6)
    np.testing.assert_allclose(back.shifts_A, stack.shifts_A, atol=1e-5)
    np.testing.assert_allclose(back.ctf.as_array(), stack.ctf.as_array(), rtol=1e-6)
    np.testing.assert_array_equal(back.image_names, [s.lstrip("0") for s in stack.ids])


def test_uids_for_ids():
    np.testing.assert_array_equal(uids_for_ids(np.array(["7", "18446744073709551615"])),
                                  np.array([7, 2**64 - 1], dtype=np.uint64))
    hashed = uids_for_ids(np.array(["1@a.mrcs", "1@a.mrcs", "2@a.mrcs"]))  # repeated id -> still unique uids
    assert hashed.dtype == np.uint64 and len(set(hashed.tolist())) == 3
    np.testing.assert_array_equal(hashed, uids_for_ids(np.array(["1@a.mrcs", "1@a.mrcs", "2@a.mrcs"])))


def test_stack_without_image_references_cannot_become_a_cs(tmp_path):
    stack = ParticleStack(ids=["a", "b"], pixel_size_A=1.0, box=8, ctf=CTFParams.constant(2))
    with pytest.raises(InputError, match="id 'a'.*N@path"):
        write_cs(stack, tmp_path / "x.cs")
    assert not (tmp_path / "x.cs").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("field, value, match", [
    ("blob/shape", np.array([64, 64], dtype=np.uint32), r"row 3 field blob/shape is \[64, 64\].*one square box"),
    ("blob/psize_A", np.float32(1.0), r"blob/psize_A holds several values \(1 to 2\.95\)"),
])
def test_mixed_box_or_pixel_size_is_an_input_error(tmp_path, field, value, match):
    dset = Dataset.load(str(shared_fixture(P12))).take(np.arange(5))
    column = np.asarray(dset[field]).copy()
    column[2] = value
    dset[field] = column
    dset.save(str(tmp_path / "mixed.cs"))
    with pytest.raises(InputError, match=match):
        read_cs(tmp_path / "mixed.cs")


def test_heterogeneous_refinement_takes_each_particles_most_probable_class(tmp_path):
    """cryoSPARC <= 4.4 heterogeneous refinement: alignments_class_K/* per class, no alignments3D."""
    n = 12
    full = Dataset.load(str(shared_fixture(P12))).take(np.arange(n))
    a3d = [f for f in full.fields() if f.startswith("alignments3D/")]
    rng = np.random.default_rng(0)
    post = rng.dirichlet(np.ones(3), size=n).astype(np.float32)
    poses = [rng.normal(size=(n, 3)).astype(np.float32) for _ in range(3)]
    het = full.drop_fields(a3d, copy=True)
    for k in range(3):
        het.add_fields([(f"alignments_class_{k}/pose", "<f4", (3,)), (f"alignments_class_{k}/shift", "<f4", (2,)),
                        (f"alignments_class_{k}/psize_A", "<f4"), (f"alignments_class_{k}/class_posterior", "<f4")])
        het[f"alignments_class_{k}/pose"] = poses[k]
        het[f"alignments_class_{k}/shift"] = np.full((n, 2), k + 1, dtype=np.float32)
        het[f"alignments_class_{k}/psize_A"] = np.full(n, 2.0, dtype=np.float32)
        het[f"alignments_class_{k}/class_posterior"] = post[:, k]
    het.save(str(tmp_path / "het.cs"))
    stack = read_cs(tmp_path / "het.cs")
    best = post.argmax(axis=1)
    np.testing.assert_array_equal(stack.class_id, best)
    chosen = np.stack(poses)[best, np.arange(n)]
    np.testing.assert_allclose(stack.A, np.swapaxes(rodrigues(chosen), 1, 2), atol=1e-6)
    np.testing.assert_allclose(stack.shifts_A, np.repeat((best + 1)[:, None] * 2.0, 2, axis=1), rtol=1e-6)
