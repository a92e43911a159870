"""RELION particle STAR files: read 3.0/3.1/4/5 (`read_star`), write 3.1 (`write_star`), latents (`read_latents`)."""

from integrations.relion.export import star_tables, write_star
from integrations.relion.star import RelionTables, read_latents, read_star

__all__ = ["RelionTables", "read_star", "read_latents", "write_star", "star_tables"]
