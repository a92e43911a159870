"""`cryofire` commands for this group (filled in by its issue's work)."""

import typer


def register(app: typer.Typer) -> None:
    """Add this group's commands to `app`."""
