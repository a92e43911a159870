"""RELION STAR files as text: the data blocks (`starfile`), checked before any column is used.

`read_blocks` parses every block (file names and other text labels kept as text), refusing a file that
is not UTF-8 or has a loop row whose field count differs from its labels (naming the line);
`particle_block` finds the particle table (`data_particles`, or the one loop with rlnImageName, as in
3.0 files); `numeric_column` reads a column as numbers, naming the first row that is not one.
`star.read_star` maps these tables to a ParticleStack.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from cryofire_ext.errors import InputError

OPTICS_BLOCK = "optics"
PARTICLES_BLOCK = "particles"
# labels read as text, never numbers (file names; names that may look numeric)
STRING_LABELS = ["rlnImageName", "rlnMicrographName", "rlnImageOriginalName", "rlnOpticsGroupName",
                 "rlnMtfFileName", "rlnMicrographOriginalName", "rlnCtfImage", "rlnReferenceImage",
                 "rlnMicrographMovieName", "rlnOriginalParticleName", "rlnGroupName", "rlnOddZernike",
                 "rlnEvenZernike"]


def read_blocks(path) -> tuple[dict, str | None]:
    """All data blocks of a STAR file (`starfile.read`, always a dict) and its `# version` number."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: STAR file not found")
    check_utf8(path)
    try:
        blocks = starfile.read(path, always_dict=True, parse_as_string=STRING_LABELS)
    except Exception as exc:  # starfile/pandas raise many types for malformed text
        bad = _first_bad_row(path)
        if bad is not None:
            raise InputError(bad) from exc
        raise InputError(f"{path}: not a readable STAR file ({type(exc).__name__}: {exc})") from exc
    for name, table in blocks.items():
        if isinstance(table, pd.DataFrame) and len(table) and len(table.columns) \
                and table.iloc[:, -1].isna().any():  # a short row leaves its last fields empty
            bad = _first_bad_row(path, name)
            if bad is not None:
                raise InputError(bad)
    version = None
    with open(path, "r", errors="replace") as fh:
        for line in fh:
            m = re.match(r"^#\s*version\s+(\d+)", line)
            if m:
                version = m.group(1)
                break
            if line.startswith("loop_"):
                break
    return blocks, version


def check_utf8(path, chunk_bytes: int = 1 << 24) -> None:
    """InputError naming the line and byte when the file is not UTF-8 text (read in chunks, no copy)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    lines = 0
    with open(path, "rb") as fh:
        while True:
            data = fh.read(chunk_bytes)
            try:
                decoder.decode(data, final=not data)
            except UnicodeDecodeError as exc:
                start = max(exc.start, 0)
                line_start = data.rfind(b"\n", 0, start) + 1
                line_end = data.find(b"\n", start)
                text = data[line_start:line_end if line_end >= 0 else len(data)].decode("utf-8", "replace")
                lineno = lines + data.count(b"\n", 0, start) + 1
                raise InputError(
                    f"{path}: line {lineno} holds the byte 0x{data[start]:02x}, "
                    f"which is not UTF-8 text (column {start - line_start + 1}: {text.strip()[:120]!r}). Convert the "
                    "file to UTF-8 (e.g. `iconv -f latin1 -t utf-8`) and make the file names it holds match."
                ) from None
            if not data:
                return
            lines += data.count(b"\n")


def _first_bad_row(path, block: str | None = None) -> str | None:
    """A message naming the first loop row (in `data_<block>`, or any) whose field count differs from its
    header's, or None. Read only when a table looks wrong, so well-formed files cost nothing extra."""
    import shlex

    current, labels, in_loop, row = None, 0, False, 0
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            text = line.strip()
            if text.startswith("data_"):
                current, labels, in_loop, row = text[5:], 0, False, 0
            elif text.startswith("loop_"):
                in_loop, labels, row = True, 0, 0
            elif not in_loop or (block is not None and current != block) or not text or text.startswith("#"):
                continue
            elif text.startswith("_") and row == 0:
                labels += 1
            else:
                row += 1
                try:
                    count = len(shlex.split(text.replace("'", '"'))) if '"' in text or "'" in text else len(text.split())
                except ValueError:
                    count = -1
                if count != labels:
                    cut = " (the file may be truncated)" if count < labels else ""
                    return (f"{path}: row {row} of data_{current} (line {lineno}) has {max(count, 0)} fields but "
                            f"the loop has {labels} labels{cut}; expected one value per label on every row")
    return None


def particle_block(blocks: dict, path) -> tuple[str, pd.DataFrame]:
    """(name, table) of the particle table: `data_particles`, else the one loop table with rlnImageName."""
    tables = {k: v for k, v in blocks.items() if isinstance(v, pd.DataFrame)}
    if PARTICLES_BLOCK in tables:
        name = PARTICLES_BLOCK
    else:
        named = [k for k, v in tables.items() if k != OPTICS_BLOCK and "rlnImageName" in v.columns]
        if not named:
            found = "; ".join(f"data_{k} ({', '.join(map(str, list(v.columns)[:6]))}...)" for k, v in tables.items())
            raise InputError(f"{path}: no particle table: no loop block has the field rlnImageName (found: "
                             f"{found or 'no loop blocks'}). Expected a RELION particles STAR file with one row per "
                             "particle image and its rlnImageName (N@stack.mrcs).")
        name = named[0]
    table = tables[name]
    if "rlnImageName" not in table.columns:
        raise InputError(f"{path}: data_{name} has no field rlnImageName; every particle needs its image name "
                         "(N@stack.mrcs) to be read or exported")
    return name, table


def numeric_column(table: pd.DataFrame, label: str, path, block: str, dtype=np.float64) -> np.ndarray:
    """A column as numbers; InputError naming the first row that is not a finite number."""
    values = pd.to_numeric(table[label], errors="coerce")
    bad = ~np.isfinite(values.to_numpy(dtype=np.float64))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise InputError(f"{path}: row {row + 1} of data_{block} has {label} = '{table[label].iloc[row]}'; "
                         "expected a finite number")
    out = values.to_numpy(dtype=np.float64)
    if np.issubdtype(dtype, np.integer):
        if np.any(out != np.round(out)):
            row = int(np.flatnonzero(out != np.round(out))[0])
            raise InputError(f"{path}: row {row + 1} of data_{block} has {label} = {out[row]}; expected an integer")
        return out.astype(dtype)
    return out
