"""Latent-space analysis: PCA and clustering of z.

The front doors are verbs: `pca`, `cluster`, `pc_traversal`, `cluster_members`. Cluster
labels are 0-based inside the library; users see 1-based cluster numbers
(`cluster 1` is label 0) in file names, plots, the report and `cryofire select`.

Shapes: `z` is `(n, d)` (n particles, latent dimension d); maps are `(D, D, D)`
float32 `[z, y, x]` with a voxel size in Angstrom.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from cryofire_ext.errors import InputError, brief
from cryofire_ext.safe_io import atomic_path

log = logging.getLogger(__name__)

CLUSTERS_FORMAT = "cryofire-clusters"
CLUSTERS_VERSION = 1
K_CRITERION = "minimum BIC of a full-covariance Gaussian mixture over K = 1..k_max"


# --------------------------------------------------------------------------- PCA
@dataclass
class PCAResult:
    """mean `(d,)`; components `(p, d)` (unit rows, PC1 first); explained_variance `(p,)`;
    explained_variance_ratio `(p,)` (fraction of the total variance of z); coords `(n, p)`."""

    mean: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray
    explained_variance_ratio: np.ndarray
    coords: np.ndarray


def _check_z(z: np.ndarray, what: str = "z") -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] == 0:
        raise InputError(f"{what}: latent coordinates must be (n, d) with d >= 1, got shape {z.shape}; "
                         "a run trained without a latent space (zdim 0) has nothing to analyse")
    if len(z) < 2:
        raise InputError(f"{what}: need at least 2 particles to analyse the latent space, got {len(z)}")
    if not np.all(np.isfinite(z)):
        bad = int(np.nonzero(~np.all(np.isfinite(z), axis=1))[0][0])
        raise InputError(f"{what}: row {bad} (0-based) holds a non-finite latent coordinate")
    return z


def pca(z: np.ndarray, n_components: int = 2) -> PCAResult:
    """Principal components of `z` `(n, d)`; `n_components` is clipped to `min(n, d)`.

    Signs are fixed so that the largest-magnitude loading of each component is positive
    (deterministic across runs).
    """
    z = _check_z(z)
    if n_components < 1:
        raise InputError(f"--pcs must be at least 1, got {n_components}")
    p = min(n_components, z.shape[0], z.shape[1])
    mean = z.mean(axis=0)
    _, s, vt = np.linalg.svd(z - mean, full_matrices=False)
    vt = vt[:p]
    sign = np.sign(vt[np.arange(p), np.argmax(np.abs(vt), axis=1)])
    vt = vt * sign[:, None]
    var = s ** 2 / max(len(z) - 1, 1)
    total = var.sum()
    ratio = var[:p] / total if total > 0 else np.zeros(p)
    return PCAResult(mean=mean, components=vt, explained_variance=var[:p], explained_variance_ratio=ratio,
                     coords=(z - mean) @ vt.T)


def pc_traversal(result: PCAResult, pc: int, n_steps: int = 10, lo_pct: float = 5.0,
                 hi_pct: float = 95.0) -> np.ndarray:
    """Points `(n_steps, d)` along principal component `pc` (0-based) from its `lo_pct` to its
    `hi_pct` percentile of the particles' coordinates, all other components at the mean."""
    if not 0 <= pc < len(result.components):
        raise InputError(f"PC{pc + 1} was not computed (only {len(result.components)} components)")
    lo, hi = np.percentile(result.coords[:, pc], [lo_pct, hi_pct])
    t = np.linspace(lo, hi, n_steps)
    return result.mean[None, :] + t[:, None] * result.components[pc][None, :]


def polyline_points(vertices: np.ndarray, n_points: int) -> np.ndarray:
    """`n_points` points `(n_points, d)` evenly spaced by arc length along the polyline through `vertices`
    `(k, d)` in their order, from the first vertex to the last (both included). Repeated vertices are
    skipped; a polyline of length 0 gives its one point `n_points` times."""
    v = np.asarray(vertices, dtype=np.float64)
    if v.ndim != 2 or len(v) == 0 or n_points < 1:
        raise InputError(f"a path needs vertices (k, d) and at least one point, got {v.shape} and {n_points}")
    seg = np.linalg.norm(np.diff(v, axis=0), axis=1)
    keep = np.concatenate([[True], seg > 0])
    v, s = v[keep], np.concatenate([[0.0], np.cumsum(seg[seg > 0])])
    t = np.linspace(0.0, s[-1], n_points)
    return np.stack([np.interp(t, s, v[:, j]) for j in range(v.shape[1])], axis=1)


