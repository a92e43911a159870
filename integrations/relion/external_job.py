"""RELION External job: run cryoFIRE training from a RELION 3.1+ pipeline.

RELION runs the program in the project directory as
`PROGRAM --o External/jobNNN/ --in_parts particles.star [--in_mics X --in_3dref Y ...] --j N [--label value ...]`
(user parameters come as `--label value` pairs from the job's Params tab). This module
turns that command line into a training run and honours RELION's job contract:

- outputs go into `--o`: particles.star (our poses and latents), maps/*.mrc, and
  `RELION_OUTPUT_NODES.star` naming them with RELION 3.1 node types (particles
  `NODE_PART_DATA` = 3, maps `NODE_3DREF` = 6; src/pipeline_jobs.h);
- the run ends with `RELION_JOB_EXIT_SUCCESS`, `RELION_JOB_EXIT_FAILURE` (the error as one
  paragraph in run.err, the traceback only in `cryofire_debug.log`), or
  `RELION_JOB_EXIT_ABORTED` when `RELION_JOB_ABORT_NOW` appears in `--o` during training
  (polled between batches; training checkpoints and stops).

Image paths in the STAR file are resolved relative to the RELION project directory
(the directory RELION runs in, i.e. the current directory unless `project_dir` says
otherwise), as RELION itself does.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from cryofire_ext.errors import InputError, MissingImagesError
from integrations.params import config_from_params, parse_label_values, pop_job_params

logger = logging.getLogger(__name__)

EXIT_SUCCESS = "RELION_JOB_EXIT_SUCCESS"
EXIT_FAILURE = "RELION_JOB_EXIT_FAILURE"
EXIT_ABORTED = "RELION_JOB_EXIT_ABORTED"
ABORT_NOW = "RELION_JOB_ABORT_NOW"
OUTPUT_NODES = "RELION_OUTPUT_NODES.star"
DEBUG_LOG = "cryofire_debug.log"

#: RELION 3.1 node types (src/pipeline_jobs.h): particles STAR, single 3D map.
NODE_PART_DATA = 3
NODE_3DREF = 6
#: RELION 4/5 name node types by label (LABEL_PARTS_CPIPE, LABEL_MAP_CPIPE); written beside the
#: 3.1 number (RELION 3.1 keeps the unknown column). Not tested against a RELION 4/5 install.
NODE_LABELS = {NODE_PART_DATA: "ParticleGroupMetadata.star.relion", NODE_3DREF: "DensityMap.mrc"}

#: Inputs RELION may pass to any External job; accepted and not used by cryoFIRE.
IGNORED_RELION_INPUTS = ("in_mics", "in_movies", "in_coords", "in_3dref", "in_mask", "pipeline_control")

#: Process exit status for each outcome (RELION's own programs use 0 / 1 / 2).
STATUS = {"success": 0, "failure": 1, "aborted": 2}

#: the command named in error messages
WHERE = "relion-external"


@dataclass
class RelionExternalArgs:
    """What RELION passed: output job dir, input particles STAR, threads, user parameters (str values)."""

    out_dir: Path
    in_parts: Path | None
    threads: int = 1
    params: dict[str, str] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)
    argv: list[str] = field(default_factory=list)


def parse_relion_args(argv: Sequence[str]) -> RelionExternalArgs:
    """Parse RELION's External-job command line (see `integrations.params.parse_label_values`); `--o` is required."""
    pairs = parse_label_values(argv, where=WHERE)
    if "o" not in pairs:
        raise InputError("relion-external: --o (the job's output directory, e.g. External/job001/) is required; "
                         "RELION passes it when the program runs as an External job")
    threads_text = pairs.pop("j", "1")
    try:
        threads = max(1, int(threads_text))
    except ValueError:
        raise InputError(f"relion-external: --j must be a whole number of threads, got {threads_text!r}") from None
    out_dir = Path(pairs.pop("o"))
    in_parts = pairs.pop("in_parts", None)
    ignored = {k: pairs.pop(k) for k in IGNORED_RELION_INPUTS if k in pairs}
    return RelionExternalArgs(out_dir=out_dir, in_parts=Path(in_parts) if in_parts else None,
                              threads=threads, params=pairs, ignored=ignored, argv=[str(a) for a in argv])


def write_output_nodes(out_dir: Path, nodes: Sequence[tuple[str | os.PathLike, int]]) -> Path:
    """Write `RELION_OUTPUT_NODES.star` listing `(path relative to the project dir, node type)` pairs."""
    from cryofire_ext.safe_io import atomic_path

    lines = ["", "# version 30001", "", "data_output_nodes", "", "loop_",
             "_rlnPipeLineNodeName #1", "_rlnPipeLineNodeType #2", "_rlnPipeLineNodeTypeLabel #3"]
    for name, node_type in nodes:
        if " " in str(name):
            raise InputError(f"RELION node names cannot contain spaces: {name!r}")
        lines.append(f"{Path(name).as_posix()} {int(node_type)} {NODE_LABELS.get(int(node_type), 'Unknown')}")
    path = Path(out_dir) / OUTPUT_NODES
    with atomic_path(path, force=True) as tmp:
        tmp.write_text("\n".join(lines) + "\n \n")
    return path


def abort_requested(out_dir: Path) -> Callable[[], bool]:
    """A cheap poll (one stat) for RELION's abort request file in `out_dir`."""
    flag = Path(out_dir) / ABORT_NOW
    return flag.exists


def _clear_exit_files(out_dir: Path) -> None:
    """Remove stale exit markers from an earlier run of this job (RELION's programs do the same)."""
    for name in (EXIT_SUCCESS, EXIT_FAILURE, EXIT_ABORTED):
        (out_dir / name).unlink(missing_ok=True)


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


