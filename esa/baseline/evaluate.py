"""Baselines of the unmodified model: windows over a text, token/word/byte perplexity, calibration.

Windows follow the Hugging Face perplexity guide.  A text of ``n`` tokens is read by windows of
``context`` tokens (``body`` text tokens, plus a leading BOS when the tokenizer prepends one, see
:func:`esa.data.bos_policy`) starting every ``stride`` text tokens; each window scores only the
tokens no earlier window scored, so every token is scored exactly once with up to
``context - stride`` tokens of left context.  The first window scores all its predictable tokens
(all but the first without BOS).  The last window ends at the end of the text and may be short;
it runs as a batch of its own, so there is never padding.  Without a stride the windows do not
overlap (``stride = body``): each window scores its ``context - 1`` predicted tokens, exactly what
ESA runner's :func:`esa.model.forward.perplexity` scores, and the same windows in the same batches
give a bit-identical perplexity because both go through :func:`esa.model.forward.score_tokens` and
:class:`esa.model.forward.NLLTotal`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from esa.errors import UsageError
from esa.model.forward import NLLTotal, TokenScores, batches, score_tokens
from esa.model.introspect import assert_eval
from esa.outdir.manifest import peak_memory_mb

ECE_BINS = 15

WINDOWING = ("windows of `context` tokens (BOS + context-1 text tokens under the prepend_bos policy) start every "
             "`stride` text tokens (Hugging Face perplexity guide); each scores only the tokens no earlier window "
             "scored, so every token is scored once with up to context-stride tokens of left context; the last "
             "window may be short and runs alone (no padding). Without a stride windows do not overlap and each "
             "scores its context-1 predicted tokens, exactly as ESA runner's perplexity. --max-windows keeps the "
             "first windows in text order")

DEFINITIONS = {
    "ppl": "token perplexity exp(nll_sum / tokens_scored)",
    "mean_nll": "nll_sum / tokens_scored (nats per token)",
    "nll_sum": "sum over scored tokens of -ln p(token | left context in its window); per-token values from "
               "fp32 logits, summed in float64",
    "top1_accuracy": "fraction of scored tokens whose argmax next-token prediction (first index on ties) is "
                     "the actual token",
    "ece": f"expected calibration error of the top-1 confidence (Guo et al. 2017): {ECE_BINS} equal-width "
           "bins (lo, hi] over [0, 1] (confidence 0 goes to the first bin), ECE = sum over bins of "
           "(n_bin / N) * |accuracy_bin - mean_confidence_bin|; ece_bins lists every bin",
    "brier_top1": "mean over scored tokens of (c - y)^2 with c = top-1 probability and y = 1 if the top-1 "
                  "prediction is the actual token else 0: the top-label Brier score, NOT the multi-class "
                  "Brier score over the whole vocabulary",
    "word_perplexity": "exp(nll_sum / words) over the evaluated text as ONE stream; words = number of "
                       "whitespace-separated words (Python str.split(): leading/trailing whitespace adds none). "
                       "Not lm-evaluation-harness's number: it scores each document separately from its start "
                       "and counts len(re.split(r'\\s+', document)) words per document",
    "byte_perplexity": "exp(nll_sum / bytes) over the evaluated text as one stream; bytes = UTF-8 bytes of "
                       "the evaluated text (lm-evaluation-harness's formula, but per document there)",
    "bits_per_byte": "nll_sum / (bytes * ln 2) over the evaluated text as one stream (lm-evaluation-harness's "
                     "formula, but per document there)",
    "evaluated_text": "the text spanned by the evaluated windows: the whole text when every window is "
                      "evaluated, otherwise the decoded tokens up to the end of the last evaluated window. "
                      "nll_sum misses the unscored tokens (tokens_unscored: the first token of the text, and "
                      "without BOS the first token of every non-overlapping window), so word/byte "
                      "perplexity of non-overlapping windows is slightly optimistic",
    "tokens_per_s": "scored tokens per second of evaluation wall time (forward passes and scoring; loading "
                    "and tokenization excluded)",
    "input_tokens_per_s": "window tokens fed to the model per second (strided evaluation re-reads context)",
    "peak_memory": "rss_peak_mb: the process's peak RSS since it started (cumulative over the run); "
                   "cuda_peak_mb: peak CUDA allocation during this evaluation only",
}


@dataclass(frozen=True)
class WindowPlan:
    """The windows of one text at one context and stride, as batches of equal-length windows.

    ``groups``: ``(ids [W, L] int64 cpu, n_context list[W])`` pairs (the full windows, then the
    short final window alone); ``n_context[i]`` leading tokens of window i are context only.
    """

    context: int
    stride: int  # in text tokens; == body for non-overlapping windows
    body: int  # text tokens per full window (context - 1 with a BOS)
    strided: bool
    groups: list[tuple[torch.Tensor, list[int]]]
    windows: int  # windows evaluated
    windows_total: int  # windows with at least one scored token before --max-windows
    covered_tokens: int  # text tokens [0, covered_tokens) lie in evaluated windows
    text_tokens: int

    @property
    def tokens_scored(self) -> int:
        return sum(ids.shape[1] * len(ctx) - sum(ctx) for ids, ctx in self.groups)


def plan_windows(tokens: torch.Tensor, context: int, stride: int | None, policy: dict,
                 max_windows: int | None = None) -> WindowPlan:
    """Windows over ``tokens`` ``[n]`` (int64); ``stride`` None = non-overlapping.

    With a BOS policy a window is BOS + ``context - 1`` text tokens, so a stride is capped at
    ``context - 1`` (a stride of ``context`` then means non-overlapping, not a skipped token).
    ``max_windows`` keeps the first windows in text order (never a sample).
    """
    off = 1 if policy["policy"] == "prepend_bos" else 0
    body = context - off
    if body < 1 or (off == 0 and context < 2):
        raise UsageError(f"context {context} is too short to predict any token")
    s = body if stride is None else min(stride, body)
    if s < 1:
        raise UsageError(f"stride must be a positive number of tokens, got {stride}")
    n = len(tokens)
    n_full = (n - body) // s + 1 if n >= body else 0
    later = max(body - s + off, 1)  # context-only tokens of every window after the first
    starts = [i * s for i in range(n_full)]
    ctx = [1 if i == 0 else later for i in range(n_full)]
    short = None
    if (starts[-1] + body if starts else 0) < n:
        start = n_full * s
        n_ctx = 1 if n_full == 0 else later
        if n - start + off > n_ctx:  # skip a final window with nothing left to score
            short = (start, n_ctx)
    total = n_full + (short is not None)
    keep = total if max_windows is None else min(total, max_windows)
    groups = []
    bos = torch.full((1,), policy["bos_token_id"] if off else 0, dtype=torch.long)
    n_keep_full = min(n_full, keep)
    covered = 0
    if n_keep_full:
        ids = tokens.unfold(0, body, s)[:n_keep_full]  # [W, body] view; equals a reshape when s == body
        if off:
            ids = torch.cat([bos.expand(n_keep_full, 1), ids], dim=1)
        groups.append((ids.contiguous(), ctx[:n_keep_full]))
        covered = starts[n_keep_full - 1] + body
    if short is not None and keep > n_full:
        start, n_ctx = short
        ids = tokens[start:]
        if off:
            ids = torch.cat([bos, ids])
        groups.append((ids[None].contiguous(), [n_ctx]))
        covered = n
    if not groups:
        raise UsageError(f"text of {n} tokens is too short for one window at context {context}")
    if keep == total:  # every window runs: the whole text is covered (a dropped 1-token tail scores nothing)
        covered = n
    return WindowPlan(context, s, body, stride is not None and s < body, groups, keep, total, covered, n)


class CalibratedTotal(NLLTotal):
    """:class:`NLLTotal` plus top-1 accuracy, Brier score and ECE bin sums (float64 / int64)."""

    def __init__(self) -> None:
        super().__init__()
        self.correct = 0
        self.brier_sum = 0.0
        self.bin_count = torch.zeros(ECE_BINS, dtype=torch.int64)
        self.bin_conf = torch.zeros(ECE_BINS, dtype=torch.float64)
        self.bin_correct = torch.zeros(ECE_BINS, dtype=torch.int64)
        # inner edges 1/15 .. 14/15: bucketize(right=False) puts edges[i-1] < c <= edges[i] in bin i
        self.edges = torch.arange(1, ECE_BINS, dtype=torch.float64) / ECE_BINS

    def add(self, scores: TokenScores) -> None:
        super().add(scores)
        conf = scores.confidence.double().cpu()
        hit = scores.correct.cpu()
        self.correct += int(hit.sum())
        self.brier_sum += float((conf - hit.double()).square().sum())
        idx = torch.bucketize(conf, self.edges, right=False)
        self.bin_count += torch.bincount(idx, minlength=ECE_BINS)
        self.bin_conf += torch.zeros(ECE_BINS, dtype=torch.float64).index_add_(0, idx, conf)
        self.bin_correct += torch.bincount(idx[hit], minlength=ECE_BINS)

    def result(self) -> dict:
        out = super().result()
        n = self.tokens
        ece = float((self.bin_correct.double() - self.bin_conf).abs().sum()) / n
        bins = [{"lo": i / ECE_BINS, "hi": (i + 1) / ECE_BINS, "count": int(c),
                 "accuracy": int(k) / int(c) if c else None, "mean_confidence": float(s) / int(c) if c else None}
                for i, (c, k, s) in enumerate(zip(self.bin_count, self.bin_correct, self.bin_conf))]
        return {**out, "top1_accuracy": self.correct / n, "ece": ece, "brier_top1": self.brier_sum / n,
                "ece_bins": bins}


def per_unit(nll_sum: float, text: str) -> dict:
    """Word and byte perplexity and bits per byte of ``text`` as one stream (see DEFINITIONS: the
    formulas of lm-evaluation-harness, which however scores and counts per document)."""
    words = len(text.split())
    n_bytes = len(text.encode("utf-8"))

    def exp(x: float) -> float:
        return math.exp(x) if x < 709.0 else math.inf

    return {"words": words, "bytes": n_bytes,
            "word_perplexity": exp(nll_sum / words) if words else None,
            "byte_perplexity": exp(nll_sum / n_bytes) if n_bytes else None,
            "bits_per_byte": nll_sum / (n_bytes * math.log(2)) if n_bytes else None}


def evaluated_text(plan: WindowPlan, tokens: torch.Tensor, text: str, tokenizer) -> tuple[str, str]:
    """The text the windows span and how it was obtained (whole text, or decoded token prefix)."""
    if plan.covered_tokens == plan.text_tokens:
        return text, "whole text"
    part = tokenizer.decode(tokens[:plan.covered_tokens].tolist(), clean_up_tokenization_spaces=False)
    return part, f"decoded first {plan.covered_tokens} of {plan.text_tokens} tokens"


@torch.no_grad()
def evaluate_plan(model: torch.nn.Module, plan: WindowPlan, batch_size: int, desc: str = "baseline") -> dict:
    """Score every window of ``plan`` (``batch_size`` windows per forward pass); metrics and timing."""
    assert_eval(model)
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    total = CalibratedTotal()
    fed = 0
    t0 = time.perf_counter()
    for ids, ctx in plan.groups:
        for i, batch in enumerate(batches(ids, batch_size, device, desc)):
            total.add(score_tokens(model, batch, ctx[i * batch_size:(i + 1) * batch_size]))
            fed += batch.numel()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    res = total.result()
    return {**res, "eval_wall_s": wall, "tokens_per_s": res["tokens"] / wall if wall > 0 else None,
            "input_tokens": fed, "input_tokens_per_s": fed / wall if wall > 0 else None,
            "peak_memory": peak_memory_mb()}


def evaluate_text(model: torch.nn.Module, tokenizer, tokens: torch.Tensor, text: str, plan: WindowPlan,
                  batch_size: int, desc: str = "baseline") -> dict:
    """One row of baseline_results.json: ``text`` (tokenized as ``tokens``) read by the windows of ``plan``
    (:func:`plan_windows` at one context and stride)."""
    context = plan.context
    res = evaluate_plan(model, plan, batch_size, desc)
    span, how = evaluated_text(plan, tokens, text, tokenizer)
    return {"context": context, "mode": "strided" if plan.strided else "non_overlapping",
            "stride": plan.stride, "windows": plan.windows, "windows_total": plan.windows_total,
            "batch_size": batch_size, "text_tokens": plan.text_tokens, "tokens_covered": plan.covered_tokens,
            "tokens_scored": res["tokens"], "tokens_unscored": plan.covered_tokens - res["tokens"],
            "evaluated_text": how, **res, **per_unit(res["nll_sum"], span)}
