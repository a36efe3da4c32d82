"""Resolved run configuration: one frozen dataclass, canonical names and validation.

The CLI turns argparse output into a :class:`RunConfig`; library code only ever sees this
dataclass.  Every user mistake detectable without loading the model raises :class:`UsageError`,
which the CLI prints as one line and turns into exit code 2.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from esa.data import DATASETS, check_text_file
from esa.errors import UsageError
from esa.experiment.controls import CONTROLS
from esa.experiment.perturb import PERTURBATIONS
from esa.metrics import METRICS
from esa.model import distributed
from esa.model.device import DEVICES, DTYPES, EMBEDDED_MODEL, ModelSpec
from esa.model.targets import SCOPES
from esa.naming import compile_patterns
from esa.outdir.layout import default_out_dir, model_slug

MODES = ("per_layer", "per_row", "global")
QUANTIZERS = ("rtn",)
__all__ = ["CONTROLS", "DATASETS", "DEVICES", "DTYPES", "EMBEDDED_MODEL", "METRICS", "MODES", "PERTURBATIONS",
           "QUANTIZERS", "RESULT_FREE", "RunConfig", "canonical", "default_run_dir", "parse_block_sizes",
           "parse_controls", "parse_metrics", "parse_seeds", "parse_topk_sweep", "resume_config", "stored_config",
           "validate"]


def canonical(value: str, choices: Iterable[str], aliases: Mapping[str, str], what: str) -> str:
    """Map ``value`` (or one of its aliases, case-insensitively) to its canonical name."""
    key = value.strip().lower().replace("-", "_")
    key = aliases.get(key, aliases.get(value.strip().lower(), key))
    choices = tuple(choices)
    if key not in choices:
        raise UsageError(f"unknown {what} {value!r}; choose from {', '.join(choices)}")
    return key


def parse_seeds(text: str) -> tuple[int, ...]:
    """Parse ``"0,1,2"`` into ``(0, 1, 2)``; duplicates and non-integers are errors."""
    parts = [p.strip() for p in text.split(",")]
    if not parts or any(not re.fullmatch(r"-?\d+", p) for p in parts):
        raise UsageError(f"--seeds must be a comma-separated list of integers, got {text!r}")
    seeds = tuple(int(p) for p in parts)
    if any(s < 0 or s >= 2**63 for s in seeds):
        raise UsageError(f"--seeds must be non-negative 64-bit integers, got {text!r}")
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds contains duplicates: {text!r}")
    return seeds


def parse_topk_sweep(text: str) -> tuple[int, ...]:
    """Parse ``"1,10,100,1000"`` into ascending ``(1, 10, 100, 1000)``; ``""`` means no sweep.

    Every k must be a positive integer and appear once (a duplicate is almost surely a typo).
    """
    if not text.strip():
        return ()
    parts = [p.strip() for p in text.split(",")]
    if any(not re.fullmatch(r"\d+", p) for p in parts):
        raise UsageError(f"--topk-sweep must be a comma-separated list of positive integers, got {text!r}")
    ks = [int(p) for p in parts]
    if any(k <= 0 for k in ks):
        raise UsageError(f"--topk-sweep values must be positive, got {text!r}")
    if len(set(ks)) != len(ks):
        raise UsageError(f"--topk-sweep contains duplicates: {text!r}")
    return tuple(sorted(ks))


def parse_controls(text: str) -> tuple[str, ...]:
    """Parse ``"random_k,bottom_k"`` (aliases allowed); ``"none"`` or ``""`` means no controls."""
    if text.strip().lower() in ("", "none"):
        return ()
    out: list[str] = []
    for part in text.split(","):
        name = canonical(part, CONTROLS.names(), CONTROLS.aliases(), "control")
        if name not in out:
            out.append(name)
    return tuple(out)


def parse_metrics(text: str) -> tuple[str, ...]:
    """Parse ``"grad_x_weight,act_mag"`` (aliases allowed) into canonical names, in the given order;
    naming a metric twice (also through an alias) is an error."""
    parts = [p for p in (q.strip() for q in text.split(",")) if p]
    if not parts:
        raise UsageError("--metric is empty; name one or more metrics, comma-separated")
    names = tuple(canonical(p, METRICS.names(), METRICS.aliases(), "--metric") for p in parts)
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UsageError(f"--metric names {', '.join(twice)} more than once ({text!r})")
    return names


def parse_block_sizes(text: str) -> tuple[str | int, ...]:
    """Parse ``"channel,16384,tensor"``: ``channel`` (one block per output row), ``tensor`` or a positive
    count of contiguous weights, in the given order; duplicates are errors."""
    out: list[str | int] = []
    for part in (p.strip().lower() for p in text.split(",")):
        if part in ("channel", "tensor"):
            out.append(part)
        elif re.fullmatch(r"\d+", part) and int(part) > 0:
            out.append(int(part))
        else:
            raise UsageError(f"--block-size takes channel, tensor or a positive integer, got {part!r} in {text!r}")
    if len(set(out)) != len(out):
        raise UsageError(f"--block-size names a block size twice: {text!r}")
    return tuple(out)


@dataclass(frozen=True)
class RunConfig(ModelSpec):
    """Everything a run needs, with canonical names. ``*_explicit`` record user intent."""

    device_map: str | None = None  # "auto": accelerate's big-model dispatch over the GPUs (and CPU with offload)
    offload: bool = False
    gradient_checkpointing: bool = False
    metrics: tuple[str, ...] = ("grad_x_weight",)  # --metric a,b,c: scored in one pass, reported per metric
    mode: str = "per_layer"
    topk: int = 100
    topk_sweep: tuple[int, ...] = ()  # extra k values for the dose-response curve (ascending); --topk stays main
    perturb: str | None = None
    perturb_scale: float = 1.0
    perturb_prob: float = 1.0
    bit_index: int | None = None
    hutchinson_samples: int = 16
    curvature_samples: int = 1
    obs_damp: float = 0.01  # obs: dampening, a fraction of mean(diag H) (SparseGPT's default)
    controls: tuple[str, ...] = ("random_k", "bottom_k")
    quantize: str | None = None  # "rtn": the quantization experiment instead of --perturb
    bits: int = 4
    block_sizes: tuple[str | int, ...] = ("channel",)  # "channel", "tensor" or a count of contiguous weights
    clip_z: float | None = None
    seeds: tuple[int, ...] = (0,)
    stability_check: bool = False
    data_file: str | None = None
    dataset: str | None = None
    data_dir: str | None = None  # local raw files of --dataset (wiki.test.raw, wiki.train.raw)
    max_samples: int = 32
    eval_samples: int = 16
    max_length: int = 256
    batch_size: int = 4
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    targets: str = "matrices"  # "matrices": every float parameter with ndim >= 2; "all": norms and biases too
    out_dir: str | None = None
    save_plots: bool = False
    detect_super_weights: bool = False  # also run the data-free super-weight detector (esa.superweights.detect)
    super_weight_threshold: float = 50.0
    max_super_weights: int = 8
    super_weight_prompt: str | None = None  # None: the detector's neutral default sentence
    detect_on_data: bool = False
    dry_run: bool = False
    verbose: bool = False
    resume: bool = False  # --resume OUT_DIR: continue the run in out_dir (same configuration)
    overwrite: bool = False  # --overwrite: remove an earlier run's files from out_dir first
    extra: dict = field(default_factory=dict)

    @property
    def metric(self) -> str:
        """The metric of a single-metric configuration (see :meth:`for_metric`); a multi-metric
        configuration has none, and asking for it is a programming error."""
        if len(self.metrics) != 1:
            raise ValueError(f"a run of {len(self.metrics)} metrics has no single metric; use cfg.for_metric(name)")
        return self.metrics[0]

    @property
    def multi(self) -> bool:
        return len(self.metrics) > 1

    def for_metric(self, name: str) -> RunConfig:
        """This configuration with only metric ``name``: what a single-metric run of it would be."""
        return dataclasses.replace(self, metrics=(name,))

    def replace(self, **changes) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("extra")
        d["metrics"] = list(self.metrics)
        d["metric"] = ",".join(self.metrics)  # the single name of a single-metric run (what readers use)
        return d


# Fields that do not change what a run computes: --resume may differ in these (and only these).
RESULT_FREE = frozenset({"out_dir", "dry_run", "verbose", "save_plots", "resume", "overwrite", "extra"})
FLAG_NAMES = {"metrics": "--metric", "block_sizes": "--block-size", "device_explicit": "--device",
              "dtype_explicit": "--dtype", "targets": "--targets"}


def stored_config(config_json: dict) -> RunConfig:
    """The RunConfig a run recorded in its config.json (``"config"``): lists back to tuples."""
    c = dict(config_json["config"])
    c.pop("metric", None)
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    unknown = set(c) - set(fields)
    if unknown:
        raise UsageError(f"--resume: config.json has fields this version does not know: {', '.join(sorted(unknown))}")
    return RunConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in c.items()})


def resume_config(cfg: RunConfig, config_json: dict, explicit: bool) -> RunConfig:
    """The configuration of ``--resume``: the recorded one, with this invocation's result-free
    settings (verbose, plots, dry run).  ``explicit`` (the command line sets anything that affects
    results): it must equal the recorded run in every such field, else UsageError naming each
    difference."""
    old = stored_config(config_json)
    keep = {"out_dir": cfg.out_dir, "verbose": cfg.verbose, "dry_run": cfg.dry_run, "resume": True,
            "overwrite": False, "save_plots": cfg.save_plots or old.save_plots}
    if explicit:
        diff = [f"{FLAG_NAMES.get(f.name, '--' + f.name.replace('_', '-'))}: {getattr(old, f.name)!r} in the run, "
                f"{getattr(cfg, f.name)!r} now" for f in dataclasses.fields(RunConfig)
                if f.name not in RESULT_FREE and getattr(cfg, f.name) != getattr(old, f.name)]
        if diff:
            raise UsageError("--resume: the command line changes what the run computes (" + "; ".join(diff)
                             + "); give the run's own command, or only --resume OUT_DIR")
    return old.replace(**keep)


def default_run_dir(cfg: RunConfig) -> Path:
    """``outputs/<model>_<metric>[+<metric>...]_<mode>_k<k>[_<perturb>][_rtn<bits>]_<timestamp>``: an ESA run's
    default --out-dir."""
    return default_out_dir(model_slug(cfg.model), "+".join(cfg.metrics), cfg.mode, f"k{cfg.topk}",
                           *filter(None, [cfg.perturb, f"{cfg.quantize}{cfg.bits}" if cfg.quantize else None]))


def validate(cfg: RunConfig) -> RunConfig:
    """Check everything that can be checked before the model loads; return the config."""
    if cfg.topk <= 0:
        raise UsageError(f"--topk must be a positive integer, got {cfg.topk}")
    if cfg.resume and cfg.overwrite:
        raise UsageError("give either --resume (continue the run) or --overwrite (replace it), not both")
    if cfg.quantize is not None:
        if cfg.quantize not in QUANTIZERS:
            raise UsageError(f"unknown --quantize {cfg.quantize!r}; choose from {', '.join(QUANTIZERS)}")
        if cfg.perturb:
            raise UsageError("--quantize cannot be combined with --perturb: a condition is either a perturbation of "
                             "the selected weights or a quantization that protects them, not both")
        if not 2 <= cfg.bits <= 8:
            raise UsageError(f"--bits must be in 2..8, got {cfg.bits}")
        if not cfg.block_sizes:
            raise UsageError("--block-size is empty")
        if cfg.clip_z is not None and not (0 < cfg.clip_z < float("inf")):
            raise UsageError(f"--clip-z must be a positive number of standard deviations, got {cfg.clip_z}")
    if cfg.topk_sweep and not cfg.perturb:
        raise UsageError("--topk-sweep needs --perturb (the sweep measures the perplexity change per k)")
    if any(k <= 0 for k in cfg.topk_sweep):
        raise UsageError(f"--topk-sweep values must be positive, got {list(cfg.topk_sweep)}")
    if cfg.bit_index is not None and cfg.perturb != "bit_flip":
        raise UsageError("--bit-index only applies to --perturb bit_flip")
    if cfg.bit_index is not None and not 0 <= cfg.bit_index < 32:
        raise UsageError(f"--bit-index must be in 0..31 (0..15 for bf16/fp16), got {cfg.bit_index}")
    for name in ("max_samples", "eval_samples", "batch_size", "hutchinson_samples", "curvature_samples"):
        if getattr(cfg, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.max_length < 2:
        raise UsageError(f"--max-length must be at least 2 tokens, got {cfg.max_length}")
    if not (cfg.obs_damp >= 0.0 and cfg.obs_damp != float("inf")):
        raise UsageError(f"--obs-damp must be a finite number >= 0, got {cfg.obs_damp}")
    if not 0.0 < cfg.perturb_prob <= 1.0:
        raise UsageError(f"--perturb-prob must be in (0, 1], got {cfg.perturb_prob}")
    if not cfg.perturb_scale >= 0.0 or cfg.perturb_scale != cfg.perturb_scale:
        raise UsageError(f"--perturb-scale must be a non-negative number, got {cfg.perturb_scale}")
    if cfg.data_file is not None and cfg.dataset is not None:
        raise UsageError("give either --data-file or --dataset, not both")
    if cfg.data_dir is not None:
        if cfg.dataset is None:
            raise UsageError("--data-dir needs --dataset (it holds that dataset's raw files)")
        if not os.path.isdir(cfg.data_dir):
            raise UsageError(f"--data-dir {cfg.data_dir!r} does not exist or is not a folder")
    if cfg.data_file is not None:
        check_text_file(cfg.data_file, "--data-file")
    if cfg.device_map not in (None, "auto"):
        raise UsageError(f"--device-map only supports 'auto', got {cfg.device_map!r}")
    if cfg.offload and cfg.device_map is None:
        raise UsageError("--offload needs --device-map auto (it lets the device map use CPU memory)")
    if cfg.device_map is not None and distributed.requested():
        raise UsageError("--device-map auto cannot be combined with torchrun: each rank would spread its own "
                         "copy over all GPUs; use one or the other")
    if not cfg.metrics:
        raise UsageError("--metric is empty; name one or more metrics, comma-separated")
    if cfg.gradient_checkpointing and not any("backward" in METRICS[m].needs for m in cfg.metrics):
        raise UsageError(f"--gradient-checkpointing only applies to gradient metrics, not {', '.join(cfg.metrics)}")
    if cfg.detect_super_weights:
        if not (cfg.super_weight_threshold > 1.0 and cfg.super_weight_threshold != float("inf")):
            raise UsageError("--super-weight-threshold must be a finite number > 1 (a multiple of the median), "
                             f"got {cfg.super_weight_threshold}")
        if cfg.max_super_weights < 1:
            raise UsageError(f"--max-super-weights must be at least 1, got {cfg.max_super_weights}")
        if cfg.super_weight_prompt is not None and cfg.detect_on_data:
            raise UsageError("give either --super-weight-prompt or --detect-on-data, not both")
        if cfg.super_weight_prompt is not None and not cfg.super_weight_prompt.strip():
            raise UsageError("--super-weight-prompt is empty")
    elif cfg.detect_on_data or cfg.super_weight_prompt is not None:
        raise UsageError("--detect-on-data and --super-weight-prompt need --detect-super-weights")
    if cfg.targets not in SCOPES:
        raise UsageError(f"--targets must be one of {', '.join(SCOPES)}, got {cfg.targets!r}")
    compile_patterns(cfg.include, "--include")
    compile_patterns(cfg.exclude, "--exclude")
    return cfg
