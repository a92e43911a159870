"""`cryofire cryosparc run|export`: train on a cryoSPARC particle output and save results back."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from integrations.run_folder import PREDICTIONS

RUN_HELP = """Create a cryoSPARC External job, train on JOB.OUTPUT particles, save poses/latents/volumes to it.

Training options follow as --label value pairs (any TrainConfig field, e.g. --zdim 8
--epochs 20). Credentials: CRYOSPARC_EMAIL and CRYOSPARC_PASSWORD, or a session from
`python -m cryosparc.tools login --url URL`. Run on a machine that sees the project directory.
"""


def register(app: typer.Typer) -> None:
    """Add the `cryosparc` command group to `app`."""
    group = typer.Typer(help="cryoSPARC: run as an External job, or export a run's poses into a .cs file.",
                        no_args_is_help=True)

    @group.command("run", help=RUN_HELP,
                   context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def run(ctx: typer.Context,
            url: Optional[str] = typer.Option(None, "--url", help="cryoSPARC web address, e.g. http://host:39000 "
                                              "(default: $CRYOSPARC_BASE_URL)."),
            project: str = typer.Option(..., "--project", help="Project uid, e.g. P3."),
            workspace: str = typer.Option(..., "--workspace", help="Workspace uid for the new job, e.g. W1."),
            particles: str = typer.Option(..., "--particles", help="Source particles as JOB.OUTPUT, e.g. "
                                          "J42.particles."),
            out: Optional[Path] = typer.Option(None, "--out", "-o", help="Local run folder (default "
                                               "./cryofire_<project>_<job>)."),
            title: str = typer.Option("cryoFIRE ab initio", "--title", help="Title of the new job."),
            force: bool = typer.Option(False, "--force", help="Overwrite files in an existing run folder."),
            ) -> None:
        from cryofire_ext.train.config import TrainConfig
        from integrations.cryosparc.external_job import connect_cryosparc, run_cryosparc_job
        from integrations.params import config_from_params, parse_label_values, pop_job_params

        params = parse_label_values(ctx.args, where="cryofire cryosparc run")
        job_params = pop_job_params(params, where="cryofire cryosparc run")
        config = config_from_params(TrainConfig, params, where="cryofire cryosparc run")
        cs = connect_cryosparc(url)
        result = run_cryosparc_job(cs, project, workspace, particles, config, run_dir=out, title=title,
                                   force=force, **job_params)
        typer.echo(f"{result.project_uid} {result.job_uid}: saved particles ({len(result.particles)}) and "
                   f"{len(result.volumes)} volume(s); local run folder {result.run_dir}")

    @group.command("export")
    def export(run_dir: Path = typer.Argument(..., help=f"A cryofire run folder (or its {PREDICTIONS})."),
               like: Path = typer.Option(..., "--like", help="cryoSPARC particles .cs the run was trained on."),
               out: Path = typer.Option(..., "--out", "-o", help="Output .cs file."),
               force: bool = typer.Option(False, "--force", help="Overwrite the output."),
               ) -> None:
        """Write a .cs with the --like particles plus the run's alignments3D and components_mode_K."""
        from integrations.cryosparc import export_cs

        path = export_cs(run_dir, like, out, force=force)
        typer.echo(f"wrote {path} and {path.with_suffix('.csg')} (import with an Import Result Group job)")

    app.add_typer(group, name="cryosparc")


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `cryofire cryosparc ...`")
