"""The activations evaluator against a brute-force computation from ``output_hidden_states``, on tiny
Llama, GPT-2 and mixture-of-experts models; a planted massive activation found, removed by zeroing
its weight and written back exactly by the restoring hooks; one forward per batch shared with
perplexity (whose numbers do not change); the model bit-exactly itself after every condition."""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from esa.evaluators import EvalInputs
from esa.evaluators.activations import Activations, feeds, restoring
from esa.evaluators.measure import Measurer
from esa.evaluators.perplexity import Perplexity
from esa.experiment.registry import Condition
from esa.model import residual
from esa.model.forward import dummy_step
from esa.options import Options
from esa.superweights import detect as sw
from tests.conftest import VOCAB, make_gpt2, make_llama
from tests.model_families import FAMILIES, build
from tests.superweights.test_detect import assert_bit_identical, llama6, params, plant_llama

pytestmark = pytest.mark.usefixtures("single_thread")

BATCH = 4
BOS = 7  # the token that carries the planted massive activation (as BOS does in real models)
FINAL_NORM = {"llama": ("model", "norm"), "gpt2": ("transformer", "ln_f"), "mixtral": ("model", "norm")}


def family(name: str) -> torch.nn.Module:
    if name == "mixtral":
        return build("mixtral", VOCAB, pad_token_id=0, bos_token_id=0, eos_token_id=0, num_hidden_layers=3)
    return {"llama": make_llama, "gpt2": make_gpt2}[name]()


def windows(n: int = 6, length: int = 12, seed: int = 5) -> torch.Tensor:
    """``[n, length]`` random windows that start with BOS (and hold it nowhere else)."""
    w = torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))
    w[w == BOS] = BOS + 1
    w[:, 0] = BOS
    return w


def planted(weight: float = 2000.0) -> torch.nn.Module:
    """A 6-layer Llama whose down_proj[9, 21] of layer 2 writes a massive activation into residual
    channel 9, at the BOS token only (its source channel 4 is 5 for BOS and 0 for every other token)."""
    model = llama6()
    plant_llama(model, layer=2, row=9, col=21, source=4, weight=weight)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 4] = 0.0
        model.model.embed_tokens.weight[BOS, 4] = 5.0
    return model


def evaluator(w: torch.Tensor, **opts) -> Activations:
    return Activations(Options(opts), EvalInputs(w, BATCH))


def block_outputs(model: torch.nn.Module, name: str, w: torch.Tensor) -> torch.Tensor:
    """``[layers, W, L, H]`` every block's output from ``output_hidden_states``, batch by batch as the
    evaluator runs.  The final norm is swapped for the identity meanwhile, so that the last entry is
    the last block's output rather than its norm."""
    parent, attr = getattr(model, FINAL_NORM[name][0]), FINAL_NORM[name][1]
    norm = getattr(parent, attr)
    setattr(parent, attr, torch.nn.Identity())
    try:
        with torch.no_grad():
            hs = [model(input_ids=w[i:i + BATCH], output_hidden_states=True, use_cache=False).hidden_states[1:]
                  for i in range(0, len(w), BATCH)]
    finally:
        setattr(parent, attr, norm)
    return torch.stack([torch.cat([h[layer] for h in hs]) for layer in range(len(hs[0]))])


