"""Where a run writes and how it talks: out-dir, plots, resume/overwrite, dry run, verbosity."""

from __future__ import annotations

from dataclasses import dataclass

from esa.errors import UsageError
from esa.options import opt


@dataclass(frozen=True)
class OutputSpec:
    """``resume``: continue the run in ``out_dir`` (the command line's ``--resume OUT_DIR``)."""

    out_dir: str | None = opt(None, "output directory (default: outputs/<model>_<metric>_<mode>_k<K>[_<perturb>]_"
                              "<time>)")
    save_plots: bool = opt(False, "write PNG plots to OUT_DIR/plots/")
    resume: bool = False
    overwrite: bool = opt(False, "remove an earlier run's files from --out-dir before starting (only the tool's own "
                          "files)")
    dry_run: bool = opt(False, "validate the configuration, print the plan and exit without loading the model")
    verbose: bool = opt(False, "debug logs and tracebacks", short="-v")


def validate_output(spec: OutputSpec) -> None:
    if spec.resume and spec.overwrite:
        raise UsageError("give either --resume (continue the run) or --overwrite (replace it), not both")