# --------------------------------------------------------------------- clustering
@dataclass
class Clustering:
    """A clustering of `n` particles into `k` clusters.

    method: 'gmm' or 'kmeans' (which `labels` came from); labels `(n,)` 0-based;
    kmeans_labels, gmm_labels `(n,)` both methods' labels (matched to `labels`' numbering);
    centres `(k, d)` cluster centres in z; centre_particles `(k,)` index of the particle
    nearest each centre (maps there are "on data"); k_source: 'user' or 'bic';
    bic: {K: BIC of the Gaussian mixture with K components} where computed.
    """

    method: str
    labels: np.ndarray
    centres: np.ndarray
    centre_particles: np.ndarray
    kmeans_labels: np.ndarray
    gmm_labels: np.ndarray
    k_source: str
    bic: dict = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(len(self.centres))

    def k_criterion(self) -> str:
        """How K was chosen, in words."""
        if self.k_source != "bic":
            return "given by the user"
        return K_CRITERION.replace("k_max", str(max(self.bic)) if self.bic else "k_max")

    def populations(self) -> np.ndarray:
        """`(k,)` particle counts per cluster (label order)."""
        return np.bincount(self.labels, minlength=self.k)


def _gmm(z: np.ndarray, k: int, seed: int, n_init: int = 2):
    from sklearn.mixture import GaussianMixture

    return GaussianMixture(n_components=k, covariance_type="full", n_init=n_init, reg_covar=1e-5,
                           init_params="k-means++", random_state=seed).fit(z)


def _standardise(z: np.ndarray) -> np.ndarray:
    """`z` centred and divided by one global scale (its RMS spread): the geometry is kept, but the GMM's fixed
    covariance regulariser no longer depends on the units of z (a barely trained model's z spreads ~1e-5)."""
    zc = z - z.mean(axis=0)
    scale = float(np.sqrt(np.mean(zc ** 2)))
    return zc / scale if scale > 0 else zc


def choose_k(z: np.ndarray, k_max: int = 10, seed: int = 0) -> tuple[int, dict]:
    """K with the smallest BIC of a full-covariance Gaussian mixture, K = 1..k_max; returns (K, {K: BIC}).

    BIC is computed on `z` standardised by one global scale (argmin unchanged by that choice of units).
    """
    z = _standardise(_check_z(z))
    k_max = max(1, min(k_max, len(z) - 1))
    bic = {}
    for k in range(1, k_max + 1):
        bic[k] = float(_gmm(z, k, seed, n_init=1).bic(z))
    best = min(bic, key=bic.get)
    return best, bic


def _match_labels(ref: np.ndarray, other: np.ndarray, k: int) -> np.ndarray:
    """Renumber `other` to agree best with `ref` (Hungarian matching on the confusion matrix)."""
    from scipy.optimize import linear_sum_assignment

    conf = np.zeros((k, k))
    np.add.at(conf, (ref, other), 1)
    rows, cols = linear_sum_assignment(-conf)
    mapping = np.empty(k, dtype=np.int64)
    mapping[cols] = rows
    return mapping[other]


def cluster(z: np.ndarray, k: int | None = None, *, method: str = "gmm", k_max: int = 10,
            seed: int = 0) -> Clustering:
    """Cluster `z` `(n, d)` with k-means and a Gaussian mixture; `labels` come from `method`.

    K: `k` when given (1 <= k <= n), else chosen by `choose_k` (minimum BIC). When the mixture leaves a
    cluster empty (nested components on unstructured z), the k-means labels are used and `method` says
    so. Clusters are
    numbered by decreasing population (label 0 = the largest cluster), ties by PC order of
    the centre, so numbering is stable for a given seed.
    """
    from sklearn.cluster import KMeans

    z = _check_z(z)
    n = len(z)
    if method not in ("gmm", "kmeans"):
        raise InputError(f"clustering method must be 'gmm' or 'kmeans', got {method!r}")
    bic: dict = {}
    if k is None:
        k, bic = choose_k(z, k_max=k_max, seed=seed)
        k_source = "bic"
    else:
        k_source = "user"
        if not 1 <= k <= n:
            raise InputError(f"--clusters {k}: K must be between 1 and the number of particles ({n})")
    zs = _standardise(z)
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(zs)
    km_labels = km.labels_.astype(np.int64)
    gmm = _gmm(zs, k, seed)
    gmm_labels = gmm.predict(zs).astype(np.int64)
    if not bic and k < n:
        bic = {k: float(gmm.bic(zs))}
    if method == "gmm" and len(np.unique(gmm_labels)) < k:
        log.warning("the Gaussian mixture left %d of %d clusters empty (z has fewer separable groups than K); "
                    "using the k-means labels, which fill every cluster", k - len(np.unique(gmm_labels)), k)
        method = "kmeans"
    labels = gmm_labels if method == "gmm" else km_labels
    # renumber by decreasing population
    counts = np.bincount(labels, minlength=k)
    order = np.argsort(-counts, kind="stable")
    relabel = np.empty(k, dtype=np.int64)
    relabel[order] = np.arange(k)
    labels = relabel[labels]
    empty = [j + 1 for j in range(k) if not np.any(labels == j)]
    if empty:
        log.warning("%s left cluster(s) %s (1-based) empty: the latent space has fewer than %d separable groups",
                    method, ", ".join(map(str, empty)), k)
    ref = (gmm.means_ if method == "gmm" else km.cluster_centers_) * np.sqrt(np.mean((z - z.mean(0)) ** 2)) + z.mean(0)
    centres = np.stack([z[labels == j].mean(axis=0) if np.any(labels == j) else ref[order[j]] for j in range(k)])
    other = km_labels if method == "gmm" else gmm_labels
    other = _match_labels(labels, other, k)
    dist = ((z[None, :, :] - centres[:, None, :]) ** 2).sum(-1) if n * k < 5e7 else None
    if dist is None:
        centre_particles = np.array([int(np.argmin(((z - c) ** 2).sum(-1))) for c in centres])
    else:
        centre_particles = np.argmin(dist, axis=1)
    return Clustering(method=method, labels=labels, centres=centres, centre_particles=centre_particles.astype(np.int64),
                      kmeans_labels=labels if method == "kmeans" else other,
                      gmm_labels=labels if method == "gmm" else other, k_source=k_source, bic=bic)