@pytest.mark.parametrize("name", ["llama", "gpt2", "mixtral"])
def test_per_layer_maxima_medians_and_massive_set_equal_brute_force(name):
    model = family(name)
    w = windows()
    ref = block_outputs(model, name, w)
    a = ref.abs()
    medians = torch.stack([torch.stack([a[i, j].flatten().median() for j in range(len(w))]).median()
                           for i in range(len(ref))])
    floor, ratio = float(a.flatten().quantile(0.99)), 2.0  # thresholds that leave a few dozen massive values
    rec = evaluator(w, massive_min=floor, massive_ratio=ratio).evaluate(model, None, "baseline")
    assert len(rec["layers"]) == len(ref) == model.config.num_hidden_layers
    for i, row in enumerate(rec["layers"]):
        flat = int(a[i].argmax())
        win, pos, ch = (int(v) for v in torch.unravel_index(torch.tensor(flat), a[i].shape))
        assert (row["window"], row["position"], row["channel"]) == (win, pos, ch)
        assert row["max"] == float(a[i].max()) and row["value"] == float(ref[i, win, pos, ch])
        assert row["median"] == float(medians[i])
    massive = (a > floor) & (a > ratio * medians[:, None, None, None])
    got = residual.Points.of(rec["entries"])
    expect = massive.nonzero()
    assert 10 < len(expect) < a[0].numel() and not rec["truncated"]
    assert sorted(zip(*(got.layer.tolist(), got.window.tolist(), got.position.tolist(), got.channel.tolist()))) \
        == sorted(map(tuple, expect.tolist()))
    assert rec["n_massive"] == len(expect)
    assert sorted(got.value.tolist()) == sorted(ref[massive].double().tolist())
    by_channel = {g["channel"]: g for g in rec["massive"]}
    for ch in expect[:, 3].unique().tolist():
        assert by_channel[ch]["layers"] == expect[expect[:, 3] == ch, 0].unique().tolist()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_has_one_record_per_decoder_layer(name):
    """The blocks are found from the model's never-split classes, MoE and GPT-2 alike."""
    model = build(name, VOCAB, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    rec = evaluator(windows(n=2, length=8)).evaluate(model, None, "baseline")
    assert len(rec["layers"]) == model.config.num_hidden_layers == 2
    assert all(r["max"] > r["median"] > 0 for r in rec["layers"])


def zeroing(model: torch.nn.Module) -> Condition:
    """The condition "the planted weight is zeroed" (the super-weight detector's own zeroing)."""
    projs = sw.find_mlp_output_projections(model)
    key = ("model.layers.2.mlp.down_proj.weight", 9 * 32 + 21)
    return Condition("zero", "zero", lambda: sw.zeroed(projs, [key]), "planted weight zeroed")


def test_a_planted_massive_activation_is_found_and_zeroing_its_weight_removes_it():
    model = planted()
    w = windows()
    before = params(model)
    m = Measurer(model, [Perplexity(Options(), EvalInputs(w, BATCH)), evaluator(w)])
    base = m.baseline()["activations"]
    assert [(g["channel"], g["layers"], g["positions"]) for g in base["massive"]] == [(9, [2, 3, 4, 5], [0])]
    assert base["n_massive"] == 4 * len(w) and base["massive"][0]["max"] > 1e4  # every window's BOS, 4 layers
    assert feeds(base, 9)["layers"] == [2, 3, 4, 5] and not feeds(base, 3)["massive"]
    row = m.measure(zeroing(model))
    assert_bit_identical(model, before)
    gone = row["activations"]
    assert gone["n_massive"] == 0 and gone["still_massive"] == 0 and gone["gone_from_layer"] == {"9": 2}
    assert all(abs(c["ratio"]) < 1e-2 and c["count"] == len(w) for c in gone["change"])
    assert row["ratio"] != 1.0


def hook_counts(model: torch.nn.Module) -> list[int]:
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]


def test_restoring_writes_exactly_the_baseline_values_and_only_there():
    model = planted()
    w = windows()
    base = evaluator(w).evaluate(model, None, "baseline")
    pts = residual.Points.of(base["entries"])
    before = params(model)
    with zeroing(model).change():
        plain = block_outputs(model, "llama", w)  # (transformers adds a hook of its own on the first call)
        hooks = hook_counts(model)
        with restoring(model, w, base) as info:
            restored = block_outputs(model, "llama", w)
            rec = evaluator(w).evaluate(model, base, "restored")
    assert_bit_identical(model, before)
    assert hook_counts(model) == hooks  # every hook removed
    assert info == {"restored_values": len(pts), "restored_channels": [9]}
    at = (pts.layer, pts.window, pts.position, pts.channel)
    assert torch.equal(restored[at].double(), pts.value)  # exactly the baseline's values
    assert (plain[at].double().abs() < 1e-3 * pts.value.abs()).all()  # without the hooks they are gone
    untouched = torch.ones_like(restored, dtype=torch.bool)
    untouched[at] = False
    assert torch.equal(restored[:2][untouched[:2]], plain[:2][untouched[:2]])  # layers before the first write
    assert rec["still_massive"] == rec["baseline_massive"] == len(pts)
    assert all(c["ratio"] == 1.0 for c in rec["change"]) and rec["gone_from_layer"] == {"9": None}


def test_restoring_matches_windows_by_content_in_any_batch_and_order():
    model = planted()
    w = windows()
    base = evaluator(w).evaluate(model, None, "baseline")
    shuffled = torch.cat([w[[3, 0]], torch.randint(0, VOCAB, (1, w.shape[1]), generator=torch.Generator())])
    seen = {}
    hook = residual.blocks_of(model)[3].register_forward_hook(lambda _m, _a, out: seen.update(h=out.clone()))
    try:
        with zeroing(model).change(), restoring(model, w, base), torch.no_grad():
            model(input_ids=shuffled, use_cache=False)
    finally:
        hook.remove()
    pts = residual.Points.of(base["entries"])
    value = {int(p): float(v) for p, v in zip(pts.window[pts.layer == 3], pts.value[pts.layer == 3])}
    assert float(seen["h"][0, 0, 9]) == value[3] and float(seen["h"][1, 0, 9]) == value[0]
    assert abs(float(seen["h"][2, 0, 9])) < 1e-3 * value[0]  # not an evaluation window: left alone


