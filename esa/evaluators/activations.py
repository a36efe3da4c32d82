"""``activations``: the residual stream's largest values per layer, and the massive activations
(Sun et al. 2024, "Massive Activations in Large Language Models"), for the baseline and every
condition; and the intervention that writes the baseline's massive activations back.

**What is measured** on the evaluation windows, per decoder layer (the block's output hidden state,
:mod:`esa.model.residual`): the largest |value| with its channel, window, token position and sign,
and the layer's median |value|.  **The median**: per window, the exact median of that window's
``L x H`` values |h| (the lower median, ``torch.median``; Sun et al. take this median per sequence);
the layer's median is the (lower) median of those over the windows.  An exact median of all
``W x L x H`` values of a layer would need them all at once (or a second pass); the per-window
median is exact, streams batch by batch and is the paper's own statistic.

**Massive activations**, the paper's rule: a value with |h| > ``--massive-min`` (100) and
> ``--massive-ratio`` (1000) x its layer's median.  They are found as the values above
``--massive-min`` (at most one per token and layer is kept, the largest: memory O(layers x windows x
tokens)), filtered by the ratio once the median is known; ``truncated`` says when the cap may have
cut massive ones.  They are grouped by channel with the layers they span.

**Change.**  For a condition, at each massive activation of the baseline (same layer, window,
position and channel): its value now, ``ratio`` = after / before (signed: 1 unchanged, 0 gone, -1
flipped; mean over the points of a (layer, channel)), whether it is still massive (the rule with
the condition's own medians), and per channel ``gone_from_layer``: the first of its layers from
which it is massive at none of the later ones.

**Cost.**  The hooks ride perplexity's forward when both are requested (one forward per batch:
:mod:`esa.evaluators.measure`); per layer and batch they take |h|, its maximum, median and the
values above the floor.  ``activations.json`` (baseline and every condition) is written by the
runner from the measured rows (:meth:`Activations.results`).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import torch

from esa.evaluators.registry import EvalInputs, Evaluator, Measured, evaluator
from esa.model import distributed, residual
from esa.model.forward import rank_batches
from esa.model.introspect import assert_eval
from esa.options import Option, Options, finite_non_negative

log = logging.getLogger("esa")

NAME = "activations"
RESULTS = "activations.json"
MAX_CHANNELS = 32  # channels listed per record (the rest counted): a broken model can make hundreds massive
MAX_POSITIONS = 16  # distinct token positions listed per channel (the rest counted)
RULE = ("massive activation = a residual-stream value (a decoder block's output hidden state) with |h| > massive_min "
        "and > massive_ratio x its layer's median |h| (per window the exact lower median of its L x H values, then "
        "the lower median over windows); Sun et al. 2024")


def _positive_finite(v: float) -> str | None:
    return None if 0.0 < v < math.inf else f"must be a positive finite number, got {v}"


OPTIONS = (
    Option("massive_min", 100.0, "activations: a massive activation's |value| must exceed this (Sun et al.: 100)",
           parse=float, check=finite_non_negative),
    Option("massive_ratio", 1000.0, "activations: a massive activation's |value| must also exceed this many times "
           "its layer's median |value| (Sun et al.: about 1000)", parse=float, check=_positive_finite),
)


@evaluator(NAME, needs=("eval_windows",), options=OPTIONS, implied_by=("restore_activations",), results_file=RESULTS,
           help="per decoder layer the largest |residual-stream value| (channel, token) and the median |value|; the "
                "massive activations (|h| > --massive-min and > --massive-ratio x the layer median, grouped by "
                "channel); per condition what became of each baseline massive activation")
class Activations(Evaluator):
    def thresholds(self) -> tuple[float, float]:
        """(massive_min, massive_ratio): the run's options, else the declared defaults."""
        return tuple(float(self.options.get(o.name, o.default)) for o in OPTIONS)

    def observing(self, model: torch.nn.Module, baseline: dict | None
                  ) -> AbstractContextManager[Callable[[str], dict]]:
        return self._observe(model, baseline)

    @contextlib.contextmanager
    def _observe(self, model: torch.nn.Module, baseline: dict | None) -> Iterator[Callable[[str], dict]]:
        windows = self.inputs.windows
        local, start = distributed.shard(windows)
        floor, _ = self.thresholds()
        watch = None if baseline is None else residual.Points.of(baseline["entries"])
        sink = residual.ResidualPass(len(residual.blocks_of(model)), len(windows), floor, cap=windows.numel(),
                                     watch=watch)
        with residual.observing(model, local, start, sink):
            yield lambda label: self._record(sink, baseline, label)

    def evaluate(self, model: torch.nn.Module, baseline: dict | None, label: str) -> dict:
        assert_eval(model)
        with self._observe(model, baseline) as finish, torch.no_grad():
            for batch in rank_batches(model, self.inputs.windows, self.inputs.batch_size, "activations"):
                model(input_ids=batch, use_cache=False)
        return finish(label)

    def _record(self, sink: residual.ResidualPass, baseline: dict | None, label: str) -> dict:
        sink.merge()
        if not sink.complete():
            raise RuntimeError(f"{label}: the observed forward passes did not cover every evaluation window once")
        floor, ratio = self.thresholds()
        layers, medians = _layers(sink)
        pts, truncated = _massive(sink, medians, floor, ratio)
        if truncated:
            log.warning("%s: more values above --massive-min than tokens in some layer; only the largest were kept, "
                        "so the massive set may be incomplete", label)
        w, n_tok = self.inputs.windows.shape
        # n_massive first: the measurer's log line quotes a record's first value
        rec = {"n_massive": len(pts), "massive_min": floor, "massive_ratio": ratio, "windows": int(w),
               "tokens_per_window": int(n_tok), "layers": layers, "truncated": truncated, **_groups(pts)}
        if baseline is None:
            rec["entries"] = pts.columns()  # what a condition compares with and --restore-activations writes back
        else:
            rec.update(_change(residual.Points.of(baseline["entries"]), sink.watched, medians, floor, ratio))
        return rec

    def results(self, baseline: dict, measured: list[Measured]) -> dict:
        """``activations.json``: the thresholds, its record of the unmodified model and every
        condition's record (with its experiment, seed, group, and the reference perplexity and ratio)."""
        conditions = [{"experiment": m.experiment, "seed": seed, "group": str(group), "condition": cond,
                       "ppl": row.get("ppl"), "ppl_ratio": row.get("ratio"), **row[self.name]}
                      for m in measured for seed, group, cond, row in m.each() if self.name in row]
        return {"rule": RULE, "massive_min": baseline["massive_min"], "massive_ratio": baseline["massive_ratio"],
                "windows": baseline["windows"], "tokens_per_window": baseline["tokens_per_window"],
                "baseline": baseline, "conditions": conditions}


