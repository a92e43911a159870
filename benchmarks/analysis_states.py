"""Do the clusters of a trained run recover the simulated states? One command, results as JSON.

    python benchmarks/analysis_states.py --states 2 --n 2000 --epochs 20 -o /tmp/bench2
    python benchmarks/analysis_states.py --states 10 --n 4000 --epochs 20 -o /tmp/bench10

Simulates the phantom in `--states` conformations (its arm swings through 40 degrees), trains a run, predicts, runs `cryofire analyze`'s library
(`report.analyze_run`) with K chosen by BIC and again with K = states, and reports:
clustering error (best one-to-one matching), |corr(PC1, state)|, and for each cluster map the
truth map it correlates best with (and whether that is the cluster's majority state), for the
decoder's map at the cluster centre and for the map back-projected from the cluster's particles;
and |corr(state, coordinate)| of the 3D variability components at the run's poses.
Writes `<out>/bench.json`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import mrcfile
import numpy as np
import torch


def neighbour_state_agreement(z: np.ndarray, state: np.ndarray, k: int = 50, sample: int = 2000) -> float:
    """Fraction of particles (a random `sample` of them) whose `k` nearest neighbours in z have a mean state
    within one state of their own (issue 20's locality measure)."""
    rng = np.random.default_rng(0)
    idx = rng.choice(len(z), size=min(sample, len(z)), replace=False)
    zs = (z - z.mean(0)) / np.maximum(z.std(0), 1e-12)
    d = ((zs[idx, None, :] - zs[None, :, :]) ** 2).sum(-1)
    d[np.arange(len(idx)), idx] = np.inf
    nn = np.argpartition(d, k, axis=1)[:, :k]
    return float(np.mean(np.abs(state[nn].mean(1) - state[idx]) <= 1.0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--states", type=int, default=2)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--box", type=int, default=32)
    ap.add_argument("--snr", type=float, default=1.0)
    ap.add_argument("--epochs", type=int, default=None, help="default: the demo's")
    ap.add_argument("--zdim", type=int, default=None, help="default: the demo's")
    ap.add_argument("--warm-classes", type=int, default=None, help="default: the demo's (2)")
    ap.add_argument("--z-mode", default=None, help="classes or continuous (default: the demo's)")
    ap.add_argument("--z-l2", type=float, default=None, help="L2 penalty on z (default: the demo's)")
    ap.add_argument("--landscape-nodes", type=int, default=None, help="default: TrainConfig's")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reuse-run", action="store_true",
                    help="analyse OUT/run/predictions.npz of an earlier run of this command instead of training again")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from cryofire_ext import metrics
    from integrations import report
    from integrations.job import DEMO_CONFIG, align_map
    from cryofire_ext.phantom import phantom_maps
    from cryofire_ext.pipeline import infer
    from cryofire_ext.simulate import simulate
    from cryofire_ext.train.config import TrainConfig
    from cryofire_ext.train.trainer import train

    t0 = time.time()
    maps, apix = phantom_maps(args.box, states=args.states)  # the arm swings over 40 deg through the states
    ds = simulate(maps, args.n, snr=args.snr, shift_px=2.0, pixel_size_A=apix, seed=args.seed)
    run = args.out / "run"
    over = {k: v for k, v in (("zdim", args.zdim), ("epochs", args.epochs), ("warm_classes", args.warm_classes),
                              ("z_mode", args.z_mode), ("z_l2", args.z_l2),
                              ("landscape_nodes", args.landscape_nodes)) if v is not None}
    cfg = TrainConfig(**{**DEMO_CONFIG, "device": args.device, "seed": args.seed, **over})
    t1 = time.time()
    from cryofire_ext.results import Predictions

    if not (args.reuse_run and (run / "predictions.npz").is_file()):
        train(ds.particles, run, cfg)
        infer(run, ds.particles).save(run / "predictions.npz", force=True)
    t2 = time.time()
    landscape_s = None
    heldout = None
    if cfg.z_mode == "continuous":  # the landscape at the run's refined poses (what the training job does)
        from cryofire_ext.predict import load_trained
        from cryofire_ext.pipeline import fit_landscape

        tm = load_trained(run, device=args.device)
        if not (args.reuse_run and tm.landscape is not None and "z" in Predictions.load(run / "predictions.npz").meta):
            tm.config = cfg  # the landscape settings of this command (the poses are the run's)
            fit_landscape(tm, ds.particles, Predictions.load(run / "predictions.npz")).save(
                run / "predictions.npz", force=True)
            landscape_s = round(time.time() - t2, 1)
        # held-out images (same states, new draws) at their true poses turned into the run's frame (the best
        # global rotation between the run's poses and the truth), not predict's poses
        new = simulate(maps, max(500, args.n // 2), snr=args.snr, shift_px=2.0, pixel_size_A=apix, seed=args.seed + 101)
        frame = metrics.rotation_error_deg(Predictions.load(run / "predictions.npz").A, ds.A)
        A_new = metrics.MIRROR @ new.A @ metrics.MIRROR if frame.flipped else new.A
        heldout = (tm.landscape.z_of(new.particles, A_new @ frame.global_rotation, new.particles.shifts_A), new.state)
    pred = Predictions.load(run / "predictions.npz")
    rot = metrics.rotation_error_deg(pred.A, ds.A)  # ab initio maps live in a globally rotated frame
    truth_maps = [np.roll(t[::-1], 1, axis=0) if rot.flipped else t for t in ds.maps]
    result = {"states": args.states, "n": args.n, "box": args.box, "snr": args.snr, "epochs": cfg.epochs,
              "zdim": cfg.zdim, "warm_classes": cfg.warm_classes, "train_s": round(t2 - t1, 1),
              "reused_run": bool(args.reuse_run), "simulate_s": round(t1 - t0, 1),
              "median_rotation_error_deg": float(np.median(rot.errors_deg)), "hand_flipped": bool(rot.flipped),
              "z_mode": cfg.z_mode, "z_l2": cfg.z_l2, "landscape_s": landscape_s,
              "landscape_nodes": cfg.landscape_nodes if cfg.z_mode == "continuous" else None,
              "pc1_abs_corr_state": metrics.pc1_correlation(pred.z, ds.state),
              "neighbours_within_one_state": neighbour_state_agreement(pred.z, ds.state)}
    if heldout is not None:  # along the training particles' PC1
        zc = pred.z - pred.z.mean(0)
        pc1 = np.linalg.svd(zc, full_matrices=False)[2][0]
        result["heldout_n"] = len(heldout[1])
        result["heldout_abs_corr_training_pc1_state"] = abs(float(np.corrcoef((heldout[0] - pred.z.mean(0)) @ pc1,
                                                                              heldout[1])[0, 1]))
    from cryofire_ext.analysis.variability import variability

    t3 = time.time()  # 3D variability at the run's poses (what `cryofire analyze` adds, independent of z)
    var = variability(ds.particles.images, pred.A, pred.shifts_A, ds.particles.ctf, apix, n_components=2,
                      seed=args.seed)
    result["variability"] = {"abs_corr_state": [abs(float(np.corrcoef(var.coords[:, j], ds.state)[0, 1]))
                                                for j in range(var.coords.shape[1])],
                             "resolution_A": var.resolution_A, "iterations": var.iterations,
                             "seconds": round(time.time() - t3, 1)}
    from cryofire_ext.recon.reconstruct import reconstruct

    posed = ds.particles.with_poses(pred.A, pred.shifts_A)  # predictions are in the stack's order

    def member_map(rows):  # what `cryofire analyze` does from the run's particles.star
        sub = posed.take(rows)
        return reconstruct(sub.images, sub.A, sub.shifts_A, sub.ctf, apix).numpy(), apix

    def best_truth(paths):
        best, corrs = [], []
        for path in paths:
            with mrcfile.open(path) as m:
                vol = align_map(m.data.astype(np.float64), rot.global_rotation)
            corr = [float(np.corrcoef(vol.ravel(), t.ravel())[0, 1]) for t in truth_maps]
            best.append(int(np.argmax(corr)))
            corrs.append([round(c, 4) for c in corr])
        return best, corrs

    for name, k in (("bic", None), ("k_states", args.states)):
        res = report.analyze_run(run, args.out / f"analysis_{name}", report.AnalyzeConfig(n_clusters=k),
                                 member_map=member_map, force=True)
        c = res.clustering
        majority = [int(np.bincount(ds.state[c.labels == j], minlength=args.states).argmax()) for j in range(c.k)]
        best, corrs = best_truth(res.cluster_maps)
        best_bp, corrs_bp = best_truth(res.backprojected_maps)
        result[name] = {"k": c.k, "clustering_error": metrics.clustering_error(c.labels, ds.state),
                        "kmeans_clustering_error": metrics.clustering_error(c.kmeans_labels, ds.state),
                        "populations": c.populations().tolist(),
                        "cluster_map_best_truth": best, "cluster_map_corr_with_truths": corrs,
                        "cluster_majority_state": majority, "maps_match_own_state": bool(best == majority),
                        "backprojected_best_truth": best_bp, "backprojected_corr_with_truths": corrs_bp,
                        "backprojected_match_own_state": bool(best_bp == majority)}
    if cfg.z_mode == "continuous":  # the decoder's map at each state's median z against that state's truth
        from cryofire_ext.analysis import map_fsc
        from cryofire_ext.predict import load_trained
        from cryofire_ext.recon.classmaps import fsc_resolution_A

        tm = load_trained(run, device=args.device)
        med = np.stack([np.median(pred.z[ds.state == k], 0) for k in range(args.states)])
        per_state = []
        for k, vol in enumerate(tm.volumes(med)):
            _, curve = map_fsc(align_map(vol.astype(np.float64), rot.global_rotation), truth_maps[k], apix)
            per_state.append(fsc_resolution_A(torch.as_tensor(curve), args.box, apix, 0.5))
        result["fsc05_A_at_state_median_z"] = per_state
    result["total_s"] = round(time.time() - t0, 1)
    (args.out / "bench.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
