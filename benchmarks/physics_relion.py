"""Physics against RELION at a realistic box: projection, CTF, reconstruction, and their speed. One command, JSON out.

    python benchmarks/physics_relion.py --map ../shared/fixtures/cryojax/3jar_monomer_bfm1_ps5_28.mrc --n 4000 -o /tmp/physics64
    python benchmarks/physics_relion.py --box 32 --n 2000 -o /tmp/physics32      # the bundled phantom

The phantom is band-limited (Gaussian blobs of sigma >= 6.5 A): at 64 px / 3 A it has no
signal above ~0.5 Nyquist, so FSC there compares noise; use a real map for the high shells.

Simulates a map (`--map`, or the phantom's state 0) with `cryofire_ext.simulate`, writes the dataset, and runs
  relion_project --ctf     on our STAR (noise-free images: per-image correlation with ours)
  relion_reconstruct --ctf on our STAR (high SNR: FSC between our reconstruction and RELION's,
                           and each against the truth map)
Reports the FSC curves (Nyquist units), the last shell with FSC >= 0.9 / 0.5, amplitude ratio,
and wall times of our simulate / reconstruct and RELION's. Writes `<out>/physics.json`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path

import mrcfile
import numpy as np
import torch


def _last_above(freqs, values, level):
    above = np.flatnonzero(values < level)
    return float(freqs[above[0] - 1]) if len(above) and above[0] > 0 else float(freqs[-1] if not len(above) else 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--map", type=Path, default=None, help="MRC map (default: the phantom at --box)")
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--snr", type=float, default=1000.0)
    ap.add_argument("--wiener", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if shutil.which("relion_project") is None or shutil.which("relion_reconstruct") is None:
        raise SystemExit("RELION (relion_project, relion_reconstruct) is not installed")

    from cryofire_ext.phantom import phantom_maps
    from cryofire_ext.recon.projection import correlation
    from cryofire_ext.recon.reconstruct import fsc, reconstruct
    from cryofire_ext.simulate import simulate
    from integrations.simulated import write_dataset

    if args.map is not None:
        from integrations.simulated import read_map

        vol, apix = read_map(args.map)
        maps = vol[None]
    else:
        maps, apix = phantom_maps(args.box, states=1)
    out = args.out
    result: dict = {"map": str(args.map or "phantom"), "box": int(maps.shape[-1]), "pixel_size_A": apix, "n": args.n, "snr": args.snr, "wiener": args.wiener,
                    "threads": args.threads}

    # 1. noise-free images vs relion_project --ctf on our own STAR
    clean = simulate(maps, 200, snr=float("inf"), pixel_size_A=apix, seed=args.seed + 1)
    write_dataset(clean, out / "clean", force=args.force)
    t = time.perf_counter()
    subprocess.run(["relion_project", "--i", "state_00.mrc", "--o", "rln_proj", "--ang", "particles.star", "--ctf",
                    "--angpix", str(apix)], cwd=out / "clean", check=True, capture_output=True)
    result["relion_project_s"] = time.perf_counter() - t
    rln = mrcfile.read(out / "clean" / "rln_proj.mrcs")
    corr = correlation(torch.from_numpy(clean.images), torch.from_numpy(rln)).numpy()
    result["project_corr_min"], result["project_corr_median"] = float(corr.min()), float(np.median(corr))

    # 2. reconstruction from true poses vs relion_reconstruct --ctf
    t = time.perf_counter()
    ds = simulate(maps, args.n, snr=args.snr, pixel_size_A=apix, seed=args.seed)
    result["simulate_s"] = time.perf_counter() - t
    write_dataset(ds, out / "noisy", force=args.force)
    t = time.perf_counter()
    subprocess.run(["relion_reconstruct", "--i", "particles.star", "--o", "rln_rec.mrc", "--ctf"], cwd=out / "noisy",
                   check=True, capture_output=True)
    result["relion_reconstruct_s"] = time.perf_counter() - t
    rln_map = mrcfile.read(out / "noisy" / "rln_rec.mrc")
    t = time.perf_counter()
    ours = reconstruct(ds.images, ds.A, ds.shifts_A, ds.particles.ctf, apix, wiener=args.wiener)
    result["reconstruct_s"] = time.perf_counter() - t
    freqs, ours_rln = fsc(ours, rln_map)
    _, ours_truth = fsc(ours, maps[0])
    _, rln_truth = fsc(rln_map, maps[0])
    result["fsc_freq_nyquist"] = freqs.tolist()
    result["fsc_ours_vs_relion"] = ours_rln.tolist()
    result["fsc_ours_vs_truth"] = ours_truth.tolist()
    result["fsc_relion_vs_truth"] = rln_truth.tolist()
    for name, curve in (("ours_vs_relion", ours_rln), ("ours_vs_truth", ours_truth), ("relion_vs_truth", rln_truth)):
        result[f"{name}_last_0.9_nyquist"] = _last_above(freqs, curve, 0.9)
        result[f"{name}_min_to_2/3_nyquist"] = float(curve[freqs <= 2 / 3].min())
    result["amplitude_ratio_ours_over_relion"] = float(ours.std() / rln_map.std())
    (out / "physics.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("fsc_")}, indent=1))


if __name__ == "__main__":
    main()
