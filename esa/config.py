"""A run's resolved configuration: one frozen dataclass of groups, each validated by its own function.

The CLI turns argparse output into a :class:`RunConfig`; library code only ever sees this
dataclass.  The groups are declared where they are used (their fields carry the flag, default and
help, :func:`esa.options.opt`; registries add their items' options), so the parser's defaults and
the config's are one source:

* ``model`` (:class:`esa.model.device.ModelSpec`), ``distributed`` (device map, offload,
  checkpointing), ``data`` (:class:`esa.data.DataSpec`), ``scoring`` (metrics and their options,
  mode, k, targets, seeds), ``experiment`` (every experiment's options), ``super_weights`` (the
  detector), ``evaluation`` (evaluators and their options), ``output``.

Every user mistake detectable without loading the model raises :class:`UsageError`, which the CLI
prints as one line and turns into exit code 2.  ``config.json`` records :meth:`RunConfig.to_json`:
every setting in one flat dict (the names are the flags' names).

May import: esa.errors, esa.registry, esa.naming, esa.seeding, esa.options, esa.outdir, esa.model,
esa.data, esa.metrics, esa.experiment, esa.evaluators, esa.superweights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from esa.data import DataSpec, validate_data
from esa.errors import UsageError
from esa.evaluators.spec import EvaluationSpec, validate_evaluation
from esa.experiment import perturbation
from esa.experiment.spec import ExperimentSpec, validate_experiment
from esa.metrics import METRICS
from esa.metrics.spec import ScoringSpec, validate_scoring
from esa.model import distributed
from esa.model.device import DistributedSpec, ModelSpec, validate_distributed
from esa.options import flat_json, from_flat
from esa.outdir.layout import default_out_dir, model_slug
from esa.outdir.spec import OutputSpec, validate_output
from esa.superweights.config import SuperWeightSpec, validate_super_weights

# Settings that do not change what a run computes: --resume may differ in these (and only these).
RESULT_FREE = frozenset({"out_dir", "dry_run", "verbose", "save_plots", "resume", "overwrite"})


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs, in groups, with canonical names."""

    model: ModelSpec = field(default_factory=ModelSpec)
    distributed: DistributedSpec = field(default_factory=DistributedSpec)
    data: DataSpec = field(default_factory=DataSpec)
    scoring: ScoringSpec = field(default_factory=ScoringSpec)
    experiment: ExperimentSpec = field(default_factory=ExperimentSpec)
    super_weights: SuperWeightSpec = field(default_factory=SuperWeightSpec)
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    output: OutputSpec = field(default_factory=OutputSpec)

    @property
    def metric(self) -> str:
        """The metric of a single-metric configuration (see :meth:`for_metric`); a multi-metric
        configuration has none, and asking for it is a programming error."""
        if len(self.scoring.metrics) != 1:
            raise ValueError(f"a run of {len(self.scoring.metrics)} metrics has no single metric; use "
                             "cfg.for_metric(name)")
        return self.scoring.metrics[0]

    @property
    def multi(self) -> bool:
        return self.scoring.multi

    def for_metric(self, name: str) -> RunConfig:
        """This configuration with only metric ``name``: what a single-metric run of it would be."""
        return self.replace(scoring=dataclasses.replace(self.scoring, metrics=(name,)))

    @property
    def perturbations(self) -> tuple[str, ...]:
        """The perturbations of ``--perturb`` in the order given (empty without it)."""
        return tuple(perturbation.perturbations(self.experiment.options))

    @property
    def multi_perturb(self) -> bool:
        """Several perturbations: each gets its own folder ``perturbations/<name>/``."""
        return len(self.perturbations) > 1

    def for_perturbation(self, name: str) -> RunConfig:
        """This configuration with only perturbation ``name``: what a run of it alone would be."""
        return self.replace(experiment=ExperimentSpec(perturbation.single(self.experiment.options, name)))

    def replace(self, **changes) -> RunConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def of(cls, **flat) -> RunConfig:
        """A configuration from settings named as in config.json (``RunConfig.of(topk=5, perturb="zero")``):
        each goes to its group; the others keep their defaults.  Not validated."""
        return from_flat(cls, flat)

    def to_json(self) -> dict:
        """Every setting in one flat dict, plus ``metric`` (the metrics comma-joined: the single name
        of a single-metric run, which readers use)."""
        d = flat_json(self)
        d["metric"] = ",".join(self.scoring.metrics)
        return d


