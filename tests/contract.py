"""The one contract every particle reader/writer satisfies (mrcfile's shared-test-class pattern).

A format's test class inherits `ParticleFormatContract` and sets:
  fmt: key in FORMATS;  fixtures: fixture paths under ../shared/fixtures it must parse.
Round trips compare rotation matrices (never angles) to 1e-5 and shifts to 1e-4 A.
Classes: every writer takes `classes` `(n,)` 0-based and stores them in its own numbering
(`STORED_CLASSES`), replacing whatever class the input held.
"""

from __future__ import annotations

import numpy as np
import pytest

from cryofire_ext.errors import InputError
from tests.conftest import shared_fixture


def formats():
    """name -> (read(path, datadir=None) -> ParticleStack, write(stack, path, z=None, force=False), suffix)."""
    from integrations import cryosparc, relion

    return {
        "relion": (relion.read_star, relion.write_star, ".star"),
        "cryosparc": (cryosparc.read_cs, cryosparc.write_cs, ".cs"),
    }


def _star_classes(path):
    import starfile

    return starfile.read(path, always_dict=True)["particles"]["rlnClassNumber"].to_numpy()


def _cs_classes(path):
    from cryosparc.dataset import Dataset

    return np.asarray(Dataset.load(str(path))["alignments3D/class"])


def _cs_posterior(path):
    from cryosparc.dataset import Dataset

    return Dataset.load(str(path))["alignments3D/class_posterior"]


#: format -> (the class numbers a file stores, as written: read(path) -> `(n,)`; what the format adds to a
#: 0-based class; the field's name)
STORED_CLASSES = {"relion": (_star_classes, 1, "rlnClassNumber"), "cryosparc": (_cs_classes, 0, "alignments3D/class")}


def assert_same_particles(a, b, *, rot_atol=1e-5, shift_atol=1e-4):
    assert len(a) == len(b)
    np.testing.assert_allclose(a.pixel_size_A, b.pixel_size_A, rtol=1e-5)
    assert a.box == b.box
    for name in ("defocus_u_A", "defocus_v_A", "defocus_angle_rad", "voltage_kv", "cs_mm", "amplitude_contrast"):
        np.testing.assert_allclose(getattr(a.ctf, name), getattr(b.ctf, name), rtol=1e-5, atol=1e-6, err_msg=name)
    assert (a.A is None) == (b.A is None)
    if a.A is not None:
        np.testing.assert_allclose(a.A, b.A, atol=rot_atol)
        np.testing.assert_allclose(a.shifts_A, b.shifts_A, atol=shift_atol)


