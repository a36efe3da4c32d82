"""What a run produces, one record per metric, and the files rank 0 writes from it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from esa.experiment.registry import EXPERIMENTS, SeedSelections
from esa.model import distributed
from esa.outdir.journal import fault_point
from esa.reporting import metrics_report, parts, perturbations_report, plots, report_md, summary
from esa.reporting.superweights import PLOT_NAME, format_table, write_super_weights
from esa.runner import records
from esa.runner.context import RunContext

log = logging.getLogger("esa")


@dataclass
class MetricResult:
    """One metric of a run: every seed's selections, the Top-K rows written to top_weights.csv, the
    cross-seed stability, each experiment's results (``{experiment name: results-file content}``),
    the super-weight result with this metric's Top-K overlap, and the evaluators' own results files
    (``{file name: content}``, e.g. ``task_results.json``)."""

    metric: str
    selections: list[SeedSelections]
    top_rows: list[list] = field(default_factory=list)
    stability: dict | None = None
    experiments: dict[str, dict] = field(default_factory=dict)
    super_weights: dict | None = None
    evaluations: dict[str, dict] = field(default_factory=dict)


@dataclass
class RunResult:
    """A whole run: its out-dir, each metric's result (by :func:`esa.runner.context.leaf_key`: with several
    perturbations one per metric and perturbation), and (several metrics) their agreement;
    ``finished_before``: a ``--resume`` of a run that had already finished (nothing was done)."""

    out_dir: Path
    metrics: dict[str, MetricResult] = field(default_factory=dict)
    agreement: dict | None = None
    finished_before: bool = False

    def only(self) -> MetricResult:
        """The result of a single-metric run."""
        if len(self.metrics) != 1:
            raise ValueError(f"a run of {len(self.metrics)} metrics has no single result")
        return next(iter(self.metrics.values()))


def write_selections(view: RunContext, result: MetricResult) -> None:
    """Rank 0, before any evaluation (so a crash there loses nothing): Top-K table and stability."""
    result.top_rows = records.write_top_weights(view, result.selections)
    view.manifest.add_file("top_weights.csv")
    view.manifest.data["calibration_windows"] = {str(r.seed): r.calibration_windows for r in result.selections}
    view.manifest.data["world_size"] = distributed.world_size()
    if result.stability is not None:
        records.write_json(view.out_dir / "stability_summary.json", result.stability)
        view.manifest.add_file("stability_summary.json")
    view.manifest.save()


def write_outputs(ctx: RunContext, views: dict[str, RunContext], run: RunResult) -> None:
    """Rank 0's remaining files: each leaf's (:meth:`RunContext.leaves`: metric and perturbation)
    super-weight files, experiment results and plots, (several metrics) the agreement heatmap, then
    every report.md; then print the summary."""
    cfg, out_dir, manifest = ctx.cfg, ctx.out_dir, ctx.manifest
    plot_paths: list[Path] = []
    for key, view in views.items():
        res = run.metrics[key]
        if res.super_weights is not None:
            for name in write_super_weights(res.super_weights, view.out_dir):
                view.manifest.add_file(name)
        files = {EXPERIMENTS[name].results_file: content for name, content in res.experiments.items()}
        for results_file, content in {**files, **res.evaluations}.items():
            records.write_json(view.out_dir / results_file, content)
            view.manifest.add_file(results_file)
        with manifest.phase("plots"):  # each results file's own figure (reporting.parts), with or without --save-plots
            figures = [f for f in parts.figures(view.out_dir) if f.name != PLOT_NAME]  # (written with its JSON)
        for figure in figures:
            plot_paths.append(figure)
            view.manifest.add_file(str(figure.relative_to(view.out_dir)))
        if cfg.output.save_plots:
            with manifest.phase("plots"):
                for path in plots.make_plots(view.out_dir):
                    view.manifest.add_file(str(path.relative_to(view.out_dir)))
                    plot_paths.append(path)
    if run.agreement is not None:  # the comparison's own pictures: drawn with or without --save-plots
        with manifest.phase("plots"):
            drawn = metrics_report.figures(out_dir)
        for figure in drawn:
            manifest.add_file(figure.name)
            plot_paths.append(figure)
    # report.md is always written (text, cheap; plot sections only with --save-plots), after the
    # manifest says success so that the report quotes the final status; if it fails, the
    # recording() block turns the manifest to failed
    # the folders above the perturbations' (several --perturb): each metric's, or the run's
    above = [ctx.view(m) for m in cfg.scoring.metrics] if cfg.multi_perturb else []
    for view in (*views.values(), *above):
        view.manifest.add_file("report.md")
    manifest.add_file("report.md")
    fault_point("report")  # tests: killed while the outputs are being written
    manifest.finish("success")
    for view in (*views.values(), *above):
        report_md.write_report(view.out_dir)
    if cfg.multi:
        report_md.write_report(out_dir)
        print(metrics_report.console_summary(out_dir), flush=True)
    elif cfg.multi_perturb:
        print(perturbations_report.console_summary(out_dir), flush=True)
    else:
        res = run.only()
        text = summary.console_summary(cfg.to_json(), res.experiments.get("perturbation"), res.stability,
                                       res.top_rows[:5], ctx.coverage)
        text += "".join(f"\n{line}" for line in parts.console(out_dir))
        print(text + (f"\n{format_table(res.super_weights)}" if res.super_weights is not None else ""), flush=True)
    print(summary.files_footer(out_dir, plot_paths), flush=True)
