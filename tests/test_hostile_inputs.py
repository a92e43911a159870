"""The hostile-input sweep (issue 22) kept as tests: every bad input of every kind gets a clear error.

Each case asserts: exit status 2 (a user error), a message naming the file and the row/field or path
and what was expected, no traceback and no library advice to load unsafely, nothing left behind and
no input file changed. Data: a 64-particle phantom simulated once per module (a few seconds); the few
cases that must start training use a tiny model for one epoch.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from cryosparc.dataset import Dataset

from cli.main import main
from cryofire_ext.errors import InputError
from cryofire_ext.safe_io import LOCK_NAME, FolderLock, atomic_path

TINY = {"zdim": 2, "batch_size": 32, "hidden": 32, "dec_hidden": 32, "dec_layers": 2, "enc_channels": [4, 8, 8, 16, 16],
        "warm_start": "none", "pose_only_images": 32, "lr_warmup_images": 0, "num_workers": 1, "device": "cpu",
        "polish_rounds": 0, "epochs": 1}
UNSAFE = ("Traceback", "weights_only", "allow_pickle", "np.str_", "np.float", "loss nan", "epoch 0 ")


# ---------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    """A simulated dataset: particles.mrcs/.star/.cs, state_00/01.mrc, truth.npz (64 particles, 32 px)."""
    from integrations.simulated import SimulateConfig, run_simulate

    out = tmp_path_factory.mktemp("hostile") / "sim"
    run_simulate(SimulateConfig(out_dir=str(out), n=64, phantom=True, box=32, snr=1.0, seed=3))
    (out.parent / "tiny.json").write_text(json.dumps(TINY))
    return out


@pytest.fixture
def tiny(sim) -> Path:
    """A TrainConfig JSON for a tiny one-epoch model."""
    return sim.parent / "tiny.json"


@pytest.fixture
def data(sim, tmp_path) -> Path:
    """A private copy of the simulated dataset in `tmp_path/data` (tests may break it)."""
    dst = tmp_path / "data"
    shutil.copytree(sim, dst)
    return dst


def snapshot(root: Path) -> dict:
    """{relative path: (sha1, mode)} of every file under `root` (folders as None)."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        key = str(p.relative_to(root))
        out[key] = (hashlib.sha1(p.read_bytes()).hexdigest(), p.stat().st_mode) if p.is_file() else None
    return out


def cli(capsys, *args) -> tuple[int, str]:
    """Run `cryofire ARGS` in-process: (exit status, stderr as one line)."""
    capsys.readouterr()
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, " ".join((captured.err + captured.out).split())


def refused(capsys, pattern: str, *args, root: Path | None = None, status: int = 2) -> str:
    """Run the command; assert the status, the message (regex), no traceback or unsafe advice, and (with `root`)
    that nothing under `root` changed."""
    before = snapshot(root) if root is not None else None
    rc, err = cli(capsys, *args)
    assert rc == status, err
    assert re.search(pattern, err), err
    for word in UNSAFE:
        assert word not in err, err
    if root is not None:
        assert snapshot(root) == before
    return err


def edit_star(path: Path, row: int, label: str, value: str, dst: Path | None = None, block: str = "particles") -> Path:
    """Copy of a STAR file with `label` of (1-based) `row` of data_`block` set to the text `value`."""
    lines = path.read_text().splitlines()
    start = lines.index(f"data_{block}")
    labels, k, seen = [], start + 1, 0
    while not lines[k].startswith("_"):
        k += 1
    while lines[k].startswith("_"):
        labels.append(lines[k].split()[0][1:])
        k += 1
    for i in range(k, len(lines)):
        if lines[i].strip() and not lines[i].startswith("#"):
            seen += 1
            if seen == row:
                fields = lines[i].split()
                fields[labels.index(label)] = value
                lines[i] = "\t".join(fields)
                break
    dst = dst or path
    dst.write_text("\n".join(lines) + "\n")
    return dst


