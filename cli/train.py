"""`cryofire train`, `cryofire predict`, `cryofire demo`: parse, call one library function, report."""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from integrations.run_folder import CONFIG, MAPS, TRAIN_LOG

log = logging.getLogger("cryofire")


@contextlib.contextmanager
def _progress():
    """A rich progress bar, shown from the first training step on (an error before it prints no bar), and the
    `on_progress` callback feeding it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from cli.main import err_console

    prog = Progress(TextColumn("{task.fields[stage]} epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), console=err_console,
                    transient=False)
    tasks: list = []

    def on_progress(rec: dict) -> None:
        if not tasks:
            prog.start()
            tasks.append(prog.add_task("train", total=rec["batches"], epoch="", loss=rec["loss"], stage=""))
        prog.update(tasks[0], total=rec["batches"], completed=rec["batch"] + 1, stage=rec.get("stage", "train"),
                    epoch=f"{rec['epoch'] + 1}/{rec['epochs']}", loss=rec["loss"])

    try:
        yield on_progress
    finally:
        if tasks:
            prog.stop()


class _RunLog(logging.FileHandler):
    """A FileHandler that makes its folder when it first writes (the demo logs before its run folder exists)."""

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


def run_log_handler(path: Path) -> logging.Handler:
    """train.log in the run folder, opened at the first record (a command refused early writes none)."""
    handler = _RunLog(path, delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    logging.getLogger().addHandler(handler)
    return handler


def register(app: typer.Typer) -> None:
    """Add train, predict and demo to `app`."""

    @app.command("train")
    def train_cmd(
        particles: Path = typer.Argument(..., help="Particles: .star, .cs, .mrcs/.mrc or .txt (bare stacks have no "
                                                   "CTF: trained as CTF-free images, with a warning)."),
        out: Path = typer.Option(..., "-o", "--out", help="Run folder."),
        zdim: Optional[int] = typer.Option(None, "--zdim", help="Conformation dims (0 = homogeneous; default 8)."),
        epochs: Optional[int] = typer.Option(None, "--epochs", help="Passes over the particles (default 20)."),
        max_minutes: Optional[float] = typer.Option(None, "--max-minutes", help="Stop (checkpointed) after M minutes."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Global batch (default 32)."),
        seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (default 0)."),
        datadir: Optional[Path] = typer.Option(None, "--datadir", help="Folder holding the image stacks."),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
        config: Optional[Path] = typer.Option(None, "--config", help="JSON TrainConfig (flags override it)."),
        device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda."),
        precision: Optional[str] = typer.Option(None, "--precision",
                                                help="auto (bf16 autocast on CUDA, fp32 on the CPU), bf16 or fp32."),
        train_box: Optional[int] = typer.Option(None, "--train-box", help="Fourier-crop images to this box."),
        warm_start: Optional[str] = typer.Option(None, "--warm-start", help="search (default) or none."),
        warm_classes: Optional[int] = typer.Option(None, "--warm-classes",
                                                   help="Classes the warm start splits the particles into "
                                                        "(default 2; 1 = none; ignored for --zdim 0)."),
        z_mode: Optional[str] = typer.Option(None, "--z-mode",
                                             help="classes (z is the class code) or continuous (after training, "
                                                  "z is each particle's position along the main motion, at its "
                                                  "refined pose: the conformational landscape). Default classes."),
        landscape_nodes: Optional[int] = typer.Option(None, "--landscape-nodes",
                                                      help="Maps along the landscape (--z-mode continuous; "
                                                           "default 16)."),
        polish_rounds: Optional[int] = typer.Option(None, "--polish-rounds",
                                                    help="Rounds of per-particle refinement of pose, shift and class "
                                                         "after training (default 3, or the run's on --resume; 0 = the "
                                                         "model's own)."),
        polish_global_search: Optional[bool] = typer.Option(
            None, "--polish-global-search/--no-polish-global-search",
            help="Search every particle globally in every refinement round (default on)."),
        search_rotations: Optional[int] = typer.Option(None, "--search-rotations",
                                                       help="Rotations of the global search after training, also "
                                                            "kept in the references for predict (default 8000, or "
                                                            "the run's on --resume)."),
        force: bool = typer.Option(False, "--force", help="Overwrite existing exports in --out."),
    ) -> None:
        """Train cryoFIRE on particles with no poses; write poses, z, maps and STAR/.cs files into --out."""
        from cryofire_ext.safe_io import check_output_folder
        from cryofire_ext.train.config import TrainConfig
        from cryofire_ext.refine.config import RefineConfig
        from integrations.job import job_config_fields, run_training_job, saved_refine_config

        cfg = TrainConfig.load(config) if config else TrainConfig()
        if resume and config is None and (out / CONFIG).is_file():
            cfg = TrainConfig.load(out / CONFIG)
        overrides = {"zdim": zdim, "epochs": epochs, "max_minutes": max_minutes, "batch_size": batch_size,
                     "seed": seed, "device": device, "precision": precision, "train_box": train_box, "warm_start": warm_start,
                     "warm_classes": warm_classes, "z_mode": z_mode, "landscape_nodes": landscape_nodes}
        cfg = TrainConfig.from_dict({**cfg.to_dict(), **{k: v for k, v in overrides.items() if v is not None}})
        refine = saved_refine_config(out if resume else None)
        if config:  # a --config file may hold refinement fields beside the training ones
            refine = refine.replace(**RefineConfig.fields_in(job_config_fields(config)))
        refine = refine.replace(polish_rounds=polish_rounds, polish_global_search=polish_global_search,
                                search_rotations=search_rotations)
        check_output_folder(out)
        handler = run_log_handler(out / TRAIN_LOG)
        try:
            with _progress() as on_progress:
                job = run_training_job(particles, out, cfg, datadir=datadir, resume=resume, force=force,
                                       argv=["cryofire", *sys.argv[1:]], on_progress=on_progress,
                                       refine=refine)
        finally:
            logging.getLogger().removeHandler(handler)
            handler.close()
        typer.echo(f"wrote {job.particles_star}, {job.particles_cs}, {job.predictions} and "
                   f"{len(job.maps)} maps in {job.out_dir / MAPS}")

    @app.command("predict")
    def predict_cmd(
        run: Path = typer.Argument(..., help="A training run folder."),
        particles: Path = typer.Argument(..., help="Particles (.star/.cs/.mrcs/.txt) with the run's box and pixel size."),
        out: Path = typer.Option(..., "-o", "--out", help="Output folder."),
        datadir: Optional[Path] = typer.Option(None, "--datadir", help="Folder holding the image stacks."),
        force: bool = typer.Option(False, "--force", help="Overwrite existing outputs."),
        polish_rounds: Optional[int] = typer.Option(None, "--polish-rounds",
                                                    help="Pose refinement rounds (default: the run's; 0 = none)."),
        polish_global_search: Optional[bool] = typer.Option(
            None, "--polish-global-search/--no-polish-global-search",
            help="Global search in every refinement round (default: the run's)."),
        new_particles: Optional[str] = typer.Option(
            None, "--new-particles",
            help="Particles the run was not trained on: 'references' aligns them to the run's saved maps (fast, "
                 "default); 'refine' runs the model and the polish rounds against maps of these particles."),
        device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda (default: the run's)."),
    ) -> None:
        """Run a trained model over any particles (new images included): predictions, STAR, .cs and maps."""
        from integrations.job import predict_job, saved_refine_config

        refine = saved_refine_config(run).replace(polish_rounds=polish_rounds, polish_global_search=polish_global_search,
                                                  new_particles=new_particles)
        job = predict_job(run, particles, out, datadir=datadir, force=force, refine=refine, device=device)
        typer.echo(f"wrote {job.predictions}, {job.particles_star}, {job.particles_cs}")

    @app.command("demo")
    def demo_cmd(
        out: Path = typer.Option(..., "-o", "--out", help="Output folder (data/, run/, metrics.json)."),
        n: int = typer.Option(2000, "--n", help="Particles to simulate."),
        snr: float = typer.Option(1.0, "--snr", help="Signal-to-noise ratio of the simulated images."),
        epochs: Optional[int] = typer.Option(None, "--epochs", help="Training epochs (default 8)."),
        seed: int = typer.Option(0, "--seed"),
        device: Optional[str] = typer.Option(None, "--device", help="auto (default), cpu or cuda."),
        precision: Optional[str] = typer.Option(None, "--precision", help="auto (default), bf16 or fp32."),
        force: bool = typer.Option(False, "--force", help="Overwrite existing outputs."),
    ) -> None:
        """Simulate the bundled two-state phantom, train, predict, export, and score against the truth."""
        from cryofire_ext.safe_io import check_output_folder
        from integrations.job import DemoSettings, run_demo

        extra = {k: v for k, v in (("epochs", epochs), ("device", device), ("precision", precision)) if v is not None}
        check_output_folder(out)
        handler = run_log_handler(out / TRAIN_LOG)
        try:
            with _progress() as on_progress:
                m = run_demo(out, DemoSettings(n=n, snr=snr, seed=seed, config=extra), force=force,
                             on_progress=on_progress, argv=["cryofire", *sys.argv[1:]])
        finally:
            logging.getLogger().removeHandler(handler)
            handler.close()
        typer.echo(f"median rotation error {m['median_rotation_error_deg']:.2f} deg "
                   f"({'mirror hand' if m['hand_flipped'] else 'same hand'}), median shift error "
                   f"{m['median_shift_error_px']:.2f} px, clustering error {m.get('clustering_error', float('nan')):.3f}")
        for name, f in m.get("maps_fsc", {}).items():
            typer.echo(f"{name}: {f['members']} particles, state {f['true_state']}, FSC=0.5 at "
                       f"{f['fsc05_resolution_A']:.1f} A")
        typer.echo(f"metrics in {out / 'metrics.json'}, maps in {out / 'run' / MAPS}, {m['wall_s']:.0f} s")