def _layers(sink: residual.ResidualPass) -> tuple[list[dict], torch.Tensor]:
    """Per layer: the largest |h| over the windows (where, signed value) and the median; the medians ``[layers]``."""
    medians = sink.median.median(dim=1).values
    rows = []
    for layer in range(sink.max.shape[0]):
        w = int(sink.max[layer].argmax())  # a NaN counts as the largest (torch): a broken layer shows as nan
        rows.append({"layer": layer, "max": float(sink.max[layer, w]), "channel": int(sink.channel[layer, w]),
                     "window": w, "position": int(sink.position[layer, w]), "value": float(sink.value[layer, w]),
                     "median": float(medians[layer])})
    return rows, medians


def _is_massive(values: torch.Tensor, medians: torch.Tensor, floor: float, ratio: float) -> torch.Tensor:
    """The rule on float64 ``values`` with each one's layer median ``medians`` (same shape); NaN never is."""
    a = values.abs()
    return (a > floor) & (a > ratio * medians)


def _massive(sink: residual.ResidualPass, medians: torch.Tensor, floor: float, ratio: float
             ) -> tuple[residual.Points, bool]:
    """The kept values that pass the rule, and whether the per-layer cap may have dropped massive ones
    (it dropped some and even the smallest kept one is massive)."""
    parts, truncated = [], False
    for layer, pts in enumerate(sink.kept):
        keep = _is_massive(pts.value, medians[pts.layer], floor, ratio)
        if sink.dropped[layer] and len(pts) and bool(keep[pts.value.abs().argmin()]):
            truncated = True
        parts.append(residual.Points(*(getattr(pts, k)[keep] for k in ("layer", "window", "position", "channel",
                                                                        "value"))))
    return residual.concat(parts), truncated


