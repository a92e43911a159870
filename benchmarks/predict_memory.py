"""Peak memory of `cryofire predict` against the number of particles, with the alignment's compute mocked (or not).

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/predict_memory.py --run-dir /tmp/l20/run \\
        --template-star /tmp/l20/data/particles.star --data-dir /tmp/memprof_bench --n 20000 200000 \\
        --repeats 3 --tree base=/work/wt-base --tree after=. \\
        --out benchmarks/results/predict_memory_synthetic_box64.json

What grows with the number of particles in predict is the bookkeeping around the model: the STAR table, the
ParticleStack, Predictions, the STAR/.cs writers. This measures it. For each N a synthetic RELION STAR of N rows
(the template STAR's columns and values, cycled) over sparse all-zero .mrcs stacks of the run's box and pixel
size (10,000 images per stack) is built in `--data-dir` (reused when present). Then `integrations.job.predict_job`
runs on it, in a fresh process per (tree, N, repeat), with the tree's code (`PYTHONPATH` = the tree, `cwd` = the
tree). `references.align` is replaced by a function that reads every image chunk by chunk, as the real align does,
and returns deterministic poses/classes/confidences of the right shapes; `Landscape.z_of` returns a deterministic
z. Everything else (STAR read, run load, Predictions, predictions.npz, particles.star/.cs, the maps) is the real
path. Recorded per run: the process's peak RSS (ru_maxrss of the child, read by a small launcher process so that
the benchmark's own high-water mark is not inherited) and its RSS just before the class maps are made
(`TrainedModel.class_volumes`: the decoder's fixed working memory there sets the peak; the RSS before it is what
the particles keep resident, the steadier number). `--real` drops the mocks: the real alignment and landscape
on the all-zero images (the same work per image as on real ones), at 2 threads, for the peak and the time per
image of what a user runs. Several `--tree LABEL=PATH` are run interleaved, repeat by
repeat, so that the machine's load falls on all of them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PER_STACK = 10_000
MiB = 2**20

#: Runs the command given after it and prints its peak RSS (kB) as the last line of stdout (see predict_new.py:
#: a child started from the benchmark itself would report the benchmark's own peak as its ru_maxrss).
LAUNCHER = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")

#: The measured process: predict_job, with align and the landscape's z mocked unless argv[4] is "real".
#: argv: run_dir star out_dir mode.
CHILD = r"""
import json, sys
import numpy as np
import torch
torch.set_num_threads(1 if sys.argv[4] == "mocked" else 2)
from cryofire_ext import landscape, predict
from cryofire_ext.refine import references
from integrations.job import predict_job

def rss():
    return next(int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith("VmRSS:"))

def fake_align(refs, read, n, chunk=1024, on_chunk=None):
    parts = []
    for s in range(0, n, chunk):
        idx = np.arange(s, min(n, s + chunk))
        read(idx)  # every image, as the real align reads them
        rng = np.random.default_rng(s)
        q = rng.normal(size=(len(idx), 4))
        w, x, y, z = (q / np.linalg.norm(q, axis=1, keepdims=True)).T
        A = np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
                      2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
                      2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], 1).reshape(-1, 3, 3)
        f32 = lambda a: torch.as_tensor(a, dtype=torch.float32)
        parts.append((f32(A), f32(rng.uniform(-3, 3, (len(idx), 2))),
                      torch.as_tensor(rng.integers(0, refs.n_classes, len(idx)), dtype=torch.int64),
                      f32(rng.uniform(0, 1, len(idx))), f32(rng.uniform(0, 1, len(idx))),
                      f32(rng.uniform(0.9, 1.1, len(idx)))))
        if on_chunk is not None:
            on_chunk(int(idx[-1]) + 1)
    return references.Aligned(*(torch.cat(p) for p in zip(*parts)))

def fake_z_of(self, stack, A, shifts_A, chunk=2048):
    return ((np.arange(len(stack)) * 0.6180339887) % 1.0).astype(np.float32).reshape(-1, 1)

before_maps = []
class_volumes = predict.TrainedModel.class_volumes
def recorded_class_volumes(self):
    before_maps.append(rss())
    return class_volumes(self)

if sys.argv[4] == "mocked":
    references.align = fake_align
    landscape.Landscape.z_of = fake_z_of
predict.TrainedModel.class_volumes = recorded_class_volumes
rss_start = rss()
predict_job(sys.argv[1], sys.argv[2], sys.argv[3], force=True, device="cpu")
hwm = next(int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith("VmHWM:"))
print("RESULT " + json.dumps({"rss_after_imports": rss_start, "rss_before_class_maps": before_maps[0] if before_maps
                              else None, "vmhwm": hwm}), flush=True)
