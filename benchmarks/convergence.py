"""Convergence curves: median rotation error, shift error and clustering error against wall time and images seen.

    python benchmarks/convergence.py --n 2000 --box 32 --snr 1.0 --mix 0.9 0.1 --minutes 10 \
        --preset search --out benchmarks/results/convergence_search.json

Simulates the bundled two-state phantom (cryofire_ext.phantom, shifts +-shift_px, CTF 1-2.5 um),
trains with a preset ("search": the default config with the EM warm start and searched-pose
candidates; "plain": the seed's recipe, warm_start="none"), then scores every epoch checkpoint
on `--eval` particles with the final inference pass (not the values seen in training) without
pose refinement (`polish_rounds` 0: the model's own), and the last checkpoint once more with the
run's `polish_rounds`. Wall
time and images seen come from the run's history (evaluation is not timed). Records
os.getloadavg(): this machine's 2 cores are shared with other work.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cryofire_ext.metrics import clustering_error, rotation_error_deg, shift_error_px  # noqa: E402
from cryofire_ext.phantom import phantom_maps  # noqa: E402
from cryofire_ext.pipeline import infer  # noqa: E402
from cryofire_ext.predict import load_trained  # noqa: E402
from cryofire_ext.refine.config import RefineConfig  # noqa: E402
from cryofire_ext.simulate import simulate  # noqa: E402
from cryofire_ext.train.checkpoint import load_checkpoint  # noqa: E402
from cryofire_ext.train.config import TrainConfig  # noqa: E402
from cryofire_ext.train.trainer import train  # noqa: E402
from integrations.job import saved_refine_config  # noqa: E402

PRESETS = {
    "search": {},
    "plain": {"warm_start": "none"},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--box", type=int, default=32)
    ap.add_argument("--snr", type=float, default=1.0)
    ap.add_argument("--shift-px", type=float, default=2.0)
    ap.add_argument("--mix", type=float, nargs="+", default=[0.9, 0.1])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="search")
    ap.add_argument("--config", default="{}", help="JSON overrides of TrainConfig fields")
    ap.add_argument("--eval", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--out", default="benchmarks/results/convergence.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    maps, apix = phantom_maps(args.box, states=len(args.mix))
    ds = simulate(maps, args.n, mix=args.mix, snr=args.snr, shift_px=args.shift_px, pixel_size_A=apix, seed=0)
    run = Path(args.run_dir or f"/tmp/cryofire_convergence_{args.preset}_{int(time.time())}")
    overrides = {**PRESETS[args.preset], **json.loads(args.config)}
    cfg = TrainConfig(**{"epochs": args.epochs, "max_minutes": args.minutes, "device": "cpu", **overrides})
    t0 = time.time()
    train(ds.particles, run, cfg)
    wall = time.time() - t0
    load1 = os.getloadavg()
    hist = json.loads((run / "history.json").read_text())
    curve = score_checkpoints(run, ds, args.eval, len(args.mix), polish_last=True)
    res = {"command": " ".join(["python"] + sys.argv), "preset": args.preset, "config": cfg.to_dict(),
           "n": args.n, "box": args.box, "snr": args.snr, "shift_px": args.shift_px, "mix": args.mix,
           "pixel_size_A": apix, "train_wall_s": wall, "curve": curve, "loss_history": hist,
           "loadavg_before": load0, "loadavg_after": load1, "threads": args.threads,
           "note": "phantom two-state set (cryofire_ext.phantom); 2 CPU cores shared with other engineers' jobs"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


def score_checkpoints(run: Path, ds, n_eval: int, n_states: int, polish_last: bool) -> list[dict]:
    """Score every epoch checkpoint (and last.pt) of `run` on the first `n_eval` particles of the
    SimulatedDataset `ds` with the model's own poses (polish_rounds 0); with `polish_last`, last.pt once
    more with the run's polish_rounds (on those particles only). One dict per point, printed as it comes."""
    apix, box = ds.pixel_size_A, ds.particles.box
    sel = np.arange(min(n_eval, len(ds.A)))
    sub = type(ds.particles)(ids=ds.particles.ids[sel], pixel_size_A=apix, box=box,
                             ctf=ds.particles.ctf.subset(sel), images=_Subset(ds.particles.images, sel))
    curve = []
    ckpts = sorted(glob.glob(str(run / "checkpoints" / "epoch_*.pt"))) + [str(run / "checkpoints" / "last.pt")]
    todo = [(f, 0) for f in ckpts] + ([(ckpts[-1], None)] if polish_last else [])
    for f, rounds in todo:
        st = load_checkpoint(f)
        tm = load_trained(run, checkpoint=f)
        p = infer(tm, sub, saved_refine_config(run) if rounds is None else RefineConfig(polish_rounds=rounds))
        rot = rotation_error_deg(p.A, ds.A[sel])
        sh, _ = shift_error_px(p.shifts_A / apix, ds.shifts_A[sel] / apix, p.A)
        point = {"checkpoint": Path(f).name, "images_seen": int(st["images"]), "wall_s": float(st["elapsed_s"]),
                 "polish_rounds": p.meta["refine"]["polish_rounds"],
                 "median_rotation_error_deg": float(np.median(rot.errors_deg)),
                 "median_shift_error_px": float(np.median(sh))}
        if p.zdim:
            from sklearn.cluster import KMeans

            labels = KMeans(n_states, n_init=10, random_state=0).fit_predict(p.z)
            point["clustering_error"] = clustering_error(labels, ds.state[sel])
        curve.append(point)
        print(json.dumps(point), flush=True)
    return curve


class _Subset:
    def __init__(self, source, sel):
        self.source, self.sel, self.box = source, np.asarray(sel), source.box

    def __len__(self):
        return len(self.sel)

    def read(self, indices):
        return self.source.read(self.sel[np.asarray(indices)])


if __name__ == "__main__":
    main()
