"""What one ESA run carries through its steps, in one object instead of nine parameters."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from esa.config import RunConfig
from esa.data import TokenData
from esa.evaluators.measure import Measurer
from esa.model.device import DeviceChoice
from esa.model.targets import Target
from esa.options import Options
from esa.outdir.layout import METRICS_DIR, PERTURBATIONS_DIR
from esa.outdir.manifest import Manifest, ScopedManifest


@dataclass
class RunContext:
    """The resolved configuration and everything loaded for it; also the experiments' view of the
    run (:class:`esa.experiment.registry.RunView`).

    ``is_main``: this process writes files and prints (rank 0 under torchrun, else always).
    ``names``: target names in ``model.named_parameters()`` order (the tie-break order).
    ``measurer``: every condition x every evaluator, with the run's evaluation cache and journal
    (shared by the metrics' views).  ``super_weights``: the detector's result, once it ran.
    ``restoring``: the baseline's massive activations written back (``--restore-activations``), else None.
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
    measurer: Measurer | None = None
    coverage: dict = field(default_factory=dict)  # esa.model.targets.coverage of the run
    fingerprints: dict = field(default_factory=dict)  # model weights and data (esa.model.fingerprint)
    super_weights: dict | None = None
    restoring: Callable[[], AbstractContextManager[dict]] | None = None
    names: list[str] = field(init=False)
    by_name: dict[str, Target] = field(init=False)

    def __post_init__(self) -> None:
        self.names = [t.name for t in self.targets]
        self.by_name = {t.name: t for t in self.targets}

    # the experiments' view (esa.experiment.registry.RunView)
    @property
    def metric(self) -> str:
        return self.cfg.metric

    @property
    def mode(self) -> str:
        return self.cfg.scoring.mode

    @property
    def topk(self) -> int:
        return self.cfg.scoring.topk

    @property
    def seeds(self) -> tuple[int, ...]:
        return self.cfg.scoring.seeds

    @property
    def options(self) -> Options:
        return self.cfg.experiment.options

    @property
    def eval_windows(self) -> int:
        return len(self.data.eval_windows)

    def view(self, metric: str) -> RunContext:
        """What a single-metric run of ``metric`` would see: its configuration, and its own folder
        ``metrics/<metric>/`` when the run has several metrics (the run's own out-dir otherwise)."""
        if not self.cfg.multi:
            return self
        prefix = f"{METRICS_DIR}/{metric}/"
        return dataclasses.replace(self, cfg=self.cfg.for_metric(metric), out_dir=self.out_dir / METRICS_DIR / metric,
                                   manifest=ScopedManifest(self.manifest, prefix))

    def leaves(self, metric: str) -> dict[str, RunContext]:
        """What each single-metric, single-perturbation run would see, by :func:`leaf_key`: the metric's
        view itself, or (several ``--perturb``) one view per perturbation in its own folder
        ``perturbations/<name>/`` of the metric's view, with that perturbation's configuration."""
        view = self.view(metric)
        if not self.cfg.multi_perturb:
            return {leaf_key(metric, None): view}
        return {leaf_key(metric, p): dataclasses.replace(
            view, cfg=view.cfg.for_perturbation(p), out_dir=view.out_dir / PERTURBATIONS_DIR / p,
            manifest=ScopedManifest(view.manifest, f"{PERTURBATIONS_DIR}/{p}/")) for p in self.cfg.perturbations}

    def all_leaves(self) -> dict[str, RunContext]:
        """:meth:`leaves` of every metric, in the order of the metrics, then of the perturbations."""
        return {k: v for m in self.cfg.scoring.metrics for k, v in self.leaves(m).items()}


def leaf_key(metric: str, perturbation: str | None) -> str:
    """How a run's results are keyed: the metric, or ``<metric>/<perturbation>`` with several ``--perturb``
    (also the key of a seed's selections in its checkpoint)."""
    return metric if perturbation is None else f"{metric}/{perturbation}"
