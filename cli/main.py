"""The `cryofire` Typer app: the only place that configures logging, rich output and exit codes.

Each command group lives in its own module with a `register(app)` function;
commands parse, call one library function, and report.
"""

from __future__ import annotations

import logging
import sys

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from cryofire_ext import __version__
from cryofire_ext.errors import InputError

app = typer.Typer(help="cryofire: amortized ab initio heterogeneous cryo-EM reconstruction.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
err_console = Console(stderr=True)

COMMAND_MODULES = ("convert", "simulate", "train", "analyze", "relion", "cryosparc")


def _register_all() -> None:
    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(f"cli.{name}").register(app)


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=err_console, show_path=False)], force=True)


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


_register_all()


def main(argv: list[str] | None = None) -> int:
    """Run the app; an InputError prints one paragraph to stderr and exits with status 2, and so does an
    OSError (an output folder that is read-only or a file, a full disk): the path and what happened, no
    traceback (writes are atomic, so earlier files are kept)."""
    from cryofire_ext.safe_io import describe_os_error

    try:
        rc = app(args=argv, prog_name="cryofire", standalone_mode=False)
    except InputError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 2
    except OSError as exc:
        err_console.print(f"[bold red]error:[/] {escape(describe_os_error(exc))}", highlight=False, soft_wrap=True)
        return 2
    except typer.Abort:
        err_console.print("aborted")
        return 130
    except SystemExit as exc:
        return int(exc.code or 0)
    except typer.TyperException as exc:  # usage errors (typer's own click): message and status 2
        if hasattr(exc, "show"):
            exc.show()
        return int(getattr(exc, "exit_code", 2))
    return rc if isinstance(rc, int) else 0


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
