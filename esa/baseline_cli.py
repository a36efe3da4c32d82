#!/usr/bin/env python
"""Baseline runner: reference perplexity and calibration of the UNMODIFIED model.

For each dataset x context length (x stride): token perplexity, mean NLL, tokens scored, top-1
accuracy, ECE and top-label Brier score, word/byte perplexity and bits per byte
(lm-evaluation-harness definitions), throughput and peak memory.  Token scoring is ESA runner's
own (:func:`esa.evaluate.score_tokens`): the same windows in the same batches give the same
perplexity, bit for bit.  Windows, strides and the metric definitions: :mod:`esa.baseline`.

    python scripts/baseline_runner.py --baseline smoke
    python scripts/baseline_runner.py --datasets wikitext2,notes.txt --context-lens 512,1024 --stride 256

Presets fill in what you do not give: smoke = one dataset, context 256, the first 32 windows;
standard = the whole test text at contexts 512, 1024, 2048; extended = contexts 512 .. 4096, each
non-overlapping and with stride = context/2.  Preset contexts beyond the model's maximum position
are dropped with a warning; an explicit one is an error.

Seeds: the baseline is deterministic (see SEED_SEMANTICS).  Exit codes: 0 success, 2 bad input
(one line on stderr), 1 crash or NaN loss, 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from esa.cli import guarded, start_tool
from esa.config import (
    DATASET_ALIASES,
    DATASETS,
    DEVICES,
    DTYPES,
    EMBEDDED_MODEL,
    UsageError,
    canonical,
    parse_seeds,
)

log = logging.getLogger("esa")

PRESETS = {
    "smoke": {"contexts": (256,), "strides": (None,), "max_windows": 32},
    "standard": {"contexts": (512, 1024, 2048), "strides": (None,), "max_windows": None},
    "extended": {"contexts": (512, 1024, 2048, 4096), "strides": (None, "half"), "max_windows": None},
}
DEFAULT_BATCH_TOKENS = 4096
SEED_SEMANTICS = ("The baseline is deterministic: no step draws random numbers, and --max-windows keeps the "
                  "first windows in text order (the windows ESA runner evaluates), never a random sample. "
                  "Results are therefore identical for every seed; they are computed once and hold for each "
                  "seed listed. --seeds exists so that a baseline can be filed next to ESA runs with the "
                  "same seeds.")
ROW_JOIN_NOTE = ("datasets: the whole test split via the datasets library, rows joined with '\\n\\n' (the "
                 "Hugging Face perplexity guide's convention); text files: the whole file")


@dataclass(frozen=True)
class BaselineConfig:
    """The resolved flags; ``*_explicit`` record what the user gave (presets fill the rest)."""

    model: str = EMBEDDED_MODEL
    device: str = "cuda"
    device_explicit: bool = False
    dtype: str = "bf16"
    dtype_explicit: bool = False
    preset: str = "standard"
    datasets: tuple[str, ...] = ()  # canonical dataset names or file paths; () = the default chain
    contexts: tuple[int, ...] = (512, 1024, 2048)
    contexts_explicit: bool = False
    strides: tuple[int | str | None, ...] = (None,)  # None = non-overlapping, "half" = context // 2
    max_windows: int | None = None
    batch_size: int | None = None
    batch_tokens: int | None = None
    seeds: tuple[int, ...] = (0,)
    out_dir: str | None = None
    dry_run: bool = False
    verbose: bool = False

    def windows_per_batch(self, context: int) -> int:
        return self.batch_size or max(1, (self.batch_tokens or DEFAULT_BATCH_TOKENS) // context)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line on stderr, exit 2
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="baseline_runner.py", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "-m", default=EMBEDDED_MODEL, help="HF id, model directory, .gguf file or the "
                   f"embedded '{EMBEDDED_MODEL}' (default), as esa_runner.py")
    p.add_argument("--baseline", choices=sorted(PRESETS), default="standard", help="preset (default standard)")
    p.add_argument("--datasets", default=None, help=f"comma list of {', '.join(DATASETS)} (test split) and/or "
                   "text file paths (whole file); default: WikiText-2, else the bundled corpus (warning)")
    p.add_argument("--context-lens", default=None, help="comma list of window lengths in tokens")
    p.add_argument("--stride", default=None, help="sliding-window stride in tokens, 'half' (= context/2) or "
                   "'none' (non-overlapping windows); a comma list evaluates each. Default: none")
    p.add_argument("--seeds", default="0", help="comma list; deterministic baseline: same result for every seed")
    p.add_argument("--device", choices=DEVICES, default=None, help="default cuda, else cpu with a warning")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default bf16 (fp32 on cpu, with a warning)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--batch-size", type=int, default=None, help="windows per forward pass")
    g.add_argument("--batch-tokens", type=int, default=None,
                   help="tokens per forward pass (windows = max(1, tokens // context); "
                        f"default {DEFAULT_BATCH_TOKENS})")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows per evaluation")
    p.add_argument("--out-dir", default=None, help="default outputs/baseline_<model>_<preset>_<time>")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit without loading the model")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logs and tracebacks")
    return p


def _ints(text: str, flag: str, minimum: int) -> tuple[int, ...]:
    parts = [x.strip() for x in text.split(",")]
    if any(not re.fullmatch(r"-?\d+", x) for x in parts):
        raise UsageError(f"{flag} must be a comma-separated list of integers, got {text!r}")
    values = tuple(dict.fromkeys(int(x) for x in parts))  # duplicates dropped, order kept
    if any(v < minimum for v in values):
        raise UsageError(f"{flag} values must be at least {minimum}, got {text!r}")
    return values


def _strides(text: str) -> tuple[int | str | None, ...]:
    out: list[int | str | None] = []
    for part in (x.strip().lower() for x in text.split(",")):
        if part in ("none", "no", "off"):
            item = None
        elif part == "half":
            item = "half"
        elif re.fullmatch(r"-?\d+", part) and int(part) >= 1:
            item = int(part)
        else:
            raise UsageError(f"--stride takes positive integers, 'half' or 'none', got {text!r}")
        if item not in out:
            out.append(item)
    return tuple(out)


def _datasets(text: str) -> tuple[str, ...]:
    out = []
    for part in (x.strip() for x in text.split(",")):
        if not part:
            raise UsageError(f"--datasets has an empty item: {text!r}")
        try:
            out.append(canonical(part, DATASETS, DATASET_ALIASES, "dataset"))
            continue
        except UsageError:
            pass
        if not os.path.isfile(part):
            raise UsageError(f"--datasets item {part!r} is neither a dataset ({', '.join(DATASETS)}) nor an "
                             "existing file")
        if os.path.getsize(part) == 0:
            raise UsageError(f"--datasets file {part!r} is empty")
        out.append(part)
    return tuple(dict.fromkeys(out))


def config_from_args(ns: argparse.Namespace) -> BaselineConfig:
    """Validate every flag that can be checked without the model and apply the preset."""
    preset = PRESETS[ns.baseline]
    contexts = _ints(ns.context_lens, "--context-lens", 2) if ns.context_lens is not None else preset["contexts"]
    strides = _strides(ns.stride) if ns.stride is not None else preset["strides"]
    for s in strides:
        if isinstance(s, int) and s > min(contexts):
            raise UsageError(f"--stride {s} exceeds the context length {min(contexts)} (tokens would be skipped)")
    for flag, value in (("--batch-size", ns.batch_size), ("--batch-tokens", ns.batch_tokens),
                        ("--max-windows", ns.max_windows)):
        if value is not None and value <= 0:
            raise UsageError(f"{flag} must be positive, got {value}")
    return BaselineConfig(
        model=ns.model, device=ns.device or "cuda", device_explicit=ns.device is not None,
        dtype=ns.dtype or "bf16", dtype_explicit=ns.dtype is not None, preset=ns.baseline,
        datasets=_datasets(ns.datasets) if ns.datasets is not None else (),
        contexts=contexts, contexts_explicit=ns.context_lens is not None, strides=strides,
        max_windows=ns.max_windows if ns.max_windows is not None else preset["max_windows"],
        batch_size=ns.batch_size, batch_tokens=ns.batch_tokens, seeds=parse_seeds(ns.seeds),
        out_dir=ns.out_dir, dry_run=ns.dry_run, verbose=ns.verbose)


def default_out_dir(cfg: BaselineConfig) -> Path:
    from esa.models import model_slug

    return Path("outputs") / f"baseline_{model_slug(cfg.model)}_{cfg.preset}{time.strftime('_%Y%m%d-%H%M%S')}"


def stride_label(stride: int | str | None) -> str:
    return "none (non-overlapping)" if stride is None else ("context/2" if stride == "half" else str(stride))


def print_plan(cfg: BaselineConfig, choice) -> None:
    data = ", ".join(cfg.datasets) or "default: WikiText-2 test split if loadable, else the bundled sample corpus"
    batch = (f"{cfg.batch_size} windows" if cfg.batch_size else
             f"{cfg.batch_tokens or DEFAULT_BATCH_TOKENS} tokens (windows = max(1, tokens // context))")
    lines = ["baseline plan (dry run: no model is loaded, nothing is written)",
             f"  model:       {cfg.model}",
             f"  device:      {choice.device} (requested {cfg.device}), dtype {choice.dtype} (requested {cfg.dtype})",
             f"  preset:      {cfg.preset}",
             f"  datasets:    {data}",
             f"  text:        {ROW_JOIN_NOTE}",
             f"  contexts:    {', '.join(map(str, cfg.contexts))}",
             f"  strides:     {', '.join(stride_label(s) for s in cfg.strides)}",
             f"  max windows: {cfg.max_windows or 'all'} per evaluation (first windows in text order)",
             f"  batch:       {batch} per forward pass",
             f"  seeds:       {', '.join(map(str, cfg.seeds))} (deterministic: identical results for every seed)",
             f"  out dir:     {cfg.out_dir or default_out_dir(cfg)}",
             f"  evaluations: {max(1, len(cfg.datasets)) * len(cfg.contexts) * len(cfg.strides)} "
             "(datasets x contexts x strides)"]
    lines += [f"  warning:     {w}" for w in choice.warnings]
    print("\n".join(lines), flush=True)


def load_texts(cfg: BaselineConfig) -> list[tuple[str, str, str]]:
    """``(name, text, source)`` per dataset, through esa.data (same fallback as esa_runner)."""
    from esa import data

    if not cfg.datasets:
        text, source = data.default_eval_text()
        return [("wikitext2" if source.startswith("datasets:") else "sample_corpus", text, source)]
    out = []
    for item in cfg.datasets:
        if item in DATASETS:
            text, source = data.eval_split_text(item, required=True, hint="pass a text file path in --datasets")
            out.append((item, text, source))
            continue
        try:
            text = Path(item).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"--datasets file {item!r} is not UTF-8 text") from None
        if not text.strip():
            raise UsageError(f"--datasets file {item!r} contains no text")
        out.append((Path(item).name, text, f"file:{os.path.abspath(item)} (whole file)"))
    return out


def usable_contexts(cfg: BaselineConfig, model) -> tuple[int, ...]:
    """Contexts the model can take: too long is an error if explicit, dropped with a warning if preset."""
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit is None:
        return cfg.contexts
    too_long = [c for c in cfg.contexts if c > limit]
    if too_long and cfg.contexts_explicit:
        raise UsageError(f"--context-lens {too_long[0]} exceeds the model's maximum of {limit} positions")
    if too_long:
        log.warning("dropping preset contexts %s: the model takes at most %d positions", too_long, limit)
    kept = tuple(c for c in cfg.contexts if c <= limit)
    if not kept:
        raise UsageError(f"no preset context fits the model's {limit} positions; pass --context-lens")
    return kept


def print_table(rows: list[dict]) -> None:
    head = (f"{'dataset':<16} {'ctx':>6} {'stride':>6} {'windows':>7} {'tokens':>9} {'ppl':>10} {'acc':>6} "
            f"{'ECE':>6} {'Brier':>6} {'word ppl':>10} {'byte ppl':>8} {'bpb':>6} {'tok/s':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['dataset'][:16]:<16} {r['context']:>6} {str(r.get('stride')):>6} error: {r['error']}")
            continue
        stride = "-" if r["mode"] == "non_overlapping" else str(r["stride"])
        f = {k: "n/a" if r[k] is None else format(r[k], spec) for k, spec in (
            ("ppl", ".4f"), ("word_perplexity", ".3f"), ("byte_perplexity", ".4f"), ("bits_per_byte", ".3f"),
            ("tokens_per_s", ".0f"))}
        lines.append(f"{r['dataset'][:16]:<16} {r['context']:>6} {stride:>6} {r['windows']:>7} "
                     f"{r['tokens_scored']:>9} {f['ppl']:>10} {r['top1_accuracy']:>6.3f} {r['ece']:>6.3f} "
                     f"{r['brier_top1']:>6.3f} {f['word_perplexity']:>10} {f['byte_perplexity']:>8} "
                     f"{f['bits_per_byte']:>6} {f['tokens_per_s']:>8}")
    lines.append("ppl = token perplexity; acc = next-token top-1 accuracy; ECE = 15-bin expected calibration "
                 "error of the top-1 confidence; Brier = mean (top-1 confidence - correct)^2; word ppl, byte "
                 "ppl, bpb = lm-evaluation-harness word/byte perplexity and bits per byte; tok/s = scored tokens/s")
    print("\n".join(lines), flush=True)


def run(cfg: BaselineConfig) -> int:
    """Load the model, evaluate every dataset x context x stride, write the files; the exit code."""
    from esa import baseline, models, report
    from esa.data import bos_policy, tokenize
    from esa.evaluate import NaNLossError
    from esa.outputs import write_json

    out_dir, choice, manifest, model, tok = start_tool(Path(cfg.out_dir) if cfg.out_dir else default_out_dir(cfg),
                                                       cfg.model, cfg.device, cfg.device_explicit, cfg.dtype,
                                                       cfg.dtype_explicit)
    with manifest.recording():
        contexts = usable_contexts(cfg, model)
        policy = bos_policy(tok)
        with manifest.phase("load_data"):
            texts = [(name, text, source, tokenize(tok, text)) for name, text, source in load_texts(cfg)]
        rows: list[dict] = []
        results = {"tool": "baseline_runner", "model": cfg.model, "model_description": models.describe(model),
                   "config": dataclasses.asdict(cfg), "command": sys.argv,
                   "resolved": {"device": choice.device, "dtype": choice.dtype, "contexts": list(contexts),
                                "warnings": list(choice.warnings)},
                   "bos_policy": policy, "seeds": list(cfg.seeds), "seed_semantics": SEED_SEMANTICS,
                   "text_convention": ROW_JOIN_NOTE, "windowing": baseline.WINDOWING,
                   "definitions": baseline.DEFINITIONS, "versions": report.versions(), "git_sha": report.git_sha(),
                   "results": rows}
        for name, text, source, tokens in texts:
            done = set()
            for context in contexts:
                for stride in cfg.strides:
                    s = context // 2 if stride == "half" else stride
                    body = context - (policy["policy"] == "prepend_bos")
                    key = (context, body if s is None else min(s, body))
                    if key in done:  # e.g. --stride none,<context>: the same windows twice
                        continue
                    done.add(key)
                    bs = cfg.windows_per_batch(context)
                    log.info("%s: context %d, stride %s, %d windows per batch", name, context, stride_label(s), bs)
                    head = {"dataset": name, "source": source, "context": context, "stride": s}
                    try:
                        with manifest.phase("evaluate"):
                            row = baseline.evaluate_text(model, tok, tokens, text, context, s, policy, bs,
                                                         cfg.max_windows, desc=f"{name}@{context}")
                        rows.append({**head, **row})
                        log.info("%s: context %d: ppl %.4f over %d tokens", name, context, row["ppl"], row["tokens"])
                    except NaNLossError as exc:
                        log.error("%s at context %d: %s", name, context, exc)
                        rows.append({**head, "error": str(exc)})
                    write_json(out_dir / "baseline_results.json", results)  # after every row: long runs show progress
                    manifest.add_file("baseline_results.json")
        print_table(rows)
        failed = [r for r in rows if "error" in r]
        manifest.finish("failed" if failed else "success",
                        f"NaN loss in {len(failed)} evaluation(s)" if failed else None)
        if failed:
            print(f"error: the model produced a NaN loss in {len(failed)} evaluation(s); see "
                  f"{out_dir / 'baseline_results.json'}", file=sys.stderr)
        return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)

    def body() -> int:
        cfg = config_from_args(build_parser().parse_args(argv))
        from esa.models import DeviceChoice, resolve_device

        if cfg.dry_run:
            try:
                choice = resolve_device(cfg.device, cfg.device_explicit, cfg.dtype, cfg.dtype_explicit)
            except UsageError as exc:  # a fact about this machine, not about the configuration
                choice = DeviceChoice(cfg.device, cfg.dtype, (f"{exc}; a real run on this machine would stop",))
            print_plan(cfg, choice)
            return 0
        from esa_runner import setup_logging  # one logging setup for both tools

        setup_logging(cfg.verbose)
        return run(cfg)

    return guarded(body, argv, "interrupted (the manifest says so)")

if __name__ == "__main__":
    sys.exit(main())
