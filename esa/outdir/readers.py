"""Reading an out-dir's files back (for reports, plots and comparisons): no torch, no model."""

from __future__ import annotations

import csv
import json
from pathlib import Path


def read_json(out_dir: Path, name: str) -> dict | None:
    path = out_dir / name
    return json.loads(path.read_text()) if path.is_file() else None


def read_top_rows(out_dir: Path) -> list[dict]:
    """Rows of ``top_weights.csv`` (every seed; ``seed`` column as str), [] when absent."""
    path = out_dir / "top_weights.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
