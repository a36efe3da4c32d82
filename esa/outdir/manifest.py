"""``experiment_manifest.json``: what a run is doing or how it ended, its timings and peak memory, its
process (so that a reader can tell a killed run from a running one: :mod:`esa.outdir.process`) and,
for a resumed run, each session."""

from __future__ import annotations

import contextlib
import json
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from esa.outdir.atomic import write_json
from esa.outdir.layout import run_files
from esa.outdir.process import TIME_FORMAT, parse_time, process_record, status_of


def peak_memory_mb() -> dict:
    """Peak RSS of this process, and the CUDA peak when torch has initialised CUDA (torch is never
    imported here: the out-dir code must load without it)."""
    out = {"rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


# The order in which a run writes its files; the manifest lists them in this order (a metric's
# folder after the run's own files, metric folders by name; unknown names last, alphabetically).
FILE_ORDER = ("config.json", "sensitivity_stats.json", "score_distribution.npz", "top_weights.csv",
              "stability_summary.json", "metric_agreement.json", "super_weights.json", "super_weights.txt",
              "super_weights.png", "perturbation_results.json", "quantization_results.json", "quantization.png",
              "plots/score_distribution.png", "plots/topk_locations.png", "plots/score_concentration.png",
              "plots/perturbation_effect.png", "plots/stability.png", "plots/dose_response.png",
              "metric_agreement.png", "report.md")


def file_order(name: str) -> tuple:
    parts = name.split("/")
    folder, rest = (parts[1], "/".join(parts[2:])) if parts[0] == "metrics" and len(parts) > 2 else ("", name)
    return (folder != "", folder, FILE_ORDER.index(rest) if rest in FILE_ORDER else len(FILE_ORDER), rest)


class Manifest:
    """``experiment_manifest.json``: status (running/success/failed/interrupted), error, timings."""

    def __init__(self, out_dir: Path, write: bool = True, resume: dict | None = None):
        # write=False: the manifest of a torchrun rank other than 0, which keeps timings but writes nothing.
        # resume: what this resumed run could skip; the earlier manifest's record is kept and this resume
        # is appended to its "resumes" (time, how the session before ended and how long it ran, its
        # process, what was skipped).
        self.write = write
        self.path = out_dir / "experiment_manifest.json"
        self.started = time.time()
        self.timings: dict[str, float] = {}
        now = time.strftime(TIME_FORMAT, time.localtime(self.started))
        self.data: dict = {"status": "running", "error": None, "started_at": now}
        self.files: list[str] = []
        self.before_s = 0.0  # the earlier sessions of a resumed run
        if resume is not None and self.path.is_file():
            before = json.loads(self.path.read_text(encoding="utf-8"))
            self.files = list(before.get("files", []))
            self.data = {k: v for k, v in before.items() if k not in ("finished_at", "files", "process")}
            ran = previous_session_s(before, out_dir)
            self.data["resumes"] = [*before.get("resumes", []), {
                "at": now, "previous_status": status_of(before), "previous_error": before.get("error"),
                "previous_session_s": ran, "previous_process": before.get("process"), **resume}]
            self.data.update(status="running", error=None)
            self.before_s = sum(r.get("previous_session_s") or 0.0 for r in self.data["resumes"])
        self.data["process"] = process_record(self.started)
        self.save()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    @contextlib.contextmanager
    def recording(self) -> Iterator[Manifest]:
        """Record how the block ends: Ctrl-C -> ``interrupted``, any other exception -> ``failed``
        with the error (the exception still propagates); success is the caller's ``finish``."""
        try:
            yield self
        except KeyboardInterrupt:
            self.finish("interrupted", "KeyboardInterrupt")
            raise
        except BaseException as exc:
            self.finish("failed", f"{type(exc).__name__}: {exc}")
            raise

    def add_file(self, name: str) -> None:
        """Record a written file; the list is kept in one canonical order (:func:`file_order`), so it
        does not depend on which steps a resumed run could skip."""
        if name not in self.files:
            self.files.append(name)
            self.files.sort(key=file_order)

    def save(self) -> None:
        if not self.write:
            return
        wall = time.time() - self.started
        self.data.update(timings_s=self.timings, wall_time_s=wall, total_wall_time_s=self.before_s + wall,
                         peak_memory=peak_memory_mb(), files=self.files)
        write_json(self.path, self.data)

    def finish(self, status: str, error: str | None = None) -> None:
        self.data["status"] = status
        self.data["error"] = error
        self.data["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.save()


def previous_session_s(before: dict, out_dir: Path) -> float:
    """How long the session of manifest ``before`` ran: its recorded wall time, or, for a session that
    never recorded its end (killed), until the last file the run wrote (the journal is appended after
    every condition), whichever is later."""
    recorded = float(before.get("wall_time_s") or 0.0)
    if before.get("status") != "running":
        return recorded
    resumes = before.get("resumes") or []
    try:
        start = parse_time(resumes[-1]["at"] if resumes else before["started_at"])
    except (KeyError, ValueError):
        return recorded
    last = max((p.stat().st_mtime for p in run_files(out_dir)), default=start)
    return max(recorded, last - start)


class ScopedManifest:
    """A view of a :class:`Manifest` for the files of one part of the out-dir (a metric's folder of a
    multi-metric run): ``add_file`` records names under ``prefix``; everything else is the manifest's."""

    def __init__(self, manifest: Manifest, prefix: str) -> None:
        self.manifest = manifest
        self.prefix = prefix

    def add_file(self, name: str) -> None:
        self.manifest.add_file(self.prefix + name)

    def __getattr__(self, attr: str):
        return getattr(self.manifest, attr)
