"""Atomic output files and the experiment manifest.

Every file is written to a temporary sibling and moved into place with ``os.replace``, so a crash
never leaves a half-written file.  JSON is strict (no NaN/Infinity tokens): a non-finite float is
written as the string ``"inf"``, ``"-inf"`` or ``"nan"``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import resource
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; outputs are ordinary files
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(_finite(obj), indent=2, allow_nan=False) + "\n")


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def check_writable(out_dir: Path) -> None:
    """Create ``out_dir`` and prove a file can be written there (raises OSError otherwise)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".write-test-")
    os.close(fd)
    os.unlink(tmp)


def prepare_out_dir(out_dir: Path) -> Path:
    """``check_writable`` for the CLIs: an unwritable --out-dir is bad input (UsageError)."""
    from esa.config import UsageError

    try:
        check_writable(out_dir)
    except OSError as exc:
        raise UsageError(f"--out-dir {str(out_dir)!r} is not writable: {exc.strerror or exc}") from None
    return out_dir


def peak_memory_mb() -> dict:
    out = {"rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
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
