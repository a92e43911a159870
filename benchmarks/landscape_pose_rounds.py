"""Alternate the landscape stage and a local pose refinement against each particle's own z-bin map (issue 20).

    python benchmarks/landscape_pose_rounds.py RUN W/data/particles.star START.npz ITERS BINS all|good15 OUTDIR

START.npz holds poses of the stack's particles (`A` `(n, 3, 3)` RELION matrices, `shifts_px` `(n, 2)` pixels of
the run's box). Each iteration fits the landscape (`landscape.fit_landscape`, on all particles or, as an oracle
diagnostic, on those within 15 deg of the truth), gives every particle its z (`Landscape.z_of`), splits the
particles into BINS equal groups along z, back-projects one FSC-filtered map per group at the run's box
(`recon.classmaps.class_maps_fsc`) and hill-climbs each particle's pose and shift against its own group's map
(`refine.search.refine_local`). Prints one JSON line per iteration: pose errors against truth.npz (beside the
data), |corr(z, state)| and the time; saves each iteration's poses and z in OUTDIR. Env: N (first N particles),
THREADS.
"""
import sys, os, time, json, logging
import numpy as np, torch
from cryofire_ext.landscape import fit_landscape
from cryofire_ext.metrics import rotation_error_deg
from cryofire_ext.predict import load_trained
from cryofire_ext.train.data import TrainingImages
from cryofire_ext.recon.classmaps import class_maps_fsc, signal_radius
from cryofire_ext.recon.lattice import Lattice
from cryofire_ext.refine.search import refine_local
from cryofire_ext.refine.polish import SHIFT_PITCH_PX
from cryofire_ext.ctf import evaluate_ctf
from integrations.job import load_particles
from integrations.simulated import load_truth
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
torch.set_num_threads(int(os.environ.get("THREADS", 2)))
run, data, start, iters, B, subset, out = sys.argv[1:8]
iters, B = int(iters), int(B)
os.makedirs(out, exist_ok=True)
tm = load_trained(run); px = tm.pixel_size_A; box = tm.box
stack = load_particles(data); N = int(os.environ.get("N", len(stack)))
stack = stack.take(np.arange(N)) if N < len(stack) else stack
n = len(stack)
truth = load_truth(os.path.join(os.path.dirname(data), "truth.npz")); p = np.load(start)
A_true, state = truth["A"][:n], truth["state"][:n]
A = torch.as_tensor(p["A"][:n]).float(); t = torch.as_tensor(p["shifts_px"][:n]).float()
rd = TrainingImages(stack, box, tm.stats).read
def err(A): return rotation_error_deg(A.numpy().astype(np.float64), A_true).errors_deg
def corr(z, s): return round(float(abs(np.corrcoef(z, s)[0, 1])), 3)
for it in range(iters + 1):
    t0 = time.time()
    e = err(A)
    sel = np.ones(n, bool) if subset == "all" else e < 15
    idx = np.flatnonzero(sel)
    lm, zs = fit_landscape(stack.take(idx), A.numpy()[idx].astype(np.float64), t.numpy()[idx] * px, tm.config,
                           map_box=box, map_pixel_size_A=px)
    z = lm.z_of(stack, A.numpy().astype(np.float64), t.numpy() * px)[:, 0]
    tl = time.time() - t0
    rec = {"iter": it, "median_deg": round(float(np.median(e)), 2), "gt15": round(float(np.mean(e > 15)), 4),
           "gt150": round(float(np.mean(e > 150)), 4), "corr_fit": corr(zs[:, 0], state[idx]),
           "corr_all": corr(z, state), "n_fit": len(idx),
           "median_by_state": [round(float(np.median(e[(state == k) & (e < 15)])), 2) for k in range(int(state.max()) + 1)],
           "landscape_s": round(tl), "load": os.getloadavg()}
    print(json.dumps(rec), flush=True)
    np.savez(f"{out}/iter{it}.npz", A=A.numpy(), shifts_px=t.numpy(), z=z)
    if it == iters:
        break
    t1 = time.time()
    bins = torch.as_tensor(np.minimum((np.argsort(np.argsort(z)) * B) // n, B - 1)).long()
    V, fsc = class_maps_fsc(rd, n, A, t, bins, B, box, px, 256)
    radius = signal_radius(fsc, box)
    lat = Lattice(box, px, A.device, radius)
    for s in range(0, n, 256):
        ix = np.arange(s, min(n, s + 256))
        img, ctf = rd(ix)
        Y = lat.observe(img); C = evaluate_ctf(ctf.double(), lat.freqs).float()
        for k in range(B):
            m = (bins[ix] == k).numpy()
            if m.any():
                j = ix[m]
                Ak, tk, _ = refine_local(V[k], Y[m], C[m], lat, A[j], t[j], SHIFT_PITCH_PX)
                A[j], t[j] = Ak, tk
    print(json.dumps({"iter": it, "refine_s": round(time.time() - t1), "radius": radius}), flush=True)
