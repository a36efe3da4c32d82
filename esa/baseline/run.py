"""The baseline runner's job: load the model, evaluate every dataset x context x stride, write
``baseline_results.json`` and print the table (the flags: :mod:`esa.cli.baseline`)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from esa import data
from esa.baseline import evaluate as baseline
from esa.baseline.config import ROW_JOIN_NOTE, SEED_SEMANTICS, BaselineConfig, stride_label
from esa.data import DATASETS, bos_policy, tokenize
from esa.errors import UsageError
from esa.evaluators import EvalInputs
from esa.evaluators.measure import results_files
from esa.model.forward import NaNLossError
from esa.model.introspect import model_record
from esa.model.session import start_tool
from esa.options import flat_json
from esa.outdir.atomic import write_json
from esa.outdir.provenance import git_sha, versions
from esa.reporting import parts

log = logging.getLogger("esa")


def load_texts(cfg: BaselineConfig) -> list[tuple[str, str, str]]:
    """``(name, text, source)`` per dataset, through esa.data (same fallback as esa_runner)."""
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
                 "ppl, bpb = word/byte perplexity and bits per byte of the text as one stream (not per document as in "
                 "lm-evaluation-harness); tok/s = scored tokens/s")
    print("\n".join(lines), flush=True)


def other_evaluations(cfg: BaselineConfig, model, tok, tokens, context: int, policy: dict
                      ) -> tuple[dict, dict[str, dict]]:
    """Every evaluator but perplexity (whose table this tool is), once on the unmodified model: on the
    non-overlapping windows of the first dataset at the first context (``--max-windows`` of them).
    Returns the records (for ``baseline_results.json``) and the evaluators' own results files
    (``{file name: content}``, e.g. ``task_results.json``, with the baseline alone)."""
    plan = baseline.plan_windows(tokens, context, None, policy, cfg.max_windows)
    windows = plan.groups[0][0]
    evaluators = cfg.evaluation.build(EvalInputs(windows, cfg.windows_per_batch(context), tok, model))[1:]
    records = {}
    for ev in evaluators:
        log.info("baseline %s on %d windows of %d tokens", ev.name, *windows.shape)
        records[ev.name] = ev.evaluate(model, None, "baseline")
    out = {"windows": int(windows.shape[0]), "window_tokens": int(windows.shape[1]), **records}
    return out, results_files(evaluators, records, [])


def run(cfg: BaselineConfig, out_dir: str | Path) -> int:
    """Load the model, evaluate every dataset x context x stride, write the files; the exit code."""
    out_dir, choice, manifest, model, tok = start_tool(Path(out_dir), cfg.model, cfg.device, cfg.device_explicit,
                                                       cfg.dtype, cfg.dtype_explicit)
    with manifest.recording():
        contexts = usable_contexts(cfg, model)
        policy = bos_policy(tok)
        with manifest.phase("load_data"):
            texts = [(name, text, source, tokenize(tok, text)) for name, text, source in load_texts(cfg)]
        rows: list[dict] = []
        results = {"tool": "baseline_runner", "model": cfg.model, "model_description": model_record(model),
                   "config": flat_json(cfg), "command": sys.argv,
                   "resolved": {"device": choice.device, "dtype": choice.dtype, "contexts": list(contexts),
                                "warnings": list(choice.warnings)},
                   "bos_policy": policy, "seeds": list(cfg.seeds), "seed_semantics": SEED_SEMANTICS,
                   "text_convention": ROW_JOIN_NOTE, "windowing": baseline.WINDOWING,
                   "definitions": baseline.DEFINITIONS, "versions": versions(), "git_sha": git_sha(),
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
                            plan = baseline.plan_windows(tokens, context, s, policy, cfg.max_windows)
                            row = baseline.evaluate_text(model, tok, tokens, text, plan, bs, desc=f"{name}@{context}")
                        rows.append({**head, **row})
                        log.info("%s: context %d: ppl %.4f over %d tokens", name, context, row["ppl"], row["tokens"])
                    except NaNLossError as exc:
                        log.error("%s at context %d: %s", name, context, exc)
                        rows.append({**head, "error": str(exc)})
                    write_json(out_dir / "baseline_results.json", results)  # after every row: long runs show progress
                    manifest.add_file("baseline_results.json")
        files: dict[str, dict] = {}
        if len(cfg.evaluation.evaluate) > 1:
            with manifest.phase("evaluate"):
                results["evaluations"], files = other_evaluations(cfg, model, tok, texts[0][3], contexts[0], policy)
            write_json(out_dir / "baseline_results.json", results)
            for name, content in files.items():
                write_json(out_dir / name, content)
                manifest.add_file(name)
            for figure in parts.figures(out_dir, only=files):
                manifest.add_file(figure.name)
        print_table(rows)
        for line in parts.console(out_dir, only=files):
            print(line, flush=True)
        failed = [r for r in rows if "error" in r]
        manifest.finish("failed" if failed else "success",
                        f"NaN loss in {len(failed)} evaluation(s)" if failed else None)
        if failed:
            print(f"error: the model produced a NaN loss in {len(failed)} evaluation(s); see "
                  f"{out_dir / 'baseline_results.json'}", file=sys.stderr)
        return 1 if failed else 0
