"""Training throughput as a fraction of this machine's matmul FLOP/s.

    python benchmarks/throughput.py [--box 64] [--batch 32] [--steps 10] [--threads 2] [--device cpu]
        [--precision auto] [--out benchmarks/results/throughput.json]

Counts the model's FLOPs per training image (encoder(s) + decoder on the masked half
lattice, forward x 3 for forward + backward), times full training steps (forward, loss,
backward, Adam; in the trainer's autocast for `--precision`) on random images, and measures
matmul FLOP/s in the same process: fp32 2048x2048 products on the CPU, bf16 (and fp32)
8192x8192 products on CUDA (the peak the bf16 training step is compared with). Records
os.getloadavg(): the machine is shared.
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
from cryofire_ext.train.trainer import seeded_model, training_autocast  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops(device: torch.device, dtype=torch.float32, n: int = 2048, reps: int = 10) -> float:
    """FLOP/s of `n`^3 products of random `dtype` matrices on `device` (after one warm-up product)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--symmetric", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="auto", help="as TrainConfig.precision (auto: bf16 on CUDA)")
    ap.add_argument("--out", default="benchmarks/results/throughput.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    device = torch.device(args.device)
    cfg = TrainConfig(zdim=8, symmetric=bool(args.symmetric), device=args.device, precision=args.precision)
    model = seeded_model(cfg, args.box, 4.0).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    img = torch.randn(args.batch, args.box, args.box, device=device)
    ctf = torch.as_tensor(CTFParams.constant(args.batch).as_array()).to(device)
    flops_img = 3 * model.flops_per_image(1.0)
    autocast = training_autocast(args.precision, device)

    def step():
        with autocast:
            out = model(img, ctf, 1.0, None)
        loss = out.loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(3 if device.type == "cuda" else 1):  # warm-up (CUDA: kernel selection, allocator)
        step()
    sync(device)
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    dt = (time.perf_counter() - t) / args.steps
    bf16 = device.type == "cuda" and args.precision in ("auto", "bf16")
    if device.type == "cuda":
        peak = matmul_flops(device, torch.bfloat16 if bf16 else torch.float32, n=8192, reps=10)
    else:
        peak = matmul_flops(device)
    ips = args.batch / dt
    res = {"command": " ".join(["python"] + sys.argv), "box": args.box, "batch": args.batch,
           "symmetric": bool(args.symmetric), "threads": args.threads, "device": str(device),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
           (platform.processor() or platform.machine()), "precision": "bf16 autocast" if bf16 else "fp32",
           "images_per_s": ips, "model_flops_per_image_train": flops_img, "achieved_flops_per_s": ips * flops_img,
           "matmul_flops_per_s": peak, "matmul": ("bf16" if bf16 else "fp32") + (" 8192^3" if device.type == "cuda"
                                                                                 else " 2048^3"),
           "fraction_of_matmul": ips * flops_img / peak,
           "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "torch": torch.__version__,
           "cpu": platform.processor() or platform.machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    print(json.dumps(res, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
