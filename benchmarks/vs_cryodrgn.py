"""Side by side with cryoDRGN-AI (`cryodrgn abinit`) on the demo's data. One command, results as JSON.

    python -m venv peer && peer/bin/pip install torch==2.13.0 && peer/bin/pip install cryodrgn==4.3.1
    python benchmarks/vs_cryodrgn.py --work /tmp/vs --peer peer/bin/cryodrgn --epochs 6 \
        --out benchmarks/results/vs_cryodrgn.json
    # sized to finish on 2 cores (a coarser search of cryoDRGN's; vs_cryodrgn_n1000_coarse.json):
    python benchmarks/vs_cryodrgn.py --work /tmp/vs1000 --peer peer/bin/cryodrgn --n 1000 --epochs 4 \
        --peer-args "--base-healpy 1 --t-extent 4 --epochs-pose-search 1" --out benchmarks/results/vs_cryodrgn_n1000_coarse.json

Runs `cryofire demo -o WORK/ours` (simulate the two-state phantom, train, predict, export, score;
timed as one command), then `cryodrgn abinit` on the same particles and CTF with the same zdim
(`--max-threads 2 --num-workers 0`, a checkpoint every epoch), and scores every epoch's
`pose.N.pkl` / `z.N.pkl` with our metrics (rotation error after the best global rotation and hand,
shift error after the best global offset, k-means clustering error of z). cryoDRGN's time to an
epoch is the sum of its logged epoch times. `--reuse` scores existing outputs instead of running
again. cryoDRGN is never a dependency of cryofire-ext: it lives in its own venv (`--peer`).
Both programs must run alone on the machine (two torch jobs on 2 cores slow each other far more than 2x).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cryofire_ext.analysis import cluster  # noqa: E402
from cryofire_ext.metrics import clustering_error, rotation_error_deg, shift_error_px  # noqa: E402

EPOCH_LINE = re.compile(r"Epoch: (\d+) finished in (\d+):(\d+):([\d.]+)")


def _run(cmd: list[str], log: Path, minutes: float | None = None) -> tuple[float, bool]:
    """Run `cmd` into `log`; (wall seconds, finished). Stopped (not an error) after `minutes`."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=None if minutes is None else minutes * 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return time.perf_counter() - t0, False
    if rc:
        raise SystemExit(f"{cmd[0]} failed with exit status {rc}; see {log}")
    return time.perf_counter() - t0, True


