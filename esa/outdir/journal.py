"""``checkpoints/evaluations.jsonl``: every evaluated condition of a run, appended as it is measured,
and the fault-injection hook the resume tests use.

Each line is ``{"key": <evaluation key>, "row": <result row>}`` (the unperturbed baseline, each
perturbed or quantized condition, keyed as in the run's evaluation cache), written and fsynced
before the run goes on, so a killed run loses at most the condition it was measuring.  A run
killed mid-line leaves a partial last line, which :meth:`Journal.load` ignores.  Floats are kept
exactly (JSON's Infinity/NaN included).

:func:`fault_point` is a test hook: with ``ESA_FAULT=<point>`` in the environment the process kills
itself with SIGKILL at that point (``scoring:<seed>``, ``seed_done:<seed>``, ``condition:<n>``,
``report``), so the tests can interrupt a run exactly where they need to.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from esa.outdir.layout import CHECKPOINT_DIR

JOURNAL = "evaluations.jsonl"
FAULT_ENV = "ESA_FAULT"


def fault_point(name: str) -> None:
    """SIGKILL this process when ``ESA_FAULT`` names this point (tests only; see module docstring)."""
    if os.environ.get(FAULT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


class Journal:
    """``evaluations.jsonl``: evaluated conditions by key, appended as they are measured."""

    def __init__(self, out_dir: Path, write: bool = True) -> None:
        self.path = out_dir / CHECKPOINT_DIR / JOURNAL
        self.write = write
        self.count = 0

    def load(self) -> dict[str, dict]:
        """Every complete line (a partial last line of a killed run is ignored)."""
        rows: dict[str, dict] = {}
        if not self.path.is_file():
            return rows
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            rows[entry["key"]] = entry["row"]
        return rows

    def append(self, key: str, row: dict) -> None:
        if not self.write:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"key": key, "row": row}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.count += 1
        fault_point(f"condition:{self.count}")
