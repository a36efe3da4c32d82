"""The baseline runner's resolved configuration and presets (built by :mod:`esa.cli.baseline`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from esa.evaluators.spec import EvaluationSpec
from esa.model.device import ModelSpec
from esa.options import opt
from esa.seeding import parse_seeds

PRESETS = {
    "smoke": {"contexts": (256,), "strides": (None,), "max_windows": 32},
    "standard": {"contexts": (512, 1024, 2048), "strides": (None,), "max_windows": None},
    "extended": {"contexts": (512, 1024, 2048, 4096), "strides": (None, "half"), "max_windows": None},
}
DEFAULT_BATCH_TOKENS = 4096
SEED_SEMANTICS = ("The baseline is deterministic: no step draws random numbers, and --max-windows keeps the "
                  "first windows in text order (the windows ESA runner evaluates), never a random sample. "
                  "Results are therefore identical for every seed; they are computed once and hold for each "
                  "seed listed. --seeds exists so that a baseline can be filed next to ESA runs with the "
                  "same seeds.")
ROW_JOIN_NOTE = ("datasets: the whole test split via the datasets library, rows joined with '\\n\\n' (the "
                 "Hugging Face perplexity guide's convention); text files: the whole file")


@dataclass(frozen=True)
class BaselineConfig(ModelSpec):
    """The resolved flags; ``*_explicit`` record what the user gave (presets fill the rest)."""

    preset: str = opt("standard", "preset (fills --context-lens, --stride and --max-windows where not given)",
                      flag="--baseline", choices=tuple(sorted(PRESETS)))
    # The preset's: the flags of these four default to the chosen --baseline preset (esa.cli.baseline)
    datasets: tuple[str, ...] = ()  # canonical dataset names or file paths; () = the default chain
    contexts: tuple[int, ...] = (512, 1024, 2048)
    contexts_explicit: bool = False
    strides: tuple[int | str | None, ...] = (None,)  # None = non-overlapping, "half" = context // 2
    max_windows: int | None = None
    batch_size: int | None = None
    batch_tokens: int | None = None
    seeds: tuple[int, ...] = opt((0,), "comma list; deterministic baseline: same result for every seed",
                                 parse=parse_seeds, show_default="0")
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    out_dir: str | None = opt(None, "output directory (default: outputs/baseline_<model>_<preset>_<time>)")
    dry_run: bool = opt(False, "validate the configuration, print the plan and exit without loading the model")
    verbose: bool = opt(False, "debug logs and tracebacks", short="-v")

    def windows_per_batch(self, context: int) -> int:
        return self.batch_size or max(1, (self.batch_tokens or DEFAULT_BATCH_TOKENS) // context)


def stride_label(stride: int | str | None) -> str:
    return "none (non-overlapping)" if stride is None else ("context/2" if stride == "half" else str(stride))
