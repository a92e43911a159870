"""The landscape stage on a finished demo run: does the two-state latent become two modes in a continuous space?

    cryofire demo -o DEMO
    python benchmarks/landscape_demo.py DEMO -o landscape_demo.json
    # the two-state target set, trained by benchmarks/target_run.py --out-dir T (same data/ and run/ layout):
    python benchmarks/landscape_demo.py T -o landscape_2state_n20000_box64_snr0.1.json

Trains the landscape (`pipeline.fit_landscape`, the training job's z_mode "continuous" step) on a copy of
DEMO/run at its refined poses, then reports: |corr(PC1(z), state)|, distinct z values, K chosen by BIC of a
Gaussian mixture on z (`analysis.choose_k`), the clustering error of a 2-cluster GMM against the states,
a 20-bin histogram of z (two modes, or two points), and the stage's wall time and the machine's load average.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("demo", type=Path, help="a `cryofire demo` or target_run.py output folder (data/ and run/)")
    ap.add_argument("-o", "--out", type=Path, required=True, help="result JSON")
    ap.add_argument("--nodes", type=int, default=None, help="landscape nodes (default: TrainConfig's)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from cryofire_ext import analysis, metrics
    from cryofire_ext.pipeline import fit_landscape
    from cryofire_ext.predict import load_trained
    from cryofire_ext.results import Predictions
    from integrations.job import load_particles

    load = os.getloadavg()[0]
    truth = np.load(args.demo / "data" / "truth.npz")
    stack = load_particles(args.demo / "data" / "particles.star")
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        shutil.copytree(args.demo / "run", run)
        tm = load_trained(run)
        over = {"z_mode": "continuous", **({"landscape_nodes": args.nodes} if args.nodes else {})}
        tm.config = type(tm.config).from_dict({**tm.config.to_dict(), **over})
        t0 = time.time()
        preds = fit_landscape(tm, stack, Predictions.load(run / "predictions.npz"))
        wall = time.time() - t0
    of_id = dict(zip(truth["ids"].astype(str), truth["state"]))
    state = np.array([of_id[i] for i in preds.ids])
    k, _ = analysis.choose_k(preds.z)
    two = analysis.cluster(preds.z, 2)
    command = f"python benchmarks/landscape_demo.py {args.demo}" + (f" --nodes {args.nodes}" if args.nodes else "")
    result = {"command": command,
              "n": len(preds), "zdim": preds.zdim, "landscape_nodes": tm.config.landscape_nodes,
              "landscape_s": round(wall, 1), "load_average_at_start": round(load, 2),
              "pc1_abs_corr_state": metrics.pc1_correlation(preds.z, state),
              "distinct_z": int(len(np.unique(preds.z[:, 0]))), "bic_k": int(k),
              "z_histogram_20_bins": np.histogram(preds.z[:, 0], bins=20, range=(0.0, 1.0))[0].tolist(),
              "gmm2_clustering_error": metrics.clustering_error(two.labels, state),
              "refinement_clustering_error": metrics.clustering_error(preds.class_id, state)}
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