def save_clustering(c: Clustering, ids: np.ndarray, out_dir: str | os.PathLike, force: bool = False,
                    extra: dict | None = None) -> tuple[Path, Path]:
    """Write `clusters.npz` (versioned arrays) and `clusters.json` (a readable summary) in `out_dir`."""
    out_dir = Path(out_dir)
    pops = c.populations()
    summary = {"format": CLUSTERS_FORMAT, "version": CLUSTERS_VERSION, "method": c.method, "k": c.k,
               "k_source": c.k_source, "k_criterion": c.k_criterion(),
               "numbering": "cluster numbers are 1-based (cluster 1 = label 0 in clusters.npz)",
               "bic": {str(k): v for k, v in c.bic.items()},
               "clusters": [{"cluster": j + 1, "particles": int(pops[j]), "centre_z": c.centres[j].tolist(),
                             "centre_particle": str(ids[c.centre_particles[j]])} for j in range(c.k)],
               **(extra or {})}
    npz_path, json_path = out_dir / "clusters.npz", out_dir / "clusters.json"
    with atomic_path(npz_path, force=force) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, header=np.array(json.dumps(summary)), ids=np.asarray(ids).astype("U"), labels=c.labels,
                     centres=c.centres, centre_particles=c.centre_particles, kmeans_labels=c.kmeans_labels,
                     gmm_labels=c.gmm_labels)
    with atomic_path(json_path, force=force) as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    return npz_path, json_path


def load_clustering(path: str | os.PathLike) -> tuple[Clustering, np.ndarray]:
    """Read `clusters.npz` written by `save_clustering`; returns (clustering, ids `(n,)`)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: clusters file not found; run `cryofire analyze RUN` first "
                         "(it writes RUN/analysis/clusters.npz) or pass the analysis folder")
    try:
        with np.load(path, allow_pickle=False) as npz:
            header = json.loads(str(npz["header"]))
            arr = {k: npz[k] for k in ("ids", "labels", "centres", "centre_particles", "kmeans_labels", "gmm_labels")}
    except Exception as exc:  # zip, npy, JSON and key errors of a damaged or foreign file
        raise InputError(f"{path}: not a cryofire clusters file ({brief(exc)})") from None
    if header.get("format") != CLUSTERS_FORMAT or header.get("version", 0) > CLUSTERS_VERSION:
        raise InputError(f"{path}: format {header.get('format')} v{header.get('version')} is not "
                         f"{CLUSTERS_FORMAT} v<={CLUSTERS_VERSION}")
    c = Clustering(method=header["method"], labels=arr["labels"], centres=arr["centres"],
                   centre_particles=arr["centre_particles"], kmeans_labels=arr["kmeans_labels"],
                   gmm_labels=arr["gmm_labels"], k_source=header["k_source"],
                   bic={int(k): v for k, v in header.get("bic", {}).items()})
    return c, arr["ids"].astype(str)


def parse_cluster_numbers(text: str, k: int) -> list[int]:
    """'1,3' -> [0, 2]: 1-based cluster numbers as shown to users -> 0-based labels; checks 1..k."""
    try:
        numbers = [int(t) for t in str(text).replace(" ", "").split(",") if t]
    except ValueError:
        raise InputError(f"--clusters {text!r}: expected comma-separated 1-based cluster numbers such as 1,3") from None
    if not numbers:
        raise InputError("--clusters: give at least one 1-based cluster number, such as 1 or 1,3")
    bad = [m for m in numbers if not 1 <= m <= k]
    if bad:
        raise InputError(f"--clusters {text}: cluster {bad[0]} does not exist; clusters are numbered 1..{k} (1-based)")
    return sorted({m - 1 for m in numbers})


def cluster_members(labels: np.ndarray, clusters: Sequence[int]) -> np.ndarray:
    """Indices (sorted, 0-based rows of the predictions) of the particles whose label is in `clusters` (0-based)."""
    return np.nonzero(np.isin(labels, np.asarray(list(clusters))))[0]
