"""What a run leaves behind as it goes, so that ``--resume`` can skip what is done.

Under ``OUT_DIR/checkpoints/`` (the tool's own folder):

* ``seed_<seed>.npz``: after a seed is scored and selected, its selections (every metric's Top-K
  and controls for --topk and every --topk-sweep k, as per-tensor flat indices and their scores),
  its calibration windows and its cross-metric agreement; written atomically, O(k) in size; plus
  what an experiment kept of the full scores (``SeedSelections.kept``: pruning's bit-packed masks,
  one bit per pruned weight and level).
* ``evaluations.jsonl``: one line per evaluated condition (:class:`esa.outdir.journal.Journal`).
* ``super_weights.json``: the detector's result and its ablation.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch

from esa.errors import UsageError
from esa.experiment.registry import SeedSelections
from esa.experiment.selection import Selection
from esa.outdir.atomic import atomic_write_bytes, atomic_write_text
from esa.outdir.journal import Journal
from esa.outdir.layout import CHECKPOINT_DIR as CHECKPOINTS
from esa.runner.seeds import SeedScores


def seed_path(out_dir: Path, seed: int) -> Path:
    return out_dir / CHECKPOINTS / f"seed_{seed}.npz"


def _put(arrays: dict, meta: dict, key: str, sel: Selection) -> None:
    names = list(sel.indices)
    meta[key] = {"kind": sel.kind, "row_k": sel.row_k, "names": names, "counts": [len(sel.indices[n]) for n in names]}
    empty_i, empty_s = torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.float32)
    arrays[f"{key}/indices"] = torch.cat([empty_i, *(sel.indices[n] for n in names)]).numpy()
    arrays[f"{key}/scores"] = torch.cat([empty_s, *(sel.scores[n] for n in names)]).numpy()


def _get(z, meta: dict, key: str) -> Selection:
    m = meta[key]
    idx = torch.from_numpy(z[f"{key}/indices"].copy()).split(m["counts"])
    sc = torch.from_numpy(z[f"{key}/scores"].copy()).split(m["counts"])
    return Selection(m["kind"], dict(zip(m["names"], idx)), dict(zip(m["names"], sc)), row_k=m["row_k"])


def save_seed(out_dir: Path, seed: int, scored: SeedScores) -> Path:
    """``seed_<seed>.npz``: every selection of the seed (written atomically)."""
    arrays: dict[str, np.ndarray] = {}
    meta: dict = {}
    results = {}
    for metric, r in scored.results.items():
        ks = {"main": (r.top, r.controls), **{str(k): v for k, v in r.sweep.items()}}
        for k, (top, controls) in ks.items():
            _put(arrays, meta, f"{metric}|{k}|top_k", top)
            for c, sel in controls.items():
                _put(arrays, meta, f"{metric}|{k}|{c}", sel)
        kept = {exp: list(got) for exp, got in r.kept.items()}
        for exp, got in r.kept.items():
            for i, tensor in enumerate(got.values()):
                arrays[f"{metric}|kept|{exp}|{i}"] = tensor.numpy()
        results[metric] = {"windows": r.calibration_windows, "ks": list(ks), "controls": list(r.controls),
                           "kept": kept}
    header = {"seed": seed, "results": results, "agreement": scored.agreement, "selections": meta}
    buf = io.BytesIO()
    np.savez(buf, header=np.array(json.dumps(header)), **arrays)
    return atomic_write_bytes(seed_path(out_dir, seed), buf.getvalue())


def load_seed(out_dir: Path, seed: int) -> SeedScores | None:
    """The seed's checkpoint, or None when the run has not finished selecting it."""
    path = seed_path(out_dir, seed)
    if not path.is_file():
        return None
    with np.load(path) as z:
        header = json.loads(str(z["header"]))
        meta = header["selections"]
        results = {}
        for metric, info in header["results"].items():
            def sels(k: str, _m: str = metric, _info: dict = info) -> tuple[Selection, dict[str, Selection]]:
                return (_get(z, meta, f"{_m}|{k}|top_k"),
                        {c: _get(z, meta, f"{_m}|{k}|{c}") for c in _info["controls"]})
            top, controls = sels("main")
            sweep = {int(k): sels(k) for k in info["ks"] if k != "main"}
            kept = {exp: {key: torch.from_numpy(z[f"{metric}|kept|{exp}|{i}"].copy()) for i, key in enumerate(keys)}
                    for exp, keys in info.get("kept", {}).items()}
            results[metric] = SeedSelections(seed, top, controls, info["windows"], sweep, kept)
    return SeedScores(results, header["agreement"])


def save_json(out_dir: Path, name: str, obj) -> None:
    """Atomically, with inf/NaN kept as JSON's Infinity/NaN so that they read back as floats."""
    atomic_write_text(out_dir / CHECKPOINTS / name, json.dumps(obj))


def load_json(out_dir: Path, name: str):
    path = out_dir / CHECKPOINTS / name
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def finished(out_dir: Path) -> bool:
    """Whether the run in ``out_dir`` ended successfully (its manifest says so)."""
    try:
        return json.loads((out_dir / "experiment_manifest.json").read_text(encoding="utf-8"))["status"] == "success"
    except (OSError, ValueError, KeyError):
        return False


def resumable(out_dir: Path, seeds: tuple[int, ...]) -> dict:
    """What a resumed run can skip: the seeds with a checkpoint, the evaluations in the journal, the
    super-weight detection (recorded in the manifest's ``resumes``)."""
    return {"seeds_done": [s for s in seeds if seed_path(out_dir, s).is_file()],
            "evaluations_done": len(Journal(out_dir, write=False).load()),
            "super_weights_done": (out_dir / CHECKPOINTS / "super_weights.json").is_file()}


def check_fingerprints(out_dir: Path, now: dict) -> None:
    """A resumed run must see the model weights and the data the run started with (UsageError)."""
    recorded = json.loads((out_dir / "config.json").read_text(encoding="utf-8")).get("fingerprints") or {}
    changed = [k for k, v in now.items() if k in recorded and recorded[k] != v]
    if changed:
        raise UsageError(f"--resume: the {' and the '.join(c.replace('_', ' ') for c in changed)} differ from the "
                         f"run's ({', '.join(f'{c} {recorded[c][:12]} then, {now[c][:12]} now' for c in changed)}); "
                         "resuming would mix two runs")