def stored_config(config_json: dict) -> RunConfig:
    """The RunConfig a run recorded in its config.json (``"config"``)."""
    c = dict(config_json["config"])
    c.pop("metric", None)
    try:
        return from_flat(RunConfig, c)
    except KeyError as exc:
        raise UsageError(f"--resume: config.json has settings this version does not know: {exc.args[0]}") from None


def resume_config(cfg: RunConfig, config_json: dict, given: dict[str, str]) -> RunConfig:
    """The configuration of ``--resume``: the recorded one, with this invocation's result-free
    settings (verbose, plots, dry run).  ``given``: the settings the command line typed (name ->
    flag); each that affects results must equal the recorded run's, else UsageError naming each
    difference by its flag."""
    old = stored_config(config_json)
    now, then = cfg.to_json(), old.to_json()
    diff = [f"{flag}: {_show(then.get(name))} in the run, {_show(now[name])} now" for name, flag in given.items()
            if name not in RESULT_FREE and name in now and now[name] != then.get(name)]
    if diff:
        raise UsageError("--resume: the command line changes what the run computes (" + "; ".join(diff)
                         + "); give the run's own command, or only --resume OUT_DIR")
    keep = dataclasses.replace(old.output, out_dir=cfg.output.out_dir, verbose=cfg.output.verbose,
                               dry_run=cfg.output.dry_run, resume=True, overwrite=False,
                               save_plots=cfg.output.save_plots or old.output.save_plots)
    return old.replace(output=keep)


def _show(value) -> str:
    """A setting as a user types it: ``grad_x_weight,act_mag`` for a list, ``on``/``off`` for a switch,
    ``unset`` for an unset value (never a Python repr such as ``('grad_x_weight',)``)."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ",".join(map(_show, value)) or "none"
    return str(value)


def default_run_dir(cfg: RunConfig) -> Path:
    """``outputs/<model>_<metric>[+<metric>...]_<mode>_k<k>[_<perturb>][_rtn<bits>][_prune]_<timestamp>``: an ESA run's
    default --out-dir."""
    o = cfg.experiment.options
    return default_out_dir(model_slug(cfg.model.model), "+".join(cfg.scoring.metrics), cfg.scoring.mode,
                           f"k{cfg.scoring.topk}",
                           *filter(None, ["+".join(cfg.perturbations),
                                          f"{o.quantize}{o.bits}" if o.quantize else None,
                                          "prune" if o.prune or o.prune_pattern else None]))


def validate_sharded(cfg: RunConfig) -> None:
    """What --shard fsdp cannot do yet, each with its reason (UsageError)."""
    for m in cfg.scoring.metrics:
        if METRICS[m].not_on_shards:
            raise UsageError(f"--shard fsdp cannot score with {m}: {METRICS[m].not_on_shards}; use grad_x_weight, "
                             "act_mag, obs or magnitude, or torchrun without --shard (each rank holds the whole model)")
    if cfg.super_weights.detect_super_weights:
        raise UsageError("--detect-super-weights is not supported with --shard fsdp yet: run "
                         "scripts/find_super_weights.py on the model instead")
    others = [e for e in cfg.evaluation.evaluate[1:]]
    if others:
        raise UsageError(f"--shard fsdp measures perplexity only for now, not {', '.join(others)}")


def validate(cfg: RunConfig) -> RunConfig:
    """Check everything that can be checked before the model loads, group by group; return the config."""
    validate_scoring(cfg.scoring)
    validate_output(cfg.output)
    validate_experiment(cfg.experiment, cfg.scoring.metrics)
    validate_data(cfg.data)
    validate_distributed(cfg.distributed, distributed.requested())
    if cfg.distributed.shard:
        validate_sharded(cfg)
    if cfg.distributed.gradient_checkpointing and not any("backward" in METRICS[m].needs
                                                          for m in cfg.scoring.metrics):
        raise UsageError("--gradient-checkpointing only applies to gradient metrics, not "
                         f"{', '.join(cfg.scoring.metrics)}")
    validate_super_weights(cfg.super_weights)
    validate_evaluation(cfg.evaluation)
    return cfg