def edit_cs(path: Path, dst: Path, name: str, values, dtype=None) -> Path:
    """Copy of a .cs file with field `name` replaced by `values` (of `dtype`, e.g. object or bytes)."""
    d = Dataset.load(str(path))
    if dtype is None:
        column = np.asarray(d[name]).copy()
        column[...] = values if np.ndim(values) == 0 else column
        if np.ndim(values):
            column[: len(values)] = values
        d[name] = column
        d.save(str(dst))
        return dst
    descr = [(n, dtype if n == name else t, *rest) for n, t, *rest in d.descr()]
    new = Dataset.allocate(len(d), descr)
    for n, *_ in descr:
        new[n] = np.asarray(values, dtype=dtype) if n == name else d[n]
    new.save(str(dst))
    return dst


# ---------------------------------------------------------------- 1, 4, 5, 11: STAR content
STAR_CASES = [  # (label, row, value, block, expected message)
    ("rlnDefocusU", 5, "inf", "particles", r"row 5 of data_particles has rlnDefocusU = 'inf'; expected a finite"),
    ("rlnDefocusU", 5, "1e300", "particles", r"row 5 of data_particles has rlnDefocusU = '1e\+300'; expected a defocus"),
    ("rlnDefocusU", 3, "nan", "particles", r"row 3 of data_particles has rlnDefocusU = 'nan'; expected a finite"),
    ("rlnDefocusV", 7, "-inf", "particles", r"row 7 of data_particles has rlnDefocusV = '-inf'"),
    ("rlnDefocusAngle", 2, "1e300", "particles", r"row 2 of data_particles has rlnDefocusAngle .*finite astigmatism"),
    ("rlnCtfBfactor", 4, "1e300", "particles", r"row 4 of data_particles has rlnCtfBfactor .*B-factor"),
    ("rlnCtfScalefactor", 4, "0", "particles", r"row 4 of data_particles has rlnCtfScalefactor = '0(\.0)?'.*positive"),
    ("rlnPhaseShift", 6, "inf", "particles", r"row 6 of data_particles has rlnPhaseShift = 'inf'"),
    ("rlnAngleRot", 8, "inf", "particles", r"row 8 of data_particles has rlnAngleRot = 'inf'; expected a finite"),
    ("rlnOriginXAngst", 9, "nan", "particles", r"row 9 of data_particles has rlnOriginXAngst = 'nan'"),
    ("rlnVoltage", 1, "1e300", "optics", r"row 1 of data_optics has rlnVoltage = '1e\+300'.*accelerating voltage"),
    ("rlnVoltage", 1, "0", "optics", r"row 1 of data_optics has rlnVoltage = '0(\.0)?'.*accelerating voltage"),
    ("rlnSphericalAberration", 1, "inf", "optics", r"row 1 of data_optics has rlnSphericalAberration = 'inf'"),
    ("rlnAmplitudeContrast", 1, "1.5", "optics", r"row 1 of data_optics has rlnAmplitudeContrast = '1.5'.*0 to 1"),
    ("rlnImagePixelSize", 1, "1e300", "optics", r"row 1 of data_optics gives a pixel size of 1e\+300 A"),
    ("rlnImagePixelSize", 1, "0", "optics", r"row 1 of data_optics gives a pixel size of 0 A"),
    ("rlnImagePixelSize", 1, "inf", "optics", r"row 1 of data_optics has rlnImagePixelSize = 'inf'"),
]


@pytest.mark.parametrize("label,row,value,block,message", STAR_CASES,
                         ids=[f"{c[0]}={c[2]}" for c in STAR_CASES])
def test_star_values_are_checked_at_read_time(data, capsys, label, row, value, block, message, tiny):
    bad = edit_star(data / "particles.star", row, label, value, data / "bad.star", block)
    refused(capsys, r"bad\.star: " + message, "inspect", bad, root=data)
    out = data.parent / "run"
    refused(capsys, message, "train", bad, "-o", out, "--config", tiny, root=data)
    assert not out.exists()


