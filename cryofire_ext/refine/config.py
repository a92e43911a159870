"""RefineConfig: the per-particle refinement after the model's pass (`refine.polish`), typed and saved apart from
the training config, because it may change without retraining: a resumed run or a `predict` runs the settings it
is given and records them (`refine.json` beside the predictions, and the predictions' meta)."""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import fields as dataclass_fields

from cryofire_ext.configfile import ConfigFile
from cryofire_ext.errors import InputError


#: `RefineConfig.new_particles`: align to the run's references, or refine against the particles' own maps
NEW_PARTICLES = ("references", "refine")
#: fewer rotations than this cannot find a pose for local steps to refine (spacing over 40 degrees)
MIN_SEARCH_ROTATIONS = 100


@dataclass
class RefineConfig(ConfigFile):
    """`polish_rounds`: rounds of per-particle refinement of pose, shift and class against class maps
    back-projected from the particles themselves (0 = the model's own predictions). With
    `polish_global_search` (and a run with a search warm start) every round first searches every
    particle over a grid of `search_rotations` random rotations (seeded) and the warm start's shifts against the
    round's maps and keeps the searched pose where it explains the image better (`polish.global_research`); the
    run's references keep the same grid, so `predict` searches new particles over it. The grid must resolve the
    model box, not only the warm start's smaller one: a grid is scored on the shells its spacing resolves
    (`search.global_radius`), and the two ends of an elongated particle differ only on the finer ones.

    `new_particles`: how `predict` treats particles the run was not trained on. "references" (the default):
    aligned to the run's saved references (`refine.references.align`: global search and local refinement
    against the run's final class maps, kept fixed), as RELION or cryoSPARC refine new particles against a
    reference; the polish settings do not apply to them. "refine": the model pass, then `polish_rounds` rounds
    against class maps back-projected from the new particles themselves (for a large new dataset that should
    make its own maps). Runs without saved references (made before them) always "refine"."""

    FORMAT = "cryofire-refine-config"
    KIND = "refinement config"

    polish_rounds: int = 3
    polish_global_search: bool = True
    search_rotations: int = 8000
    new_particles: str = "references"

    def __post_init__(self) -> None:
        if not isinstance(self.polish_rounds, int) or isinstance(self.polish_rounds, bool) or self.polish_rounds < 0:
            raise InputError(f"refinement config field polish_rounds={self.polish_rounds!r}: expected an integer >= 0 "
                             "(pose refinement rounds after training; 0 = none)")
        if not isinstance(self.polish_global_search, bool):
            raise InputError(f"refinement config field polish_global_search={self.polish_global_search!r}: expected "
                             "true or false")
        if not isinstance(self.search_rotations, int) or isinstance(self.search_rotations, bool) or \
                self.search_rotations < MIN_SEARCH_ROTATIONS:
            raise InputError(f"refinement config field search_rotations={self.search_rotations!r}: expected an integer "
                             f">= {MIN_SEARCH_ROTATIONS} (rotations of the global search after training)")
        if self.new_particles not in NEW_PARTICLES:
            raise InputError(f"refinement config field new_particles={self.new_particles!r}: expected one of "
                             f"{', '.join(NEW_PARTICLES)}")

    @classmethod
    def fields_in(cls, d: dict) -> dict:
        """The refinement fields of a mapping that may hold other settings too (a job's config file, a training
        config.json of a run made before RefineConfig, a RELION job's parameters)."""
        names = {f.name for f in dataclass_fields(cls)}
        return {k: v for k, v in d.items() if k in names}

    def replace(self, **changes) -> "RefineConfig":
        """A copy with the fields in `changes` that are not None replaced."""
        return RefineConfig(**{**self.to_dict(), **{k: v for k, v in changes.items() if v is not None}})
