"""`cryofire simulate`: a simulated dataset (.mrcs + RELION 3.1 STAR + .cs + truth.npz) from maps or the phantom."""

from __future__ import annotations

from typing import List, Optional

import typer

from cryofire_ext.errors import InputError


def _floats(text: str | None, what: str, sep: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(sep)]
    except ValueError:
        raise InputError(f"{what}: expected numbers separated by '{sep}', got '{text}'") from None


def register(app: typer.Typer) -> None:
    """Add `simulate` to `app`."""

    @app.command("simulate")
    def simulate_cmd(
        maps: Optional[List[str]] = typer.Argument(None, help="Map(s) (MRC), one per state."),
        out: str = typer.Option(..., "-o", "--out", help="Output folder."),
        n: int = typer.Option(..., "-n", help="Number of particles."),
        phantom: bool = typer.Option(False, "--phantom", help="Use the bundled two-state phantom molecule."),
        box: int = typer.Option(32, "--box", help="Box of the phantom, pixels."),
        states: Optional[int] = typer.Option(None, "--states", help="States made from ONE map by a rigid motion "
                                             "of part of it (phantom: number of states, default 2)."),
        mix: Optional[str] = typer.Option(None, "--mix", help="State fractions, e.g. 0.9,0.1 (sum 1)."),
        snr: float = typer.Option(0.1, "--snr", help="Signal variance / noise variance (whole box)."),
        shift_px: float = typer.Option(4.0, "--shift-px", help="Origins uniform in +-this many pixels."),
        defocus_um: str = typer.Option("1.0-2.5", "--defocus-um", help="Defocus range, micrometres (low-high)."),
        seed: int = typer.Option(0, "--seed", help="Random seed."),
        apix: Optional[float] = typer.Option(None, "--apix", help="Pixel size in A (default: map header)."),
        force: bool = typer.Option(False, "--force", help="Overwrite existing outputs."),
    ) -> None:
        """Simulate particles with known poses, shifts, CTF and states (truth in truth.npz)."""
        from integrations.simulated import SimulateConfig, run_simulate

        defocus = _floats(defocus_um, "--defocus-um", "-")
        if defocus is None or len(defocus) != 2:
            raise InputError(f"--defocus-um: expected a range low-high in micrometres, e.g. 1.0-2.5, got '{defocus_um}'")
        cfg = SimulateConfig(out_dir=out, n=n, maps=list(maps or []), phantom=phantom, box=box, states=states,
                             mix=_floats(mix, "--mix", ","), snr=snr, shift_px=shift_px,
                             defocus_um=(defocus[0], defocus[1]), seed=seed, pixel_size_A=apix, force=force)
        paths = run_simulate(cfg)
        typer.echo(f"wrote {n} particles: {paths['images']}, {paths['star']}, {paths['cs']}, truth {paths['truth']}")