def test_truncated_star_names_the_short_row(data, capsys):
    text = (data / "particles.star").read_bytes()
    (data / "t.star").write_bytes(text[: len(text) * 2 // 3])
    refused(capsys, r"t\.star: row \d+ of data_particles \(line \d+\) has \d+ fields but the loop has 14 labels "
                    r"\(the file may be truncated\)", "inspect", data / "t.star", root=data)
    refused(capsys, r"t\.star: row \d+ of data_particles .*truncated", "convert", data / "t.star", data / "t.cs",
            root=data)


def test_a_row_with_an_extra_field_is_named(data, capsys):
    lines = (data / "particles.star").read_text().splitlines()
    k = [i for i, line in enumerate(lines) if line.startswith("000010@")][0]
    lines[k] += "\t7"
    (data / "x.star").write_text("\n".join(lines) + "\n")
    refused(capsys, r"x\.star: row 10 of data_particles \(line \d+\) has 15 fields but the loop has 14 labels",
            "inspect", data / "x.star", root=data)


def test_an_image_number_that_is_not_a_whole_number_is_named(data, capsys):
    text = (data / "particles.star").read_text()
    for bad in ("inf", "nan", "0", "2.5"):
        (data / "n.star").write_text(text.replace("000003@", f"{bad}@", 1))
        refused(capsys, rf"n\.star: row 3 of data_particles has rlnImageName '{bad}@.*'; expected 'N@path/stack.mrcs' "
                        "with N the 1-based image number", "inspect", data / "n.star", root=data)


def test_non_utf8_byte_names_the_line(data, capsys):
    text = (data / "particles.star").read_bytes()
    k = text.index(b"000004@particles")
    (data / "l.star").write_bytes(text[:k + 9] + b"\xe9" + text[k + 9:])
    line = text[:k].count(b"\n") + 1
    refused(capsys, rf"l\.star: line {line} holds the byte 0xe9, which is not UTF-8 text \(column 10", "inspect",
            data / "l.star", root=data)


def test_zero_row_star_says_the_file_has_no_particles(data, capsys, tiny):
    text = (data / "particles.star").read_text()
    head = text[: text.index("000001@")]
    (data / "empty.star").write_text(head)
    err = refused(capsys, r"empty\.star: the file has no particles", "train", data / "empty.star", "-o",
                  data.parent / "run", "--config", tiny, root=data)
    assert "bare image stack" not in err and "none named" not in err
    assert not (data.parent / "run").exists()


# ---------------------------------------------------------------- 1, 3: .cs content
CS_CASES = [  # (field, values, dtype, expected message)
    ("ctf/df1_A", "strings", object, r"field ctf/df1_A holds Python objects \(text\) \(dtype \|O\); expected numbers "
                                     r"\(float32\)"),
    ("ctf/df1_A", "bytes", "S12", r"field ctf/df1_A holds (bytes|Python objects) \(text\) .*expected numbers \(float32\)"),
    ("blob/idx", "strings", object, r"field blob/idx holds .*expected numbers \(uint32\)"),
    ("ctf/df1_A", [0, 0, np.inf], None, r"row 3 field ctf/df1_A = inf; expected a finite number"),
    ("ctf/df2_A", [1e30], None, r"row 1 field ctf/df2_A = 1\.0000000150474662e\+30; expected a defocus"),
    ("ctf/accel_kv", 0.0, None, r"row 1 field ctf/accel_kv = 0\.0 \(64 particles in all\); expected an accelerating"),
    ("ctf/cs_mm", [np.nan], None, r"row 1 field ctf/cs_mm = nan; expected a finite number"),
    ("ctf/amp_contrast", -0.5, None, r"row 1 field ctf/amp_contrast = -0\.5 .*amplitude contrast from 0 to 1"),
    ("blob/psize_A", 1e30, None, r"row 1 field blob/psize_A = 1\.0000000150474662e\+30; expected a pixel size"),
    ("blob/psize_A", np.inf, None, r"row 1 field blob/psize_A = inf; expected a finite number"),
    ("alignments3D/pose", np.nan, None, r"row 1 field alignments3D/pose = \[nan, nan, nan\]; expected a finite"),
]


@pytest.mark.parametrize("field,values,dtype,message", CS_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CS_CASES)])
def test_cs_fields_are_checked_at_read_time(data, capsys, field, values, dtype, message):
    d = Dataset.load(str(data / "particles.cs"))
    if isinstance(values, str):
        raw = [str(v) for v in np.asarray(d[field])]
        values = np.asarray(raw if values == "strings" else [v.encode() for v in raw], dtype=dtype)
    bad = edit_cs(data / "particles.cs", data / "bad.cs", field, values, dtype)
    refused(capsys, r"bad\.cs: " + message, "inspect", bad, root=data)
    refused(capsys, message, "convert", bad, data / "out.star", root=data)


