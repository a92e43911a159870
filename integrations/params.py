"""`--label value` text -> typed job settings: the parameters RELION's External job (Params tab) and
`cryofire cryosparc run` pass after their own options.

`parse_label_values` splits the command line into `{label: text}`; `pop_job_params` takes out the
job-level ones (`resume` and the refinement settings, a `RefineConfig`); `config_from_params` builds the typed training config,
converting each text to its field's annotated type (`convert_text`) and refusing unknown labels.
`where` names the command in every error message.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Sequence

from cryofire_ext.errors import InputError
from cryofire_ext.refine.config import RefineConfig

def parse_label_values(argv: Sequence[str], *, where: str = "cryofire") -> dict[str, str]:
    """`--key value` / `--key=value` pairs -> {key: value} (dashes in keys become underscores).

    A flag followed by another flag (or nothing) reads as `true`. InputError on a stray
    word or a repeated key.
    """
    pairs: dict[str, str] = {}
    args = list(argv)
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--") or len(token) <= 2:
            raise InputError(f"{where}: unexpected argument {token!r}; options come as '--label value' pairs "
                             "(e.g. --zdim 8 --epochs 20)")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 < len(args) and not (args[i + 1].startswith("--") and len(args[i + 1]) > 2):
                value = args[i + 1]
                i += 1
            else:
                value = "true"
        key = key.replace("-", "_")
        if key in pairs:
            raise InputError(f"{where}: option --{key} given twice ({pairs[key]!r} and {value!r})")
        pairs[key] = value
        i += 1
    return pairs


def convert_text(text: str, annotation: Any, label: str) -> Any:
    """`text` (as a job passed it for `--label`) converted to `annotation` (a field's type hint): Union/Optional
    (`none`/`null`/empty -> None), Literal, tuple/list (comma or space separated), bool (yes/no, true/false,
    1/0, on/off), int, float, str. InputError naming `--label` when the text does not fit."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, getattr(types, "UnionType", None)):
        choices = [a for a in typing.get_args(annotation) if a is not type(None)]
        if text.lower() in ("none", "null", "") and len(choices) < len(typing.get_args(annotation)):
            return None
        errors = []
        for choice in choices:
            try:
                return convert_text(text, choice, label)
            except InputError as exc:
                errors.append(str(exc))
        raise InputError(errors[0] if errors else f"--{label}: cannot read {text!r}")
    if origin is typing.Literal:
        allowed = typing.get_args(annotation)
        for value in allowed:
            if str(value) == text:
                return value
        raise InputError(f"--{label} must be one of {', '.join(map(str, allowed))}; got {text!r}")
    if origin in (tuple, list) or annotation in (tuple, list):
        container = origin or annotation
        inner = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        parts = [p for p in text.strip("()[] ").replace(",", " ").split() if p]
        if inner:
            return container(convert_text(p, inner[0], label) for p in parts)
        return container(number_or_text(p) for p in parts)
    if annotation is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "y", "on"):
            return True
        if lowered in ("0", "false", "no", "n", "off"):
            return False
        raise InputError(f"--{label} must be yes/no (true/false); got {text!r}")
    if annotation in (int, float):
        try:
            value = float(text)
        except ValueError:
            raise InputError(f"--{label} must be a number; got {text!r}") from None
        if annotation is int:
            if value != int(value):
                raise InputError(f"--{label} must be a whole number; got {text!r}")
            return int(value)
        return value
    if annotation in (str, Any) or annotation is None:
        return text
    if isinstance(annotation, type):
        return annotation(text)
    return text


def number_or_text(text: str) -> Any:
    """`text` as an int, else a float, else unchanged."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


#: Config fields filled by the program itself (provenance), never by users.
PROVENANCE_FIELDS = ("version", "created", "command_line")


def pop_job_params(params: dict[str, str], *, where: str = "cryofire") -> dict[str, Any]:
    """Remove and convert the job-level (not training) parameters: `resume` (yes: continue the run in the
    output folder from its last checkpoint, e.g. after an abort; only the training config's
    RESUMABLE_FIELDS may change) and the refinement settings (`REFINE_FIELDS`: a `RefineConfig`, given only
    when one of them is). Returns keyword arguments for run_training_job."""
    out: dict[str, Any] = {}
    if "resume" in params:
        out["resume"] = convert_text(params.pop("resume"), bool, "resume")
    refine = {name: params.pop(name) for name in list(params) if name.replace("-", "_") in REFINE_FIELDS}
    if refine:
        out["refine"] = config_from_params(RefineConfig, refine, where=where)
    return out


#: the refinement settings a job takes beside the training config: `RefineConfig`'s, but `new_particles` (how
#: `predict` treats particles a run was not trained on)
REFINE_FIELDS = tuple(f.name for f in dataclasses.fields(RefineConfig) if f.name != "new_particles")


def config_from_params(config_cls: type, params: dict[str, str], *, where: str = "cryofire",
                       base: Any = None) -> Any:
    """Build a typed dataclass config (e.g. TrainConfig) from `--label value` text pairs.

    Each label must name a field of `config_cls` (dashes may stand for underscores; see also
    `pop_job_params` for the job-level ones);
    values are converted to the field's annotated type. Unknown labels raise InputError
    listing the valid ones, so a typo in RELION's Params tab fails loudly instead of
    training with defaults.
    """
    hints = typing.get_type_hints(config_cls)
    names = [f.name for f in dataclasses.fields(config_cls) if f.init and f.name not in PROVENANCE_FIELDS]
    values: dict[str, Any] = {}
    for label, text in params.items():
        name = label.replace("-", "_")
        if name not in names:
            raise InputError(f"{where}: unknown parameter --{label} (value {text!r}). Training parameters are: "
                             + ", ".join(f"--{n}" for n in names) + "; and "
                             + ", ".join(f"--{n}" for n in REFINE_FIELDS) + " (the refinement after training) "
                             "and --resume (continue from the last checkpoint).")
        values[name] = convert_text(str(text), hints.get(name, str), label)
    if base is not None:
        return dataclasses.replace(base, **values)
    try:
        return config_cls(**values)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"{where}: invalid training parameters: {exc}") from exc
