"""Lazy image sources: MRC modes and flags, headers, .txt lists, batched random access, bad files."""

from __future__ import annotations

import pickle
import warnings

import mrcfile
import numpy as np
import pytest

from cryofire_ext.errors import InputError
from cryofire_ext.images import MrcImages, open_particles_file, read_stack_list, stack_info
from tests.conftest import shared_fixture


def write_mrc(path, data, *, stack=True, voxel_size=0.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)
        if stack and data.ndim == 3:
            mrc.set_image_stack()
        mrc.voxel_size = voxel_size
    return path


def rand(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def test_float16_mode_12(tmp_path):
    data = rand((4, 6, 6), dtype=np.float16)
    path = write_mrc(tmp_path / "h.mrcs", data)
    assert stack_info(path).dtype == np.float16
    imgs = open_particles_file(path)
    out = imgs.read([3, 0])
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, data[[3, 0]].astype(np.float32))


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.uint16])
def test_integer_modes(tmp_path, dtype):
    data = (np.arange(2 * 4 * 4) % 100).reshape(2, 4, 4).astype(dtype)
    path = write_mrc(tmp_path / "i.mrcs", data)
    np.testing.assert_array_equal(open_particles_file(path).read([1]), data[[1]].astype(np.float32))


def test_big_endian_stack(tmp_path):
    data = rand((3, 4, 4)).astype(">f4")
    path = write_mrc(tmp_path / "be.mrcs", data)
    assert stack_info(path).dtype == np.dtype(">f4")
    out = open_particles_file(path).read([2, 0])
    assert out.dtype == np.float32 and out.dtype.isnative
    np.testing.assert_array_equal(out, data[[2, 0]].astype(np.float32))


def test_single_2d_image(tmp_path):
    data = rand((10, 10))
    imgs = open_particles_file(write_mrc(tmp_path / "one.mrc", data))
    assert len(imgs) == 1 and imgs.box == 10
    np.testing.assert_array_equal(imgs.read([0, 0])[1], data)


def test_stack_flagged_as_volume_reads_as_stack(tmp_path):
    data = rand((5, 8, 8))
    vol = write_mrc(tmp_path / "v.mrcs", data, stack=False)
    with mrcfile.open(vol, header_only=True) as mrc:
        assert int(mrc.header.ispg) == 1  # flagged as a volume, as RELION writes .mrcs
    stk = write_mrc(tmp_path / "s.mrcs", data, stack=True)
    np.testing.assert_array_equal(open_particles_file(vol).read(range(5)), open_particles_file(stk).read(range(5)))
    # a real one: cryoDRGN's empiar_10076_7.mrc (a stack with .mrc extension, ispg 1, voxel size 0)
    real = open_particles_file(shared_fixture("cryodrgn/empiar_10076_7.mrc"))
    assert (len(real), real.box, real.voxel_size_A) == (7, 320, None)


def test_header_voxel_size_zero_is_unset(tmp_path):
    assert stack_info(write_mrc(tmp_path / "a.mrcs", rand((2, 4, 4)), voxel_size=0.0)).voxel_size_A is None
    assert stack_info(write_mrc(tmp_path / "b.mrcs", rand((2, 4, 4)), voxel_size=1.5)).voxel_size_A == \
        pytest.approx(1.5)


