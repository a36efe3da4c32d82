"""``python -m esa.report OUT_DIR``: rebuild every figure and text file a tool wrote into an out-dir,
from the out-dir's files alone, so that an out-dir whose PNGs and report.md were deleted gets the
same files back (``scripts/compare_outdirs.py``'s rules).

What a tool wrote is told by its files:

* an ESA run (``config.json``): each registered part's figure (``quantization.png``,
  ``super_weights.png``), ``super_weights.txt``, the score plots under ``plots/`` *if the run drew
  them* (``--save-plots``: its config or manifest says so; ``save_plots=True`` here draws them for a
  run that did not), report.md; a multi-metric run also each metric's folder and the agreement
  heatmap; a run of several perturbations each perturbation's folder and the report above them;
* an out-dir of ``scripts/find_super_weights.py`` (``super_weights.json``, no config.json): its
  plot and table;
* an out-dir of ``scripts/baseline_runner.py`` (``baseline_results.json``) holds no figure or
  report: :class:`esa.errors.UsageError` says so, as for a folder of no tool.
"""

from __future__ import annotations

from pathlib import Path

from esa.errors import UsageError
from esa.outdir.atomic import atomic_write_text
from esa.outdir.readers import leaf_dirs, read_json
from esa.reporting import metrics_report, parts, perturbations_report, plots, report_md
from esa.reporting.superweights import JSON_NAME, TABLE_NAME, format_table


def kind(out_dir: Path) -> str:
    """``run``, ``super_weights`` or ``baseline``: which tool made ``out_dir`` (UsageError: none)."""
    if (out_dir / "config.json").is_file():
        return "run"
    if (out_dir / JSON_NAME).is_file():
        return "super_weights"
    if (out_dir / "baseline_results.json").is_file():
        return "baseline"
    raise UsageError(f"{out_dir} holds no ESA tool's results (config.json of an ESA run, super_weights.json of "
                     "find_super_weights.py): nothing to rebuild")


def drew_plots(folder: Path, manifest: dict | None, prefix: str = "") -> bool:
    """Whether the run drew the score plots of ``folder`` (``plots/*.png``): its config says
    ``save_plots``, or the manifest lists one (a ``--resume`` may have added ``--save-plots``)."""
    config = (read_json(folder, "config.json") or {}).get("config", {})
    listed = (manifest or {}).get("files", [])
    return bool(config.get("save_plots")) or any(f.startswith(f"{prefix}plots/") for f in listed)


def _super_weights_table(folder: Path) -> list[Path]:
    sw = read_json(folder, JSON_NAME)
    if sw is None:
        return []
    return [atomic_write_text(folder / TABLE_NAME, format_table(sw) + "\n")]


def _single(folder: Path, manifest: dict | None, prefix: str, save_plots: bool) -> list[Path]:
    """A single-metric out-dir (or a metric's folder): figures, score plots, super-weight table, report."""
    made = [*parts.figures(folder), *_super_weights_table(folder)]
    if save_plots or drew_plots(folder, manifest, prefix):
        made += plots.make_plots(folder)
    return [*made, report_md.write_report(folder)]


def rebuild(out_dir: Path, save_plots: bool = False) -> list[Path]:
    """Rebuild the out-dir's figures and text files (see the module docstring); the paths written."""
    out_dir = Path(out_dir)
    made_by = kind(out_dir)
    if made_by == "baseline":
        raise UsageError(f"{out_dir} is an out-dir of baseline_runner.py, which writes no figure or report to "
                         "rebuild (its results are baseline_results.json)")
    if made_by == "super_weights":
        return [*parts.figures(out_dir), *_super_weights_table(out_dir)]
    manifest = read_json(out_dir, "experiment_manifest.json")
    config = read_json(out_dir, "config.json")
    made = []
    for folder in leaf_dirs(out_dir, config["config"]).values():
        rel = folder.relative_to(out_dir).as_posix()
        made += _single(folder, manifest, "" if rel == "." else f"{rel}/", save_plots)
    if perturbations_report.is_multi(config):  # each folder holding perturbations/<name>/: its own report
        for folder in (metrics_report.metric_dirs(out_dir, config) if metrics_report.is_multi(config)
                       else {"": out_dir}).values():
            made.append(report_md.write_report(folder))
    if not metrics_report.is_multi(config):
        return made
    return [*made, *metrics_report.figures(out_dir), report_md.write_report(out_dir)]
