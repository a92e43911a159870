"""The analysis folder of a run (`cryofire analyze`): clusters, maps, subsets, plots, one HTML page.

`analyze_run` fills the folder; `render_html` / `write_report` make its one-page report.
All links in the page are relative to the folder (the report travels with it); no
scripts, no external resources: it opens offline in any browser. Cluster numbers
shown to users are 1-based.
"""

from __future__ import annotations

import html
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from cryofire_ext import analysis
from cryofire_ext.analysis import plots
from cryofire_ext.errors import InputError
from cryofire_ext.images import write_mrc
from cryofire_ext.poses import matrix_to_relion_euler
from cryofire_ext.safe_io import atomic_path
from cryofire_ext.analysis.variability import Variability, save_variability
from integrations import map_series

log = logging.getLogger(__name__)


@dataclass
class ClusterRow:
    """One cluster's line in the report: 1-based `number`, particle count, fraction of all particles,
    and relative links to its map and its subset files (may be empty)."""

    number: int
    particles: int
    fraction: float
    map_path: str | None = None
    subset_paths: list[str] = field(default_factory=list)


@dataclass
class SeriesRow:
    """One map series in the report: title, relative links to its maps in order, and (may be None) to its
    montage picture and its ChimeraX command file."""

    title: str
    maps: list[str]
    picture: str | None = None
    chimerax: str | None = None


@dataclass
class ReportContent:
    """What goes on the page. `facts` are (label, value) lines; `plots` are (title, relative PNG path);
    `map_series` are `SeriesRow`s; `notes` are plain sentences (skipped steps etc.)."""

    title: str
    facts: list[tuple[str, str]] = field(default_factory=list)
    plots: list[tuple[str, str]] = field(default_factory=list)
    clusters: list[ClusterRow] = field(default_factory=list)
    map_series: list[SeriesRow] = field(default_factory=list)
    files: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


_STYLE = """body{font-family:sans-serif;margin:1.5em;max-width:1400px;color:#222}
h1{font-size:1.4em}h2{font-size:1.1em;border-bottom:1px solid #ccc;margin-top:1.5em}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
.grid{display:flex;flex-wrap:wrap;gap:12px}.grid figure{margin:0}.grid img{width:480px;border:1px solid #ddd}
figcaption{font-size:.85em;color:#555}.note{color:#8a5a00}.wide img{max-width:100%;border:1px solid #ddd}"""


def _a(path: str, text: str | None = None) -> str:
    return f'<a href="{html.escape(path, quote=True)}">{html.escape(text or path)}</a>'


