"""Peak memory of training for a fixed time budget, on stacks of different sizes.

    python benchmarks/train_memory.py --stacks /tmp/t20/out/new_seed1_n20000/particles.star \
        /tmp/t20/out/new_seed1_n200000/particles.star --minutes 3 \
        --out benchmarks/results/train_memory_box64_snr0.1.json

Each stack is trained in its own process with the default `TrainConfig` (search warm start, the searched
pose of each particle computed when it is first seen) and `max_minutes`, so both runs stop after the same
time; the process's peak RSS, the images trained and the seconds per image are recorded. Issue 21 asks the
peak RSS to be flat in the number of particles beyond the per-particle result arrays (within 10%). The
stack scan before training (pixel statistics over every image) is part of what is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time
import torch
torch.set_num_threads({threads})
from cryofire_ext.train.config import TrainConfig
from cryofire_ext.train.trainer import train
from integrations.job import load_particles
stack = load_particles({stack!r})
seen = []
t0 = time.time()
train(stack, {run!r}, TrainConfig(max_minutes={minutes}, log_every=10), on_progress=seen.append)
last = seen[-1] if seen else {{}}
def peak_rss_MiB():  # this process's own high-water mark (ru_maxrss would include the parent's, see predict_new)
    line = next(x for x in open("/proc/self/status") if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024
print(json.dumps({{"n": len(stack), "wall_s": time.time() - t0, "images_trained": last.get("images"),
                  "train_time_s": last.get("time_s"),
                  "peak_rss_MiB": peak_rss_MiB()}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stacks", nargs="+", required=True, help="particle STAR files, one training run each")
    ap.add_argument("--minutes", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    res: dict = {"command": " ".join(["python"] + sys.argv), "loadavg_before": os.getloadavg(),
                 "threads": args.threads, "runs": []}
    for star in args.stacks:
        with tempfile.TemporaryDirectory() as tmp:
            code = CHILD.format(threads=args.threads, stack=str(star), run=str(Path(tmp) / "run"),
                                minutes=args.minutes)
            t0 = time.time()
            proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(proc.stderr[-3000:])
            run = json.loads(proc.stdout.strip().splitlines()[-1])
            run["process_wall_s"] = time.time() - t0
            if run["images_trained"] and run["train_time_s"]:
                run["s_per_image"] = run["train_time_s"] / run["images_trained"]
            res["runs"].append(run)
            print(json.dumps(run), flush=True)
    res["loadavg_after"] = os.getloadavg()
    peaks = [r["peak_rss_MiB"] for r in res["runs"]]
    res["peak_rss_ratio_largest_to_smallest"] = max(peaks) / min(peaks)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