# ---------------------------------------------------------------- 9 and other image files
def test_a_3d_map_is_not_trained_on_as_particles(data, capsys):
    out = data.parent / "run"
    refused(capsys, r"state_00\.mrc: the header says this is a 3D map \(space group 1, 32x32x32 voxels\), not a "
                    r"stack of particle images", "train", data / "state_00.mrc", "-o", out, root=data)
    assert not out.exists()
    (data / "list.txt").write_text("particles.mrcs\nstate_01.mrc\n")
    refused(capsys, r"state_01\.mrc: the header says this is a 3D map", "inspect", data / "list.txt", root=data)
    shutil.copy(data / "state_00.mrc", data / "renamed.mrcs")  # a .mrcs is a stack by name (RELION writes ispg 1)
    rc, err = cli(capsys, "inspect", data / "renamed.mrcs")
    assert rc == 0 and "32" in err


def test_truncated_stack_and_bad_mode(data, capsys):
    raw = (data / "particles.mrcs").read_bytes()
    (data / "cut.mrcs").write_bytes(raw[: len(raw) - 100])
    refused(capsys, r"cut\.mrcs: the file is \d+ bytes but its header .* truncated \(only 63 complete images\)",
            "inspect", data / "cut.mrcs", root=data)
    with mrcfile.new(data / "complex.mrcs") as mrc:
        mrc.set_data(np.zeros((2, 8, 8), np.complex64))
    refused(capsys, r"complex\.mrcs: MRC mode 4 is not a supported image mode", "inspect", data / "complex.mrcs")


# ---------------------------------------------------------------- 2: outputs that cannot be written
def test_out_naming_a_file_is_refused_for_every_command(data, trained_run, capsys, tiny):
    (data / "afile").write_text("keep me")
    refused(capsys, r"afile: not a folder \(a file of that name exists\)", "train", data / "particles.star", "-o",
            data / "afile", "--config", tiny, root=data)
    refused(capsys, r"afile: not a folder", "predict", trained_run, data / "particles.star", "-o", data / "afile",
            root=data)
    refused(capsys, r"afile: not a folder", "convert", data / "particles.star", data / "afile" / "x.cs", root=data)
    refused(capsys, r"afile: not a folder", "simulate", "--phantom", "-n", "8", "-o", data / "afile", root=data)
    refused(capsys, r"afile: not a folder", "demo", "-o", data / "afile", root=data)
    (data / "adir.cs").mkdir()
    refused(capsys, r"adir\.cs: the output is a folder", "convert", data / "particles.star", data / "adir.cs",
            "--force", root=data)


