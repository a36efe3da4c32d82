"""The experiment settings of a run: every registered experiment's options, validated by each."""

from __future__ import annotations

from dataclasses import dataclass, field

from esa.errors import UsageError
from esa.experiment.controls import unmatched_controls
from esa.experiment.registry import EXPERIMENTS, experiment_options
from esa.options import Options, check_all


@dataclass(frozen=True)
class ExperimentSpec:
    """``options``: the value of every experiment option (``--perturb``, ``--quantize``, ...); an
    experiment runs when its :meth:`~esa.experiment.registry.Experiment.enabled` says so."""

    options: Options = field(default_factory=lambda: Options.defaults(experiment_options()))

    def enabled(self) -> list[str]:
        """The names of the experiments this run does, in registration order."""
        return [n for n in EXPERIMENTS if EXPERIMENTS[n].enabled(self.options)]


def validate_experiment(spec: ExperimentSpec, metrics: tuple[str, ...]) -> None:
    """Each option's own check, then each experiment's rules (UsageError).

    A control that cannot be built for the only metric of the run (``random_mag_k`` under
    ``magnitude``) is refused; with several metrics it is skipped for that metric alone, with the reason
    in its results (the other metrics still get it)."""
    if (why := check_all(experiment_options(), spec.options)) is not None:
        raise UsageError(why)
    for name in EXPERIMENTS:
        EXPERIMENTS[name].validate(spec.options)
    if len(metrics) == 1:
        for control, why in unmatched_controls(metrics[0], spec.options.controls).items():
            raise UsageError(f"--controls {control} cannot be used with --metric {metrics[0]} alone: {why}; drop it "
                             "from --controls")
