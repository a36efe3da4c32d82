"""Reading an out-dir's files back (for reports, plots and comparisons): no torch, no model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from esa.outdir.layout import METRICS_DIR, PERTURBATIONS_DIR


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


def perturbation_names(config: dict) -> list[str]:
    """The perturbations a run's ``config.json`` (its ``"config"`` block) records, in order, without
    their own scales (``"zero,gauss_noise:0.5"`` -> ``["zero", "gauss_noise"]``); [] without --perturb."""
    return [p.partition(":")[0] for p in (config.get("perturb") or "").split(",") if p]


def leaf_dirs(out_dir: Path, config: dict) -> dict[tuple[str, str | None], Path]:
    """Each single-metric, single-perturbation out-dir inside a run's ``out_dir`` (``config``: its
    ``"config"`` block), by (metric, perturbation or None when the run had at most one): the run itself,
    ``metrics/<metric>/`` (several metrics), ``[metrics/<metric>/]perturbations/<name>/`` (several
    perturbations)."""
    metrics = list(config.get("metrics") or [config.get("metric")])
    perts = perturbation_names(config)
    out = {}
    for m in metrics:
        folder = out_dir / METRICS_DIR / m if len(metrics) > 1 else out_dir
        for p in perts if len(perts) > 1 else [None]:
            out[(m, p)] = folder if p is None else folder / PERTURBATIONS_DIR / p
    return out
