"""`cryofire analyze`, `cryofire eval-vol`, `cryofire select`: the latent landscape, maps, cluster subsets.

Cluster numbers are 1-based everywhere a user sees them (cluster 1 is the most populated).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from cryofire_ext.errors import InputError
from integrations.run_folder import PARTICLES_CS, PARTICLES_STAR, PREDICTIONS

log = logging.getLogger(__name__)


def _particle_source(run_dir: Path, prefer_suffix: str | None):
    """The run's particle file to subset (same suffix as the output when the run has one) and its stack."""
    from integrations.formats import read_particles

    files = [run_dir / n for n in (PARTICLES_STAR, PARTICLES_CS) if (run_dir / n).is_file()]
    if not files:
        return None, None
    files.sort(key=lambda p: p.suffix != prefer_suffix)
    return files[0], read_particles(files[0], require_images=False)


def _rows_for(stack, src: Path, pred_ids: np.ndarray) -> np.ndarray:
    """Row of `stack` for each prediction id: joined on ids; by row order when the file's ids differ but it has
    one row per prediction (the run writes its particle files in the predictions' order)."""
    pos = {i: r for r, i in enumerate(stack.ids)}
    rows = np.fromiter((pos.get(i, -1) for i in pred_ids), dtype=np.int64, count=len(pred_ids))
    if np.all(rows >= 0):
        return rows
    if len(stack) == len(pred_ids):
        log.debug("%s: ids differ from %s; matching rows by order", src, PREDICTIONS)
        return np.arange(len(pred_ids))
    raise InputError(f"{src}: {int((rows < 0).sum())} of the {len(pred_ids)} particles in {PREDICTIONS} are not in "
                     f"this file ({len(stack)} rows); the run folder is inconsistent.")


def _subset_writer(run_dir: Path, pred, suffixes: tuple[str, ...] | None = None):
    """A `report.SubsetWriter` writing each subset in the run's own particle formats (STAR and/or .cs),
    keeping every input column/field; None when the run has no particle file."""
    from integrations.formats import write_particles

    sources = {}
    for suffix in suffixes or (".star", ".cs"):
        src, stack = _particle_source(run_dir, suffix)
        if stack is not None and src.suffix == suffix:
            sources[suffix] = (stack, _rows_for(stack, src, pred.ids))
    if not sources:
        return None

    def write(rows: np.ndarray, stem: Path, force: bool) -> list[Path]:
        out = []
        for suffix, (stack, map_rows) in sources.items():
            out.append(write_particles(stack.take(map_rows[rows]), stem.with_suffix(suffix), z=pred.z[rows],
                                       force=force))
        return out

    return write


def _posed_particles(run_dir: Path, pred, what: str):
    """The run's particles.star in the predictions' order (poses, CTF, stacks), or None with a log line
    saying `what` is skipped when its images cannot be read."""
    src, stack = _particle_source(run_dir, ".star")
    if stack is None or stack.images is None or stack.A is None:
        log.info("no %s: %s has no readable images with poses", what, src or run_dir)
        return None
    return stack.take(_rows_for(stack, src, pred.ids))


def member_map_for_run(run_dir: Path, pred):
    """A `report.MemberMap`: Wiener back-projection (`reconstruct`) of a cluster's particles at the poses and
    CTF of the run's particles.star; None (with a log line) when the run's particle images cannot be read."""
    from cryofire_ext.recon.reconstruct import reconstruct

    posed = _posed_particles(run_dir, pred, "back-projected cluster maps")
    if posed is None:
        return None

    def member_map(rows: np.ndarray):
        sub = posed.take(rows)
        vol = reconstruct(sub.images, sub.A, sub.shifts_A, sub.ctf, sub.pixel_size_A)
        return vol.numpy(), float(sub.pixel_size_A)

    return member_map


def _particle_variability(run_dir: Path, pred):
    """A `report.ParticleVariability`: `variability.variability` of the run's particles.star (poses, CTF,
    stacks) in the predictions' order; None (with a log line) when the images cannot be read."""
    from cryofire_ext.analysis.variability import variability

    posed = _posed_particles(run_dir, pred, "3D variability")
    if posed is None:
        return None

    def compute(components: int, resolution_A: float, seed: int):
        return variability(posed.images, posed.A, posed.shifts_A, posed.ctf, posed.pixel_size_A,
                           n_components=components, resolution_A=resolution_A, seed=seed)

    return compute