def _groups(pts: residual.Points) -> dict:
    """``massive``: per channel (largest first) its layers, count, largest |h| and token positions."""
    out = []
    for c in pts.channel.unique().tolist():
        m = pts.channel == c
        pos = pts.position[m].unique().tolist()
        out.append({"channel": c, "layers": pts.layer[m].unique().tolist(), "count": int(m.sum()),
                    "max": float(pts.value[m].abs().max()), "positions": pos[:MAX_POSITIONS], "n_positions": len(pos)})
    out.sort(key=lambda g: -g["max"])
    return {"massive": out[:MAX_CHANNELS], "n_channels": len(out)}


def _change(base: residual.Points, after: torch.Tensor, medians: torch.Tensor, floor: float, ratio: float) -> dict:
    """What became of each baseline massive activation (module docstring): per (layer, channel) and
    per channel ``gone_from_layer``."""
    still = _is_massive(after, medians[base.layer], floor, ratio)
    rows = []
    for c in base.channel.unique().tolist():
        for layer in base.layer[base.channel == c].unique().tolist():
            m = (base.channel == c) & (base.layer == layer)
            before, now = base.value[m], after[m]
            rows.append({"layer": layer, "channel": c, "count": int(m.sum()), "before": float(before.abs().mean()),
                         "after": float(now.abs().mean()), "ratio": float((now / before).mean()),
                         "still_massive": int(still[m].sum())})
    gone: dict[str, int | None] = {}
    for c in base.channel.unique().tolist():
        mine = [r for r in rows if r["channel"] == c]
        alive = [r["layer"] for r in mine if r["still_massive"]]
        later = [r["layer"] for r in mine if not alive or r["layer"] > max(alive)]
        gone[str(c)] = min(later) if later else None
    return {"change": rows, "still_massive": int(still.sum()), "baseline_massive": len(base), "gone_from_layer": gone}


@contextlib.contextmanager
def restoring(model: torch.nn.Module, windows: torch.Tensor, baseline: dict) -> Iterator[dict]:
    """Write the baseline's massive activations (``baseline``: this evaluator's baseline record) back
    into the residual stream at their (layer, window, position, channel) in every forward over the
    evaluation ``windows`` ``[W, L]`` inside the block; yields what is restored (for the row's info)."""
    pts = residual.Points.of(baseline["entries"])
    if baseline.get("truncated"):
        log.warning("--restore-activations: the baseline's massive set was truncated; only its kept values are "
                    "restored")
    with residual.writing(model, windows, pts) as counts:
        yield {"restored_values": len(pts), "restored_channels": sorted(set(pts.channel.tolist()))}
    if counts["rows_other"]:
        log.warning("--restore-activations: %d input rows were not evaluation windows and ran unrestored (the "
                    "baseline's massive activations are known on the evaluation windows only)", counts["rows_other"])


def feeds(record: dict, channel: int) -> dict:
    """Which massive activation residual channel ``channel`` carries in a baseline ``record``: its
    layers and largest |h| (``massive`` false when the channel has none)."""
    pts = residual.Points.of(record["entries"])
    m = pts.channel == channel
    return {"channel": channel, "massive": bool(m.any()), "layers": pts.layer[m].unique().tolist(),
            "max": float(pts.value[m].abs().max()) if m.any() else None}


def measure_once(model: torch.nn.Module, input_ids: torch.Tensor, options: Options | None = None) -> dict:
    """The baseline record of ``input_ids`` ``[B, T]`` (one forward; e.g. the super-weight detector's
    prompt), with ``options``' thresholds (default: the declared defaults)."""
    ev = Activations(options or Options(), EvalInputs(input_ids.detach().cpu(), int(input_ids.shape[0])))
    return ev.evaluate(model, None, "detection input")