def test_permission_denied_names_the_output_path(data, capsys, monkeypatch):
    import cryofire_ext.safe_io as safe_io

    def denied(*args, dir=None, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", os.path.join(dir, ".x.1234.tmp.cs"))

    monkeypatch.setattr(safe_io.tempfile, "mkstemp", denied)
    err = refused(capsys, r"out\.cs: permission denied", "convert", data / "particles.star", data / "out.cs",
                  root=data)
    assert ".tmp" not in err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_output_folder(data, capsys):
    ro = data.parent / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        refused(capsys, r"ro.*permission denied", "convert", data / "particles.star", ro / "out.cs", root=data)
    finally:
        ro.chmod(0o755)


def test_disk_full_while_saving_a_checkpoint(data, capsys, monkeypatch, tiny):
    """torch's short write ("enforce fail at inline_container.cc") on a full disk: one sentence, nothing left."""
    import torch

    import cryofire_ext.safe_io as safe_io

    def full(obj, f, *a, **k):
        Path(f).write_bytes(b"x" * 10)
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(safe_io.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 20, 10 << 20, 4096))
    out = data.parent / "run"
    refused(capsys, r"run/checkpoints/last\.pt: no space left on the device \(disk full\)", "train",
            data / "particles.star", "-o", out, "--config", tiny, root=data)
    assert not out.exists()  # no train.log, config.json or empty checkpoints/ left behind


def test_short_write_reports_disk_full_or_names_the_failure(tmp_path, monkeypatch):
    import cryofire_ext.safe_io as safe_io

    target = tmp_path / "p.npz"
    monkeypatch.setattr(safe_io.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 30, 1 << 30, 1000))
    with pytest.raises(OSError) as info:
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"abc")
            raise OSError("200 requested and 56 written")  # numpy's errno-less short write
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    monkeypatch.setattr(safe_io.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 40, 0, 1 << 40))
    with pytest.raises(OSError) as info:
        with atomic_path(target) as tmp:
            raise OSError("200 requested and 56 written")
    assert info.value.errno == errno.EIO and "stopped short" in str(info.value)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- 6: never over an input
def test_train_never_writes_over_its_input_even_with_force(data, capsys, tiny):
    refused(capsys, r"particles\.star: this output would overwrite the input file .*particles\.star",
            "train", data / "particles.star", "-o", data, "--config", tiny, "--force", root=data)
    refused(capsys, r"this output would overwrite the input file", "train", data / "particles.cs",
            "-o", data, "--config", tiny, "--force", root=data)
    (data / "maps").mkdir()
    shutil.copy(data / "particles.mrcs", data / "maps" / "p.mrcs")
    refused(capsys, r"maps/p\.mrcs: this input lies in .*maps, which the run writes into", "train",
            data / "maps" / "p.mrcs", "-o", data, "--config", tiny, "--force", root=data)
    assert not (data / LOCK_NAME).exists()


def test_predict_and_convert_and_export_never_write_over_inputs(data, trained_run, capsys):
    refused(capsys, r"this output would overwrite the input file", "predict", trained_run, data / "particles.star",
            "-o", data, "--force", root=data)
    refused(capsys, r"p.*\.star: this output would overwrite the input file", "convert", data / "particles.star",
            data / "particles.star", "--force", root=data)
    refused(capsys, r"this output would overwrite the input file .*particles\.cs", "cryosparc", "export",
            trained_run, "--like", data / "particles.cs", "-o", data / "particles.cs", "--force", root=data)


# ---------------------------------------------------------------- 7: one run per folder
def test_a_second_run_into_a_locked_folder_refuses(data, capsys, tiny):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = data.parent / "run"
        out.mkdir()
        (out / LOCK_NAME).write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename,
                                                 "started": "2026-01-01T00:00:00"}))
        before = snapshot(out)
        refused(capsys, rf"run: another cryofire run \(pid {holder.pid}, started 2026-01-01T00:00:00\) is using this "
                        "folder", "train", data / "particles.star", "-o", out, "--config",
                tiny, "--force", root=data)
        assert snapshot(out) == before  # no train.log, config.json
    finally:
        holder.kill()
        holder.wait()