class ParticleFormatContract:
    fmt: str = ""
    fixtures: list[str] = []

    def io(self, fmt=None):
        return formats()[fmt or self.fmt]

    def read_fixture(self, fixture_name):
        read, _, _ = self.io()
        return read(shared_fixture(fixture_name))

    def test_fixture_parses(self, fixture_name):
        stack = self.read_fixture(fixture_name)
        assert len(stack) == len(stack.ctf)
        assert stack.pixel_size_A > 0
        # box 0 = unknown: allowed only for metadata-only stacks (3.0 STAR files without stacks or rlnImageSize)
        assert stack.box > 0 or stack.images is None
        if len(stack):
            assert np.all(np.isfinite(stack.ctf.defocus_u_A))
            assert np.all(stack.ctf.voltage_kv > 0)
        if stack.A is not None and len(stack):
            np.testing.assert_allclose(stack.A @ np.swapaxes(stack.A, 1, 2), np.broadcast_to(np.eye(3), stack.A.shape),
                                       atol=1e-6)
            np.testing.assert_allclose(np.linalg.det(stack.A), 1.0, atol=1e-6)
            assert np.all(np.isfinite(stack.shifts_A))

    @pytest.mark.parametrize("other", ["relion", "cryosparc"])
    def test_round_trip(self, fixture_name, other, tmp_path):
        """self -> other -> self keeps poses, shifts, CTF, pixel size and ids' order."""
        stack = self.read_fixture(fixture_name)
        if len(stack) == 0:
            pytest.skip("zero-row fixture: nothing to round-trip")
        _, write_other, suffix_other = self.io(other)
        read_other, _, _ = self.io(other)
        read_self, write_self, suffix_self = self.io()
        mid = tmp_path / f"mid{suffix_other}"
        write_other(stack, mid)
        back_mid = read_other(mid)
        assert_same_particles(stack, back_mid)
        end = tmp_path / f"end{suffix_self}"
        write_self(back_mid, end)
        assert_same_particles(stack, read_self(end))

    def test_refuses_overwrite(self, fixture_name, tmp_path):
        stack = self.read_fixture(fixture_name)
        _, write, suffix = self.io()
        out = tmp_path / f"out{suffix}"
        out.write_text("the user's file")
        with pytest.raises(InputError, match="exists"):
            write(stack, out)
        assert out.read_text() == "the user's file"
        write(stack, out, force=True)
        assert out.read_text() != "the user's file" if suffix == ".star" else out.stat().st_size > 0

    def test_latents_written(self, fixture_name, tmp_path):
        stack = self.read_fixture(fixture_name)
        if len(stack) == 0:
            pytest.skip("zero-row fixture")
        _, write, suffix = self.io()
        z = np.arange(len(stack) * 3, dtype=np.float32).reshape(len(stack), 3) / 7
        out = tmp_path / f"z{suffix}"
        write(stack, out, z=z)
        np.testing.assert_allclose(self.read_latents(out), z, rtol=1e-6)

    def stack_in_class_7(self, fixture_name, tmp_path):
        """The fixture's particles (with poses: random ones when it has none) read back from a file of this
        format that puts every particle in RELION class 7 (0-based class 6)."""
        from cryofire_ext.poses import random_rotations

        stack = self.read_fixture(fixture_name)
        n = len(stack)
        if n == 0:
            pytest.skip("zero-row fixture")
        if stack.A is None:
            stack = stack.with_poses(random_rotations(n, np.random.default_rng(0)), np.zeros((n, 2)))
        read, write, suffix = self.io()
        src = write(stack, tmp_path / f"class7{suffix}", classes=np.full(n, 6))
        stored, base, _ = STORED_CLASSES[self.fmt]
        np.testing.assert_array_equal(stored(src), 6 + base)
        back = read(src)
        np.testing.assert_array_equal(back.class_id, 6)
        return back

    @pytest.mark.parametrize("other", ["relion", "cryosparc"])
    def test_classes_replace_the_input_classes(self, fixture_name, other, tmp_path):
        """classes [0, 1, 0, 1, ...] replace the input's class 7: rlnClassNumber = classes + 1, alignments3D/class
        = classes; without classes the input's stay."""
        stack = self.stack_in_class_7(fixture_name, tmp_path)
        classes = np.arange(len(stack)) % 2
        read, write, suffix = self.io(other)
        stored, base, _ = STORED_CLASSES[other]
        out = write(stack, tmp_path / f"out{suffix}", classes=classes)
        np.testing.assert_array_equal(stored(out), classes + base)
        np.testing.assert_array_equal(read(out).class_id, classes)
        if other == "cryosparc":
            np.testing.assert_array_equal(np.asarray(_cs_posterior(out)), 1.0)
        kept = write(stack, tmp_path / f"kept{suffix}")
        np.testing.assert_array_equal(stored(kept), 6 + base)

    @pytest.mark.parametrize("bad", ["one too many", "negative", "not whole", "text"])
    def test_bad_classes_are_refused(self, fixture_name, bad, tmp_path):
        stack = self.read_fixture(fixture_name)
        n = len(stack)
        if n == 0:
            pytest.skip("zero-row fixture")
        classes = {"one too many": np.zeros(n + 1, dtype=np.int64), "negative": -np.ones(n, dtype=np.int64),
                   "not whole": np.full(n, 0.5), "text": np.array(["a"] * n)}[bad]
        _, write, suffix = self.io()
        _, _, field = STORED_CLASSES[self.fmt]
        out = tmp_path / f"bad{suffix}"
        with pytest.raises(InputError, match=rf"classes.*expected {n} class numbers.*{field}"):
            write(stack, out, classes=classes)
        assert not out.exists()

    def read_latents(self, path):
        """The latent coordinates a writer stored, `(n, d)`; each format implements it."""
        raise NotImplementedError
