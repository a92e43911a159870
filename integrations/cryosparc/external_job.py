"""cryoSPARC external job: train on a cryoSPARC particle output, save poses, latents and volumes back.

Built on cryosparc-tools 5.x (`CryoSPARC`, `ProjectController.create_external_job`,
`ExternalJobController.add_input / connect / load_input / add_output / save_output /
run / log / log_plot / upload`). The job:

1. checks the source output (`J42.particles`) exists and carries `blob` and `ctf`;
2. creates an External job in the workspace, adds and connects a `particles` input
   (slots `blob`, `ctf`), loads it, resolves `blob/path` against the project directory;
3. trains (`integrations.job.run_training_job`) into a local run folder;
4. saves a `particles` output that passes the input through and adds `alignments3D`
   (`pose` = -rotvec(A) in radians, `shift` in pixels of `alignments3D/psize_A`, same sign
   as RELION's origin; `psize_A`; `class` = the run's 0-based classes, `class_posterior` 1) and
   `components_mode_K` (`component` = K, `value` = z_K), built by `predictions.alignment_columns`;
5. uploads each map as a `volume_N` output, and logs lines, the loss plot and a latent plot.

Everything after the job is created runs inside `job.run()`, so any error marks the job
failed with its traceback. Credentials come from arguments, `CRYOSPARC_EMAIL` /
`CRYOSPARC_PASSWORD`, or a session saved by `python -m cryosparc.tools login`; they are
never logged.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

from cryofire_ext.errors import InputError
from cryofire_ext.results import Predictions
from integrations.cryosparc.predictions import alignment_columns

if TYPE_CHECKING:
    from cryosparc.dataset import Dataset
    from cryosparc.tools import CryoSPARC

logger = logging.getLogger(__name__)

INPUT_NAME = "particles"
INPUT_SLOTS = ("blob", "ctf")
OUTPUT_NAME = "particles"
SOURCE_PATTERN = re.compile(r"^(J\d+)\.([A-Za-z][A-Za-z0-9_]*)$")


@dataclass
class CryoSPARCRunResult:
    """What `run_cryosparc_job` made: the new job's uid, the local run folder, the saved
    particle output (a cryosparc-tools Dataset) and the job-relative paths of the volumes."""

    project_uid: str
    job_uid: str
    run_dir: Path
    particles: Any
    volumes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- connection
def connect_cryosparc(url: str | None = None, *, email: str | None = None, password: str | None = None,
                      env: Mapping[str, str] | None = None) -> "CryoSPARC":
    """Open a cryosparc-tools session.

    `url` (or `CRYOSPARC_BASE_URL`) is the address of the web app, e.g. http://host:39000.
    Credentials: `email`/`password`, else `CRYOSPARC_EMAIL`/`CRYOSPARC_PASSWORD`, else a
    session saved by `python -m cryosparc.tools login --url URL`. Raises InputError (without
    the password) when the URL or credentials are missing or the server refuses them.
    """
    env = os.environ if env is None else env
    url = url or env.get("CRYOSPARC_BASE_URL")
    if not url:
        raise InputError("cryoSPARC: no server URL. Pass --url http://HOST:PORT (the address you open in the "
                         "browser, e.g. http://localhost:39000) or set CRYOSPARC_BASE_URL.")
    email = email or env.get("CRYOSPARC_EMAIL") or None
    password = password or env.get("CRYOSPARC_PASSWORD") or None
    from cryosparc.auth import InstanceAuthSessions
    from cryosparc.tools import CryoSPARC

    shown = mask_url(url)
    if not (email and password) and InstanceAuthSessions.load().find(url, email) is None:
        raise InputError(f"cryoSPARC: no credentials for {shown}. Set CRYOSPARC_EMAIL and CRYOSPARC_PASSWORD in "
                         "the environment, or log in once with `python -m cryosparc.tools login --url "
                         f"{shown}` (cryosparc-tools saves a session token).")
    try:
        return CryoSPARC(url, host=None, base_port=None, email=email, password=password)
    except Exception as exc:  # connection, version or authentication failure
        text = _scrub(str(exc), password, url)
        raise InputError(f"cryoSPARC: could not connect to {shown} as {email or 'the saved session user'}: "
                         f"{' '.join(text.split())}") from None


def mask_url(url: str) -> str:
    """`url` with any `user:password@` part replaced by `***@` (for messages and logs)."""
    scheme, sep, rest = str(url).rpartition("://")
    host_part, slash, path = rest.partition("/")
    if "@" in host_part:
        host_part = "***@" + host_part.rpartition("@")[2]
    return f"{scheme}{sep}{host_part}{slash}{path}"


def _scrub(text: str, secret: str | None, url: str | None = None) -> str:
    """`text` without the password nor the credentials of `url` (in any spelling that contains them)."""
    if url:
        text = text.replace(str(url), mask_url(url))
        userinfo = str(url).rpartition("://")[2].partition("/")[0].rpartition("@")[0]
        for part in filter(None, (userinfo, *userinfo.split(":", 1)[1:])):
            text = text.replace(part, "***")
    return text.replace(secret, "***") if secret else text


# --------------------------------------------------------------------------- datasets
def parse_source(particles: str) -> tuple[str, str]:
    """'J42.particles' -> ('J42', 'particles'); InputError otherwise."""
    match = SOURCE_PATTERN.match(particles.strip())
    if not match:
        raise InputError(f"cryoSPARC: --particles {particles!r} must name a job output as JOB.OUTPUT, e.g. "
                         "J42.particles (the job's uid, a dot, and the output name shown in its Outputs tab)")
    return match.group(1), match.group(2)


# --------------------------------------------------------------------------- the job
def check_source(cs: "CryoSPARC", project_uid: str, source_job: str, source_output: str) -> None:
    """InputError unless `source_job`'s output `source_output` exists and carries blob and ctf slots."""
    try:
        job = cs.find_job(project_uid, source_job)
        outputs = job.model.spec.outputs.root
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"cryoSPARC: cannot find job {source_job} in project {project_uid} ({exc})") from None
    if source_output not in outputs:
        names = ", ".join(sorted(outputs)) or "none"
        raise InputError(f"cryoSPARC: job {project_uid} {source_job} has no output {source_output!r} "
                         f"(its outputs: {names}); pass --particles {source_job}.OUTPUT")
    output = outputs[source_output]
    if getattr(output, "type", "particle") != "particle":
        raise InputError(f"cryoSPARC: {source_job}.{source_output} holds {output.type} data, not particles")
    slots = {r.name for r in output.results}
    lacking = [s for s in INPUT_SLOTS if s not in slots]
    if lacking:
        hint = (" Particles without CTF cannot be trained on: connect the output of an extraction or "
                "import job run on CTF-estimated micrographs." if "ctf" in lacking else "")
        raise InputError(f"cryoSPARC: {source_job}.{source_output} has no {' or '.join(lacking)} slot "
                         f"(it has: {', '.join(sorted(slots)) or 'none'}).{hint}")


