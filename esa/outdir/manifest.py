"""``experiment_manifest.json``: what a run is doing or how it ended, its timings and peak memory."""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from esa.outdir.atomic import write_json


def peak_memory_mb() -> dict:
    """Peak RSS of this process, and the CUDA peak when torch has initialised CUDA (torch is never
    imported here: the out-dir code must load without it)."""
    out = {"rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


class Manifest:
    """``experiment_manifest.json``: status (running/success/failed/interrupted), error, timings."""

    def __init__(self, out_dir: Path, write: bool = True):
        # write=False: the manifest of a torchrun rank other than 0, which keeps timings but writes nothing
        self.write = write
        self.path = out_dir / "experiment_manifest.json"
        self.started = time.time()
        self.timings: dict[str, float] = {}
        self.data: dict = {"status": "running", "error": None,
                           "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started))}
        self.files: list[str] = []
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
        if name not in self.files:
            self.files.append(name)

    def save(self) -> None:
        if not self.write:
            return
        self.data.update(timings_s=self.timings, wall_time_s=time.time() - self.started,
                         peak_memory=peak_memory_mb(), files=self.files)
        write_json(self.path, self.data)

    def finish(self, status: str, error: str | None = None) -> None:
        self.data["status"] = status
        self.data["error"] = error
        self.data["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.save()


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
