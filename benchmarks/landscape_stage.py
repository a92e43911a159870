"""The landscape stage alone (`fit_landscape`, the run's defaults) on a `cryofire simulate` set at its TRUE poses:
seconds, peak RSS and |corr(z, state)| for each particle count, one child process per count (so each peak is its
own). A library call, not the CLI: it isolates the stage's cost and the method's ceiling (poses without error).
With --rotation-noise-deg S, each pose is first turned by a random rotation vector with N(0, S) components (how
much pose error the landscape tolerates; the rows give the resulting median error).

    python benchmarks/landscape_stage.py W/data --n 5000 20000 -o benchmarks/results/landscape_stage_10state.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, resource, sys, time
import numpy as np, torch
from scipy.spatial.transform import Rotation
sys.path.insert(0, {root!r})
from integrations.formats import read_particles
from cryofire_ext.landscape import fit_landscape
from cryofire_ext.metrics import geodesic_deg
from cryofire_ext.train.config import TrainConfig
torch.set_num_threads({threads})
n = {n}
truth = np.load({data!r} + "/truth.npz")
stack = read_particles({data!r} + "/particles.star")
idx = np.arange(min(n, len(stack)))
turn = np.random.default_rng(0).normal(0.0, np.radians({noise}), (len(idx), 3))
A = np.einsum("nij,njk->nik", truth["A"][idx], Rotation.from_rotvec(turn).as_matrix())
t0 = time.monotonic()
_, z = fit_landscape(stack.take(idx), A, truth["shifts_A"][idx], TrainConfig(z_mode="continuous"),
                     map_box=stack.box, map_pixel_size_A=stack.pixel_size_A)
s = time.monotonic() - t0
state = truth["state"][idx]
print(json.dumps({{"n": len(idx), "fit_landscape_s": round(s, 1),
                  "median_rotation_error_deg": round(float(np.median(geodesic_deg(A, truth["A"][idx]))), 2),
                  "peak_rss_GiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2),
                  "abs_corr_z_state": round(abs(float(np.corrcoef(z[:, 0], state)[0, 1])), 4),
                  "median_z_by_state": [round(float(np.median(z[state == k, 0])), 3) for k in range(state.max() + 1)]}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", type=Path, help="a `cryofire simulate` folder (particles.star, truth.npz)")
    ap.add_argument("--n", type=int, nargs="+", required=True, help="particle counts (the first n of the set)")
    ap.add_argument("--root", type=Path, default=ROOT, help="the cryofire checkout to measure (e.g. a worktree)")
    ap.add_argument("--rotation-noise-deg", type=float, default=0.0, help="random pose error (see above)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-o", "--out", type=Path, required=True)
    args = ap.parse_args()
    rows = []
    for n in args.n:
        load = os.getloadavg()
        code = CHILD.format(root=str(args.root), threads=args.threads, n=n, data=str(args.data.resolve()),
                            noise=args.rotation_noise_deg)
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        rows.append({**json.loads(done.stdout.strip().splitlines()[-1]), "loadavg_before": load})
        print(json.dumps(rows[-1]), flush=True)
    res = {"command": " ".join(["python", "benchmarks/landscape_stage.py", *sys.argv[1:]]),
           "what": "fit_landscape with the run's defaults at the set's TRUE poses (turned by --rotation-noise-deg), "
                   "library call, one child per n",
           "threads": args.threads, "rows": rows}
    args.out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
