"""Training throughput as a fraction of this machine's matmul FLOP/s.

    python benchmarks/throughput.py [--box 64] [--batch 32] [--steps 10] [--threads 2] [--out benchmarks/results/throughput.json]

Counts the model's FLOPs per training image (encoder(s) + decoder on the masked half
lattice, forward x 3 for forward + backward), times full training steps (forward, loss,
backward, Adam) on random images, and measures fp32 matmul FLOP/s with 2048x2048
products in the same process. Records os.getloadavg(): the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cryofire_ext.ctf import CTFParams  # noqa: E402
from cryofire_ext.train.config import TrainConfig  # noqa: E402
from cryofire_ext.train.trainer import seeded_model  # noqa: E402


def matmul_flops(n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--symmetric", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/throughput.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    cfg = TrainConfig(zdim=8, symmetric=bool(args.symmetric), device="cpu")
    model = seeded_model(cfg, args.box, 4.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    img = torch.randn(args.batch, args.box, args.box)
    ctf = torch.as_tensor(CTFParams.constant(args.batch).as_array())
    flops_img = 3 * model.flops_per_image(1.0)

    def step():
        out = model(img, ctf, 1.0, None)
        loss = out.loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    dt = (time.perf_counter() - t) / args.steps
    peak = matmul_flops()
    ips = args.batch / dt
    res = {"command": " ".join(["python"] + sys.argv), "box": args.box, "batch": args.batch,
           "symmetric": bool(args.symmetric), "threads": args.threads, "images_per_s": ips,
           "model_flops_per_image_train": flops_img, "achieved_flops_per_s": ips * flops_img,
           "matmul_flops_per_s": peak, "fraction_of_matmul": ips * flops_img / peak,
           "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "torch": torch.__version__,
           "cpu": platform.processor() or platform.machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    print(json.dumps(res, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
