"""Issue 21: `cryofire predict` on particles a run has never seen, against the same images through the earlier
path (`--new-particles refine`), with the run trained by benchmarks/target_run.py.

    python benchmarks/target_run.py ... --out-dir /tmp/t20/out ...           # the run (seed 0 images)
    python benchmarks/predict_new.py --run-dir /tmp/t20/out --n 20000 --box 64 --snr 0.1 --shift-px 4 \\
        --mix 0.9 0.1 --n-new 20000 --old-subset 1000 --out benchmarks/results/predict_new_n20000_box64_snr0.1.json

Simulates a second, independent set of the same states (`--seed`, default 1), writes it as a STAR + stack, and
runs `cryofire predict RUN NEW.star -o OUT` as a subprocess with its defaults (wall time, peak RSS of that
process alone). An existing `new_seed*_n*` folder is reused, its truth read from its truth.npz. Scores: median
rotation error in the run's frame (the hand and global rotation found on the training particles; the new
particles are not realigned), shift error, clustering error, images/s, and the pose confidence (Spearman with
the rotation error; mean error after dropping the least confident 5%) on the new and the training particles.
Then the earlier path on the first `--old-subset` of the same images, in-process. A run that predates its
references gets them here first (`pipeline.fit_references`, timed), as a re-export would.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cryofire_ext import metrics  # noqa: E402
from cryofire_ext.phantom import phantom_maps  # noqa: E402
from cryofire_ext.results import Predictions  # noqa: E402
from cryofire_ext.simulate import simulate  # noqa: E402
from integrations.simulated import load_truth  # noqa: E402

TRUTH_ARRAYS = ("A", "shifts_A", "state")

#: Runs the command given after it and prints its peak RSS (kB) as the last line of stdout. The command must be
#: started from this small process: a child started from the benchmark itself reports the benchmark's own peak
#: as its ru_maxrss (Linux keeps the parent's high-water mark across the exec of a vfork'ed child).
LAUNCHER = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")


def confidence_scores(conf: np.ndarray, err: np.ndarray) -> dict:
    from scipy.stats import spearmanr

    keep = conf > np.quantile(conf, 0.05)
    return {"spearman_confidence_vs_error": float(spearmanr(conf, err)[0]), "mean_error_deg": float(err.mean()),
            "mean_error_deg_without_least_confident_5pct": float(err[keep].mean()),
            "confidence_quantiles_5_25_50": np.quantile(conf, [0.05, 0.25, 0.5]).tolist()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True, help="target_run.py's --out-dir (holding run/ and data/)")
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--shift-px", type=float, default=4.0)
    ap.add_argument("--mix", type=float, nargs="+", default=[0.9, 0.1])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--n-new", type=int, default=None, help="new particles to predict (default: --n)")
    ap.add_argument("--old-subset", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.run_dir)
    run = root / "run"
    load0 = os.getloadavg()
    maps, apix = phantom_maps(args.box, states=len(args.mix))
    train = simulate(maps, args.n, mix=args.mix, snr=args.snr, shift_px=args.shift_px, pixel_size_A=apix, seed=0)
    res: dict = {"command": " ".join(["python"] + sys.argv), "loadavg_before": load0, "threads": args.threads}

    from cryofire_ext.pipeline import fit_references
    from cryofire_ext.predict import load_trained
    from integrations.job import saved_refine_config
    from integrations.simulated import with_absolute_names, write_dataset

    train_preds = Predictions.load(run / "predictions.npz")
    if not (run / "references.pt").is_file():
        tm = load_trained(run)
        t0 = time.time()
        train_preds = fit_references(tm, with_absolute_names(train, root / "data"), train_preds,
                                     saved_refine_config(run))
        res["references_built_here_s"] = time.time() - t0
    elif train_preds.pose_confidence is None:
        raise SystemExit(f"{run}: references but no confidences in predictions.npz")
    frame = metrics.rotation_error_deg(train_preds.A, train.A)
    res["training_particles"] = {"median_rotation_error_deg": frame.median_deg,
                                 "clustering_error": metrics.clustering_error(train_preds.class_id, train.state),
                                 **confidence_scores(train_preds.pose_confidence, frame.errors_deg)}

    n_new = args.n_new or args.n
    new_dir = root / f"new_seed{args.seed}_n{n_new}"
    if not (new_dir / "particles.star").is_file():
        write_dataset(simulate(maps, n_new, mix=args.mix, snr=args.snr, shift_px=args.shift_px, pixel_size_A=apix,
                               seed=args.seed), new_dir)
    new = SimpleNamespace(**{k: v for k, v in load_truth(new_dir / "truth.npz").items() if k in TRUTH_ARRAYS})
    out = root / f"predict_seed{args.seed}_n{n_new}"
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, sys.executable, "-m", "cli.main", "predict", str(run),
                           str(new_dir / "particles.star"), "-o", str(out), "--force"],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    peak_rss_MiB = int(proc.stdout.strip().splitlines()[-1]) / 1024
    preds = Predictions.load(out / "predictions.npz")
    err = metrics.rotation_error_in_frame_deg(preds.A, new.A, frame)
    sh, _ = metrics.shift_error_px(preds.shifts_A / apix, new.shifts_A / apix, preds.A)
    res["predict"] = {"inference": preds.meta.get("inference"), "n": n_new, "wall_s": wall,
                      "images_per_s": n_new / wall,
                      "peak_rss_MiB": peak_rss_MiB,
                      "median_rotation_error_deg_run_frame": float(np.median(err)),
                      "median_shift_error_px": float(np.median(sh)),
                      "clustering_error": metrics.clustering_error(preds.class_id, new.state),
                      **confidence_scores(preds.pose_confidence, err), "log_tail": proc.stderr[-1500:]}

    if args.old_subset > 0:
        from cryofire_ext.pipeline import infer
        from cryofire_ext.refine.config import RefineConfig
        from integrations.job import load_particles, saved_refine_config

        m = args.old_subset
        stack = load_particles(new_dir / "particles.star").take(np.arange(m))
        tm = load_trained(run)
        t0 = time.time()
        old = infer(tm, stack, saved_refine_config(run).replace(new_particles="refine"))
        wall_old = time.time() - t0
        e_old = metrics.rotation_error_in_frame_deg(old.A, new.A[:m], frame)
        e_same = err[:m]
        res["earlier_path_on_first_subset"] = {
            "n": m, "refine": RefineConfig.to_dict(saved_refine_config(run).replace(new_particles="refine")),
            "wall_s": wall_old, "images_per_s": m / wall_old,
            "median_rotation_error_deg_run_frame": float(np.median(e_old)),
            "clustering_error": metrics.clustering_error(old.class_id, new.state[:m]),
            "references_path_same_particles": {"median_rotation_error_deg_run_frame": float(np.median(e_same)),
                                               "clustering_error": metrics.clustering_error(preds.class_id[:m],
                                                                                            new.state[:m])}}
    res["loadavg_after"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1, default=float) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "predict"}, indent=1, default=float))
    print(json.dumps({k: v for k, v in res["predict"].items() if k != "log_tail"}, indent=1, default=float))


if __name__ == "__main__":
    main()
