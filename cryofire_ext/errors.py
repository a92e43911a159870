"""Errors a user can act on.

`InputError` carries a one-paragraph message that names the file, the row or
field, and what was expected. The CLI prints it without a traceback and exits
with status 2; library code raises it for bad input and nothing else.
`MissingImagesError` is the InputError for particle image stacks that cannot be
found (callers add where-to-look hints to that one only).
"""


class InputError(ValueError):
    """Bad user input (file, row, field, value) with a message that says what was expected."""


class MissingImagesError(InputError):
    """The particle image stacks named by the metadata were not found."""


def brief(exc: BaseException, limit: int = 200) -> str:
    """The gist of a third-party error for a message: its type and first line, without terminal codes, and
    without library advice to load a file unsafely (torch's `weights_only=False`, numpy's `allow_pickle`)."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    lowered = text.lower()
    if "weights only load failed" in lowered or "weightsunpickler" in lowered or "unsupported global" in lowered:
        return ("it holds Python objects besides tensors and plain values, which cryofire refuses to load "
                "(unpickling them could run code)")
    if "allow_pickle" in lowered or "pickle" in lowered:
        return "it holds pickled Python objects, which cryofire refuses to load (unpickling them could run code)"
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first[:limit]}" if first else type(exc).__name__
