"""Typed configs saved as versioned JSON: the one persistence shared by `TrainConfig` and `RefineConfig`.

A config is a dataclass; `save` writes `{"format", "format_version", "config"}` atomically, `load` refuses
files of another format or a newer version and names unknown fields (`from_dict`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from pathlib import Path

from cryofire_ext.errors import InputError
from cryofire_ext.safe_io import atomic_path


class ConfigFile:
    """Mixin for a dataclass config: FORMAT (file format name), FORMAT_VERSION, KIND (words for errors)."""

    FORMAT = ""
    FORMAT_VERSION = 1
    KIND = "config"
    #: fields of older versions that this version no longer holds, dropped on reading
    RETIRED_FIELDS: tuple = ()

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | os.PathLike, force: bool = True) -> Path:
        """Write the versioned JSON (atomic; refuses to overwrite unless `force`)."""
        payload = {"format": self.FORMAT, "format_version": self.FORMAT_VERSION, "config": self.to_dict()}
        with atomic_path(path, force=force) as tmp:
            tmp.write_text(json.dumps(payload, indent=2) + "\n")
        return Path(path)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config"):
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k not in cls.RETIRED_FIELDS}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"{source}: unknown {cls.KIND} field(s) {', '.join(unknown)}; "
                             f"known fields: {', '.join(sorted(known))}")
        return cls(**d)

    @classmethod
    def load(cls, path: str | os.PathLike):
        """Read a file written by `save` (or a plain JSON object of fields)."""
        path = Path(path)
        try:
            payload = json.loads(path.read_text())
        except FileNotFoundError:
            raise InputError(f"{path}: {cls.KIND} file not found") from None
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: not a readable JSON {cls.KIND} ({exc})") from exc
        if not isinstance(payload, dict):
            raise InputError(f"{path}: expected a JSON object of {cls.KIND} fields")
        if "config" in payload:
            if payload.get("format") != cls.FORMAT or payload.get("format_version", 0) > cls.FORMAT_VERSION:
                raise InputError(f"{path}: format {payload.get('format')} v{payload.get('format_version')} "
                                 f"is not {cls.FORMAT} v<={cls.FORMAT_VERSION}")
            payload = payload["config"]
        return cls.from_dict(payload, source=str(path))