def register(app: typer.Typer) -> None:
    """Add `analyze`, `eval-vol` and `select` to `app`."""

    @app.command("analyze")
    def analyze(
        run: Path = typer.Argument(..., help=f"Run folder of `cryofire train` (holds {PREDICTIONS})."),
        out: Optional[Path] = typer.Option(None, "-o", "--out", help="Output folder (default: RUN/analysis)."),
        clusters: Optional[int] = typer.Option(None, "--clusters", "-k",
                                               help="Number of clusters K (default: minimum BIC of a Gaussian "
                                                    "mixture over K = 1..--k-max)."),
        pcs: int = typer.Option(2, "--pcs", help="Principal components to traverse: maps along PC1..PCN."),
        method: str = typer.Option("gmm", "--method", help="Labels exported: gmm (Gaussian mixture) or kmeans."),
        k_max: int = typer.Option(10, "--k-max", help="Largest K tried when choosing K."),
        steps: int = typer.Option(10, "--steps", help="Maps per PC traversal (5th to 95th percentile)."),
        maps: bool = typer.Option(True, "--maps/--no-maps", help="Make maps with the trained model."),
        subsets: bool = typer.Option(True, "--subsets/--no-subsets",
                                     help="Write one particle subset per cluster (STAR and/or .cs, as the run has)."),
        variability_components: int = typer.Option(
            2, "--variability", help="3D variability components from the particles at their poses (0 = none)."),
        variability_resolution: float = typer.Option(
            20.0, "--variability-resolution", help="Resolution (A) of the 3D variability analysis."),
        seed: int = typer.Option(0, "--seed", help="Seed for k-means, GMM, UMAP and the variability analysis."),
        device: str = typer.Option("cpu", "--device", help="Device for making maps (cpu, cuda, cuda:1)."),
        force: bool = typer.Option(False, "--force", help="Overwrite existing outputs."),
    ) -> None:
        """PCA and clustering of the latent space, maps, per-cluster subsets, plots and an HTML report."""
        from cryofire_ext import analysis
        from integrations import report

        cfg = report.AnalyzeConfig(n_clusters=clusters, method=method, k_max=k_max, n_pcs=pcs, traversal_steps=steps,
                                   maps=maps, subsets=subsets, seed=seed, device=device,
                                   variability_components=variability_components,
                                   variability_resolution_A=variability_resolution)
        pred = analysis.load_run(run).predictions
        writer = _subset_writer(run, pred) if subsets else None
        member_map = member_map_for_run(run, pred) if maps else None
        variab = _particle_variability(run, pred) if variability_components else None
        res = report.analyze_run(run, out, cfg, subset_writer=writer, member_map=member_map,
                                 particle_variability=variab, force=force)
        pops = res.clustering.populations()
        typer.echo(f"K = {res.clustering.k} ({'chosen by BIC' if res.clustering.k_source == 'bic' else 'given'}); "
                   "clusters (1-based): " + ", ".join(f"{j + 1}: {p}" for j, p in enumerate(pops)))
        if res.variability is not None:
            typer.echo(f"3D variability: {res.variability.coords.shape[1]} component(s) at "
                       f"{res.variability.resolution_A:.0f} A; coordinates in {res.out_dir / 'variability.npz'}")
        for note in res.notes:
            typer.echo(note)
        typer.echo(f"report: {res.report}")

    @app.command("eval-vol")
    def eval_vol(
        run: Path = typer.Argument(..., help="Run folder of `cryofire train`."),
        out: Path = typer.Option(..., "-o", "--out", help="Output folder for vol_001.mrc, vol_002.mrc, ..."),
        z: Optional[str] = typer.Option(None, "--z", help='Latent point(s): "z1,z2,...", several separated by ";".'),
        z_file: Optional[Path] = typer.Option(None, "--z-file", help="Points, one per line (text) or a .npy (m, d)."),
        device: str = typer.Option("cpu", "--device", help="Device (cpu, cuda, cuda:1)."),
        force: bool = typer.Option(False, "--force", help="Overwrite existing maps."),
    ) -> None:
        """Maps of the trained model at given latent points."""
        from cryofire_ext import analysis

        zdim = data_z = None
        if (run / PREDICTIONS).is_file():
            preds = analysis.load_run(run).predictions
            zdim, data_z = preds.zdim, preds.z
        points = analysis.read_z_points(z, z_file, zdim=zdim, data_z=data_z)
        source = analysis.load_volume_source(run, device=device)
        paths = analysis.eval_volumes(run, points, out, force=force, source=source)
        typer.echo(f"wrote {len(paths)} map(s) to {out}")

    @app.command("select")
    def select(
        run: Path = typer.Argument(..., help="Run folder of `cryofire train` (analysed by `cryofire analyze`)."),
        out: Path = typer.Option(..., "-o", "--out", help="Subset file: .star (RELION) or .cs (cryoSPARC)."),
        clusters: Optional[str] = typer.Option(None, "--clusters",
                                               help="1-based cluster numbers as shown by analyze: 1,3"),
        min_confidence: Optional[float] = typer.Option(
            None, "--min-confidence",
            help="Keep particles whose pose confidence (cryofirePoseConfidence) is at least this, in [0, 1]."),
        analysis_dir: Optional[Path] = typer.Option(None, "--analysis",
                                                    help="Folder of `cryofire analyze` (default: RUN/analysis)."),
        force: bool = typer.Option(False, "--force", help="Overwrite the output."),
    ) -> None:
        """Write the particles of chosen clusters (1-based numbers), and/or those with a pose confidence of at least
        --min-confidence, with every input column, ready for refinement."""
        from cryofire_ext import analysis

        if out.suffix.lower() not in (".star", ".cs"):
            raise InputError(f"{out}: the subset must be a .star (RELION) or .cs (cryoSPARC) file")
        if clusters is None and min_confidence is None:
            raise InputError("select: give --clusters, --min-confidence or both")
        if min_confidence is not None and not 0.0 <= min_confidence <= 1.0:
            raise InputError(f"--min-confidence {min_confidence}: expected a number in [0, 1]")
        pred = analysis.load_run(run).predictions
        keep = np.ones(len(pred), dtype=bool)
        said = []
        if clusters is not None:
            clus, ids = analysis.load_clustering((analysis_dir or run / "analysis") / "clusters.npz")
            if len(ids) != len(pred.ids) or np.any(ids != pred.ids):
                raise InputError(f"{analysis_dir or run / 'analysis'}/clusters.npz: its particles differ from "
                                 f"{run}/{PREDICTIONS}; run `cryofire analyze {run} --force` again")
            wanted = analysis.parse_cluster_numbers(clusters, clus.k)
            keep &= np.isin(np.arange(len(pred)), analysis.cluster_members(clus.labels, wanted))
            said.append(f"of cluster(s) {', '.join(str(c + 1) for c in wanted)} (1-based)")
        if min_confidence is not None:
            if pred.pose_confidence is None:
                raise InputError(f"{run}/{PREDICTIONS} has no pose confidences (a run exported before them); "
                                 f"export it again (`cryofire train ... --resume`) or `cryofire predict` with it")
            keep &= pred.pose_confidence >= min_confidence
            said.append(f"with pose confidence >= {min_confidence:g}")
        rows = np.flatnonzero(keep)
        if len(rows) == 0:
            raise InputError(f"no particle of {run} is {' and '.join(said)}; nothing written")
        src, stack = _particle_source(run, out.suffix.lower())
        if stack is None:
            raise InputError(f"{run}: the run folder holds no {PARTICLES_STAR} or {PARTICLES_CS} to select from")
        from integrations.formats import write_particles

        map_rows = _rows_for(stack, src, pred.ids)
        write_particles(stack.take(map_rows[rows]), out, z=pred.z[rows], force=force)
        typer.echo(f"wrote {len(rows)} of {len(pred)} particles {' and '.join(said)} from {src.name} to {out}")
