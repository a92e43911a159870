"""Score a landscape run (`--z-mode continuous`) made with the CLI against a simulated continuum: issue 20's metrics.

    M=../shared/fixtures/cryojax/3jar_dimer_bfm1_ps5_28.mrc
    cryofire simulate $M --states 10 -n 20000 --snr 0.1 --shift-px 4 --seed 0 -o W/data
    cryofire simulate $M --states 10 -n 2000 --snr 0.1 --shift-px 4 --seed 1 -o W/heldout
    cryofire train W/data/particles.star -o W/run --z-mode continuous --max-minutes 30
    cryofire predict W/run W/heldout/particles.star -o W/pred
    python benchmarks/landscape_states.py --run W/run --data W/data --heldout W/heldout --pred W/pred \\
        --out benchmarks/results/landscape_10state_n20000_box64_snr0.1.json

Reads the run's `predictions.npz` (the training particles, in the stack's order) and `landscape.pt`, the truth
`truth.npz` and state maps of both simulated sets, and the held-out predictions. Reports: |corr(PC1(z), state)|
(z is one-dimensional: PC1 is z), the share of particles whose 50 nearest neighbours in z have a mean state within
one state of their own, the landscape's map at each state's median z against that state's truth (FSC 0.5, after
the run's global rotation and hand), the median rotation error after global alignment, the shift error, the same
|corr| and neighbour share on the held-out particles through `predict`'s own poses and z, the mean z per state,
and `analyze`'s clusters of z against the states (on a two-state set: are the states two modes of z?).
`--peer NAME=Z_PKL` adds the same metrics for another method's per-particle latents (cryoDRGN's `z.N.pkl`, in
the training stack's order), e.g. cryoDRGN train_vae given the true poses and given ours.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path

import mrcfile
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from analysis_states import neighbour_state_agreement  # noqa: E402

from cryofire_ext import metrics  # noqa: E402
from cryofire_ext.analysis import cluster, map_fsc, pca  # noqa: E402
from cryofire_ext.predict import load_trained  # noqa: E402
from cryofire_ext.recon.classmaps import fsc_resolution_A  # noqa: E402
from cryofire_ext.results import Predictions  # noqa: E402
from integrations.job import align_map  # noqa: E402
from integrations.simulated import load_truth  # noqa: E402


def latent_scores(z: np.ndarray, state: np.ndarray) -> dict:
    """|corr(PC1(z), state)|, the 50-nearest-neighbour state agreement, and `cryofire analyze`'s clustering
    (`analysis.cluster`: the k its BIC picks; the clustering error with k = the number of states) of latents z
    `(n, d)`; with a one-dimensional z its histogram over 20 bins (are there modes?)."""
    z = np.asarray(z, np.float64).reshape(len(state), -1)
    n_states = int(state.max()) + 1
    out = {"pc1_abs_corr_state": round(metrics.pc1_correlation(z, state), 4),
           "neighbours_within_one_state": round(neighbour_state_agreement(z, state), 4),
           "mean_pc1_by_state": [round(float(v), 4) for v in pc1_means(z, state)],
           "analyze_bic_k": cluster(z).k,
           "clustering_error_k_states": round(metrics.clustering_error(cluster(z, n_states).labels, state), 4)}
    if z.shape[1] == 1:
        out["z_histogram_20_bins"] = np.histogram(z[:, 0], 20)[0].tolist()
    return out


def pc1_means(z: np.ndarray, state: np.ndarray) -> list[float]:
    """Mean PC1 of z `(n, d)` in each state, PC1's sign chosen to rise with the state."""
    pc1 = pca(z, 1).coords[:, 0]
    pc1 = pc1 if np.corrcoef(pc1, state)[0, 1] >= 0 else -pc1
    return [float(pc1[state == k].mean()) for k in range(int(state.max()) + 1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="the training set's simulate folder (truth.npz)")
    ap.add_argument("--heldout", type=Path, help="the held-out set's simulate folder")
    ap.add_argument("--pred", type=Path, help="`cryofire predict RUN HELDOUT/particles.star -o PRED`'s folder")
    ap.add_argument("--peer", action="append", default=[], help="NAME=Z_PKL: another method's latents")
    ap.add_argument("--extra", default="{}", help="JSON merged into the result (commands, timings, load)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    truth = load_truth(args.data / "truth.npz")
    state = np.asarray(truth["state"])
    pred = Predictions.load(args.run / "predictions.npz")
    rot = metrics.rotation_error_deg(pred.A, truth["A"])
    shift_err, _ = metrics.shift_error_px(pred.shifts_A / float(truth["pixel_size_A"]),
                                          truth["shifts_A"] / float(truth["pixel_size_A"]), pred.A)
    res = {"n": len(state), "states": int(state.max()) + 1, "zdim": int(pred.z.shape[1]),
           "median_rotation_error_deg": round(rot.median_deg, 3),
           "share_rotation_error_over_15_deg": round(float(np.mean(rot.errors_deg > 15)), 4),
           "median_shift_error_px": round(float(np.median(shift_err)), 3), "hand_flipped": bool(rot.flipped),
           "training": latent_scores(pred.z, state)}

    tm = load_trained(args.run)
    apix = float(truth["pixel_size_A"])
    truth_maps = []
    for path in sorted(args.data.glob("state_*.mrc")):
        with mrcfile.open(path) as m:
            t = m.data.astype(np.float64)
        truth_maps.append(np.roll(t[::-1], 1, axis=0) if rot.flipped else t)
    med = np.stack([np.median(pred.z[state == k], 0) for k in range(len(truth_maps))])
    fsc = []
    for k, vol in enumerate(tm.volumes(med)):
        _, curve = map_fsc(align_map(vol.astype(np.float64), rot.global_rotation), truth_maps[k], apix)
        fsc.append(round(fsc_resolution_A(torch.as_tensor(curve), vol.shape[0], apix, 0.5), 1))
    res["fsc05_A_at_state_median_z"] = fsc
    res["median_z_by_state"] = [round(float(v), 4) for v in med[:, 0]]

    if args.pred is not None:
        new = load_truth(args.heldout / "truth.npz")
        hp = Predictions.load(args.pred / "predictions.npz")
        err = metrics.rotation_error_in_frame_deg(hp.A, new["A"], rot)
        res["heldout"] = {"n": len(hp), "median_rotation_error_deg_run_frame": round(float(np.median(err)), 3),
                          **latent_scores(hp.z, np.asarray(new["state"]))}
        # issue 20: held-out |corr| within 0.05 of the training particles'
        res["heldout"]["corr_gap_to_training"] = round(
            res["training"]["pc1_abs_corr_state"] - res["heldout"]["pc1_abs_corr_state"], 4)

    for spec in args.peer:
        name, path = spec.split("=", 1)
        with open(path, "rb") as f:
            z = np.asarray(pickle.load(f))
        res.setdefault("peers", {})[name] = {"z_file": path, "zdim": int(z.reshape(len(state), -1).shape[1]),
                                             **latent_scores(z, state)}
    res.update(json.loads(args.extra))
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