class Forwards:
    """Counts the model's forward calls."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.n = 0
        self.handle = model.register_forward_pre_hook(lambda *_: setattr(self, "n", self.n + 1))


def test_activations_ride_the_perplexity_forward_which_stays_bit_identical():
    model = planted()
    w = windows(n=7)  # batches of 4 and 3
    alone = Measurer(model, [Perplexity(Options(), EvalInputs(w, BATCH))])
    both = Measurer(model, [Perplexity(Options(), EvalInputs(w, BATCH)), evaluator(w)])
    count = Forwards(model)
    try:
        row = both.measure(zeroing(model))
        assert count.n == 2 * 2  # baseline + condition, one forward per batch of 4 for both evaluators
        ref = alone.measure(zeroing(model))
    finally:
        count.handle.remove()
    assert {k: v for k, v in row.items() if k != "activations"} == ref  # perplexity bit for bit
    own = evaluator(w)  # its own forward gives the same record
    assert own.evaluate(model, None, "baseline") == both.baseline()["activations"]
    with zeroing(model).change():
        assert own.evaluate(model, both.baseline()["activations"], "zero") == row["activations"]


def test_a_sharded_models_dummy_steps_are_neither_recorded_nor_restored(caplog):
    """FSDP ranks that ran out of windows make dummy forwards (esa.model.forward.dummy_step): skipped."""
    model = planted()
    w = windows()
    ev = evaluator(w)
    with ev.observing(model, None) as finish, torch.no_grad():
        for i in range(0, len(w), BATCH):
            model(input_ids=w[i:i + BATCH], use_cache=False)
        dummy_step(model, backward=False)
    assert finish("baseline") == ev.evaluate(model, None, "baseline")
    with caplog.at_level(logging.WARNING, logger="esa"), restoring(model, w, finish("baseline")), torch.no_grad():
        dummy_step(model, backward=False)
    assert not caplog.records  # not an input that ran unrestored


def test_an_observed_forward_over_other_windows_is_an_error():
    model = make_llama()
    w = windows()
    ev = evaluator(w)
    hooks = hook_counts(model)
    with pytest.raises(RuntimeError, match="not over the next evaluation windows"), ev.observing(model, None), \
            torch.no_grad():
        model(input_ids=w[1:3], use_cache=False)
    assert hook_counts(model) == hooks
    with contextlib.ExitStack() as stack:
        finish = stack.enter_context(ev.observing(model, None))
        with torch.no_grad():
            model(input_ids=w[:4], use_cache=False)
        with pytest.raises(RuntimeError, match="did not cover every evaluation window"):
            finish("half")


def _rows() -> list[dict]:
    """Baseline, the planted weight zeroed, and zeroed with the massive activations restored."""
    model = planted()
    w = windows(n=7)  # 7 windows over two ranks: uneven shares
    m = Measurer(model, [Perplexity(Options(), EvalInputs(w, 2)), Activations(Options(), EvalInputs(w, 2))])
    plain = zeroing(model)

    @contextlib.contextmanager
    def restored():
        with plain.change() as info, restoring(model, w, m.baselines()["activations"]) as more:
            yield {**info, **more}
    return [m.baseline(), m.measure(plain), m.measure(Condition("restored", "restored", restored, "restored"))]


def _worker(rank: int, store: str, dest: str) -> None:
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        rows = _rows()
        if rank == 0:
            torch.save(rows, dest)
    finally:
        tdist.destroy_process_group()


def test_two_ranks_give_the_records_of_one_process(tmp_path):
    dest = tmp_path / "rows.pt"
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(dest)), nprocs=2, join=True)
    ones, twos = _rows(), torch.load(dest)
    assert [r["activations"]["n_massive"] for r in ones] == [28, 0, 28]  # baseline, zeroed, restored
    for one, two in zip(ones, twos):
        a, b = one["activations"], two["activations"]
        assert two["ppl"] == pytest.approx(one["ppl"], rel=1e-6)
        assert [(r["layer"], r["window"], r["position"], r["channel"]) for r in a["layers"]] == \
            [(r["layer"], r["window"], r["position"], r["channel"]) for r in b["layers"]]
        for x, y in zip(a["layers"], b["layers"]):  # other batches: equal up to fp32 rounding
            assert y["max"] == pytest.approx(x["max"], rel=1e-5) and y["median"] == pytest.approx(x["median"], rel=1e-5)
        assert a["n_massive"] == b["n_massive"]
        assert [{**g, "max": 0} for g in a["massive"]] == [{**g, "max": 0} for g in b["massive"]]
        assert [g["max"] for g in b["massive"]] == pytest.approx([g["max"] for g in a["massive"]], rel=1e-5)
        for key in ("still_massive", "gone_from_layer"):
            assert a.get(key) == b.get(key)
