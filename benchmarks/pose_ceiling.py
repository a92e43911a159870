"""The pose ceiling of a `cryofire simulate` set for our alignment: references built from the TRUE poses (and, with
--classes, the true states grouped into that many classes) of the training images, then held-out images aligned
to them with the run's global search grid (8,000 rotations, shifts to 4 px at 1.5 px). What no reconstruction of
ours can beat on that set: the references are as good as the images allow. A library call, not the CLI.

    python benchmarks/pose_ceiling.py W/data W/heldout --classes 1 10 -o benchmarks/results/pose_ceiling_10state.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cryofire_ext.metrics import geodesic_deg  # noqa: E402
from cryofire_ext.poses import random_rotations  # noqa: E402
from cryofire_ext.refine.references import align, build_references  # noqa: E402
from cryofire_ext.refine.search import shift_grid  # noqa: E402
from cryofire_ext.train.data import StackStats, TrainingImages  # noqa: E402
from integrations.formats import read_particles  # noqa: E402

BINS = [0, 5, 10, 15, 30, 60, 90, 120, 150, 170, 180]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", type=Path, help="the training set's simulate folder (references from its truth)")
    ap.add_argument("heldout", type=Path, help="a second simulate folder of the same states (aligned)")
    ap.add_argument("--classes", type=int, nargs="+", default=[1], help="reference classes (true states grouped)")
    ap.add_argument("--n-new", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-o", "--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    truth, new_truth = np.load(args.data / "truth.npz"), np.load(args.heldout / "truth.npz")
    stack, new = read_particles(args.data / "particles.star"), read_particles(args.heldout / "particles.star")
    apix, box, n = stack.pixel_size_A, stack.box, len(stack)
    sample = np.asarray(stack.images.read(np.arange(min(n, 2000))), dtype=np.float64)
    stats = StackStats(float(sample.mean()), float(sample.std()))
    grid = (torch.as_tensor(random_rotations(8000, np.random.default_rng(0))).float(), shift_grid(4.0, 1.5))
    states = int(truth["state"].max()) + 1
    rows = []
    for classes in args.classes:
        load = os.getloadavg()
        t0 = time.monotonic()
        refs = build_references(TrainingImages(stack, box, stats).read, n, torch.as_tensor(truth["A"]).float(),
                                torch.as_tensor(truth["shifts_A"] / apix).float(),
                                torch.as_tensor(truth["state"] * classes // states), classes, box, apix, grid)
        built = time.monotonic() - t0
        t0 = time.monotonic()
        out = align(refs, TrainingImages(new, box, stats).read, args.n_new)
        took = time.monotonic() - t0
        err = geodesic_deg(out.A.numpy(), new_truth["A"][:args.n_new])
        rows.append({"classes": classes, "reference_particles": n, "aligned": args.n_new,
                     "median_rotation_error_deg": round(float(np.median(err)), 2),
                     "share_over_15_deg": round(float(np.mean(err > 15)), 4),
                     "share_over_150_deg": round(float(np.mean(err > 150)), 4),
                     "error_histogram": {"bins_deg": BINS, "counts": np.histogram(err, BINS)[0].tolist()},
                     "build_references_s": round(built, 1), "align_images_per_s": round(args.n_new / took, 1),
                     "loadavg_before": load})
        print(json.dumps(rows[-1]), flush=True)
    res = {"command": " ".join(["python", "benchmarks/pose_ceiling.py", *sys.argv[1:]]),
           "what": "references from the TRUE poses and states, held-out images aligned with the run's grid",
           "threads": args.threads, "rows": rows}
    args.out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