def render_html(content: ReportContent) -> str:
    """The page as a string."""
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(content.title)}</title>",
             f"<style>{_STYLE}</style></head><body>", f"<h1>{e(content.title)}</h1>"]
    if content.facts:
        parts.append("<table>" + "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in content.facts)
                     + "</table>")
    for note in content.notes:
        parts.append(f'<p class="note">{e(note)}</p>')
    if content.clusters:
        parts.append("<h2>Clusters (1-based numbers, as used by <code>cryofire select --clusters</code>)</h2>")
        parts.append("<table><tr><th>cluster</th><th>particles</th><th>fraction</th><th>map at centre</th>"
                     "<th>particle subset</th></tr>")
        for row in content.clusters:
            mp = _a(row.map_path, Path(row.map_path).name) if row.map_path else "-"
            subs = " ".join(_a(p, Path(p).name) for p in row.subset_paths) or "-"
            parts.append(f"<tr><td>{row.number}</td><td>{row.particles}</td><td>{100 * row.fraction:.1f}%</td>"
                         f"<td>{mp}</td><td>{subs}</td></tr>")
        parts.append("</table>")
    if content.plots:
        parts.append('<h2>Plots</h2><div class="grid">')
        for title, path in content.plots:
            q = html.escape(path, quote=True)
            parts.append(f'<figure><a href="{q}"><img src="{q}" alt="{e(title)}"></a><figcaption>{e(title)}'
                         "</figcaption></figure>")
        parts.append("</div>")
    if content.map_series:
        parts.append("<h2>Maps along the landscape</h2>")
        for s in content.map_series:
            links = ", ".join(_a(p, Path(p).name) for p in s.maps)
            cxc = (f"; ChimeraX: {_a(s.chimerax)} (<code>chimerax {e(s.chimerax)}</code> from this folder, then "
                   "<code>vseries play #1 loop true</code>)") if s.chimerax else ""
            if s.picture:
                q = html.escape(s.picture, quote=True)
                parts.append(f'<figure class="wide"><a href="{q}"><img src="{q}" alt="{e(s.title)}"></a>'
                             f"<figcaption>{e(s.title)}: {links}{cxc}</figcaption></figure>")
            else:
                parts.append(f"<p>{e(s.title)}: {links}{cxc}</p>")
    if content.files:
        parts.append("<h2>Files</h2><ul>" + "".join(f"<li>{_a(p)}: {e(what)}</li>" for what, p in content.files)
                     + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(content: ReportContent, path: str | os.PathLike, force: bool = False) -> Path:
    """Write the page to `path` (atomic; refuses to overwrite unless `force`)."""
    with atomic_path(path, force=force) as tmp:
        tmp.write_text(render_html(content), encoding="utf-8")
    return Path(path)


# ------------------------------------------------------------------ the analysis
SubsetWriter = Callable[[np.ndarray, Path, bool], list[Path]]
"""`(rows (m,) 0-based rows of the predictions, path stem without suffix, force) -> files written`;
the CLI builds one from the run's particle files with the RELION/cryoSPARC exporters."""
MemberMap = Callable[[np.ndarray], tuple[np.ndarray, float]]
"""`(rows (m,) 0-based rows of the predictions) -> (map (D, D, D) float32, voxel size A)` back-projected
from those particles at their poses; the CLI builds one from the run's particles.star and stacks."""
ParticleVariability = Callable[[int, float, int], Variability]
"""`(components, resolution_A, seed) -> variability.Variability` of the predictions' particles (in their
order) at their poses; the CLI builds one from the run's particles.star and stacks."""


@dataclass(frozen=True)
class AnalyzeConfig:
    """Settings of `cryofire analyze`.

    n_clusters: K, or None to choose it by minimum GMM BIC over 1..k_max. method: 'gmm' or 'kmeans'
    (whose labels are exported). n_pcs: principal components computed, and maps made along each of
    them (traversal_steps maps per PC, 5th to 95th percentile of the particles' coordinates; as many along
    the path through the cluster centres). maps: make maps (needs the trained model). subsets: write one
    particle subset per cluster. umap: try UMAP (needs the `umap` extra, umap-learn; skipped with a note
    otherwise). variability_components: 3D variability components
    computed from the particles at their poses (0 = none; needs readable images), at
    variability_resolution_A. seed: for k-means, GMM, UMAP and the variability start.
    """

    n_clusters: int | None = None
    method: str = "gmm"
    k_max: int = 10
    n_pcs: int = 2
    traversal_steps: int = 10
    maps: bool = True
    subsets: bool = True
    umap: bool = True
    variability_components: int = 2
    variability_resolution_A: float = 20.0
    seed: int = 0
    device: str = "cpu"


@dataclass
class AnalysisResult:
    """What `analyze_run` made: the folder, the clustering, PCA, and the paths written (relative to out_dir)."""

    out_dir: Path
    clustering: analysis.Clustering
    pca: analysis.PCAResult
    report: Path
    plots: dict = field(default_factory=dict)
    cluster_maps: list[Path] = field(default_factory=list)
    backprojected_maps: list[Path] = field(default_factory=list)
    traversal_maps: dict = field(default_factory=dict)
    map_views: dict = field(default_factory=dict)  # series name -> map_series.SeriesViews (montage, ChimeraX file)
    variability: Variability | None = None
    variability_maps: dict = field(default_factory=dict)
    subsets: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _umap(z: np.ndarray, seed: int) -> np.ndarray | None:
    try:
        import umap  # optional extra: umap-learn
    except ImportError:
        return None
    return np.asarray(umap.UMAP(n_components=2, random_state=seed).fit_transform(z))


def analyze_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                config: AnalyzeConfig = AnalyzeConfig(), *, source: analysis.VolumeSource | None = None,
                subset_writer: SubsetWriter | None = None, member_map: MemberMap | None = None,
                particle_variability: ParticleVariability | None = None, force: bool = False) -> AnalysisResult:
    """Analyse a run folder into `out_dir` (default `RUN/analysis`): PCA, clusters (`clusters.npz/.json`),
    maps at cluster centres (`maps/cluster_NN.mrc`), along PC traversals (`maps/pcN_traversal/`) and along the
    path through the cluster centres (`maps/cluster_path/`), each series with a montage (`plots/NAME.png`) and
    a ChimeraX command file that plays it (`maps/NAME.cxc`; `integrations.map_series`),
    with `member_map` a map back-projected from each cluster's particles at their poses
    (`maps/cluster_NN_backprojected.mrc`: independent of the neural decoder),
    with `particle_variability` the 3D variability of the particles at their poses (`variability.npz`, maps
    along each component in `maps/variabilityN/`, a plot of the first two coordinates by cluster),
    per-cluster subsets (`subsets/cluster_NN.star|.cs` via `subset_writer`), PNG plots (`plots/`),
    `summary.json` and `report.html`. `source` makes the maps (default: the run's trained model)."""
    run = analysis.load_run(run_dir)
    pred = run.predictions
    out = Path(out_dir) if out_dir is not None else run.path / "analysis"
    z = pred.z
    if pred.zdim == 0:
        raise InputError(f"{run.path}/predictions.npz: the run has no latent coordinates (zdim 0); "
                         "a homogeneous run has no landscape to analyse")
    if config.n_clusters is not None and config.n_clusters > len(pred):
        raise InputError(f"--clusters {config.n_clusters}: K is larger than the number of particles in "
                         f"{run.path}/predictions.npz ({len(pred)})")
    if config.n_pcs < 1:
        raise InputError(f"--pcs must be at least 1, got {config.n_pcs}")
    if config.variability_components < 0:
        raise InputError(f"--variability must be 0 (none) or more components, got {config.variability_components}")
    pcs = analysis.pca(z, max(config.n_pcs, 2))  # PC1-PC2 for the plots
    clus = analysis.cluster(z, config.n_clusters, method=config.method, k_max=config.k_max, seed=config.seed)
    res = AnalysisResult(out_dir=out, clustering=clus, pca=pcs, report=out / "report.html")
    log.info("%d particles, zdim %d: K = %d (%s), populations %s", len(pred), pred.zdim, clus.k, clus.k_source,
             clus.populations().tolist())
    analysis.save_clustering(clus, pred.ids, out, force=force)
    empty = [j + 1 for j in np.nonzero(clus.populations() == 0)[0]]
    if empty:
        res.notes.append(f"Cluster(s) {', '.join(map(str, empty))} have no particles: z takes fewer distinct values "
                         f"than K = {clus.k} (choose fewer clusters); their subsets are empty.")

    # plots
    P = out / "plots"
    xy = pcs.coords[:, :2]
    ev = pcs.explained_variance_ratio
    xl = f"PC1 ({100 * ev[0]:.0f}% var)"
    yl = f"PC2 ({100 * ev[1]:.0f}% var)" if len(ev) > 1 else "(z is 1D)"
    res.plots["PC1-PC2 by cluster"] = plots.latent_scatter(xy, clus.labels, P / "pca_clusters.png", xlabel=xl,
                                                           ylabel=yl, force=force)
    res.plots["PC1-PC2 density"] = plots.latent_density(xy, P / "pca_density.png", xlabel=xl, ylabel=yl, force=force)
    res.plots["Cluster populations"] = plots.cluster_populations(clus.populations(), P / "cluster_populations.png",
                                                                 method=f"({clus.method}, K={clus.k})", force=force)
    if clus.k_source == "bic" and len(clus.bic) > 1:
        res.plots["Choosing K (BIC)"] = plots.bic_curve(clus.bic, clus.k, P / "bic.png", force=force)
    if run.loss_history is not None:
        x, y, xlabel = run.loss_history
        res.plots["Training loss"] = plots.loss_curve(x, y, P / "loss.png", xlabel=xlabel, force=force)
    else:
        res.notes.append("No loss curve: the run folder keeps no loss history.")
    res.plots["Viewing directions"] = plots.viewing_directions(pred.A, P / "viewing_directions.png", force=force)
    psi = matrix_to_relion_euler(pred.A)[:, 2]
    res.plots["In-plane angle and shifts"] = plots.inplane_and_shifts(psi, pred.shifts_A, P / "inplane_shifts.png",
                                                                      force=force)
    if config.umap:
        emb = _umap(z, config.seed) if pred.zdim > 2 else None
        if emb is not None:
            res.plots["UMAP by cluster"] = plots.latent_scatter(emb, clus.labels, P / "umap_clusters.png",
                                                                xlabel="UMAP1", ylabel="UMAP2", title="UMAP",
                                                                force=force)
        elif pred.zdim > 2:
            res.notes.append("UMAP skipped: the optional umap-learn package is not installed; "
                             'pip install "cryofire-ext[umap]" to get a UMAP plot.')

    # maps
    if config.maps:
        src = source if source is not None else analysis.load_volume_source(run.path, device=config.device)
        voxel = float(src.pixel_size_A)
        centres_z = z[clus.centre_particles]
        vols = np.concatenate([np.asarray(src.volumes(centres_z[i:i + 4]), dtype=np.float32)
                               for i in range(0, clus.k, 4)])
        for j, vol in enumerate(vols):
            res.cluster_maps.append(write_mrc(out / "maps" / f"cluster_{j + 1:02d}.mrc", vol, voxel, force))
        curves, freq = {}, None
        for i in range(clus.k):
            for j in range(i + 1, clus.k):
                freq, curves[(i, j)] = analysis.map_fsc(vols[i], vols[j], voxel)
        if curves:
            res.plots["FSC between cluster maps"] = plots.fsc_between_maps(freq, curves, P / "fsc_clusters.png",
                                                                           force=force)
        if member_map is not None:
            for j in np.nonzero(clus.populations() > 0)[0]:
                vol, apix = member_map(analysis.cluster_members(clus.labels, [j]))
                res.backprojected_maps.append(write_mrc(out / "maps" / f"cluster_{j + 1:02d}_backprojected.mrc",
                                                        vol, apix, force))
        for pc in range(min(config.n_pcs, len(pcs.components))):
            pts = analysis.pc_traversal(pcs, pc, config.traversal_steps)
            views = map_series.write_series(src, pts, out, f"pc{pc + 1}_traversal", force=force,
                                           title=f"PC{pc + 1} traversal (5th to 95th percentile)")
            res.traversal_maps[pc + 1], res.map_views[f"pc{pc + 1}_traversal"] = views.maps, views
        if clus.k > 1:  # the polyline through the cluster maps' points, ordered along PC1
            c = clus.centre_particles
            pts = map_series.cluster_path_points(z[c], pcs.coords[c, 0], config.traversal_steps)
            res.map_views["cluster_path"] = map_series.write_series(
                src, pts, out, "cluster_path", title="Path through the cluster centres (ordered along PC1)",
                force=force)
    else:
        res.notes.append("Maps not made (--no-maps).")

    if config.variability_components and particle_variability is not None:
        _variability(res, particle_variability, config, pred.ids, force)
    elif config.variability_components:
        res.notes.append("No 3D variability: the run's particle images could not be read.")

    # subsets
    if config.subsets and subset_writer is not None:
        for j in range(clus.k):
            rows = analysis.cluster_members(clus.labels, [j])
            res.subsets[j + 1] = subset_writer(rows, out / "subsets" / f"cluster_{j + 1:02d}", force)
    elif config.subsets:
        res.notes.append("No particle subsets: the run folder holds no particles.star or particles.cs.")

    _write_summary(res, run, force)
    write_report(_content(res, run), res.report, force=force)
    return res