def test_stale_and_foreign_locks(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
    with FolderLock(tmp_path) as lock:
        assert lock.held and json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
        with pytest.raises(InputError, match=rf"pid {os.getpid()}"):
            FolderLock(tmp_path).acquire()
    assert "stale lock" in caplog.text and not (tmp_path / LOCK_NAME).exists()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    with pytest.raises(InputError, match=r"pid 1 on host elsewhere.*delete .*\.cryofire\.lock"):
        FolderLock(tmp_path).acquire()
    (tmp_path / LOCK_NAME).write_text("")  # a crash between create and write, long ago
    old = time.time() - 3600
    os.utime(tmp_path / LOCK_NAME, (old, old))
    with FolderLock(tmp_path):
        pass


# ---------------------------------------------------------------- 8: modes
@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_outputs_honour_the_umask(data, capsys, mask):
    old = os.umask(mask)
    try:
        assert cli(capsys, "convert", data / "particles.star", data.parent / "o" / "out.cs")[0] == 0
    finally:
        os.umask(old)
    assert (data.parent / "o" / "out.cs").stat().st_mode & 0o777 == 0o666 & ~mask


# ---------------------------------------------------------------- 10: credentials
def test_credentials_in_the_url_are_never_printed(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no saved cryosparc-tools sessions
    for var in ("CRYOSPARC_EMAIL", "CRYOSPARC_PASSWORD", "CRYOSPARC_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    args = ("cryosparc", "run", "--url", "http://alice:s3cret@127.0.0.1:9", "--project", "P1", "--workspace", "W1",
            "--particles", "J1.particles")
    err = refused(capsys, r"no credentials for http://\*\*\*@127\.0\.0\.1:9", *args)
    assert "s3cret" not in err and "alice" not in err
    monkeypatch.setenv("CRYOSPARC_EMAIL", "a@b.c")
    monkeypatch.setenv("CRYOSPARC_PASSWORD", "pw")
    err = refused(capsys, r"could not connect to http://\*\*\*@127\.0\.0\.1:9", *args)
    assert "s3cret" not in err and "alice" not in err


# ---------------------------------------------------------------- 12: files that would need unsafe loading
def test_pickles_are_refused_without_quoting_unsafe_advice(data, trained_run, capsys, tmp_path):
    import torch

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    torch.save({"format": "cryofire-checkpoint", "evil": Path("x")}, run / "checkpoints" / "last.pt")
    err = refused(capsys, r"last\.pt: unreadable checkpoint \(it holds Python objects besides tensors", "predict",
                  run, data / "particles.star", "-o", tmp_path / "pred", root=data)
    assert "weights_only=False" not in err  # torch's advice to load it unsafely is not passed on
    assert not (tmp_path / "pred").exists()
    np.savez(run / "predictions.npz", header=np.array([{"a": 1}], dtype=object))
    refused(capsys, r"predictions\.npz: not a cryofire predictions file \(it holds pickled Python objects",
            "cryosparc", "export", run, "--like", data / "particles.cs", "-o", tmp_path / "x.cs", root=data)
    (run / "predictions.npz").write_bytes(b"PK\x03\x04 truncated")
    refused(capsys, r"predictions\.npz: not a cryofire predictions file", "cryosparc", "export", run, "--like",
            data / "particles.cs", "-o", tmp_path / "x.cs", root=data)


def test_failed_predict_leaves_no_output_folder(data, trained_run, capsys):
    out = data.parent / "pred" / "deeper"
    with mrcfile.new(data / "big.mrcs") as mrc:  # fails inside the model pass, after the folder was made
        mrc.set_data(np.zeros((4, 64, 64), np.float32))
        mrc.voxel_size = 3.0
    refused(capsys, r"64 px", "predict", trained_run, data / "big.mrcs", "-o", out, root=data)
    assert not out.exists() and not out.parent.exists()
    bad = edit_star(data / "particles.star", 2, "rlnDefocusU", "inf", data / "bad.star")
    refused(capsys, r"row 2 of data_particles has rlnDefocusU", "predict", trained_run, bad, "-o", out, root=data)
    assert not out.parent.exists()


# ---------------------------------------------------------------- 12: RELION External job
def test_relion_external_adds_the_image_path_hint_only_to_missing_stacks(data, tmp_path, capsys):
    from integrations.relion.external_job import run_relion_external

    bad = edit_star(data / "particles.star", 2, "rlnDefocusU", "inf", data / "bad.star")
    job = tmp_path / "External" / "job001"
    assert run_relion_external(["--o", str(job), "--in_parts", str(bad)], project_dir=data) == 1
    err = (job / "run.err").read_text() if (job / "run.err").exists() else capsys.readouterr().err
    assert "rlnDefocusU" in err and "RELION runs this job" not in err
    assert (job / "RELION_JOB_EXIT_FAILURE").exists()
    (data / "particles.mrcs").rename(data / "moved.mrcs")
    job2 = tmp_path / "External" / "job002"
    assert run_relion_external(["--o", str(job2), "--in_parts", str(data / "particles.star")], project_dir=data) == 1
    err = (job2 / "run.err").read_text() if (job2 / "run.err").exists() else capsys.readouterr().err
    assert "stacks not found" in err and "RELION runs this job" in err


def test_relion_abort_during_the_warm_start(data, tmp_path):
    from integrations.relion.external_job import run_relion_external

    job = tmp_path / "External" / "job003"
    job.mkdir(parents=True)
    (job / "RELION_JOB_ABORT_NOW").touch()
    args = ["--o", str(job), "--in_parts", str(data / "particles.star")]
    args += [f"--{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in TINY.items()
             if k != "warm_start"]
    args += ["--warm_start", "search", "--warm_images", "32", "--warm_steps", "4", "--warm_rotations", "100"]
    assert run_relion_external(args, project_dir=data) == 2
    assert (job / "RELION_JOB_EXIT_ABORTED").exists()
    assert not (job / "checkpoints").exists() and not (job / "config.json").exists()


# ---------------------------------------------------------------- other commands and formats (the sweep extended)
def test_other_commands_refuse_bad_input_cleanly(data, trained_run, capsys, tmp_path):
    refused(capsys, r"nothing\.star: particle file not found", "train", data / "nothing.star", "-o", tmp_path / "r")
    assert not (tmp_path / "r").exists()
    (tmp_path / "bad.json").write_text("{not json")
    refused(capsys, r"bad\.json", "train", data / "particles.star", "-o", tmp_path / "r", "--config",
            tmp_path / "bad.json")
    assert not (tmp_path / "r").exists()
    refused(capsys, r"pixel size 1e\+30 A \(from --apix or the map header\); expected a pixel size", "simulate",
            "--phantom", "-n", "8", "--apix", "1e30", "-o", tmp_path / "s")
    refused(capsys, r"pixel size -1 A", "simulate", "--phantom", "-n", "8", "--apix", "-1", "-o", tmp_path / "s")
    assert not (tmp_path / "s").exists()
    refused(capsys, r"not a cryofire run|predictions|not found", "analyze", data, "-o", tmp_path / "a")
    (data / "notes.star").write_text("this is not a STAR file\n")
    refused(capsys, r"notes\.star: no particle table", "inspect", data / "notes.star", root=data)
    (data / "empty.cs").write_bytes(b"")
    refused(capsys, r"empty\.cs: not a readable cryoSPARC \.cs file", "inspect", data / "empty.cs", root=data)
    (data / "text.mrcs").write_text("hello")
    refused(capsys, r"text\.mrcs: not a readable MRC stack", "inspect", data / "text.mrcs", root=data)
    refused(capsys, r"unknown particle file extension '\.xyz'", "convert", data / "particles.star", data / "o.xyz",
            root=data)


def test_no_traceback_end_to_end_through_the_console_script(data, tmp_path, tiny):
    bad = edit_star(data / "particles.star", 5, "rlnDefocusU", "inf", data / "bad.star")
    proc = subprocess.run([sys.executable, "-m", "cli.main", "train", str(bad), "-o", str(tmp_path / "run"), "--config",
                           str(tiny)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2
    assert "row 5 of data_particles has rlnDefocusU = 'inf'" in " ".join(proc.stderr.split())
    assert "Traceback" not in proc.stderr and "loss nan" not in proc.stderr and "epoch 0" not in proc.stderr
    assert not (tmp_path / "run").exists()
