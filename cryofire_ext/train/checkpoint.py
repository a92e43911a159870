"""Checkpoints: torch tensors and plain Python values only, written atomically, loaded with weights_only=True."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from cryofire_ext.errors import InputError, brief
from cryofire_ext.safe_io import atomic_path

FORMAT = "cryofire-checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """Write `state` (tensors, dicts, lists, numbers, strings) to `path` atomically (overwrites)."""
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, **state}
    with atomic_path(path, force=True) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a checkpoint with `weights_only=True`; InputError naming the file when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated, not a torch file, unsafe pickle content
        raise InputError(f"{path}: unreadable checkpoint ({brief(exc)}); "
                         "it may be truncated or not written by cryofire") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise InputError(f"{path}: not a cryofire checkpoint")
    if state.get("format_version", 0) > FORMAT_VERSION:
        raise InputError(f"{path}: checkpoint format v{state.get('format_version')} is newer than this "
                         f"cryofire (v<={FORMAT_VERSION})")
    return state
