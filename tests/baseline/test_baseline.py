"""Baseline runner: windows, metrics against naive and hand computations, agreement with esa_runner, CLI."""

from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import esa.cli.baseline as baseline_runner
import esa.model.loading
import esa_runner
from esa.baseline.evaluate import CalibratedTotal, evaluate_plan, evaluate_text, plan_windows
from esa.model.forward import NaNLossError, TokenScores, perplexity
from tests.conftest import VOCAB, to_double
from tests.realmodels import CORPUS, REPO, tiny_model_dir

pytestmark = pytest.mark.usefixtures("single_thread")

SCRIPT = REPO / "scripts" / "baseline_runner.py"

NO_BOS = {"policy": "none", "bos_token_id": None}
BOS = {"policy": "prepend_bos", "bos_token_id": 0}


def naive_nll(model64: torch.nn.Module, tokens: torch.Tensor, context: int, stride: int | None,
              bos_id: int | None) -> tuple[float, int, int]:
    """The Hugging Face guide's loop, one window at a time, explicit shift and log_softmax in float64.

    Returns (sum of NLL, tokens scored, tokens scored with the top-1 prediction right).
    """
    off = 0 if bos_id is None else 1
    body = context - off
    stride = body if stride is None else min(stride, body)
    total, n, hits, prev_end = 0.0, 0, 0, 0
    for begin in range(0, len(tokens), stride):
        end = min(begin + body, len(tokens))
        ids = tokens[begin:end]
        if off:
            ids = torch.cat([torch.tensor([bos_id]), ids])
        logits = model64(input_ids=ids[None], use_cache=False).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        for j in range(1, len(ids)):  # logits at j-1 predict token j
            if begin + j - off < prev_end:  # already scored by an earlier window
                continue
            total -= float(logp[j - 1, ids[j]])
            hits += int(logp[j - 1].argmax() == ids[j])
            n += 1
        prev_end = end
        if end == len(tokens):
            break
    return total, n, hits


def random_tokens(n: int, seed: int = 7) -> torch.Tensor:
    return torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- windows


@pytest.mark.parametrize("policy", [NO_BOS, BOS], ids=["no_bos", "bos"])
@pytest.mark.parametrize("n, context, stride", [(50, 8, 3), (50, 8, None), (49, 8, 4), (7, 8, 3), (33, 5, 1),
                                                (40, 8, 8), (41, 8, None)])
def test_every_token_scored_once_with_left_context(n, context, stride, policy):
    tokens = torch.arange(100, 100 + n)  # token id = 100 + text position
    plan = plan_windows(tokens, context, stride, policy)
    off = policy["policy"] == "prepend_bos"
    scored = []
    for i_group, (ids, ctx) in enumerate(plan.groups):
        assert ids.shape[1] <= context
        for i, (w, k) in enumerate(zip(ids, ctx)):
            first = i_group == 0 and i == 0
            if not first and plan.strided:  # up to context - stride tokens of left context, at least that many
                assert k == context - plan.stride
            scored += (w[k:] - 100).tolist()
    assert len(scored) == len(set(scored)) == plan.tokens_scored
    if plan.strided or n < plan.body:
        assert sorted(scored) == list(range(0 if off else 1, n))  # all but (without BOS) the first token
    else:  # non-overlapping: each window's first text token has no context unless a BOS precedes it
        assert sorted(scored) == [p for p in range(n) if off or p % plan.body]
    assert plan.covered_tokens == n


def test_max_windows_keeps_first_windows_and_short_window_runs_alone():
    tokens = torch.arange(45)
    plan = plan_windows(tokens, 10, 4, NO_BOS)
    assert [g[0].shape for g in plan.groups] == [torch.Size([9, 10]), torch.Size([1, 9])]  # starts 0..32, then 36
    assert plan.groups[1][0][0].tolist() == list(range(36, 45))
    cut = plan_windows(tokens, 10, 4, NO_BOS, max_windows=3)
    assert cut.windows == 3 and cut.windows_total == 10 and cut.covered_tokens == 18
    assert cut.groups[0][0][:, 0].tolist() == [0, 4, 8]


# ---------------------------------------------------------------- (a) naive independent loop


