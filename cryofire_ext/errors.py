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
