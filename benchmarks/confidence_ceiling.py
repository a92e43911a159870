"""Issue 21: how well can a per-particle pose confidence rank the rotation errors of aligned particles?

References from the TRUE poses and states of 4,000 images (64 px, SNR 0.1, shifts +-4 px, 90/10, as
align_throughput.py), 1,000 new images aligned to them (`refine.references.align`, the default). Around each final
pose the log-likelihood is scored at 48 random axes x 7 angles (0.5-6 deg); the local posterior over them (noise
power x the particle's residual x a scale f) gives an expected angular error E. Reported: Spearman of the exported
pose confidence and of E with the true error (how far a confidence built on the local posterior width could go).

    python benchmarks/confidence_ceiling.py benchmarks/results/confidence_ceiling_box64_snr0.1.json
"""
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as Fn
from scipy.stats import spearmanr

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from align_throughput import truth_references_and_new_images  # noqa: E402
from cryofire_ext.ctf import evaluate_ctf  # noqa: E402
from cryofire_ext.metrics import geodesic_deg  # noqa: E402
from cryofire_ext.poses import axis_angle_matrix  # noqa: E402
from cryofire_ext.recon.lattice import score_at, slices  # noqa: E402
from cryofire_ext.refine.references import align  # noqa: E402

torch.set_num_threads(2)
load0 = os.getloadavg()
M = 1000
refs, _, _, new, read, apix = truth_references_and_new_images(M)
out = align(refs, read, M)
err = geodesic_deg(out.A.numpy(), new.A)
conf = out.pose_confidence.numpy()

lat = refs.lattice("cpu")
im, ctf = read(np.arange(M))
Y, C = lat.observe(im), evaluate_ctf(ctf.double(), lat.freqs).float()
axes = Fn.normalize(torch.randn(48, 3, generator=torch.Generator().manual_seed(1)), dim=-1)
angles = torch.tensor([0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]) * np.pi / 180
R = torch.cat((torch.eye(3)[None], axis_angle_matrix((angles[:, None, None] * axes[None]).reshape(-1, 3))))
theta_deg = torch.cat((torch.zeros(1), angles[:, None].expand(-1, 48).reshape(-1))).numpy() * 180 / np.pi
scores = []
for s in range(0, M, 100):
    sl = slice(s, s + 100)
    cand = R[None] @ out.A[sl][:, None]  # (n, J, 3, 3)
    S = torch.zeros(cand.shape[0], len(R), len(lat.r), dtype=torch.complex64)
    for k in range(refs.n_classes):
        m = out.labels[sl] == k
        if m.any():
            S[m] = slices(refs.V[k], torch.einsum("mi,ncij->ncmj", lat.k, cand[m]))
    scores.append(score_at(Y[sl], C[sl], lat.k[:, :2], S, out.shifts_px[sl][:, None]))
sc = torch.cat(scores)
noise = refs.sigma2 * out.residual.clamp_min(1.0)[:, None]
local = {}
for f in (0.5, 1.0, 2.0, 4.0):
    p = torch.softmax(sc / (f * noise), 1).numpy().astype(np.float64)
    E = p @ theta_deg
    local[str(f)] = {"spearman_expected_error_vs_true_error": float(spearmanr(E, err)[0]),
                     "spearman_expected_error_vs_true_error_under_15deg": float(spearmanr(E[err < 15], err[err < 15])[0]),
                     "median_expected_error_deg": float(np.median(E))}
res = {"command": "python benchmarks/confidence_ceiling.py benchmarks/results/confidence_ceiling_box64_snr0.1.json "
                  "(library call; references from the TRUE poses of 4,000 images, 1,000 new images aligned)",
       "loadavg_before": load0, "threads": 2, "median_rotation_error_deg": float(np.median(err)),
       "spearman_pose_confidence_vs_error": float(spearmanr(conf, err)[0]),
       "local_posterior_by_noise_scale": local, "loadavg_after": os.getloadavg()}
print(json.dumps(res, indent=1))
with open(sys.argv[1], "w") as fh:
    json.dump(res, fh, indent=1)