def _same_file_as_stderr(path: Path) -> bool:
    """True when our stderr already is `path` (RELION redirects stderr to run.err)."""
    try:
        err = os.fstat(sys.stderr.fileno())
        st = path.stat()
    except (OSError, ValueError, AttributeError):
        return False
    return (err.st_dev, err.st_ino) == (st.st_dev, st.st_ino)


def _report_error(out_dir: Path, message: str, tb: str) -> None:
    """One paragraph to stderr (which RELION sends to run.err); the traceback to the debug log."""
    paragraph = " ".join(message.split())
    print(f"ERROR: {paragraph}", file=sys.stderr, flush=True)
    run_err = out_dir / "run.err"
    if not _same_file_as_stderr(run_err):
        with open(run_err, "a", encoding="utf-8") as fh:
            fh.write(f"ERROR: {paragraph}\n")
    with open(out_dir / DEBUG_LOG, "a", encoding="utf-8") as fh:
        fh.write(tb)


def _relative_to(path: Path, root: Path) -> Path:
    try:
        return Path(os.path.relpath(Path(path).resolve(), root.resolve()))
    except ValueError:
        return Path(path)


def run_relion_external(argv: Sequence[str], *, project_dir: str | os.PathLike | None = None,
                        on_progress: Callable[..., None] | None = None) -> int:
    """Run one RELION External job from its command line; return the exit status (0 / 1 / 2).

    Never raises for bad input or training errors: those end in `RELION_JOB_EXIT_FAILURE`
    with a readable run.err. `project_dir` (default: the current directory, where RELION
    runs the program) anchors `--o`, `--in_parts` and the image paths in the STAR file.
    """
    project = Path(project_dir) if project_dir is not None else Path.cwd()
    try:
        args = parse_relion_args(argv)
    except InputError as exc:
        print(f"ERROR: {exc}", file=sys.stderr, flush=True)
        return STATUS["failure"]
    out_dir = args.out_dir if args.out_dir.is_absolute() else project / args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_exit_files(out_dir)
    try:
        outcome = _run(args, project, out_dir, on_progress)
    except BaseException as exc:  # noqa: BLE001 - every failure must leave RELION's failure marker
        if isinstance(exc, InputError):
            message = str(exc)
        elif isinstance(exc, OSError):
            from cryofire_ext.safe_io import describe_os_error

            message = describe_os_error(exc)
        elif isinstance(exc, KeyboardInterrupt):
            message = "interrupted (Ctrl-C or a signal) before the job finished"
        else:
            message = (f"{type(exc).__name__}: {exc}. This is a bug or an environment problem rather than bad "
                       f"input; the traceback is in {out_dir / DEBUG_LOG}")
        _report_error(out_dir, message, traceback.format_exc())
        _touch(out_dir / EXIT_FAILURE)
        if isinstance(exc, (KeyboardInterrupt, SystemExit)) and not isinstance(exc, InputError):
            raise
        return STATUS["failure"]
    _touch(out_dir / (EXIT_ABORTED if outcome == "aborted" else EXIT_SUCCESS))
    return STATUS[outcome]


def _run(args: RelionExternalArgs, project: Path, out_dir: Path,
         on_progress: Callable[..., None] | None) -> str:
    """Train and export; return "success" or "aborted". Raises on failure."""
    from cryofire_ext.train.config import TrainConfig
    from integrations.relion import read_star

    if args.ignored:
        logger.info("ignoring RELION inputs not used by cryoFIRE: %s",
                    ", ".join(f"--{k} {v}" for k, v in args.ignored.items()))
    if args.in_parts is None:
        raise InputError("relion-external: no input particles. Set 'Input particles' (--in_parts) on the "
                         "External job's Input tab to a particles STAR file, e.g. Extract/job007/particles.star")
    star = args.in_parts if args.in_parts.is_absolute() else project / args.in_parts
    if not star.is_file():
        raise InputError(f"{args.in_parts}: input particles STAR file not found (looked in the RELION project "
                         f"directory {project})")
    params = dict(args.params)
    job_params = pop_job_params(params, where=WHERE)
    config = config_from_params(TrainConfig, params, where=WHERE)
    logger.info("cryoFIRE External job: particles %s, output %s, %d thread(s)", args.in_parts, args.out_dir,
                args.threads)
    try:
        stack = read_star(star, datadir=project, require_images=True)
    except MissingImagesError as exc:  # the hint is about image paths: only for stacks not found
        raise MissingImagesError(f"{exc} RELION runs this job in the project directory {project}: image paths in "
                                 f"{args.in_parts} must be relative to it (or absolute).") from exc
    if stack.images is None:  # readers that do not raise themselves
        stack.require_images()
    from cryofire_ext.train.trainer import TrainingStopped
    from integrations.job import run_training_job

    should_stop = abort_requested(out_dir)
    try:
        outputs = run_training_job(stack, out_dir, config, should_stop=should_stop, force=True,
                                   argv=["cryofire", "relion-external", *args.argv], on_progress=on_progress,
                                   **job_params)
    except TrainingStopped as stopped:
        if should_stop():
            logger.info("RELION asked to abort (%s): training stopped %s", ABORT_NOW,
                        "after a checkpoint" if stopped.checkpoint is not None else "during the warm start")
            return "aborted"
        raise
    nodes: list[tuple[Path, int]] = [(_relative_to(Path(outputs.particles_star), project), NODE_PART_DATA)]
    nodes += [(_relative_to(Path(m), project), NODE_3DREF) for m in outputs.maps]
    write_output_nodes(out_dir, nodes)
    logger.info("wrote %s with %d node(s)", OUTPUT_NODES, len(nodes))
    return "success"
