"""cryoSPARC particle files (.cs) through cryosparc-tools' `Dataset`: read, write, latent coordinates.

Front doors: `read_cs`, `write_cs`, `read_latents`; `stack_from_dataset` / `dataset_from_stack`
are the pure Dataset <-> ParticleStack steps (used by the cryoSPARC external job).
`apply_predictions` / `export_cs` put a run's predictions into an existing particle Dataset / .cs
(matched on uid). Every alignments3D and components_mode_K field written comes from
`fields.alignment_fields`.
Stacks read here have `ids` = uids as text; where stacks are absent, `image_names` = `N@path` (N = blob/idx + 1),
so a STAR writer can name the images without them (with the stacks found, the image source names them).
"""

from integrations.cryosparc.cs import find_passthrough, read_cs, read_latents, stack_from_dataset
from integrations.cryosparc.export import dataset_from_stack, uids_for_ids, write_cs
from integrations.cryosparc.fields import alignment_fields
from integrations.cryosparc.predictions import alignment_columns, apply_predictions, export_cs, result_group_text

__all__ = ["read_cs", "write_cs", "read_latents", "stack_from_dataset", "dataset_from_stack", "find_passthrough",
           "uids_for_ids", "alignment_fields", "alignment_columns", "apply_predictions", "export_cs",
           "result_group_text"]
