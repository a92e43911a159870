"""A training job end to end: read particles -> train -> predict -> export (STAR, .cs, maps, plot).

Also the demo: simulate the bundled two-state phantom, run the job, score it against the truth.
Run folder layout (`out_dir`, names owned by `run_folder`): config.json, refine.json, checkpoints/last.pt
(+ epoch_NNNN.pt), history.json, references.pt (and landscape.pt with z_mode "continuous"), predictions.npz,
particles.star (RELION 3.1 + cryofireZ*, rlnClassNumber ours, cryofirePoseConfidence, cryofireClassProbability),
particles.cs (alignments3D with our class and its probability + cryofire/pose_confidence + components_mode_K),
classes.json, maps/*.mrc (mean z and each class's mean z, numbered as rlnClassNumber), loss.png.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from cryofire_ext.errors import InputError
from cryofire_ext.particles import ParticleStack
from cryofire_ext.results import Predictions
from cryofire_ext.safe_io import atomic_path, check_writable
from cryofire_ext.refine.config import RefineConfig
from cryofire_ext.train.config import TrainConfig
from integrations.run_folder import (CHECKPOINTS, CLASSES, CONFIG, LAST_CHECKPOINT, LOSS_PLOT, MAPS, PARTICLES_CS,
                                     PARTICLES_STAR, PREDICTIONS, REFINE)

if TYPE_CHECKING:
    from cryofire_ext.predict import TrainedModel

log = logging.getLogger(__name__)

OUTPUT_FILES = (PREDICTIONS, PARTICLES_STAR, PARTICLES_CS, LOSS_PLOT, CLASSES, REFINE)


@dataclass
class JobOutputs:
    out_dir: Path
    particles_star: Path
    particles_cs: Path
    predictions: Path
    maps: list[Path]
    loss_plot: Path
    classes: dict = field(default_factory=dict)


def load_particles(particles, datadir=None) -> ParticleStack:
    """A ParticleStack from a path (.star/.cs/.mrcs/.mrc/.txt) or as given; images required, at least one particle."""
    if isinstance(particles, ParticleStack):
        if len(particles) == 0:
            raise InputError("no particles: the particle set is empty")
        particles.require_images()
        return particles
    from integrations.formats import read_particles

    stack = read_particles(particles, datadir=datadir, require_images=True)
    if len(stack) == 0:
        raise InputError(f"{particles}: the file has no particles (its particle table has no rows); expected at "
                         "least one particle to train on or predict")
    if stack.ctf is not None and np.all(stack.ctf.defocus_u_A == 0) and np.all(stack.ctf.cs_mm == 0):
        log.warning("%s carries no CTF (bare image stack): training treats the images as CTF-free "
                    "(CTF = 1); give a STAR or .cs file to model the CTF", particles)
    return stack


def run_training_job(particles, out_dir, config: TrainConfig, *, datadir=None,
                     should_stop: Callable[[], bool] | None = None, force: bool = False,
                     argv: list[str] | None = None, on_progress: Callable[[dict], None] | None = None,
                     resume: bool = False, refine: RefineConfig | None = None) -> JobOutputs:
    """Train on `particles`, then predict and refine every particle and export; returns the outputs' paths.

    Refuses (before training) to overwrite existing exports unless `force` or `resume`. `refine`: the refinement
    after training (None: the run's saved `refine.json` on a resume, else the defaults); saved as `refine.json`.
    """
    from cryofire_ext.train import distributed
    from integrations.run_folder import run_folder

    out = Path(out_dir)
    check_runtime(config)
    overwrite = force or resume
    check_outputs(out, overwrite)
    refine = refine or saved_refine_config(out if resume else None)
    main = int(os.environ.get("RANK", "0")) == 0  # torchrun: rank 0 holds the folder for the whole world
    try:
        with run_folder(out, what="cryofire run") if main else contextlib.nullcontext(out):
            return _train_and_export(particles, out, config, refine, datadir, should_stop, overwrite, argv,
                                     on_progress, resume)
    finally:
        distributed.finish()


def _train_and_export(particles, out: Path, config, refine, datadir, should_stop, overwrite, argv, on_progress,
                      resume) -> JobOutputs:
    import torch.distributed as dist

    from cryofire_ext.train.trainer import train
    from integrations.formats import input_files
    from integrations.run_folder import check_inputs_kept

    stack = load_particles(particles, datadir)
    check_inputs_kept(out, input_files(particles, stack))
    train(stack, out, config, resume=resume, should_stop=should_stop, on_progress=on_progress, argv=argv)
    if dist.is_initialized() and dist.get_rank() != 0:  # under torchrun only rank 0 predicts and exports
        return JobOutputs(out, out / PARTICLES_STAR, out / PARTICLES_CS, out / PREDICTIONS, [],
                          out / LOSS_PLOT)
    return export_run(out, stack, refine=refine, device=None, force=overwrite, fit=config, should_stop=should_stop,
                      on_progress=on_progress)


def check_outputs(out: Path, force: bool) -> None:
    """Refuse, before anything runs, to replace a job's exports in `out` (OUTPUT_FILES, maps/*.mrc) unless `force`."""
    for name in OUTPUT_FILES:
        check_writable(out / name, force)
    maps = sorted((out / MAPS).glob("*.mrc")) if (out / MAPS).is_dir() else []
    if maps and not force:
        raise InputError(f"{out / MAPS} already holds maps ({maps[0].name}, ...); pass --force to replace them or "
                         "choose another output folder")


def check_runtime(config: TrainConfig) -> None:
    """Refuse a device or precision this machine cannot run (no CUDA, bf16 on the CPU) before anything is written."""
    from cryofire_ext.train.distributed import resolve_device
    from cryofire_ext.train.trainer import training_autocast

    training_autocast(config.precision, resolve_device(config.device))


def saved_refine_config(run_dir) -> RefineConfig:
    """The refinement settings saved in `run_dir` (`refine.json`; for runs made before it, the `polish_*` fields of
    `config.json`), or the defaults when `run_dir` is None or holds neither."""
    if run_dir is None:
        return RefineConfig()
    run_dir = Path(run_dir)
    if (run_dir / REFINE).is_file():
        return RefineConfig.load(run_dir / REFINE)
    return RefineConfig(**RefineConfig.fields_in(job_config_fields(run_dir / CONFIG)))


def job_config_fields(path) -> dict:
    """The fields of a JSON config file (a saved `TrainConfig` or a plain object), {} when unreadable or absent;
    a job config file may hold the refinement fields beside the training ones."""
    try:
        payload = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    payload = payload.get("config", payload) if isinstance(payload, dict) else {}
    return payload if isinstance(payload, dict) else {}


def predict_job(run_dir, particles, out_dir, *, datadir=None, force: bool = False,
                refine: RefineConfig | None = None, device: str | None = None) -> JobOutputs:
    """`cryofire predict`: the run in `run_dir` over `particles` (path or stack), exported into `out_dir`
    (locked while written; nothing left there when it fails; never over an input file). `refine` None: the run's
    saved refinement settings. Under torchrun (WORLD_SIZE > 1) every rank aligns its block of the new particles
    (`pipeline.infer`) and rank 0 alone holds the folder and writes."""
    from cryofire_ext.train import distributed
    from integrations.formats import input_files
    from integrations.run_folder import check_inputs_kept, run_folder

    out = Path(out_dir)
    check_outputs(out, force)
    refine = refine or saved_refine_config(run_dir)
    env = distributed.setup(device or "cpu") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    main = env is None or env.is_main
    try:
        with run_folder(out, what="cryofire predict", resumable=()) if main else contextlib.nullcontext(out):
            stack = load_particles(particles, datadir)
            check_inputs_kept(out, input_files(particles, stack))
            return export_run(run_dir, stack, out_dir=out, refine=refine, device=device, force=force, write=main)
    finally:
        distributed.finish()


def export_run(run_dir, stack: ParticleStack, *, out_dir=None, refine: RefineConfig | None = None,
               device: str | None = None, force: bool = False, fit: TrainConfig | None = None,
               should_stop: Callable[[], bool] | None = None,
               on_progress: Callable[[dict], None] | None = None, write: bool = True) -> JobOutputs:
    """Inference over `stack` with the run in `run_dir` (`pipeline.infer`: the model pass and the refinement
    `refine`, None: the run's saved settings) on `device` (None: the run's), exported into `out_dir` (default
    `run_dir`) by `export_predictions`. `fit` (the training job, `stack` = the training particles): the job's
    config, whose landscape settings hold (a resume may change them): with `z_mode` "continuous" the landscape
    stage is trained on the refined poses first (`pipeline.fit_landscape`; `should_stop` / `on_progress` as in
    training); with "classes" a landscape left by an earlier export is removed; then the run's references are
    built from the final poses (`pipeline.fit_references`), against which `predict` aligns new particles.
    `write` False: compute only (a torchrun rank other than 0)."""
    from cryofire_ext import run_layout
    from cryofire_ext.pipeline import fit_landscape, fit_references, infer
    from cryofire_ext.predict import load_trained

    refine = refine or saved_refine_config(run_dir)
    if fit is not None:  # a landscape or references of an earlier export belong to other poses
        for name in (run_layout.LANDSCAPE, run_layout.REFERENCES):
            (Path(run_dir) / name).unlink(missing_ok=True)
    tm = load_trained(run_dir, device=device)
    if fit is not None:
        tm.config = fit
    preds = infer(tm, stack, refine)
    if fit is not None and fit.z_mode == "continuous":
        preds = fit_landscape(tm, stack, preds, should_stop=should_stop, on_progress=on_progress)
    if fit is not None:
        preds = fit_references(tm, stack, preds, refine)
    out = Path(out_dir) if out_dir is not None else Path(run_dir)
    if not write:  # another rank of a torchrun predict: rank 0 writes
        return JobOutputs(out, out / PARTICLES_STAR, out / PARTICLES_CS, out / PREDICTIONS, [], out / LOSS_PLOT)
    return export_predictions(preds, tm, stack, out, refine, force=force)


def export_predictions(preds: Predictions, tm: "TrainedModel", stack: ParticleStack, out: Path, refine: RefineConfig,
                       *, force: bool = False) -> JobOutputs:
    """Write `preds` of `stack` (made with the trained run `tm` and the settings `refine`) into `out`:
    predictions.npz, particles.star (rlnClassNumber = class + 1), particles.cs (alignments3D/class = class),
    refine.json, classes.json (counts, each class's mean z), the decoder's maps (maps/mean_z.mrc at the mean z,
    by the landscape when the run has one; maps/class_NN.mrc, the pose model's map of class NN =
    rlnClassNumber; maps/consensus.mrc without z) and loss.png."""
    from cryofire_ext.analysis import write_maps
    from cryofire_ext.images import release_freed_heap, write_mrc
    from integrations.cryosparc import write_cs
    from integrations.relion import write_star

    out = Path(out)
    pred_path = preds.save(out / PREDICTIONS, force=force)
    posed = stack.with_poses(preds.A, preds.shifts_A)
    z = preds.z if preds.zdim else None
    conf = preds.confidences()
    star = write_star(posed, out / PARTICLES_STAR, z=z, classes=preds.class_id, force=force, confidences=conf)
    cs = write_cs(posed, out / PARTICLES_CS, z=z, classes=preds.class_id, force=force, confidences=conf)
    release_freed_heap()  # the writers' temporaries (pandas' strings) leave before the maps' working memory comes
    refine.save(out / REFINE, force=force)
    K = preds.n_classes
    counts = np.bincount(preds.class_id, minlength=K)
    info = {"k": K, "labels": preds.class_id}
    if preds.zdim:
        centres = np.stack([preds.z[preds.class_id == k].mean(0) if counts[k] else np.full(preds.zdim, np.nan)
                            for k in range(K)]).astype(np.float32)
        info["centres"] = centres
        maps = write_maps(tm, preds.z.mean(0, keepdims=True), out / MAPS, ["mean_z"], force=force)
    else:
        maps = write_maps(tm, np.zeros((1, 0), np.float32), out / MAPS, ["consensus"], force=force)
    with atomic_path(out / CLASSES, force=force) as tmp:
        tmp.write_text(json.dumps({"k": K, "numbering": "rlnClassNumber (1-based) = alignments3D/class + 1",
                                   "counts": counts.tolist(),
                                   "mean_z": info["centres"].tolist() if preds.zdim else None}, default=float))
    if K > 1:  # the pose model's map of each class (at its class code), numbered as rlnClassNumber
        vols = tm.class_volumes()
        maps += [write_mrc(out / MAPS / f"class_{k + 1:02d}.mrc", vols[k], tm.pixel_size_A, force=force)
                 for k in range(K) if counts[k]]
    plot = loss_plot(tm.run_dir, out / LOSS_PLOT, force=force)
    return JobOutputs(out, star, cs, pred_path, maps, plot, info)


def loss_plot(run_dir, path, force: bool = False) -> Path:
    """PNG of the training loss against images seen, from `run_dir/history.json` (empty axes when none)."""
    from cryofire_ext.analysis import loss_history
    from cryofire_ext.analysis.plots import loss_curve

    x, y, xlabel = loss_history(Path(run_dir)) or (np.zeros(0), np.zeros(0), "images seen")
    return loss_curve(x, y, path, xlabel=xlabel, force=force)


# ---------------------------------------------------------------- demo
DEMO_CONFIG = dict(zdim=2, epochs=8, batch_size=32, lr=3e-4, lr_warmup_images=1000, symmetric=False,
                   pose_only_images=2000, march_images=6000, distill_images=4000, warm_images=800, warm_box=24,
                   warm_steps=300, warm_rotations=8000, warm_max_shift_px=2.0)


@dataclass
class DemoSettings:
    """Size of the demo (defaults finish in well under 10 minutes on 2 CPU cores)."""

    n: int = 2000
    box: int = 32
    snr: float = 1.0
    shift_px: float = 2.0
    mix: tuple = (0.5, 0.5)
    seed: int = 0
    config: dict = field(default_factory=dict)


def run_demo(out_dir, settings: DemoSettings | None = None, *, force: bool = False,
             on_progress: Callable[[dict], None] | None = None, argv: list[str] | None = None) -> dict:
    """Simulate the two-state phantom into `out_dir/data`, train into `out_dir/run`, score against the truth.

    Returns (and writes to `out_dir/metrics.json`) median rotation error (deg, after global
    alignment, either hand), median shift error (px), clustering error, FSC of each class map
    to its matched true state, and the run's wall time.
    """
    import time

    from cryofire_ext.phantom import phantom_maps
    from cryofire_ext.simulate import simulate
    from integrations.simulated import with_absolute_names, write_dataset

    s = settings or DemoSettings()
    out = Path(out_dir)
    cfg = TrainConfig(**{**DEMO_CONFIG, "seed": s.seed, **s.config})
    check_runtime(cfg)
    check_writable(out / "metrics.json", force)
    previous = out / "run" / CHECKPOINTS
    if (out / "run" / LAST_CHECKPOINT).exists():  # checked before anything is written
        if not force:
            raise InputError(f"{out / 'run'} already holds a training run ({LAST_CHECKPOINT}); pass --force to "
                             "run the demo again from scratch, or choose another output folder")
        shutil.rmtree(previous)  # --force: the demo starts over (its data and exports are overwritten too)
    maps, apix = phantom_maps(s.box, states=len(s.mix))
    ds = simulate(maps, s.n, mix=list(s.mix), snr=s.snr, shift_px=s.shift_px, pixel_size_A=apix, seed=s.seed)
    write_dataset(ds, out / "data", map_names=[f"phantom state {k}" for k in range(len(maps))], force=force)
    t0 = time.monotonic()
    # the images stay in memory; the run's particles.star / .cs name the written stack by absolute path so they
    # resolve from the run folder (relion_reconstruct, `cryofire analyze`'s back-projected maps)
    job = run_training_job(with_absolute_names(ds, out / "data"), out / "run", cfg, force=force,
                           on_progress=on_progress, argv=argv)
    wall = time.monotonic() - t0
    metrics = score_run(job, ds)
    metrics.update({"wall_s": wall, "n": s.n, "box": s.box, "snr": s.snr, "pixel_size_A": apix,
                    "config": cfg.to_dict(), "run_dir": str(job.out_dir)})
    with atomic_path(out / "metrics.json", force=force) as tmp:
        tmp.write_text(json.dumps(metrics, indent=2, default=float))
    return metrics


def score_run(job: JobOutputs, ds) -> dict:
    """Metrics of a run's predictions against a SimulatedDataset's truth."""
    from cryofire_ext.analysis import map_fsc
    from cryofire_ext.metrics import clustering_error, rotation_error_deg, shift_error_px

    preds = Predictions.load(job.predictions)
    rot = rotation_error_deg(preds.A, ds.A)
    px = ds.pixel_size_A
    sh, _ = shift_error_px(preds.shifts_A / px, ds.shifts_A / px, preds.A)
    m = {"median_rotation_error_deg": float(np.median(rot.errors_deg)), "hand_flipped": bool(rot.flipped),
         "median_shift_error_px": float(np.median(sh))}
    if preds.n_classes > 1:
        labels = preds.class_id
        m["clustering_error"] = clustering_error(labels, ds.state)
        fsc = {}
        import mrcfile

        for j in range(preds.n_classes):
            members = ds.state[labels == j]
            if len(members) == 0:
                continue
            true_state = int(np.bincount(members).argmax())
            with mrcfile.open(job.out_dir / MAPS / f"class_{j + 1:02d}.mrc") as mrc:
                vol = np.asarray(mrc.data, dtype=np.float64)
            truth = ds.maps[true_state]
            if rot.flipped:  # the run found the mirror image: compare with the mirrored truth (z -> -z)
                truth = np.roll(truth[::-1], 1, axis=0)
            freq, curve = map_fsc(align_map(vol, rot.global_rotation), truth, px)
            below = np.nonzero(curve < 0.5)[0]
            res = float(1.0 / freq[below[0]]) if len(below) and freq[below[0]] > 0 else float(2 * px)
            fsc[f"class_{j + 1:02d}"] = {"true_state": true_state, "fsc05_resolution_A": res,
                                       "members": int((labels == j).sum())}
        m["maps_fsc"] = fsc
    return m


def align_map(vol: np.ndarray, G: np.ndarray) -> np.ndarray:
    """`vol` `(D, D, D)` [z, y, x] in the run's frame, resampled into the truth's frame.

    With `A_pred = A_true G` (metrics.rotation_error_deg), `V_pred(x) = V_true(G x)`, so the
    aligned map is `V_pred(G^T y)`. Trilinear; the grid's centre is `D/2` (our convention).
    """
    import torch
    import torch.nn.functional as F

    D = vol.shape[0]
    v = torch.as_tensor(np.ascontiguousarray(vol), dtype=torch.float64)[None, None]
    ax = torch.arange(D, dtype=torch.float64) - D // 2
    zz, yy, xx = torch.meshgrid(ax, ax, ax, indexing="ij")
    pts = torch.stack((xx, yy, zz), -1) @ torch.as_tensor(G, dtype=torch.float64)  # rows y^T G = (G^T y)^T
    idx = pts + D // 2
    grid = (2.0 * idx + 1.0) / D - 1.0  # align_corners=False: index i -> (2i + 1)/D - 1
    out = F.grid_sample(v, grid[None], mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[0, 0].numpy()
