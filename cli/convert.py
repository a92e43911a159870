"""`cryofire convert` (STAR <-> .cs, metadata only) and `cryofire inspect` (a summary of a particle file)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console()


def register(app: typer.Typer) -> None:
    """Add `convert` and `inspect` to `app`."""

    @app.command("convert")
    def convert(
        src: Path = typer.Argument(..., help="Input particles: .star, .cs, .mrcs/.mrc or .txt."),
        dst: Path = typer.Argument(..., help="Output particles: .star (RELION 3.1) or .cs (cryoSPARC)."),
        datadir: Optional[Path] = typer.Option(None, "--datadir", "-d",
                                               help="Folder the image paths are relative to (RELION/cryoSPARC project)."),
        force: bool = typer.Option(False, "--force", help="Overwrite DST if it exists."),
    ) -> None:
        """Convert particle metadata between RELION STAR and cryoSPARC .cs (either way). Stacks are not needed."""
        from integrations.formats import convert_particles

        stack, out = convert_particles(src, dst, datadir=datadir, force=force)
        note = f" ({len(stack.missing_stacks)} image stacks not found; metadata only)" if stack.missing_stacks else ""
        console.print(f"wrote {len(stack)} particles to {out}{note}", highlight=False, soft_wrap=True)

    @app.command("inspect")
    def inspect(
        path: Path = typer.Argument(..., help="Particles: .star, .cs, .mrcs/.mrc or .txt."),
        datadir: Optional[Path] = typer.Option(None, "--datadir", "-d", help="Folder the image paths are relative to."),
    ) -> None:
        """Summarise a particle file: count, box, pixel size, optics groups, CTF ranges, poses, classes, stacks."""
        from integrations.formats import describe_particles

        s = describe_particles(path, datadir=datadir)
        table = Table(title=str(path), show_header=False)
        table.add_column("field", style="bold")
        table.add_column("value")

        def span(pair, fmt="{:.1f}"):
            return "-" if pair[0] != pair[0] else f"{fmt.format(pair[0])} .. {fmt.format(pair[1])}"

        table.add_row("particles", str(s["count"]))
        table.add_row("box", f"{s['box_px']} px" if s["count"] else "-")
        table.add_row("pixel size", f"{s['pixel_size_A']:.4f} A" if s["count"] else "-")
        for g, info in s["optics_groups"].items():
            table.add_row(f"optics group {g} (0-based)", f"{info['count']} particles, {'/'.join(map(str, info['voltage_kv']))} kV, "
                                               f"Cs {'/'.join(map(str, info['cs_mm']))} mm, "
                                               f"amp. contrast {'/'.join(map(str, info['amplitude_contrast']))}")
        table.add_row("defocus U", span(s["defocus_u_A"]) + " A")
        table.add_row("defocus V", span(s["defocus_v_A"]) + " A")
        table.add_row("astigmatism angle", span(s["defocus_angle_deg"]) + " deg")
        table.add_row("phase shift", span(s["phase_shift_deg"]) + " deg")
        table.add_row("B-factor", span(s["bfactor_A2"]) + " A^2")
        table.add_row("poses", "yes" + (f" (|shift| <= {s['shift_A_max_abs']:.2f} A)" if s["shift_A_max_abs"] is not None
                                        else "") if s["has_poses"] else "no")
        table.add_row("classes", str(s["classes"]) if s["classes"] is not None else "no")
        table.add_row("half sets", ",".join(map(str, s["subsets"])) if s["subsets"] is not None else "no")
        missing = s["missing_stacks"]
        table.add_row("images", "available" if s["images_available"] else
                      f"missing: {len(missing)} stacks, e.g. {missing[0]}" if missing else "none")
        console.print(table)