@pytest.mark.parametrize("policy", [NO_BOS, BOS], ids=["no_bos", "bos"])
@pytest.mark.parametrize("stride", [None, 4, 11])
def test_matches_naive_loop(tiny_model, policy, stride):
    tokens = random_tokens(53)  # 53 tokens at context 12: a short final window in every case
    res = evaluate_text(tiny_model, None, tokens, "x", plan_windows(tokens, 12, stride, policy), batch_size=3)
    ref, n, hits = naive_nll(to_double(tiny_model), tokens, 12, stride, policy["bos_token_id"])
    assert res["tokens_scored"] == n
    assert res["nll_sum"] == pytest.approx(ref, rel=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(ref / n), rel=1e-5)
    assert res["top1_accuracy"] == hits / n
    assert res["ppl"] > 10  # a random model: the comparison is not vacuous


def test_script_matches_naive_loop_on_a_saved_model(tiny_dir, tmp_path, wikitext2):
    """End to end: tokenizer, windows with a short last window, strided and non-overlapping."""
    text = wikitext2.read_text(encoding="utf-8")[:1500]
    f = tmp_path / "t.txt"
    f.write_text(text, encoding="utf-8")
    out = tmp_path / "o"
    argv = ["--model", tiny_dir, "--device", "cpu", "--dtype", "fp32", "--datasets", str(f), "--context-lens", "64",
            "--stride", "none,24", "--batch-size", "3", "--out-dir", str(out)]
    assert run_script(argv)[0] == 0
    rows = json.loads((out / "baseline_results.json").read_text())["results"]
    model, tok = esa.model.loading.load_model(tiny_dir, "cpu", "fp32")
    tokens = torch.tensor(tok(text, add_special_tokens=False).input_ids)
    model64 = to_double(model)
    for row, stride in zip(rows, [None, 24]):
        ref, n, _ = naive_nll(model64, tokens, 64, stride, None)
        starts = math.ceil(len(tokens) / 64)  # non-overlapping: every window start is unscored
        assert row["tokens_scored"] == n == (len(tokens) - 1 if stride else len(tokens) - starts)
        assert row["nll_sum"] == pytest.approx(ref, rel=1e-5)
    assert (len(tokens) - 64) % 24 != 0  # the strided pass ended with a short window


# ---------------------------------------------------------------- (b) one implementation with esa_runner


def test_non_overlapping_is_bit_identical_to_esa_perplexity(tiny_model):
    tokens = random_tokens(12 * 6 + 5)
    windows = tokens[:72].view(6, 12)  # esa.data's non-overlapping tiling
    plan = plan_windows(tokens, 12, None, NO_BOS, max_windows=6)
    got = evaluate_plan(tiny_model, plan, 4)
    ref = perplexity(tiny_model, windows, 4)
    assert (got["ppl"], got["nll_sum"], got["tokens"]) == (ref["ppl"], ref["nll_sum"], ref["tokens"])


def test_esa_runner_baseline_equals_baseline_runner_exactly(tiny_dir, baseline_run, tmp_path, capsys):
    out = tmp_path / "esa"
    argv = ["--model", tiny_dir, "--device", "cpu", "--dtype", "fp32", "--data-file", str(CORPUS),
            "--max-length", "32", "--eval-samples", "4", "--max-samples", "4", "--batch-size", "2",
            "--topk", "3", "--perturb", "zero", "--controls", "none", "--out-dir", str(out)]
    assert esa_runner.main(argv) == 0
    esa_base = json.loads((out / "perturbation_results.json").read_text())["baseline"]
    row = json.loads((baseline_run / "baseline_results.json").read_text())["results"][0]
    assert row["windows"] == 4 and row["batch_size"] == 2 and row["context"] == 32
    assert row["tokens"] == esa_base["tokens"] == 4 * 31
    assert row["ppl"] == esa_base["ppl"]  # exact: one implementation, same windows and batches
    assert row["nll_sum"] == esa_base["nll_sum"]


# ---------------------------------------------------------------- (c) metrics by hand


class Bigram(torch.nn.Module):
    """logits(next | current) = log of a fixed table row: every probability is known by hand."""

    def __init__(self, probs: list[list[float]]):
        super().__init__()
        self.table = torch.nn.Parameter(torch.tensor(probs).log(), requires_grad=False)

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.table[input_ids])


P = [[0.7, 0.2, 0.1], [0.25, 0.5, 0.25], [0.05, 0.1, 0.85]]


