"""What one ESA run carries through its steps, in one object instead of nine parameters."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from esa.config import RunConfig
from esa.data import TokenData
from esa.model.device import DeviceChoice
from esa.model.targets import Target
from esa.outdir.journal import Journal
from esa.outdir.layout import METRICS_DIR
from esa.outdir.manifest import Manifest, ScopedManifest


@dataclass
class RunContext:
    """The resolved configuration and everything loaded for it.

    ``is_main``: this process writes files and prints (rank 0 under torchrun, else always).
    ``names``: target names in ``model.named_parameters()`` order (the tie-break order).
    """

    cfg: RunConfig
    choice: DeviceChoice
    model: torch.nn.Module
    tokenizer: object
    targets: list[Target]
    data: TokenData
    out_dir: Path
    manifest: Manifest | ScopedManifest
    is_main: bool
    coverage: dict = field(default_factory=dict)  # esa.model.targets.coverage of the run
    evaluated: dict[str, dict] = field(default_factory=dict)  # evaluation key -> row (shared by the views)
    journal: Journal | None = None  # checkpoints/evaluations.jsonl: each row as it is measured
    fingerprints: dict = field(default_factory=dict)  # model weights and data (esa.model.fingerprint)
    names: list[str] = field(init=False)
    by_name: dict[str, Target] = field(init=False)

    def __post_init__(self) -> None:
        self.names = [t.name for t in self.targets]
        self.by_name = {t.name: t for t in self.targets}

    def record(self, key: str, row: dict) -> None:
        """An evaluated condition: kept for reuse in this run and appended to the journal (resume)."""
        self.evaluated[key] = row
        if self.journal is not None:
            self.journal.append(key, row)

    def view(self, metric: str) -> RunContext:
        """What a single-metric run of ``metric`` would see: its configuration, and its own folder
        ``metrics/<metric>/`` when the run has several metrics (the run's own out-dir otherwise)."""
        if not self.cfg.multi:
            return self
        prefix = f"{METRICS_DIR}/{metric}/"
        return dataclasses.replace(self, cfg=self.cfg.for_metric(metric), out_dir=self.out_dir / METRICS_DIR / metric,
                                   manifest=ScopedManifest(self.manifest, prefix))