"""


def run_geometry(run_dir: Path) -> tuple[int, float]:
    """The box (px) and pixel size (A) of the particles the run was trained on."""
    sys.path.insert(0, str(ROOT))
    from cryofire_ext.predict import load_trained

    tm = load_trained(run_dir)
    return tm.input_box, tm.input_pixel_size_A


def build_data(folder: Path, n: int, box: int, apix: float, template: Path) -> Path:
    """`folder/particles.star` (N rows: the template's columns and values cycled, optics set to box/apix) over
    sparse zero stacks `folder/Particles/stack_NNNN.mrcs`; reused when the STAR exists."""
    import mrcfile
    import starfile

    star = folder / "particles.star"
    if star.is_file():
        return star
    tables = starfile.read(template, always_dict=True)
    optics, rows = tables["optics"].copy(), tables["particles"]
    optics["rlnImageSize"], optics["rlnImagePixelSize"] = box, apix
    (folder / "Particles").mkdir(parents=True, exist_ok=True)
    for s in range((n + PER_STACK - 1) // PER_STACK):
        shape = (min(PER_STACK, n - s * PER_STACK), box, box)
        with mrcfile.new_mmap(folder / "Particles" / f"stack_{s + 1:04d}.mrcs", shape=shape, mrc_mode=2,
                              fill=None, overwrite=True) as mrc:
            mrc.set_image_stack()
            mrc.voxel_size = apix
    parts = rows.iloc[np.arange(n) % len(rows)].reset_index(drop=True)
    i = np.arange(n)
    parts["rlnImageName"] = [f"{k + 1:06d}@Particles/stack_{s + 1:04d}.mrcs"
                             for s, k in zip(i // PER_STACK, i % PER_STACK)]
    starfile.write({"optics": optics, "particles": parts}, folder / "particles.tmp.star")
    (folder / "particles.tmp.star").rename(star)
    return star


def measure(tree: Path, run_dir: Path, star: Path, out: Path, mode: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1" if mode == "mocked" else "2")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, sys.executable, "-c", CHILD, str(run_dir), str(star),
                           str(out), mode], cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{tree} {star}:\n{proc.stderr[-3000:]}")
    lines = proc.stdout.strip().splitlines()
    child = json.loads(next(x for x in lines if x.startswith("RESULT "))[len("RESULT "):])
    return {"peak_rss_MiB": int(lines[-1]) / 1024, "rss_before_class_maps_MiB": (child["rss_before_class_maps"] / MiB
                                                                 if child["rss_before_class_maps"] else None),
            "child_vmhwm_MiB": child["vmhwm"] / MiB, "rss_after_imports_MiB": child["rss_after_imports"] / MiB,
            "wall_s": time.time() - t0}


def summary(runs: list[dict], ns: list[int]) -> dict:
    """Per N: the values of every repeat and their median; between the smallest and largest N: bytes per
    particle and the ratio, of the medians."""
    out: dict = {}
    for key in ("peak_rss_MiB", "rss_before_class_maps_MiB", "s_per_image"):
        if any(r.get(key) is None for r in runs):  # no class maps (one class), or not recorded
            continue
        per_n = {n: [r[key] for r in runs if r["n"] == n] for n in ns}
        med = {n: float(np.median(v)) for n, v in per_n.items()}
        lo, hi = min(ns), max(ns)
        out[key] = {"per_n": {str(n): {"repeats": v, "median": med[n], "min": min(v), "max": max(v)}
                              for n, v in per_n.items()}}
        if hi > lo:
            out[key][f"ratio_{hi}_over_{lo}"] = med[hi] / med[lo]
        if key.endswith("_MiB") and hi > lo:
            out[key][f"bytes_per_particle_{lo}_to_{hi}"] = (med[hi] - med[lo]) * MiB / (hi - lo)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True, type=Path, help="a trained run (with references.pt)")
    ap.add_argument("--template-star", required=True, type=Path, help="a particle STAR whose columns are copied")
    ap.add_argument("--data-dir", required=True, type=Path, help="where the synthetic stacks are built / reused")
    ap.add_argument("--n", type=int, nargs="+", default=[20000, 200000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tree", action="append", default=None,
                    help="LABEL=PATH of a source tree to measure (repeatable); default: this tree as 'tree'")
    ap.add_argument("--real", action="store_true",
                    help="no mocks: the real alignment and landscape z (on all-zero images: the same work per image)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    mode = "real" if args.real else "mocked"
    trees = [(lab, Path(p).resolve()) for lab, p in (t.split("=", 1) for t in (args.tree or [f"tree={ROOT}"]))]
    run_dir = args.run_dir.resolve()
    box, apix = run_geometry(run_dir)
    data_dir = args.data_dir.resolve()
    stars = {n: build_data(data_dir / f"n{n}_box{box}", n, box, apix, args.template_star) for n in args.n}
    res: dict = {
        "command": " ".join(["python"] + sys.argv), "loadavg_before": os.getloadavg(), "run_dir": str(run_dir),
        "box": box, "pixel_size_A": apix, "n": args.n, "repeats": args.repeats,
        "threads": "OMP_NUM_THREADS=2, torch.set_num_threads(2) in the measured process" if args.real else
                   "OMP_NUM_THREADS=1, torch.set_num_threads(1) in the measured process",
        "mocked": "nothing: the real predict path on all-zero images" if args.real else
                  "refine.references.align and Landscape.z_of are mocked (deterministic results of the right shapes; "
                  "the mocked align reads every image as the real one does): this is a memory benchmark of the I/O "
                  "and bookkeeping around them, not of their compute",
        "trees": {}}
    for lab, tree in trees:
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=tree,
                               capture_output=True, text=True).stdout.strip()
        res["trees"][lab] = {"path": str(tree), "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=tree,
                             capture_output=True, text=True, check=True).stdout.strip(),
                             "tracked_changes": dirty or None, "runs": []}
    for rep in range(args.repeats):
        for lab, tree in trees:
            for n in args.n:
                r = {"n": n, "repeat": rep, **measure(tree, run_dir, stars[n], data_dir / f"out_{lab}_{n}", mode)}
                r["s_per_image"] = r["wall_s"] / n
                res["trees"][lab]["runs"].append(r)
                print(lab, json.dumps(r), flush=True)
    res["loadavg_after"] = os.getloadavg()
    for lab, _ in trees:
        res["trees"][lab]["summary"] = summary(res["trees"][lab]["runs"], args.n)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({lab: t["summary"] for lab, t in res["trees"].items()}, indent=1))


if __name__ == "__main__":
    main()