def test_missing_map_id_is_permissive():
    path = shared_fixture("cryodrgn/relion31.mrcs")
    imgs = open_particles_file(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mrcfile.open(path, permissive=True) as mrc:
            ref = np.array(mrc.data)
    np.testing.assert_array_equal(imgs.read([4, 2]), ref[[4, 2]])


def test_extended_header_offset(tmp_path):
    data = rand((3, 4, 4))
    path = tmp_path / "ext.mrcs"
    with mrcfile.new(path) as mrc:
        mrc.set_extended_header(np.zeros(40, dtype="V4"))  # 160 bytes, like EMD-3001's symmetry block
        mrc.set_data(data)
    assert stack_info(path).offset == 1024 + 160
    np.testing.assert_array_equal(open_particles_file(path).read([2]), data[[2]])


def test_stack_list_txt(tmp_path):
    a, b = rand((3, 6, 6), 1), rand((2, 6, 6), 2)
    write_mrc(tmp_path / "stacks" / "a.mrcs", a)
    write_mrc(tmp_path / "stacks" / "b.mrcs", b)
    lst = tmp_path / "lists" / "all.txt"
    lst.parent.mkdir()
    lst.write_text("# two stacks\n../stacks/a.mrcs\n\n" + str(tmp_path / "stacks" / "b.mrcs") + "  # absolute\n")
    imgs = read_stack_list(lst)
    assert len(imgs) == 5
    np.testing.assert_array_equal(imgs.read([4, 0, 3, 2]), np.concatenate([a, b])[[4, 0, 3, 2]])
    assert len(open_particles_file(lst)) == 5
    lst.write_text("../stacks/a.mrcs\n../stacks/missing.mrcs\n")
    with pytest.raises(InputError, match=r"all\.txt: line 2 names the stack '../stacks/missing.mrcs'"):
        read_stack_list(lst)
    lst.write_text("# nothing\n")
    with pytest.raises(InputError, match="names no stacks"):
        read_stack_list(lst)


def test_unknown_extension(tmp_path):
    with pytest.raises(InputError, match=r"unknown extension '\.star'"):
        open_particles_file(tmp_path / "p.star")


def test_batched_random_access_grouped_by_file(tmp_path):
    stacks = [rand((n, 8, 8), seed=k) for k, n in enumerate((4, 7, 3, 5, 6))]
    paths, idx, ref = [], [], []
    rng = np.random.default_rng(0)
    for k, data in enumerate(stacks):
        p = write_mrc(tmp_path / f"s{k}.mrcs", data)
        for i in rng.permutation(len(data)):
            paths.append(p)
            idx.append(i)
            ref.append(data[i])
    order = rng.permutation(len(paths))  # particles interleaved across files
    paths, idx, ref = [paths[i] for i in order], np.asarray(idx)[order], np.asarray(ref)[order]
    imgs = MrcImages(paths, idx, max_open=2)
    for _ in range(5):
        batch = rng.integers(0, len(imgs), size=11)  # repeats allowed
        out = imgs.read(batch)
        assert out.dtype == np.float32 and out.shape == (11, 8, 8) and not isinstance(out, np.memmap)
        np.testing.assert_array_equal(out, ref[batch])
        assert len(imgs._files) <= 2  # at most max_open files stay open
    sub = imgs.take([5, 1])
    np.testing.assert_array_equal(sub.read([1, 0]), ref[[1, 5]])
    again = pickle.loads(pickle.dumps(imgs))
    np.testing.assert_array_equal(again.read([0, 9]), ref[[0, 9]])


def test_runs_repeats_and_any_order_within_one_file(tmp_path):
    data = rand((64, 16, 16))
    imgs = open_particles_file(write_mrc(tmp_path / "s.mrcs", data))
    for ask in (np.arange(3), np.arange(63, -1, -1), np.array([5, 6, 7, 5, 40, 8, 6, 63, 0])):
        np.testing.assert_array_equal(imgs.read(ask), data[ask])


def test_stack_truncated_after_it_was_opened(tmp_path):
    path = write_mrc(tmp_path / "s.mrcs", rand((8, 8, 8)))
    imgs = open_particles_file(path)  # the header checks pass
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(InputError, match=r"s\.mrcs: the file ended before image 8 \(1-based\)"):
        imgs.read(np.arange(8))


def test_truncated_stack(tmp_path):
    path = write_mrc(tmp_path / "t.mrcs", rand((4, 8, 8)))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(InputError, match=r"t\.mrcs: the file is .* bytes but its header .*truncated \(only 3 complete"):
        open_particles_file(path)


def test_index_beyond_and_negative(tmp_path):
    path = write_mrc(tmp_path / "s.mrcs", rand((3, 8, 8)))
    with pytest.raises(InputError, match=r"particle 2 \(1-based\) asks for image 4 \(1-based\) but the stack holds 3 images"):
        MrcImages([path, path], [0, 3])
    with pytest.raises(InputError, match="beyond the stack"):
        MrcImages([path], [-1])


def test_mixed_and_non_square_boxes(tmp_path):
    a = write_mrc(tmp_path / "a.mrcs", rand((2, 8, 8)))
    b = write_mrc(tmp_path / "b.mrcs", rand((2, 6, 6)))
    with pytest.raises(InputError, match=r"b\.mrcs: box 6 px differs from 8 px"):
        MrcImages([a, b], [0, 0])
    c = write_mrc(tmp_path / "c.mrcs", rand((2, 6, 8)))
    with pytest.raises(InputError, match=r"c\.mrcs: images must be square, got 8x6"):
        MrcImages([c], [0])


def test_not_mrc_missing_and_bad_axes(tmp_path):
    junk = tmp_path / "junk.mrcs"
    junk.write_bytes(b"not an mrc file")
    with pytest.raises(InputError, match=r"junk\.mrcs: not a readable MRC stack"):
        open_particles_file(junk)
    with pytest.raises(InputError, match=r"nope\.mrcs: image stack not found"):
        open_particles_file(tmp_path / "nope.mrcs")
    path = write_mrc(tmp_path / "axes.mrcs", rand((2, 4, 4)))
    with mrcfile.open(path, mode="r+") as mrc:
        mrc.header.mapc, mrc.header.mapr = 2, 1
    with pytest.raises(InputError, match=r"axis order mapc,mapr,maps = \(2, 1, 3\)"):
        open_particles_file(path)
    cplx = tmp_path / "c.mrcs"
    write_mrc(cplx, rand((2, 4, 4)))
    with mrcfile.open(cplx, mode="r+") as mrc:
        mrc.header.mode = 4
    with pytest.raises(InputError, match="mode 4 is not a supported image mode"):
        open_particles_file(cplx)