def _check_loaded(dset: "Dataset", where: str) -> None:
    prefixes = set(dset.prefixes())
    lacking = [s for s in INPUT_SLOTS if s not in prefixes]
    if lacking:
        raise InputError(f"cryoSPARC: the loaded input {where} has no {' or '.join(lacking)} fields "
                         f"(it has: {', '.join(sorted(prefixes))})")


def _latent_figure(z: np.ndarray):
    """A matplotlib Figure: the first two principal components of z (or a histogram when d = 1)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 4), dpi=100)
    ax = fig.add_subplot()
    if z.shape[1] >= 2:
        centred = z - z.mean(axis=0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        pcs = centred @ vt[:2].T
        ax.scatter(pcs[:, 0], pcs[:, 1], s=2, alpha=0.5)
        ax.set_xlabel("PC1 of z")
        ax.set_ylabel("PC2 of z")
    else:
        ax.hist(z[:, 0], bins=50)
        ax.set_xlabel("z")
    ax.set_title(f"latent space ({len(z)} particles, d = {z.shape[1]})")
    return fig


def _progress_logger(job, every_s: float = 10.0) -> Callable[..., None]:
    last = [0.0]

    def report(*args, **kwargs) -> None:
        now = time.monotonic()
        if now - last[0] < every_s:
            return
        last[0] = now
        fields = dict(kwargs)
        for a in args:
            if isinstance(a, dict):
                fields.update(a)
        parts = [str(a) for a in args if not isinstance(a, dict)]
        parts += [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items()]
        job.log("training: " + " ".join(parts), name="progress")

    return report


def _map_info(path: Path) -> tuple[tuple[int, int, int], float]:
    import mrcfile

    with mrcfile.open(path, permissive=True, header_only=True) as mrc:
        h = mrc.header
        shape = (int(h.nz), int(h.ny), int(h.nx))
        voxel = float(mrc.voxel_size.x)
    return shape, voxel


def run_cryosparc_job(cs: "CryoSPARC", project_uid: str, workspace_uid: str, particles: str, config: Any, *,
                      run_dir: str | os.PathLike | None = None, title: str = "cryoFIRE ab initio",
                      force: bool = False, refine: Any = None) -> CryoSPARCRunResult:
    """Create, run and fill a cryoSPARC External job; return what it saved.

    `particles` is the source as 'J42.particles'; `config` a TrainConfig; `run_dir` the local
    run folder (default `./cryofire_<project>_<new job uid>`); `refine` a RefineConfig for the refinement
    after training (None: the defaults). The project directory must be readable from this
    machine (stacks are read from it).
    """
    from integrations.cryosparc import stack_from_dataset
    from integrations.job import run_training_job

    source_job, source_output = parse_source(particles)
    check_source(cs, project_uid, source_job, source_output)
    project = cs.find_project(project_uid)
    job = project.create_external_job(workspace_uid, title=title,
                                      desc=f"cryoFIRE amortized ab initio reconstruction of {particles}")
    job.add_input(type="particle", name=INPUT_NAME, min=1, max=1, slots=list(INPUT_SLOTS),
                  title="Particles to reconstruct")
    job.connect(INPUT_NAME, source_job, source_output)
    with job.run():
        job.log(f"cryoFIRE: input {project_uid} {particles}; loading blob and ctf")
        dset = job.load_input(INPUT_NAME, list(INPUT_SLOTS))
        _check_loaded(dset, f"{source_job}.{source_output}")
        project_dir = Path(str(project.dir))
        if not project_dir.is_dir():
            raise InputError(f"cryoSPARC: the project directory {project_dir} is not visible from this machine; "
                             "run `cryofire cryosparc run` where the project's files are mounted")
        stack = stack_from_dataset(dset, datadir=project_dir, require_images=True,
                                   source=str(project_dir / f"{source_job}.{source_output}"))
        job.log(f"{len(stack)} particles, box {stack.box} px, {stack.pixel_size_A:.4g} A/px; training")
        out_dir = Path(run_dir) if run_dir is not None else Path.cwd() / f"cryofire_{project_uid}_{job.uid}"
        outputs = run_training_job(stack, out_dir, config, force=force, on_progress=_progress_logger(job),
                                   refine=refine,
                                   argv=["cryofire", "cryosparc", "run", "--project", project_uid,
                                         "--particles", particles])
        preds = Predictions.load(outputs.predictions)
        job.log(f"training done: {len(preds)} particles, latent dimension {preds.zdim}; saving outputs")

        slots: list[Any] = ["alignments3D"]
        slots += [{"name": f"components_mode_{k}", "dtype": "components"} for k in range(preds.zdim)]
        out = job.add_output("particle", name=OUTPUT_NAME, slots=slots, passthrough=INPUT_NAME,
                             title="Particles with cryoFIRE poses and latents", alloc=dset)
        rows, cols = alignment_columns(dset, preds)
        if len(rows) != len(dset):
            raise InputError(f"cryoSPARC: {len(dset) - len(rows)} of {len(dset)} input particles got no "
                             "prediction; refusing to save a partial output")
        for name, (_, values) in cols.items():
            if name in out.fields():
                out[name][rows] = values
        job.save_output(OUTPUT_NAME, out)

        volumes: list[str] = []
        for i, map_path in enumerate(sorted(Path(p) for p in outputs.maps)):
            name = f"volume_{i}"
            shape, voxel = _map_info(map_path)
            target = f"cryofire_{map_path.name}"
            job.upload(target, map_path, overwrite=True)
            vol = job.add_output("volume", name=name, slots=["map"], title=f"cryoFIRE map {map_path.stem}", alloc=1)
            vol["map/path"] = [f"{job.uid}/{target}"]
            vol["map/shape"] = [shape]
            vol["map/psize_A"] = [voxel if voxel > 0 else stack.pixel_size_A]
            job.save_output(name, vol)
            volumes.append(f"{job.uid}/{target}")
        if outputs.loss_plot and Path(outputs.loss_plot).is_file():
            job.log_plot(str(outputs.loss_plot), "Training loss", formats=["png"])
        if preds.zdim:
            job.log_plot(_latent_figure(preds.z), "Latent coordinates z (PCA)", formats=["png"])
        job.log(f"saved {OUTPUT_NAME} ({len(out)} particles) and {len(volumes)} volume(s); local run folder "
                f"{out_dir}")
    return CryoSPARCRunResult(project_uid=project_uid, job_uid=job.uid, run_dir=out_dir, particles=out,
                              volumes=volumes)
