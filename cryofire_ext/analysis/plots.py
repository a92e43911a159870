"""PNG plots of a run's latent space, poses and maps (matplotlib, Agg canvas, no pyplot).

Every function takes arrays and an output path, draws one figure of a fixed size
(`FIGSIZE_IN` at `DPI`, so `WIDTH_PX x HEIGHT_PX` pixels; `map_montage` instead grows
with the number of maps, `MONTAGE_PANEL_IN` per panel), writes it atomically
(refusing to overwrite unless `force`), and returns the path. Matplotlib is
imported inside the functions and drawn on an Agg canvas: importing this module
never chooses a backend or touches global state.

Cluster numbers shown on plots are 1-based (label 0 is "cluster 1").
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cryofire_ext.safe_io import atomic_path

DPI = 100
FIGSIZE_IN = (6.4, 4.8)
WIDTH_PX, HEIGHT_PX = int(FIGSIZE_IN[0] * DPI), int(FIGSIZE_IN[1] * DPI)


def _figure(ncols: int = 1, subplot_kw: dict | None = None):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE_IN, dpi=DPI)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1, **(subplot_kw or {})) for i in range(ncols)]
    return fig, axes


def _save(fig, path: str | os.PathLike, force: bool) -> Path:
    fig.tight_layout()
    with atomic_path(path, force=force) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)  # no bbox_inches="tight": the pixel size stays fixed
    return Path(path)


def _cluster_colours(k: int):
    from matplotlib import colormaps

    cmap = colormaps["tab10" if k <= 10 else "tab20"]
    return [cmap(j % cmap.N) for j in range(k)]


def latent_scatter(coords: np.ndarray, labels: np.ndarray | None, path, *, xlabel: str = "PC1",
                   ylabel: str = "PC2", title: str = "Latent space", force: bool = False) -> Path:
    """Scatter of `coords` `(n, 2)` coloured by 0-based `labels` `(n,)` (legend shows 1-based clusters)."""
    fig, (ax,) = _figure()
    coords = np.asarray(coords, dtype=np.float64).reshape(len(coords), -1)
    y = coords[:, 1] if coords.shape[1] > 1 else np.zeros(len(coords))
    size = max(1.0, min(12.0, 3000.0 / max(len(coords), 1)))
    if labels is None:
        ax.scatter(coords[:, 0], y, s=size, alpha=0.6, color="C0", linewidths=0)
    else:
        k = int(labels.max()) + 1
        for j, colour in enumerate(_cluster_colours(k)):
            sel = labels == j
            ax.scatter(coords[sel, 0], y[sel], s=size, alpha=0.6, color=colour, linewidths=0,
                       label=f"cluster {j + 1} ({int(sel.sum())})")
        ax.legend(fontsize=7, markerscale=2, loc="best")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    return _save(fig, path, force)


def latent_density(coords: np.ndarray, path, *, xlabel: str = "PC1", ylabel: str = "PC2",
                   force: bool = False) -> Path:
    """Hexagonal-bin density (log counts) of `coords` `(n, 2)`."""
    fig, (ax,) = _figure()
    coords = np.asarray(coords, dtype=np.float64)
    y = coords[:, 1] if coords.shape[1] > 1 else np.zeros(len(coords))
    hb = ax.hexbin(coords[:, 0], y, gridsize=40, bins="log", cmap="viridis", mincnt=1)
    fig.colorbar(hb, ax=ax, label="particles (log)")
    ax.set(xlabel=xlabel, ylabel=ylabel, title="Particle density")
    return _save(fig, path, force)


def cluster_populations(populations: np.ndarray, path, *, method: str = "", force: bool = False) -> Path:
    """Bar chart of `(k,)` particle counts per cluster (1-based cluster numbers on the x axis)."""
    fig, (ax,) = _figure()
    pops = np.asarray(populations)
    k = len(pops)
    bars = ax.bar(np.arange(1, k + 1), pops, color=_cluster_colours(k))
    for rect, p in zip(bars, pops):
        ax.annotate(f"{100.0 * p / max(pops.sum(), 1):.1f}%", (rect.get_x() + rect.get_width() / 2, rect.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(np.arange(1, k + 1))
    ax.set(xlabel="cluster (1-based)", ylabel="particles", title=f"Cluster populations {method}".strip())
    return _save(fig, path, force)


def loss_curve(x: np.ndarray, loss: np.ndarray, path, *, xlabel: str = "epoch", force: bool = False) -> Path:
    """Training loss `(m,)` against `x` `(m,)` (log y axis when the loss is positive)."""
    fig, (ax,) = _figure()
    x, loss = np.asarray(x, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    ax.plot(x, loss, color="C0", lw=1.5, marker="o" if len(x) < 30 else None, ms=3)
    if len(loss) and np.all(loss > 0):
        ax.set_yscale("log")
    ax.set(xlabel=xlabel, ylabel="loss", title="Training loss")
    ax.grid(alpha=0.3)
    return _save(fig, path, force)


def fsc_between_maps(freq_per_A: np.ndarray, curves: dict, path, *, force: bool = False) -> Path:
    """FSC curves between cluster maps: `curves` maps (i, j) 0-based cluster pairs to `(m,)` FSC values
    at `freq_per_A` `(m,)`; left panel the curves (up to 15 pairs), right panel the FSC=0.5
    resolution matrix in Angstrom (1-based cluster numbers)."""
    fig, (ax, axm) = _figure(ncols=2)
    freq = np.asarray(freq_per_A, dtype=np.float64)
    k = 1 + max((max(p) for p in curves), default=0)
    res = np.full((k, k), np.nan)
    for n_drawn, ((i, j), f) in enumerate(sorted(curves.items())):
        f = np.asarray(f)
        if n_drawn < 15:
            ax.plot(freq, f, lw=1, label=f"{i + 1} vs {j + 1}")
        below = np.nonzero(f[1:] < 0.5)[0]
        r = 1.0 / freq[below[0] + 1] if len(below) else 1.0 / freq[-1]
        res[i, j] = res[j, i] = r
    ax.axhline(0.5, color="grey", ls="--", lw=0.8)
    ax.set(xlabel="spatial frequency (1/A)", ylabel="FSC", title="FSC between cluster maps", ylim=(-0.1, 1.05))
    if curves:
        ax.legend(fontsize=6, loc="lower left")
    im = axm.imshow(res, cmap="magma_r", origin="upper")
    axm.set_xticks(range(k), [str(i + 1) for i in range(k)])
    axm.set_yticks(range(k), [str(i + 1) for i in range(k)])
    axm.set(title="FSC=0.5 resolution (A)", xlabel="cluster", ylabel="cluster")
    fig.colorbar(im, ax=axm, fraction=0.046)
    return _save(fig, path, force)


def viewing_directions(A: np.ndarray, path, *, force: bool = False) -> Path:
    """Distribution of projection directions on the sphere (Mollweide map, log counts).

    For `A` `(n, 3, 3)` (RELION matrices, left-multiply xyz columns) the beam direction in map
    coordinates is `A^T e_z` = the third row of `A`; its azimuth is RELION's rot and its
    polar angle RELION's tilt.
    """
    fig, (ax,) = _figure(subplot_kw={"projection": "mollweide"})
    d = np.asarray(A, dtype=np.float64)[:, 2, :]
    lon = np.arctan2(d[:, 1], d[:, 0])
    lat = np.arcsin(np.clip(d[:, 2], -1.0, 1.0))
    hb = ax.hexbin(lon, lat, gridsize=(36, 18), bins="log", cmap="viridis", mincnt=1,
                   extent=(-np.pi, np.pi, -np.pi / 2, np.pi / 2))
    fig.colorbar(hb, ax=ax, orientation="horizontal", fraction=0.05, pad=0.08, label="particles (log)")
    ax.set_title("Viewing directions (azimuth = rot, latitude = 90 - tilt)", fontsize=9)
    ax.tick_params(labelsize=6)
    ax.grid(alpha=0.3)
    return _save(fig, path, force)


def inplane_and_shifts(psi_deg: np.ndarray, shifts_A: np.ndarray, path, *, force: bool = False) -> Path:
    """Histograms of the in-plane angle psi `(n,)` (degrees) and of the shifts `(n, 2)` (x, y) in Angstrom."""
    fig, (ax1, ax2) = _figure(ncols=2)
    ax1.hist(np.asarray(psi_deg), bins=36, range=(-180, 180), color="C0")
    ax1.set(xlabel="in-plane angle psi (deg)", ylabel="particles", title="In-plane angle")
    shifts = np.asarray(shifts_A, dtype=np.float64)
    lim = float(np.max(np.abs(shifts))) if shifts.size else 1.0
    lim = lim if lim > 0 else 1.0
    ax2.hist(shifts[:, 0], bins=40, range=(-lim, lim), alpha=0.6, label="x", color="C1")
    ax2.hist(shifts[:, 1], bins=40, range=(-lim, lim), alpha=0.6, label="y", color="C2")
    ax2.set(xlabel="shift (A)", title="Shifts")
    ax2.legend(fontsize=8)
    return _save(fig, path, force)


def bic_curve(bic: dict, chosen_k: int, path, *, force: bool = False) -> Path:
    """BIC of the Gaussian mixture against K (`bic` maps K to BIC), the chosen K marked."""
    fig, (ax,) = _figure()
    ks = np.array(sorted(bic))
    vals = np.array([bic[k] for k in ks], dtype=np.float64)
    ax.plot(ks, vals, marker="o", color="C0")
    if chosen_k in bic:
        ax.plot([chosen_k], [bic[chosen_k]], marker="o", ms=12, mfc="none", mec="C3", mew=2, ls="none",
                label=f"chosen K = {chosen_k}")
        ax.legend()
    ax.set_xticks(ks)
    ax.set(xlabel="K (clusters)", ylabel="BIC (lower is better)", title="Choosing K: Gaussian mixture BIC")
    ax.grid(alpha=0.3)
    return _save(fig, path, force)


#: projections drawn by `map_montage`, one row each: (label, axis of a `[z, y, x]` map summed over)
MONTAGE_ROWS = (("along z", 0), ("along y", 1), ("along x", 2))
MONTAGE_PANEL_IN = 1.1


def map_montage(volumes: np.ndarray, path, *, title: str = "", labels=None, force: bool = False) -> Path:
    """Montage of a map series `(m, D, D, D)` (`[z, y, x]` each): one column per map, one row per projection
    along z, y and x (the sum over that axis, drawn with the first remaining axis up). Every panel of a row
    shares one grey scale (the row's minimum to maximum), so what changes along the series shows. `labels`
    `(m,)` name the columns (default 1..m). The picture is `MONTAGE_PANEL_IN` inches per panel at `DPI`, so
    its width grows with m."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    vols = np.asarray(volumes, dtype=np.float64)
    if vols.ndim != 4 or len(vols) == 0:
        raise ValueError(f"map_montage needs maps (m, D, D, D), got shape {vols.shape}")
    m = len(vols)
    labels = [str(i + 1) for i in range(m)] if labels is None else [str(x) for x in labels]
    left, top, bottom = 0.35, 0.45 if title else 0.25, 0.05  # inches
    p = MONTAGE_PANEL_IN
    w, h = left + p * m + 0.05, top + p * len(MONTAGE_ROWS) + bottom
    fig = Figure(figsize=(w, h), dpi=DPI)
    FigureCanvasAgg(fig)
    for r, (row_label, axis) in enumerate(MONTAGE_ROWS):
        proj = vols.sum(axis=axis + 1)  # (m, a, b)
        lo, hi = float(proj.min()), float(proj.max())
        for c in range(m):
            ax = fig.add_axes(((left + c * p) / w, 1 - (top + (r + 1) * p) / h, 0.96 * p / w, 0.96 * p / h))
            ax.imshow(proj[c], cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1.0, origin="lower",
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(labels[c], fontsize=8, pad=2)
        fig.text(0.3 * left / w, 1 - (top + (r + 0.5) * p) / h, row_label, rotation=90, ha="center", va="center",
                 fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9, y=1 - 0.08 / h, va="top")
    with atomic_path(path, force=force) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return Path(path)
