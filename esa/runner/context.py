"""What one ESA run carries through its steps, in one object instead of nine parameters."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from esa.config import RunConfig
from esa.data import TokenData
from esa.model.device import DeviceChoice
from esa.model.targets import Target
from esa.outdir.manifest import Manifest


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
    manifest: Manifest
    is_main: bool
    coverage: dict = field(default_factory=dict)  # esa.model.targets.coverage of the run
    names: list[str] = field(init=False)
    by_name: dict[str, Target] = field(init=False)

    def __post_init__(self) -> None:
        self.names = [t.name for t in self.targets]
        self.by_name = {t.name: t for t in self.targets}