def test_metrics_by_hand():
    model = Bigram(P).eval()
    tokens = torch.tensor([0, 0, 1, 2, 2, 1, 0])
    text = "ab cd\né"  # 3 words, 8 UTF-8 bytes (é is two)
    res = evaluate_text(model, None, tokens, text, plan_windows(tokens, 7, None, NO_BOS), batch_size=1)
    # (current -> next): p(next), top-1 correct, top-1 confidence
    steps = [(0.7, 1, 0.7), (0.2, 0, 0.7), (0.25, 0, 0.5), (0.85, 1, 0.85), (0.1, 0, 0.85), (0.25, 0, 0.5)]
    nll = -sum(math.log(p) for p, _, _ in steps)
    assert res["tokens_scored"] == 6
    assert res["nll_sum"] == pytest.approx(nll, rel=1e-6)
    assert res["top1_accuracy"] == 2 / 6
    assert res["brier_top1"] == pytest.approx(sum((c - y) ** 2 for _, y, c in steps) / 6, rel=1e-6)
    # bins (10/15, 11/15] holds 0.7, 0.7 (1 right); (7/15, 8/15] 0.5, 0.5 (0 right); (12/15, 13/15] 0.85 x2 (1 right)
    assert res["ece"] == pytest.approx((abs(1 - 1.4) + abs(0 - 1.0) + abs(1 - 1.7)) / 6, rel=1e-6)
    counts = {i: b["count"] for i, b in enumerate(res["ece_bins"]) if b["count"]}
    assert counts == {7: 2, 10: 2, 12: 2}
    assert (res["words"], res["bytes"]) == (3, 8)
    assert res["word_perplexity"] == pytest.approx(math.exp(nll / 3), rel=1e-6)
    assert res["byte_perplexity"] == pytest.approx(math.exp(nll / 8), rel=1e-6)
    assert res["bits_per_byte"] == pytest.approx(nll / (8 * math.log(2)), rel=1e-6)


def test_window_boundaries_by_hand():
    """Context 3, no overlap: windows [0 0 1] [2 2 1] [0]; each first token unscored, the lone last one too."""
    model = Bigram(P).eval()
    tokens = torch.tensor([0, 0, 1, 2, 2, 1, 0])
    res = evaluate_text(model, None, tokens, "t", plan_windows(tokens, 3, None, NO_BOS), batch_size=2)
    assert (res["tokens_scored"], res["windows"]) == (4, 2)
    assert res["nll_sum"] == pytest.approx(-math.log(0.7 * 0.2 * 0.85 * 0.1), rel=1e-6)
    # a bigram needs no context
    strided = evaluate_text(model, None, tokens, "t", plan_windows(tokens, 3, 1, NO_BOS), batch_size=2)
    assert strided["tokens_scored"] == 6
    assert strided["nll_sum"] == pytest.approx(-math.log(0.7 * 0.2 * 0.25 * 0.85 * 0.1 * 0.25), rel=1e-6)


def test_nan_is_an_error_not_a_number():
    total = CalibratedTotal()
    total.add(TokenScores(torch.tensor([1.0, float("nan")]), torch.tensor([True, False]), torch.tensor([0.5, 0.5])))
    with pytest.raises(NaNLossError):
        total.result()


# ---------------------------------------------------------------- CLI: (d) errors, (e) dry run, (f) outputs


