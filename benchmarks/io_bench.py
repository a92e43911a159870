"""I/O benchmark: random batches from a large generated .mrcs through `MrcImages.read` against a bare
numpy memmap of the same file, and RELION STAR read/write time for a generated 1M-row particle file.

One command (results as JSON, temporary files removed at the end):

    nice -n 10 python benchmarks/io_bench.py --out benchmarks/results/io_bench.json

The stack is written to --tmpdir and read right after, so reads are page-cache-warm unless the
machine has less free memory than the file; both readers see the same cache state because their
batches alternate (same indices, order swapped every batch).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import starfile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cryofire_ext.images import MrcImages  # noqa: E402
from integrations.relion import read_star, write_star  # noqa: E402


def machine_facts() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = None
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(), "memory_GiB": mem_gb,
            "load_avg_at_start": load, "python": platform.python_version(), "numpy": np.__version__,
            "pandas": pd.__version__, "mrcfile": mrcfile.__version__, "git_commit": commit}


def make_stack(path: Path, n: int, box: int, seed: int) -> None:
    """A float32 stack `(n, box, box)` written in chunks (memory bounded by the chunk)."""
    rng = np.random.default_rng(seed)
    with mrcfile.new_mmap(path, shape=(n, box, box), mrc_mode=2, overwrite=True) as mrc:
        mrc.set_image_stack()
        chunk = max(1, (64 << 20) // (box * box * 4))
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            mrc.data[s:e] = rng.standard_normal((e - s, box, box), dtype=np.float32)


def bench_images(path: Path, n: int, box: int, batch: int, batches: int, seed: int) -> dict:
    rng = np.random.default_rng(seed + 1)
    ours = MrcImages.from_stacks([path])
    bare = np.memmap(path, dtype=np.float32, mode="r", offset=1024, shape=(n, box, box))
    times = {"ours": [], "bare": []}
    for b in range(batches):
        idx = rng.integers(0, n, size=batch)
        runs = [("ours", lambda: ours.read(idx)), ("bare", lambda: np.asarray(bare[idx]))]
        if b % 2:
            runs.reverse()
        results = {}
        for name, fn in runs:
            t0 = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t0)
        if b == 0:
            np.testing.assert_array_equal(results["ours"], results["bare"])
    med = {k: float(np.median(v)) for k, v in times.items()}
    tot = {k: float(np.sum(v)) for k, v in times.items()}
    return {"batch": batch, "batches": batches,
            "images_per_s_mrcimages_median": batch / med["ours"], "images_per_s_bare_memmap_median": batch / med["bare"],
            "ratio_mrcimages_over_bare_median": med["bare"] / med["ours"],
            "images_per_s_mrcimages_total": batch * batches / tot["ours"],
            "images_per_s_bare_memmap_total": batch * batches / tot["bare"],
            "ratio_mrcimages_over_bare_total": tot["bare"] / tot["ours"]}


def make_star(path: Path, rows: int, seed: int, micrographs: int = 2000) -> None:
    """A RELION 3.1 particle STAR file with `rows` particles over `micrographs` stacks (typical columns)."""
    rng = np.random.default_rng(seed)
    mic = np.sort(rng.integers(0, micrographs, rows))  # particles grouped by micrograph, numbered within it
    num = np.arange(rows) - np.searchsorted(mic, mic) + 1
    names = pd.Series(num).map("{:06d}".format) + "@Extract/job007/Movies/mic" + pd.Series(mic).map("{:05d}".format) \
        + ".mrcs"
    parts = pd.DataFrame({
        "rlnCoordinateX": rng.uniform(0, 4096, rows).round(6), "rlnCoordinateY": rng.uniform(0, 4096, rows).round(6),
        "rlnImageName": names, "rlnMicrographName": "MotionCorr/job002/Movies/mic" + pd.Series(mic).map(
            "{:05d}".format) + ".mrc",
        "rlnOpticsGroup": rng.integers(1, 3, rows), "rlnDefocusU": rng.uniform(5000, 30000, rows).round(6),
        "rlnDefocusV": rng.uniform(5000, 30000, rows).round(6), "rlnDefocusAngle": rng.uniform(-180, 180, rows).round(6),
        "rlnCtfBfactor": np.zeros(rows), "rlnCtfScalefactor": np.ones(rows), "rlnPhaseShift": np.zeros(rows),
        "rlnAngleRot": rng.uniform(-180, 180, rows).round(6), "rlnAngleTilt": rng.uniform(0, 180, rows).round(6),
        "rlnAnglePsi": rng.uniform(-180, 180, rows).round(6), "rlnOriginXAngst": rng.normal(0, 3, rows).round(6),
        "rlnOriginYAngst": rng.normal(0, 3, rows).round(6), "rlnClassNumber": rng.integers(1, 5, rows),
        "rlnRandomSubset": rng.integers(1, 3, rows), "rlnNormCorrection": rng.uniform(0.5, 1.5, rows).round(6),
    })
    optics = pd.DataFrame({"rlnOpticsGroup": [1, 2], "rlnOpticsGroupName": ["opticsGroup1", "opticsGroup2"],
                           "rlnVoltage": [300.0, 300.0], "rlnSphericalAberration": [2.7, 2.7],
                           "rlnAmplitudeContrast": [0.1, 0.1], "rlnImagePixelSize": [1.1, 1.1],
                           "rlnImageSize": [256, 256], "rlnImageDimensionality": [2, 2]})
    with open(path, "w") as fh:
        for name, df in (("optics", optics), ("particles", parts)):
            fh.write(f"# version 30001\n\ndata_{name}\n\nloop_\n")
            fh.writelines(f"_{c} #{i}\n" for i, c in enumerate(df.columns, 1))
            df.to_csv(fh, sep="\t", header=False, index=False, float_format="%.6f")
            fh.write("\n\n")


def bench_star(path: Path, rows: int, seed: int) -> dict:
    t0 = time.perf_counter()
    make_star(path, rows, seed)
    t_make = time.perf_counter() - t0
    t0 = time.perf_counter()
    starfile.read(path, always_dict=True)
    t_starfile = time.perf_counter() - t0
    t0 = time.perf_counter()
    stack = read_star(path)
    t_read = time.perf_counter() - t0
    assert len(stack) == rows and stack.A is not None
    out = path.with_name("written.star")
    t0 = time.perf_counter()
    write_star(stack, out, z=np.zeros((rows, 8), dtype=np.float32))
    t_write = time.perf_counter() - t0
    size = path.stat().st_size
    out.unlink()
    return {"rows": rows, "file_MB": round(size / 2**20, 1), "seconds_generate": t_make,
            "seconds_starfile_read": t_starfile, "seconds_read_star": t_read,
            "seconds_write_star_with_8_latents": t_write}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-gb", type=float, default=2.0, help="stack size in GiB (>= 2 for the issue's check)")
    p.add_argument("--box", type=int, default=256)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--batches", type=int, default=60)
    p.add_argument("--star-rows", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tmpdir", default=tempfile.gettempdir())
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "io_bench.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    n = int(np.ceil(args.size_gb * 2**30 / (args.box * args.box * 4)))
    work = Path(tempfile.mkdtemp(prefix="cryofire_io_bench_", dir=args.tmpdir))
    free = shutil.disk_usage(work).free
    if free < 1.5 * n * args.box * args.box * 4:
        raise SystemExit(f"not enough free disk in {work} for a {args.size_gb} GiB stack")
    result = {"command": " ".join([Path(sys.executable).name] + sys.argv if argv is None else argv),
              "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine_facts()}
    try:
        stack = work / "bench.mrcs"
        t0 = time.perf_counter()
        make_stack(stack, n, args.box, args.seed)
        result["stack"] = {"images": n, "box": args.box, "bytes": stack.stat().st_size,
                           "seconds_generate": time.perf_counter() - t0, "cache": "warm (just written)"}
        result["random_batches"] = bench_images(stack, n, args.box, args.batch, args.batches, args.seed)
        stack.unlink()
        result["star"] = bench_star(work / "particles.star", args.star_rows, args.seed)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