def _variability(res: AnalysisResult, compute: ParticleVariability, config: AnalyzeConfig, ids: np.ndarray,
                 force: bool) -> None:
    """3D variability of the particles at their poses: npz, maps along each component (5th to 95th
    percentile of the coordinates), and the first two coordinates by cluster."""
    var = compute(config.variability_components, config.variability_resolution_A, config.seed)
    res.variability = var
    out = res.out_dir
    save_variability(var, ids, out / "variability.npz", force=force)
    for j in range(var.coords.shape[1]):
        lo, hi = np.percentile(var.coords[:, j], [5, 95])
        vols = var.maps_along(j, np.linspace(lo, hi, config.traversal_steps))
        res.variability_maps[j + 1] = [write_mrc(out / "maps" / f"variability{j + 1}" / f"step_{s + 1:02d}.mrc",
                                                 v, var.pixel_size_A, force) for s, v in enumerate(vols)]
    res.plots["3D variability coordinates by cluster"] = plots.latent_scatter(
        var.coords[:, :2], res.clustering.labels, out / "plots" / "variability_clusters.png",
        xlabel="variability 1", ylabel="variability 2" if var.coords.shape[1] > 1 else "",
        title=f"3D variability at the particles' poses ({var.resolution_A:.0f} A)", force=force)