def run_script(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = baseline_runner.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return str(tiny_model_dir(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def baseline_run(tiny_dir, tmp_path_factory):
    """The windows esa_runner evaluates with --max-length 32 --eval-samples 4 --batch-size 2 on CORPUS."""
    out = tmp_path_factory.mktemp("baseline")
    argv = ["--model", tiny_dir, "--device", "cpu", "--dtype", "fp32", "--datasets", str(CORPUS),
            "--context-lens", "32", "--max-windows", "4", "--batch-size", "2", "--seeds", "0,1", "--out-dir", str(out)]
    code, stdout, err = run_script(argv)
    assert code == 0, err
    (out / "stdout.txt").write_text(stdout)
    return out


def test_outputs_and_manifest(baseline_run):
    manifest = json.loads((baseline_run / "experiment_manifest.json").read_text())
    assert manifest["status"] == "success" and manifest["error"] is None
    assert manifest["files"] == ["baseline_results.json"]
    assert {"load_model", "load_data", "evaluate"} <= manifest["timings_s"].keys()
    res = json.loads((baseline_run / "baseline_results.json").read_text())
    assert res["seeds"] == [0, 1] and "identical for every seed" in res["seed_semantics"]
    assert res["bos_policy"]["policy"] == "none"  # the SmolLM2 tokenizer adds no BOS
    assert "joined with '\\n\\n'" in res["text_convention"]
    assert {"ece", "brier_top1", "word_perplexity", "bits_per_byte"} <= res["definitions"].keys()
    row = res["results"][0]
    for key in ("ppl", "mean_nll", "tokens_scored", "top1_accuracy", "ece", "brier_top1", "word_perplexity",
                "byte_perplexity", "bits_per_byte", "tokens_per_s", "peak_memory"):
        assert row[key] is not None, key
    assert row["mode"] == "non_overlapping" and row["evaluated_text"].startswith("decoded first 128 of ")
    table = (baseline_run / "stdout.txt").read_text()
    assert "word ppl" in table and f"{row['ppl']:.4f}" in table


def one_error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("argv, needle", [
    (["--baseline", "huge"], "invalid choice"),
    (["--datasets", "wikitext9"], "neither a dataset"),
    (["--datasets", "wikitext2,"], "empty item"),
    (["--context-lens", "1"], "at least 2"),
    (["--context-lens", "x"], "list of integers"),
    (["--stride", "0"], "--stride takes"),
    (["--context-lens", "64", "--stride", "65"], "exceeds the context"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--batch-size", "2", "--batch-tokens", "64"], "not allowed with"),
    (["--max-windows", "-1"], "--max-windows must be positive"),
    (["--seeds", "1,1"], "duplicates"),
    (["--dtype", "fp64"], "invalid choice"),
])
def test_bad_flags_one_line_exit_2(argv, needle):
    code, _, err = run_script(argv + ["--dry-run"])
    assert code == 2
    assert err.count("\n") == 1 and needle in one_error_line(err)


def test_bad_inputs_after_loading(tiny_dir, tmp_path):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "one.txt").write_text("a")
    base = ["--model", tiny_dir, "--device", "cpu", "--dtype", "fp32", "--datasets", str(CORPUS),
            "--max-windows", "1", "--context-lens", "32", "--out-dir", str(tmp_path / "o")]
    cases = [
        (["--model", str(tmp_path / "no-such-model")], "does not exist"),
        (["--out-dir", str(tmp_path / "file.txt" / "sub")], "not writable"),
        (["--context-lens", "4096"], "exceeds the model's maximum"),
        (["--datasets", str(tmp_path / "latin1.txt")], "not UTF-8"),
        (["--datasets", str(tmp_path / "one.txt")], "too short for one window"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "CUDA is not available"))
    for extra, needle in cases:
        code, _, err = run_script(base + extra)
        assert code == 2, (extra, err)
        assert needle in one_error_line(err), extra


def test_nan_loss_fails_the_run(tiny_dir, tmp_path, monkeypatch):
    real = esa.model.loading.load_model

    def nan_model(*args, **kwargs):
        model, tok = real(*args, **kwargs)
        model.model.norm.weight.data[0] = float("nan")
        return model, tok

    monkeypatch.setattr(esa.model.loading, "load_model", nan_model)
    out = tmp_path / "o"
    code, _, err = run_script(["--model", tiny_dir, "--device", "cpu", "--dtype", "fp32", "--datasets",
                               str(CORPUS), "--context-lens", "16", "--max-windows", "2", "--out-dir", str(out)])
    assert code == 1 and "NaN loss" in one_error_line(err)
    assert json.loads((out / "experiment_manifest.json").read_text())["status"] == "failed"
    assert "NaN" in json.loads((out / "baseline_results.json").read_text())["results"][0]["error"]


def test_verbose_shows_the_traceback():
    code, _, err = run_script(["--stride", "0", "--verbose"])
    assert code == 2 and "Traceback" in err


def test_dry_run_loads_nothing(monkeypatch, tmp_path):
    def boom(*a, **k):
        raise AssertionError("--dry-run loaded the model")

    monkeypatch.setattr(esa.model.loading, "load_model", boom)
    code, out, _ = run_script(["--dry-run", "--baseline", "extended", "--out-dir", str(tmp_path / "o")])
    assert code == 0 and "contexts:    512, 1024, 2048, 4096" in out and "context/2" in out
    assert not (tmp_path / "o").exists()


def test_script_runs_from_the_repo_root():
    proc = subprocess.run([sys.executable, "scripts/baseline_runner.py", "--dry-run", "--baseline", "smoke",
                           "--datasets", str(CORPUS)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "baseline plan" in proc.stdout and "max windows: 32" in proc.stdout
