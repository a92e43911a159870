"""Issue 21: the alignment to fixed references at the target set's size (64 px, SNR 0.1, shifts +-4 px, 90/10),
as a library call: references built from the TRUE poses and states of 4,000 images (no training run), then
1,000 new images aligned to them (speed on 2 threads, pose/shift/class errors in the truth's frame, pose confidence).
The grid is the target run's size: 8,000 rotations, shifts up to 4 px at 1.5 px pitch.

    python benchmarks/align_throughput.py benchmarks/results/align_throughput_box64_snr0.1.json
"""
import sys, time, json, os, numpy as np, torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from scipy.stats import spearmanr
from cryofire_ext.phantom import phantom_maps
from cryofire_ext.simulate import simulate
from cryofire_ext.train.data import StackStats, TrainingImages
from cryofire_ext.poses import random_rotations
from cryofire_ext.refine.search import shift_grid
from cryofire_ext.refine.references import build_references, align
from cryofire_ext.metrics import geodesic_deg, clustering_error


def truth_references_and_new_images(n_new: int = 1000):
    """(references from the true poses of 4,000 target-set images, the grid, seconds to build them, the new
    images' SimulatedDataset, their reader, pixel size A)."""
    maps, apix = phantom_maps(64, states=2)
    tr = simulate(maps, 4000, mix=[0.9, 0.1], snr=0.1, shift_px=4.0, pixel_size_A=apix, seed=0)
    img = np.asarray(tr.particles.images.read(np.arange(4000)), dtype=np.float64)
    stats = StackStats(float(img.mean()), float(img.std()))
    data = TrainingImages(tr.particles, 64, stats)
    grid = (torch.as_tensor(random_rotations(8000, np.random.default_rng(0))).float(), shift_grid(4.0, 1.5))
    t0 = time.time()
    refs = build_references(data.read, 4000, torch.as_tensor(tr.A).float(),
                            torch.as_tensor(tr.shifts_A / apix).float(), torch.as_tensor(tr.state), 2, 64, apix, grid)
    tb = time.time() - t0
    new = simulate(maps, n_new, mix=[0.9, 0.1], snr=0.1, shift_px=4.0, pixel_size_A=apix, seed=1)
    return refs, grid, tb, new, TrainingImages(new.particles, 64, stats).read, apix


if __name__ == "__main__":
    torch.set_num_threads(2)
    load0 = os.getloadavg()
    refs, grid, tb, new, read, apix = truth_references_and_new_images()
    t0 = time.time(); out = align(refs, read, 1000); ta = time.time() - t0
    e = geodesic_deg(out.A.numpy(), new.A)
    conf = out.pose_confidence.numpy()
    res = {"command": "python benchmarks/align_throughput.py benchmarks/results/align_throughput_box64_snr0.1.json (references from the TRUE poses and states of 4,000 images; align 1,000 new ones; library call, not the CLI)",
           "box": 64, "snr": 0.1, "shift_px": 4.0, "mix": [0.9, 0.1], "grid_rotations": 8000, "grid_shifts": int(len(grid[1])),
           "threads": 2, "loadavg_before": load0, "build_references_s": tb, "align_images_per_s": 1000 / ta,
           "median_rotation_error_deg": float(np.median(e)), "frac_over_15deg": float(np.mean(e > 15)),
           "median_shift_error_px": float(np.median(np.linalg.norm(out.shifts_px.numpy() - new.shifts_A / apix, axis=1))),
           "clustering_error": clustering_error(out.labels.numpy(), new.state),
           "spearman_confidence_vs_error": float(spearmanr(conf, e)[0]),
           "mean_error_deg": float(e.mean()), "mean_error_deg_without_least_confident_5pct": float(e[conf > np.quantile(conf, 0.05)].mean()),
           "confidence_quantiles_5_25_50": np.quantile(conf, [0.05, 0.25, 0.5]).tolist(), "loadavg_after": os.getloadavg()}
    print(json.dumps(res, indent=1))
    json.dump(res, open(sys.argv[1], "w"), indent=1)
