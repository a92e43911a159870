"""`cryofire relion-external`: the program a RELION External job runs.

Put `cryofire relion-external` in the External job's "External executable" field;
RELION calls it as `cryofire relion-external --o External/jobNNN/ --in_parts X.star --j N
[--label value ...]` from the project directory.
"""

from __future__ import annotations

import logging
import sys

import typer

HELP = """Run cryoFIRE as a RELION External job (RELION calls this; see README "Use from RELION").

RELION passes --o DIR/ --in_parts STAR --j N and the Params tab as --label value pairs
(any TrainConfig field, e.g. --zdim 8 --epochs 20, the refinement's --polish_rounds N,
--polish_global_search yes/no and --search_rotations N, and --resume yes). Writes particles.star, maps/*.mrc,
RELION_OUTPUT_NODES.star and RELION_JOB_EXIT_SUCCESS / _FAILURE / _ABORTED into --o.
Exit status 0 success, 1 failure, 2 aborted.
"""


def register(app: typer.Typer) -> None:
    """Add `relion-external` to `app`."""

    @app.command("relion-external", help=HELP, add_help_option=False,
                 context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def relion_external(ctx: typer.Context) -> None:
        if ctx.args in ([], ["--help"], ["-h"]):
            typer.echo(HELP)
            _echo_params()
            sys.exit(0 if ctx.args else 1)
        from integrations.relion.external_job import parse_relion_args, run_relion_external

        _log_to_stdout()
        try:
            threads = parse_relion_args(ctx.args).threads
        except Exception:  # the library reports the bad argument itself
            threads = 1
        import torch

        torch.set_num_threads(threads)
        sys.exit(run_relion_external(ctx.args))


def _log_to_stdout() -> None:
    """RELION files stdout in run.out and stderr in run.err: progress to stdout, errors only to stderr."""
    root = logging.getLogger()
    level = root.level if root.level != logging.NOTSET else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)], force=True)
    logging.captureWarnings(True)  # library warnings to run.out, so run.err holds only the error


def _echo_params() -> None:
    try:
        import dataclasses

        from cryofire_ext.train.config import TrainConfig
        from integrations.params import PROVENANCE_FIELDS
    except ImportError:
        return
    typer.echo("Training parameters (--label value): " + ", ".join(
        f"--{f.name}" for f in dataclasses.fields(TrainConfig) if f.init and f.name not in PROVENANCE_FIELDS))
