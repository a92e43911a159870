"""Issue 4's target run through the product path: simulate, train, predict every particle (with polish), score.

    python benchmarks/target_run.py --n 20000 --box 64 --snr 0.1 --shift-px 4 --mix 0.9 0.1 --minutes 45 \\
        --out-dir /tmp/target20k --out benchmarks/results/target_n20000_box64_snr0.1.json

The same code as `cryofire demo` (integrations.job.run_demo: the two-state phantom, training capped at
`--minutes`, the final inference pass with pose refinement over all particles, export, cluster maps,
scoring: median rotation error after global alignment, shift error, clustering error, FSC of each
cluster map to its true state), at the issue's size. Then each epoch checkpoint is scored on `--eval`
particles with the model's own poses (benchmarks/convergence.py's curve). The run's wall time is split
into training (config max_minutes caps it) and the rest (warm start, final pass, export) by the
log lines this script prints with their times (also kept in the JSON as `log`). `--device cuda` trains and
infers on a GPU (the images are simulated on the CPU, the same set as the CPU runs'); `--eval 0` skips
the per-checkpoint curve. `--export-only` redoes the final pass, export and scoring
of a run already trained in `--out-dir`. Run it from a checkout you do not edit meanwhile (`git worktree
add`): `predict` imports the pose refinement only when it gets there, hours into a run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from convergence import score_checkpoints  # noqa: E402

from cryofire_ext.phantom import phantom_maps  # noqa: E402
from cryofire_ext.run_layout import CONFIG  # noqa: E402
from cryofire_ext.simulate import simulate  # noqa: E402
from cryofire_ext.train.config import TrainConfig  # noqa: E402
from integrations.job import DEMO_CONFIG, DemoSettings, export_run, run_demo, score_run  # noqa: E402
from integrations.simulated import with_absolute_names  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--shift-px", type=float, default=4.0)
    ap.add_argument("--mix", type=float, nargs="+", default=[0.9, 0.1])
    ap.add_argument("--minutes", type=float, default=45.0, help="training time cap (config max_minutes)")
    ap.add_argument("--config", default="{}", help="JSON overrides of TrainConfig fields (on top of the demo's)")
    ap.add_argument("--eval", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto", help="TrainConfig.device (auto: CUDA when present)")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--export-only", action="store_true",
                    help="only the final pass (with pose refinement), export and scoring of the run already trained "
                         "in OUT_DIR/run (after a crash there, or to measure changed inference code); no curve")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")  # phase timings
    records = LogTimes()
    logging.getLogger().addHandler(records)
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    extra = {"epochs": 100, "max_minutes": args.minutes, "warm_max_shift_px": args.shift_px, "device": args.device,
             **json.loads(args.config)}
    settings = DemoSettings(n=args.n, box=args.box, snr=args.snr, shift_px=args.shift_px, mix=tuple(args.mix),
                            config=extra)
    maps, apix = phantom_maps(args.box, states=len(args.mix))  # the same simulation as run_demo's
    ds = simulate(maps, args.n, mix=args.mix, snr=args.snr, shift_px=args.shift_px, pixel_size_A=apix, seed=0)
    t0 = time.time()
    if args.export_only:
        metrics = export_only(Path(args.out_dir), ds, len(args.mix))
    else:
        metrics = run_demo(args.out_dir, settings, argv=["python"] + sys.argv)
    wall = time.time() - t0
    load1 = os.getloadavg()
    run = Path(metrics["run_dir"])
    hist = json.loads((run / "history.json").read_text())
    curve = [] if args.export_only or args.eval <= 0 else score_checkpoints(run, ds, args.eval, len(args.mix), polish_last=False)
    res = {"command": " ".join(["python"] + sys.argv), "n": args.n, "box": args.box, "snr": args.snr,
           "shift_px": args.shift_px, "mix": args.mix, "wall_s_whole_command": wall, "final": metrics,
           "curve_model_own_poses": curve, "history_last": hist[-1] if hist else None, "loadavg_before": load0, "loadavg_after": load1,
           "threads": args.threads, "demo_config": DEMO_CONFIG, "log": records.lines,
           "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "cpu",
           "note": "issue 4 target: N 20,000, D 64, SNR 0.1, shifts +-4 px, 90/10 mix; 2 CPU cores"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1, default=float) + "\n")
    print(json.dumps({k: metrics[k] for k in metrics if k != "config"}, indent=1, default=float))


class LogTimes(logging.Handler):
    """Keeps every INFO line with its seconds since the start, so the JSON carries the stage timings."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.t0 = time.time()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.created - self.t0:8.1f} s {record.name}: {record.getMessage()}")


def export_only(out_dir: Path, ds, n_states: int) -> dict:
    """`run_demo`'s metrics for the run trained in `out_dir/run` on the SimulatedDataset `ds` (the one
    `run_demo` made, seed 0), without training: what the training job runs after training (the final pass and
    refinement, the landscape when the run's config asks for one, the references, export), then the scoring
    (`wall_s` is theirs alone)."""
    t0 = time.monotonic()
    run = out_dir / "run"
    job = export_run(run, with_absolute_names(ds, out_dir / "data"), force=True, fit=TrainConfig.load(run / CONFIG))
    m = score_run(job, ds)
    m.update({"wall_s": time.monotonic() - t0, "wall_s_covers": "final pass, pose refinement, landscape (continuous), references, export",
              "run_dir": str(job.out_dir)})
    return m


if __name__ == "__main__":
    main()
