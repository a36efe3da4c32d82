"""Naming and creating an out-dir: a default name per tool, and it must be writable before any work starts."""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path

from esa.errors import UsageError
from esa.outdir.process import alive, status_of


def check_writable(out_dir: Path) -> None:
    """Create ``out_dir`` and prove a file can be written there (raises OSError otherwise)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".write-test-")
    os.close(fd)
    os.unlink(tmp)


def prepare_out_dir(out_dir: Path) -> Path:
    """``check_writable`` for the CLIs: an unwritable --out-dir is bad input (UsageError)."""
    try:
        check_writable(out_dir)
    except OSError as exc:
        raise UsageError(f"--out-dir {str(out_dir)!r} is not writable: {exc.strerror or exc}") from None
    return out_dir


def model_slug(model: str) -> str:
    """A filesystem-safe short name for a model id, directory or .gguf path (for default out-dirs)."""
    name = Path(model).name if model.endswith(".gguf") else model
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def default_out_dir(*parts: str) -> Path:
    """``outputs/<part>_<part>_..._<timestamp>``: every tool's default --out-dir."""
    return Path("outputs") / ("_".join(parts) + time.strftime("_%Y%m%d-%H%M%S"))


# Every file an ESA run writes (at the top of its out-dir, and in each metrics/<name>/ folder of a
# multi-metric run); plots/ holds PLOT_FILES, checkpoints/ the resume state.  An out-dir holding any
# of them belongs to a run: a new run refuses it unless told to --overwrite (which removes exactly
# these files, never a user's) or to --resume it.
RUN_FILES = ("config.json", "experiment_manifest.json", "top_weights.csv", "sensitivity_stats.json",
             "score_distribution.npz", "perturbation_results.json", "stability_summary.json", "report.md",
             "super_weights.json", "super_weights.txt", "super_weights.png", "quantization_results.json",
             "quantization.png", "metric_agreement.json", "metric_agreement.png", "activations.json",
             "activations.png")
PLOT_FILES = ("score_distribution.png", "topk_locations.png", "score_concentration.png", "perturbation_effect.png",
              "stability.png", "dose_response.png")
RESULTS_SUFFIX = "_results.json"  # every experiment's results file (<name>_results.json), registered or future
CHECKPOINT_DIR = "checkpoints"
METRICS_DIR = "metrics"
PERTURBATIONS_DIR = "perturbations"  # several --perturb: each one's complete out-dir (in each metric's folder)
_CHECKPOINT_FILE = re.compile(r"(seed_\d+\.npz|evaluations\.jsonl|super_weights\.json)")


def _is_tool_file(folder: str, name: str) -> bool:
    """Whether ``name`` in ``folder`` ("", "plots", "checkpoints") is a file a run writes, or the hidden
    temporary of an atomic write of one that a killed run left behind."""
    temp = re.fullmatch(r"\.(.+)\.[0-9a-f]{8}\.tmp", name)
    name = temp.group(1) if temp else name
    if folder == "plots":
        return name in PLOT_FILES
    if folder == CHECKPOINT_DIR:
        return bool(_CHECKPOINT_FILE.fullmatch(name))
    return name in RUN_FILES or name.endswith(RESULTS_SUFFIX)


def run_files(out_dir: Path) -> list[Path]:
    """The files of a run found in ``out_dir`` (top level, plots/, checkpoints/, metrics/<name>/...,
    perturbations/<name>/... at the top or in a metric's folder)."""
    out: list[Path] = []

    def scan(root: Path, nested: tuple[str, ...]) -> None:
        if not root.is_dir():
            return
        for p in sorted(root.iterdir()):
            if p.is_file() and _is_tool_file("", p.name):
                out.append(p)
            elif p.is_dir() and p.name in ("plots", CHECKPOINT_DIR):
                out.extend(q for q in sorted(p.iterdir()) if q.is_file() and _is_tool_file(p.name, q.name))
            elif p.is_dir() and p.name in nested:
                for sub in sorted(p.iterdir()):
                    scan(sub, nested[nested.index(p.name) + 1:])
    scan(out_dir, (METRICS_DIR, PERTURBATIONS_DIR))
    return out


def _read(out_dir: Path, name: str) -> dict:
    try:
        return json.loads((out_dir / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def describe_run(out_dir: Path) -> str:
    """One line naming the run in ``out_dir``: model, metric(s), mode, k, status (``killed`` when the
    manifest says running but its process is gone) and start time."""
    c = _read(out_dir, "config.json").get("config", {})
    m = _read(out_dir, "experiment_manifest.json")
    what = (f"{c.get('model')}, {c.get('metric')}, {c.get('mode')}, k={c.get('topk')}" if c
            else "a run without config.json")
    status = status_of(m) if m else "unknown"
    if status == "killed":
        status += " (its manifest says running, but its process is gone)"
    return f"{what}; status {status}, started {m.get('started_at', 'unknown')}"


def refuse_live(out_dir: Path, action: str) -> None:
    """A run whose process still runs owns its out-dir: ``action`` (--resume, --overwrite) would write
    into it alongside (UsageError)."""
    m = _read(out_dir, "experiment_manifest.json")
    if m.get("status") == "running" and alive(m.get("process")):
        p = m["process"]
        raise UsageError(f"{action} {str(out_dir)!r}: that run is still running (process {p['pid']} on {p['host']}, "
                         f"started {p.get('started_at')}); wait for it to end or stop it first")


def claim_out_dir(out_dir: Path, resume: bool = False, overwrite: bool = False) -> Path:
    """Make ``out_dir`` this run's: a fresh run refuses an out-dir holding another run's files (exit 2,
    naming it) unless ``overwrite``, which removes exactly those files (and the tool's folders, if
    left empty) first; ``resume`` needs the run's config.json there."""
    if resume:
        if not (out_dir / "config.json").is_file():
            raise UsageError(f"--resume {str(out_dir)!r}: no ESA run there (config.json is missing)")
        refuse_live(out_dir, "--resume")
        return prepare_out_dir(out_dir)
    found = run_files(out_dir)
    if found and overwrite:
        refuse_live(out_dir, "--overwrite")
    if found and not overwrite:
        raise UsageError(f"--out-dir {str(out_dir)!r} holds another run ({describe_run(out_dir)}); pass --overwrite "
                         f"to replace it, or --resume {str(out_dir)!r} to continue it")
    for p in found:
        p.unlink()
    for folder in sorted({p.parent for p in found}, key=lambda d: -len(d.parts)):
        while folder != out_dir and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
            folder = folder.parent
    return prepare_out_dir(out_dir)
