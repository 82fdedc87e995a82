"""Checkpoints written atomically: temporary name → fsync → rename, so a crash never leaves a torn file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from exaforce.io.atomic import write_file_atomically


def save_atomic(state: dict[str, Any], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomically(path, lambda f: torch.save(state, f))
    return path


def load(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    return torch.load(path, map_location="cpu", weights_only=False)
