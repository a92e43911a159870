"""teamtomo's torch-fourier-slice beside our Fourier-slice engines: accuracy and CPU speed. One command, JSON out.

    python benchmarks/fourier_slice_compare.py --boxes 32 64 128 -o benchmarks/results/fourier_slice_compare.json

Engines compared (all trilinear interpolation in Fourier space):
  ours_projector   cryofire_ext.recon.projection.Projector(pad=2) / reconstruct.reconstruct (pad 2, gridding-corrected, Wiener)
  ours_stage       cryofire_ext.recon.lattice.slices / insert / solve (the refinement stages' engine; slices on
                   a G = box+1 grid (pad 1) as the search uses, reconstruction on a 2x grid as classes.RECONSTRUCT_PAD,
                   no gridding correction)
  tfs              torch_fourier_slice.project_3d_to_2d / extract_central_slices_rfft_3d / backproject_2d_to_3d /
                   insert_central_slices_rfft_3d (defaults: pad_factor 2, sinc^2 correction, weights clamped at 1)

Pose convention: our A (RELION) left-multiplies xyz volume coordinates and the slice samples the transform at
A^T (kx, ky, 0); torch-fourier-slice rotates the slice's xyz coordinates by its matrix R, so R = A^T. Both are
measured (R = A^T and R = A) and reported; arrays are (z, y, x) volumes and (y, x) images in both.

Test map: a sum of Gaussian blobs with widths in pixels (1.0 to 2.5 px), so the map has signal up to Nyquist at
every box (the bundled phantom has a fixed physical size and no signal above ~0.5 Nyquist at 64 px). Its
projections are computed analytically (line integrals of Gaussians, in voxel units), so the reference depends
on neither library.
  (a) projection: per-image Pearson correlation and relative L2 error of each engine's real-space projections
      to the analytic ones, over --n-proj random poses.
  (b) reconstruction: each engine reconstructs from --n-rec analytic (noiseless, no CTF) projections at known
      poses; FSC to the sampled true map (cryofire_ext.recon.reconstruct.fsc).
  (c) speed: images/s for a batch of --batch poses (median of --repeats after one warm-up), torch threads = --threads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as Fn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cryofire_ext import fourier  # noqa: E402
from cryofire_ext.poses import random_rotations  # noqa: E402
from cryofire_ext.recon.projection import Projector, project  # noqa: E402
from cryofire_ext.recon.reconstruct import fsc, reconstruct  # noqa: E402
from cryofire_ext.recon.lattice import Lattice, insert, slices, solve  # noqa: E402

import torch_fourier_slice as tfs  # noqa: E402
from torch_fourier_slice.volume_utils import separable_sinc2_correction  # noqa: E402


# ------------------------------------------------------------------ test map and analytic projections
def blobs(box: int, seed: int = 0, n: int = 24):
    """(centres (n, 3) xyz px from box//2, sigmas (n,) px, amplitudes (n,))."""
    rng = np.random.default_rng(seed)
    c = rng.uniform(-1, 1, size=(4 * n, 3))
    c = c[np.linalg.norm(c, axis=1) <= 1.0][:n] * 0.3 * box
    s = rng.uniform(1.0, 2.5, size=n)
    a = rng.uniform(0.5, 1.5, size=n)
    return c, s, a


def render(box: int, c, s, a) -> torch.Tensor:
    ax = np.arange(box) - box // 2
    z, y, x = np.meshgrid(ax, ax, ax, indexing="ij")
    vol = np.zeros((box,) * 3)
    for ci, si, ai in zip(c, s, a):
        vol += ai * np.exp(-((x - ci[0]) ** 2 + (y - ci[1]) ** 2 + (z - ci[2]) ** 2) / (2 * si * si))
    return torch.as_tensor(vol)


def analytic_projections(box: int, A: np.ndarray, c, s, a) -> torch.Tensor:
    """Line integrals along image z of the blobs at poses A (n, 3, 3): a blob at c lands at (A c)_xy."""
    ax = np.arange(box) - box // 2
    y, x = np.meshgrid(ax, ax, indexing="ij")
    pc = np.einsum("nij,bj->nbi", A, c)[..., :2]  # (n, blobs, 2)
    out = np.zeros((A.shape[0], box, box))
    for b in range(len(s)):
        dx = x[None] - pc[:, b, 0, None, None]
        dy = y[None] - pc[:, b, 1, None, None]
        out += a[b] * np.sqrt(2 * np.pi) * s[b] * np.exp(-(dx * dx + dy * dy) / (2 * s[b] ** 2))
    return torch.as_tensor(out)


# ------------------------------------------------------------------ engines
def tfs_volume_rfft(vol: torch.Tensor, pad: float = 2.0) -> torch.Tensor:
    """The padded, sinc^2-corrected, fftshifted rfft that tfs.project_3d_to_2d builds (for slice-only timing)."""
    d = vol.shape[-1]
    p = int((d * (pad - 1.0)) // 2)
    v = Fn.pad(vol, [p] * 6)
    v = v / separable_sinc2_correction(tuple(v.shape), device=v.device)
    dft = torch.fft.rfftn(torch.fft.ifftshift(v, dim=(-3, -2, -1)), dim=(-3, -2, -1))
    return torch.fft.fftshift(dft, dim=(-3, -2))


def tfs_backproject_batched(images: torch.Tensor, R: torch.Tensor, batch: int, pad: float = 2.0) -> torch.Tensor:
    """tfs.backproject_2d_to_3d with the slice insertion done in batches (its one-shot insertion needs ~1.5 GB per
    256 images at 128 px); otherwise the library's steps verbatim (checked equal to the one-shot call)."""
    d = images.shape[-1]
    p = int((d * (pad - 1.0)) // 2)
    w = d + 2 * p
    shape = (w, w, w)
    dft, wts = None, None
    for s in range(0, images.shape[0], batch):
        im = Fn.pad(images[s:s + batch], [p] * 4)
        im = torch.fft.fftshift(torch.fft.rfftn(torch.fft.ifftshift(im, dim=(-2, -1)), dim=(-2, -1)), dim=(-2,))
        d1, w1 = tfs.insert_central_slices_rfft_3d(image_rfft=im, volume_shape=shape, rotation_matrices=R[s:s + batch])
        dft, wts = (d1, w1) if dft is None else (dft + d1, wts + w1)
    dft = dft / torch.clamp(wts, min=1.0)
    dft = torch.fft.ifftshift(dft, dim=(-3, -2))
    vol = torch.fft.fftshift(torch.fft.irfftn(dft, dim=(-3, -2, -1), s=shape), dim=(-3, -2, -1))
    vol = vol / separable_sinc2_correction(vol.shape, device=vol.device)
    return torch.real(Fn.pad(vol, [-p] * 6))


def stage_grid(vol: torch.Tensor, pad: int) -> torch.Tensor:
    """The stage engine's complex Fourier grid (G, G, G), G = pad*box + 1, of a real map (slices = observe(img))."""
    box = vol.shape[-1]
    P = pad * box
    s = P // 2 - box // 2
    v = vol.new_zeros((P, P, P))
    v[s:s + box, s:s + box, s:s + box] = vol
    F = fourier.fft3_centered(v) / box  # as classes._back_project: observe(padded image) * pad = fft2 / box
    # the k = +1 planes: DFT periodicity (the same values as k = -1)
    F = torch.cat((F, F[:1]), 0)
    F = torch.cat((F, F[:, :1]), 1)
    F = torch.cat((F, F[:, :, :1]), 2)
    return F.to(torch.complex64)


def stage_project(V: torch.Tensor, A: torch.Tensor, box: int, lat: Lattice) -> torch.Tensor:
    coords = torch.einsum("mi,nij->nmj", lat.k, A.float())
    S = slices(V, coords)
    full = fourier.expand_half(S, box, 1.0 - 1e-3)
    return fourier.ifft2_centered(full).real * box


def stage_reconstruct(images: torch.Tensor, A: torch.Tensor, pad: int = 2, reg: float = 0.05,
                      batch: int = 256) -> torch.Tensor:
    """classmaps.back_project + solve (no CTF, no shifts), then the map on the box lattice in real space."""
    box = images.shape[-1]
    lat = Lattice(pad * box, 1.0, images.device)
    keep = lat.r <= 1.0 + 2.0 / (pad * box)
    kp = lat.k[keep]
    G = pad * box + 1
    acc = torch.zeros(G, G, G, 3)
    edge = (pad * box - box) // 2
    for s in range(0, images.shape[0], batch):
        img = Fn.pad(images[s:s + batch].float(), (edge,) * 4)
        Y = lat.observe(img)[:, keep] * pad
        coords = torch.einsum("mi,nij->nmj", kp, A[s:s + batch].float())
        vals = torch.stack((Y.real, Y.imag, torch.ones_like(Y.real)), -1)
        insert(acc, coords.reshape(-1, 3), vals.reshape(-1, 3))
    V = solve(acc, reg)[::pad, ::pad, ::pad][:box, :box, :box]  # classmaps.on_box_lattice, frames.real_map
    return fourier.ifft3_centered(V).real


# ------------------------------------------------------------------ metrics
def corr(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    a = a.double().flatten(1)
    b = b.double().flatten(1)
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return ((a * b).sum(1) / torch.sqrt((a * a).sum(1) * (b * b).sum(1))).numpy()


def proj_metrics(p: torch.Tensor, ref: torch.Tensor) -> dict:
    p, ref = p.double().flatten(1), ref.double().flatten(1)
    c = corr(p, ref)
    rel = (torch.linalg.vector_norm(p - ref, dim=1) / torch.linalg.vector_norm(ref, dim=1)).numpy()
    scale = ((p * ref).sum(1) / (ref * ref).sum(1)).numpy()
    return {"corr_mean": float(c.mean()), "corr_min": float(c.min()), "one_minus_corr_median": float(np.median(1 - c)),
            "rel_l2_err_mean": float(rel.mean()), "rel_l2_err_max": float(rel.max()),
            "amplitude_ratio_mean": float(scale.mean())}


def fsc_metrics(vol: torch.Tensor, truth: torch.Tensor) -> dict:
    f, v = fsc(vol.double(), truth.double())

    def last_above(level):
        below = np.flatnonzero(v[1:] < level)
        return float(f[below[0]]) if len(below) else float(f[-1])  # f[1 + i] is the first below: f[i] last above

    return {"fsc_0.5_nyquist": last_above(0.5), "fsc_0.143_nyquist": last_above(0.143),
            "fsc_mean": float(v[1:].mean()), "fsc_at_nyquist": float(v[-1]),
            "fsc_curve": [round(float(x), 5) for x in v]}


def timed(fn, n_images: int, repeats: int) -> dict:
    fn()  # warm-up
    ts, loads = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
        loads.append([round(x, 2) for x in os.getloadavg()])
    med = statistics.median(ts)
    return {"images_per_s": round(n_images / med, 1), "median_s": round(med, 4), "times_s": [round(t, 4) for t in ts],
            "loadavg_1_5_15": loads}


# ------------------------------------------------------------------ main
def run_box(box: int, args) -> dict:
    rng = np.random.default_rng(args.seed + box)
    c, s, a = blobs(box, args.seed)
    vol64 = render(box, c, s, a)
    vol = vol64.float()
    out = {"box": box, "map": {"blobs": len(s), "sigma_px": [float(s.min()), float(s.max())]}}

    # (a) projection accuracy and convention
    A = random_rotations(args.n_proj, rng)
    At = torch.as_tensor(A, dtype=torch.float32)
    ref = analytic_projections(box, A, c, s, a)
    ours = Projector(vol, pad=2).project(At)
    ours4 = Projector(vol, pad=4).project(At)
    stage = stage_project(stage_grid(vol64, 1), At, box, Lattice(box, 1.0, "cpu"))
    stage2 = stage_project(stage_grid(vol64, 2), At, box, Lattice(box, 1.0, "cpu"))
    tfs_T = tfs.project_3d_to_2d(vol, At.transpose(-1, -2).contiguous())
    tfs_A = tfs.project_3d_to_2d(vol, At)
    out["projection"] = {
        "n_poses": args.n_proj, "reference": "analytic line integrals of the Gaussian blobs",
        "ours_projector_pad2": proj_metrics(ours, ref),
        "ours_projector_pad4": proj_metrics(ours4, ref),
        "ours_stage_pad1": proj_metrics(stage, ref),
        "ours_stage_pad2": proj_metrics(stage2, ref),
        "tfs_pad2_R=A^T": proj_metrics(tfs_T, ref),
        "tfs_pad2_R=A": proj_metrics(tfs_A, ref),
        "convention": {
            "corr_ours_vs_tfs_R=A^T_mean": float(corr(ours, tfs_T).mean()),
            "corr_ours_vs_tfs_R=A_mean": float(corr(ours, tfs_A).mean()),
            "corr_ours_vs_tfs_R=A^T_transposed_image_mean": float(corr(ours, tfs_T.transpose(-1, -2)).mean()),
        },
    }
    print(f"[{box}] projection done", flush=True)

    # (b) reconstruction from analytic noiseless projections
    n_rec = args.n_rec if box < 128 else args.n_rec_128
    Ar = random_rotations(n_rec, rng)
    Art = torch.as_tensor(Ar, dtype=torch.float32)
    imgs = analytic_projections(box, Ar, c, s, a).float()
    rec = {"n_images": n_rec, "input": "analytic projections, no noise, no CTF, known poses"}
    t0 = time.perf_counter()
    v = reconstruct(imgs, Art)
    rec["ours_reconstruct_pad2"] = {**fsc_metrics(v, vol64), "wall_s": round(time.perf_counter() - t0, 2),
                                    "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()]}
    t0 = time.perf_counter()
    v = stage_reconstruct(imgs, Art, pad=2)
    rec["ours_stage_pad2"] = {**fsc_metrics(v, vol64), "wall_s": round(time.perf_counter() - t0, 2),
                              "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()]}
    t0 = time.perf_counter()
    v = tfs_backproject_batched(imgs, Art.transpose(-1, -2).contiguous(), args.batch)
    rec["tfs_backproject_pad2"] = {**fsc_metrics(v, vol64), "wall_s": round(time.perf_counter() - t0, 2),
                                   "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()]}
    if box == min(args.boxes):  # the batched insertion reproduces the library's one-shot call
        one = tfs.backproject_2d_to_3d(imgs[:args.batch], Art[:args.batch].transpose(-1, -2).contiguous())
        bat = tfs_backproject_batched(imgs[:args.batch], Art[:args.batch].transpose(-1, -2).contiguous(), 64)
        rec["tfs_batched_vs_oneshot_max_rel_diff"] = float((one - bat).abs().max() / one.abs().max())
    out["reconstruction"] = rec
    print(f"[{box}] reconstruction done", flush=True)

    # (c) speed, batch of poses
    B = args.batch
    reps = args.repeats if box < 128 else args.repeats_128
    Ab = torch.as_tensor(random_rotations(B, rng), dtype=torch.float32)
    Rb = Ab.transpose(-1, -2).contiguous()
    P = Projector(vol, pad=2)
    V1 = stage_grid(vol64, 1)
    lat = Lattice(box, 1.0, "cpu")
    dft = tfs_volume_rfft(vol)
    imgs_b = analytic_projections(box, Ab.double().numpy(), c, s, a).float()
    # inputs of the insertion-only timings: each engine's own slice layout
    S_stage = slices(V1, torch.einsum("mi,nij->nmj", lat.k, Ab))
    vals_stage = torch.stack((S_stage.real, S_stage.imag, torch.ones_like(S_stage.real)), -1).reshape(-1, 3)
    coords_stage = torch.einsum("mi,nij->nmj", lat.k, Ab).reshape(-1, 3)
    p2 = box // 2
    im_pad = Fn.pad(imgs_b, [p2] * 4)
    im_rfft = torch.fft.fftshift(torch.fft.rfftn(torch.fft.ifftshift(im_pad, dim=(-2, -1)), dim=(-2, -1)), dim=(-2,))
    W = 2 * box

    def stage_insert():
        acc = torch.zeros(box + 1, box + 1, box + 1, 3)
        insert(acc, coords_stage, vals_stage)

    speed = {"batch": B, "repeats": reps,
             "slices_only": {
                 "ours_projector_slice_pad2": timed(lambda: P.slice(Ab), B, reps),
                 "ours_stage_slices_pad1": timed(lambda: slices(V1, torch.einsum("mi,nij->nmj", lat.k, Ab)), B,
                                                 reps),
                 "tfs_extract_central_slices_rfft_3d_pad2": timed(
                     lambda: tfs.extract_central_slices_rfft_3d(dft, Rb), B, reps)},
             "projection_to_real_space": {
                 "ours_Projector_project_cached": timed(lambda: P.project(Ab), B, reps),
                 "ours_project_incl_volume_fft": timed(lambda: project(vol, Ab), B, reps),
                 "tfs_project_3d_to_2d_incl_volume_fft": timed(lambda: tfs.project_3d_to_2d(vol, Rb), B, reps)},
             "insertion_only": {
                 "ours_stage_splat_pad1": timed(stage_insert, B, reps),
                 "tfs_insert_central_slices_rfft_3d_pad2": timed(
                     lambda: tfs.insert_central_slices_rfft_3d(im_rfft, (W, W, W), Rb), B, reps)},
             "backprojection_images_to_map": {
                 "ours_reconstruct_pad2": timed(lambda: reconstruct(imgs_b, Ab), B, reps),
                 "ours_stage_reconstruct_pad2": timed(lambda: stage_reconstruct(imgs_b, Ab, pad=2), B, reps),
                 "tfs_backproject_2d_to_3d_pad2": timed(lambda: tfs.backproject_2d_to_3d(imgs_b, Rb), B, reps)},
             }
    out["speed"] = speed
    print(f"[{box}] speed done", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-o", "--out", type=Path, default=REPO / "benchmarks/results/fourier_slice_compare.json")
    ap.add_argument("--boxes", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--n-proj", type=int, default=200)
    ap.add_argument("--n-rec", type=int, default=2000)
    ap.add_argument("--n-rec-128", type=int, default=1000, help="images to reconstruct from at boxes >= 128")
    ap.add_argument("--repeats-128", type=int, default=2, help="timing repeats at boxes >= 128")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    res = {"command": " ".join([Path(sys.executable).name] + sys.argv),
           "versions": {"torch": torch.__version__, "torch-fourier-slice": version("torch-fourier-slice"),
                        "torch-grid-utils": version("torch-grid-utils"),
                        "torch-image-interpolation": version("torch-image-interpolation"),
                        "torch-ctf": version("torch-ctf"), "einops": version("einops"),
                        "python": platform.python_version()},
           "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "loadavg_start_1_5_15": [round(x, 2) for x in os.getloadavg()],
           "pose_mapping": "torch-fourier-slice R = A^T (our RELION A transposed), volumes (z, y, x) and images "
                           "(y, x) in both, no image transpose", "boxes": {}}
    for box in args.boxes:
        res["boxes"][str(box)] = run_box(box, args)
    res["loadavg_end_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(json.dumps({b: {"proj": {k: v["corr_mean"] for k, v in r["projection"].items() if isinstance(v, dict)
                                   and "corr_mean" in v},
                          "rec": {k: v["fsc_0.143_nyquist"] for k, v in r["reconstruction"].items()
                                  if isinstance(v, dict)}} for b, r in res["boxes"].items()}, indent=1))


if __name__ == "__main__":
    main()