def score_peer(out: Path, truth: dict, box: int, k: int) -> list[dict]:
    """Metrics of every `pose.N.pkl` in cryoDRGN's output folder, with cumulative logged time."""
    times = {}
    for m in EPOCH_LINE.finditer((out / "run.log").read_text()):
        times[int(m.group(1))] = int(m.group(2)) * 3600 + int(m.group(3)) * 60 + float(m.group(4))
    rows = []
    for path in sorted(out.glob("pose.*.pkl"), key=lambda p: int(p.stem.split(".")[1])):
        epoch = int(path.stem.split(".")[1])
        with open(path, "rb") as fh:
            pose = pickle.load(fh)
        R, t = (pose if isinstance(pose, tuple) else (pose, None))
        R = np.asarray(R)  # its matrices or their transposes: whichever aligns (the wrong one scores ~random)
        rot = min((rotation_error_deg(Rc, truth["A"]) for Rc in (R, R.transpose(0, 2, 1))), key=lambda r: r.median_deg)
        row = {"epoch": epoch, "wall_s": sum(v for e, v in times.items() if e <= epoch) if epoch in times else None,
               "median_rotation_error_deg": rot.median_deg, "hand_flipped": rot.flipped}
        if t is not None:  # `parse_pose_star` writes fractions of the box, abinit's pose search pixels; the sign
            true_px = truth["shifts_A"] / float(truth["pixel_size_A"])  # is not documented: take the best
            row["median_shift_error_px"] = min(
                float(np.median(shift_error_px(sgn * np.asarray(t) * scale, true_px, np.asarray(R))[0]))
                for sgn in (1, -1) for scale in (box, 1))
        zpath = out / f"z.{epoch}.pkl"
        if zpath.exists():
            with open(zpath, "rb") as fh:
                z = np.asarray(pickle.load(fh), dtype=np.float64)
            row["clustering_error"] = clustering_error(cluster(z, k=k, method="kmeans", seed=0).labels, truth["state"])
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--peer", required=True, help="the cryodrgn executable of its own venv")
    ap.add_argument("--n", type=int, default=2000, help="particles of the demo (cryofire demo --n)")
    ap.add_argument("--epochs", type=int, default=6, help="cryoDRGN epochs (its default is 30)")
    ap.add_argument("--peer-minutes", type=float, default=60.0, help="stop cryoDRGN after this long")
    ap.add_argument("--peer-args", default="", help="extra cryodrgn abinit arguments, one string (e.g. a coarser "
                    "pose search so that it finishes: \"--base-healpy 1 --epochs-pose-search 1\")")
    ap.add_argument("--reuse", action="store_true", help="score existing outputs in --work")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/vs_cryodrgn.json"))
    args = ap.parse_args()
    ours, peer = args.work / "ours", args.work / "cryodrgn"
    peer.mkdir(parents=True, exist_ok=True)
    res: dict = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "loadavg_before": os.getloadavg()}
    if not (args.reuse and (ours / "metrics.json").exists()):
        _run(["cryofire", "demo", "-o", str(ours), "--n", str(args.n), "--force"], args.work / "ours.log")
    m = json.loads((ours / "metrics.json").read_text())
    res["cryofire"] = {k: m[k] for k in ("median_rotation_error_deg", "hand_flipped", "median_shift_error_px",
                                         "clustering_error", "wall_s", "n", "box", "snr")}
    zdim = int(m["config"]["zdim"])
    data = ours / "data"
    res["cryodrgn_command"] = [args.peer, "abinit", str(data / "particles.mrcs"), "--ctf", str(peer / "ctf.pkl"),
                               "--zdim", str(zdim), "-o", str(peer / "out"), "-n", str(args.epochs),
                               "--checkpoint", "1", "--no-analysis", "--max-threads", "2", "--num-workers", "0",
                               "--seed", "0", *shlex.split(args.peer_args)]
    if not (args.reuse and (peer / "out" / "run.log").exists()):
        _run([args.peer, "parse_ctf_star", str(data / "particles.star"), "-o", str(peer / "ctf.pkl")], peer / "ctf.log")
        wall, finished = _run(res["cryodrgn_command"], peer / "abinit.log", args.peer_minutes)
        (peer / "stopped.json").unlink(missing_ok=True)
        if not finished:
            (peer / "stopped.json").write_text(json.dumps({"stopped_after_s": wall, "reason": f"--peer-minutes {args.peer_minutes}"}))
        res["cryodrgn_command_wall_s"] = wall
    if (peer / "stopped.json").exists():  # cryoDRGN was stopped before its last epoch
        res["cryodrgn_stopped"] = json.loads((peer / "stopped.json").read_text())
    with np.load(data / "truth.npz") as f:
        truth = {k: f[k] for k in ("A", "shifts_A", "state", "pixel_size_A")}
    res["cryodrgn_epochs"] = score_peer(peer / "out", truth, int(m["box"]), k=len(np.unique(truth["state"])))
    done = [r for r in res["cryodrgn_epochs"] if r["wall_s"] is not None]
    if "cryodrgn_stopped" in res:
        last = done[-1] if done else None
        res["summary"] = {"cryodrgn_finished": False, "cryodrgn_stopped_after_s": res["cryodrgn_stopped"]["stopped_after_s"],
                          "cryodrgn_last_finished_epoch": last,
                          "cryofire_wall_s_whole_demo": m["wall_s"],
                          "cryofire_median_rotation_error_deg": m["median_rotation_error_deg"],
                          "time_ratio_lower_bound": res["cryodrgn_stopped"]["stopped_after_s"] / m["wall_s"]}
    elif done:
        last = done[-1]
        res["summary"] = {"cryodrgn_final_median_rotation_error_deg": last["median_rotation_error_deg"],
                          "cryodrgn_wall_s_to_final": last["wall_s"],
                          "cryofire_wall_s_whole_demo": m["wall_s"],
                          "time_ratio_cryodrgn_over_cryofire": last["wall_s"] / m["wall_s"],
                          "cryofire_beats_cryodrgn_final_error": m["median_rotation_error_deg"]
                          <= last["median_rotation_error_deg"]}
    res["loadavg_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res.get("summary", res), indent=2))


if __name__ == "__main__":
    main()
