"""What a run scores and selects: metrics (with their options), targets, Top-K mode and k, seeds."""

from __future__ import annotations

from dataclasses import dataclass, field

from esa.errors import UsageError
from esa.metrics.registry import METRICS, metric_options
from esa.model.targets import SCOPES
from esa.naming import canonical, compile_patterns
from esa.options import Options, check_all, check_spec, opt
from esa.seeding import parse_seeds

MODES = ("per_layer", "per_row", "global")


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


def _catalogue() -> str:
    return "; ".join(f"{name} = {METRICS[name].help}" for name in METRICS)


@dataclass(frozen=True)
class ScoringSpec:
    """Which weights are scored by which metrics, how the Top-K is chosen, and with which seeds;
    ``options``: every metric option (each declared by its metric; :func:`metric_options`)."""

    metrics: tuple[str, ...] = opt(
        ("grad_x_weight",), "sensitivity metric, or a comma list of them scored in one pass (shared forward and "
        "backward passes; per-metric results under OUT_DIR/metrics/<name>/, their agreement in "
        f"metric_agreement.json): {', '.join(METRICS)} (aliases such as activation_magnitude -> act_mag are "
        "accepted). " + _catalogue(), flag="--metric", parse=parse_metrics, show_default="grad_x_weight",
        metavar="NAME[,NAME...]")
    mode: str = opt("per_layer", "per_layer: k highest scores in each target tensor; per_row: k highest in each "
                    "output row of each tensor (Wanda's comparison group; per expert and row for fused experts); "
                    "global: k highest overall", choices=MODES)
    topk: int = opt(100, "k", check=lambda v: None if v > 0 else f"must be a positive integer, got {v}")
    targets: str = opt("matrices", "which weights are scored: matrices = every floating-point parameter with 2 or "
                       "more dimensions (Linear, Conv1D, embeddings, fused MoE experts, routers, ...); all = also the "
                       "1-D norm scales and biases", choices=SCOPES)
    include: tuple[str, ...] = opt((), "only parameters whose name matches (repeatable)", append=True,
                                   metavar="REGEX")
    exclude: tuple[str, ...] = opt((), "skip parameters whose name matches (repeatable)", append=True,
                                   metavar="REGEX")
    seeds: tuple[int, ...] = opt((0,), "comma list of seeds; the first is the primary seed", parse=parse_seeds,
                                 show_default="0")
    stability_check: bool = opt(False, "Jaccard overlap of Top-K across seeds")
    options: Options = field(default_factory=lambda: Options.defaults(metric_options()))

    @property
    def multi(self) -> bool:
        return len(self.metrics) > 1


def validate_scoring(spec: ScoringSpec) -> None:
    """Everything about scoring that can be checked before the model loads (UsageError)."""
    check_spec(spec)
    if not spec.metrics:
        raise UsageError("--metric is empty; name one or more metrics, comma-separated")
    if spec.mode not in MODES:
        raise UsageError(f"--mode must be one of {', '.join(MODES)}, got {spec.mode!r}")
    if spec.targets not in SCOPES:
        raise UsageError(f"--targets must be one of {', '.join(SCOPES)}, got {spec.targets!r}")
    if (why := check_all(metric_options(), spec.options)) is not None:
        raise UsageError(why)
    compile_patterns(spec.include, "--include")
    compile_patterns(spec.exclude, "--exclude")