def _rel(path: Path, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def _write_summary(res: AnalysisResult, run: analysis.Run, force: bool) -> Path:
    c, p = res.clustering, res.pca
    summary = {"format": "cryofire-analysis", "version": 1, "run": str(run.path), "particles": len(run.predictions),
               "zdim": run.predictions.zdim, "k": c.k, "method": c.method, "k_source": c.k_source,
               "k_criterion": c.k_criterion(),
               "populations": c.populations().tolist(),
               "pca": {"explained_variance_ratio": p.explained_variance_ratio.tolist(),
                       "components": p.components.tolist(), "mean": p.mean.tolist()},
               "kmeans_gmm_agreement": float(np.mean(c.kmeans_labels == c.gmm_labels)),
               "cluster_maps": [_rel(m, res.out_dir) for m in res.cluster_maps],
               "backprojected_maps": [_rel(m, res.out_dir) for m in res.backprojected_maps],
               "traversal_maps": {f"pc{k}": [_rel(m, res.out_dir) for m in v] for k, v in res.traversal_maps.items()},
               "map_views": {k: {"title": v.title, "maps": [_rel(m, res.out_dir) for m in v.maps],
                                 "picture": _rel(v.picture, res.out_dir), "chimerax": _rel(v.chimerax, res.out_dir),
                                 "level": v.level} for k, v in res.map_views.items()},
               "variability": None if res.variability is None else {
                   "file": "variability.npz", "resolution_A": res.variability.resolution_A,
                   "variance": res.variability.variance.tolist(),
                   "maps": {f"variability{k}": [_rel(m, res.out_dir) for m in v]
                            for k, v in res.variability_maps.items()}},
               "subsets": {str(k): [_rel(m, res.out_dir) for m in v] for k, v in res.subsets.items()},
               "plots": {k: _rel(v, res.out_dir) for k, v in res.plots.items()}, "notes": res.notes}
    path = res.out_dir / "summary.json"
    with atomic_path(path, force=force) as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    return path


def _content(res: AnalysisResult, run: analysis.Run) -> ReportContent:
    c, p, root = res.clustering, res.pca, res.out_dir
    pops = c.populations()
    ev = ", ".join(f"PC{i + 1} {100 * v:.1f}%" for i, v in enumerate(p.explained_variance_ratio))
    facts = [("run", str(run.path)), ("particles", str(len(run.predictions))),
             ("latent dimension", str(run.predictions.zdim)),
             ("clusters", f"K = {c.k} ({'chosen by ' + c.k_criterion() if c.k_source == 'bic' else 'given'}); "
                          f"labels from {c.method}"),
             ("k-means / GMM agreement", f"{100 * np.mean(c.kmeans_labels == c.gmm_labels):.1f}% of particles"),
             ("PCA explained variance", ev)]
    if res.variability is not None:
        v = res.variability
        facts.append(("3D variability", f"{v.coords.shape[1]} component(s) at {v.resolution_A:.0f} A from the particles "
                                        f"at their poses (variance of the coordinates: "
                                        f"{', '.join(f'{x:.3g}' for x in v.variance)})"))
    rows = [ClusterRow(number=j + 1, particles=int(pops[j]), fraction=float(pops[j] / max(pops.sum(), 1)),
                       map_path=_rel(res.cluster_maps[j], root) if res.cluster_maps else None,
                       subset_paths=[_rel(s, root) for s in res.subsets.get(j + 1, [])]) for j in range(c.k)]
    series = [SeriesRow(v.title, [_rel(m, root) for m in v.maps], _rel(v.picture, root), _rel(v.chimerax, root))
              for v in res.map_views.values()]
    series += [SeriesRow(f"Along 3D variability component {k} (5th to 95th percentile; "
                         f"{res.variability.resolution_A:.0f} A, independent of z)", [_rel(m, root) for m in v])
               for k, v in res.variability_maps.items()]
    if res.backprojected_maps:
        series.insert(0, SeriesRow("Cluster maps back-projected from their particles",
                                   [_rel(m, root) for m in res.backprojected_maps]))
    files = [("cluster labels (versioned arrays)", "clusters.npz"), ("cluster summary", "clusters.json"),
             ("analysis summary", "summary.json")]
    if res.variability is not None:
        files.append(("3D variability coordinates of each particle (versioned arrays)", "variability.npz"))
    return ReportContent(title=f"cryofire analysis: {run.path.name}", facts=facts,
                         plots=[(t, _rel(v, root)) for t, v in res.plots.items()], clusters=rows,
                         map_series=series, files=files, notes=res.notes)
