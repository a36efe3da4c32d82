"""Compare two out-dirs file by file, ignoring only what differs between two identical runs.

Ignored: timestamps, timings, throughput, peak memory, the git SHA, the command line, the out-dir
path, the manifest's record of its process and of resumes (keys in :data:`VOLATILE_KEYS`, at any
depth of a JSON file), the run time and sessions quoted in report.md, the zip timestamps inside
``.npz`` files (their members are compared byte for byte instead) and the resume state in
``checkpoints/``.  Everything else, PNGs included, must be byte-identical.  Used to show that a
refactoring or a resumed run reproduces an earlier run exactly: ``python scripts/compare_outdirs.py A B``.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

from esa.outdir.layout import CHECKPOINT_DIR

VOLATILE_KEYS = frozenset({"started_at", "finished_at", "timings_s", "wall_time_s", "total_wall_time_s",
                           "eval_wall_s", "tokens_per_s", "input_tokens_per_s", "peak_memory", "git_sha", "command",
                           "out_dir", "resumes", "process"})
# report.md's "run: success after 95 s" and, for a resumed run, its sessions (older reports: "run success in 95 s")
_REPORT_TIMING = re.compile(r"run: (\w+) after [0-9.]+ s(?: over \d+ sessions \([^)]*\))?|run (\w+) in [0-9.]+ s")


def strip_volatile(obj):
    """``obj`` (parsed JSON) without the keys of :data:`VOLATILE_KEYS`, at any depth."""
    if isinstance(obj, dict):
        return {k: strip_volatile(v) for k, v in obj.items() if k not in VOLATILE_KEYS}
    if isinstance(obj, list):
        return [strip_volatile(v) for v in obj]
    return obj


def normalised(path: Path) -> bytes:
    """The bytes of ``path`` that must match between identical runs."""
    if path.suffix == ".json":
        return json.dumps(strip_volatile(json.loads(path.read_text(encoding="utf-8"))), sort_keys=True).encode()
    if path.suffix == ".md":
        return _REPORT_TIMING.sub(lambda m: f"run {m.group(1) or m.group(2)} in <t> s",
                                  path.read_text(encoding="utf-8")).encode()
    if path.suffix == ".npz":
        with zipfile.ZipFile(path) as z:
            return b"".join(name.encode() + z.read(name) for name in sorted(z.namelist()))
    return path.read_bytes()


def files(out_dir: Path) -> set[str]:
    """Relative paths of the out-dir's files (hidden temporaries and the resume state in
    ``checkpoints/`` excluded: what was journalled depends on where a run was interrupted)."""
    return {str(p.relative_to(out_dir)) for p in out_dir.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(out_dir).parts)
            and p.relative_to(out_dir).parts[0] != CHECKPOINT_DIR}


def compare(a: Path, b: Path) -> dict[str, str]:
    """``{relative path: "identical" | "differs" | "only in A" | "only in B"}`` for every file of either."""
    a, b = Path(a), Path(b)
    fa, fb = files(a), files(b)
    out = {}
    for name in sorted(fa | fb):
        if name not in fb:
            out[name] = "only in A"
        elif name not in fa:
            out[name] = "only in B"
        else:
            out[name] = "identical" if normalised(a / name) == normalised(b / name) else "differs"
    return out
