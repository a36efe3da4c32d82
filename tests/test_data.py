"""Token windows: evaluation and calibration never overlap, seeds resample, BOS policy, fallbacks."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from esa.config import UsageError
from esa.data import bos_policy, from_text, load_data, sample_corpus


class CharTokenizer:
    """Character-level stand-in: token id = position of the character in the text + 2 (unique ids)."""

    def __init__(self, add_bos: bool):
        self.add_bos, self.bos_token_id = add_bos, 1

    def __call__(self, text, add_special_tokens=True, verbose=False):
        ids = [ord(c) + 2 for c in text]
        if self.add_bos and add_special_tokens:
            ids = [1] + ids

        class Out:
            input_ids = ids
        return Out()


def unique_text(n: int) -> str:
    return "".join(chr(0x4E00 + i) for i in range(n))  # n distinct characters -> n distinct token ids


@pytest.mark.parametrize("add_bos", [False, True])
def test_eval_and_calibration_never_overlap(add_bos):
    tok = CharTokenizer(add_bos)
    policy = bos_policy(tok)
    assert policy["policy"] == ("prepend_bos" if add_bos else "none")
    data = from_text(unique_text(1000), "t", tok, max_length=10, eval_samples=5, max_samples=20, policy=policy)
    body = 9 if add_bos else 10
    assert data.eval_windows.shape == (5, 10) and len(data.calib_pool) == (1000 - 5 * body) // body
    if add_bos:
        assert (data.eval_windows[:, 0] == 1).all() and (data.calib_pool[:, 0] == 1).all()
    text_ids = lambda w: set(w[:, 1:].flatten().tolist() if add_bos else w.flatten().tolist())  # noqa: E731
    ev, pool = text_ids(data.eval_windows), text_ids(data.calib_pool)
    assert not ev & pool
    assert min(pool) > max(ev)  # calibration comes from the text after the evaluation region
    # evaluation = the first windows, in order, with no gap
    assert data.eval_windows[0, int(add_bos)].item() == 0x4E00 + 2


def test_seeds_draw_different_calibration_windows():
    tok = CharTokenizer(False)
    data = from_text(unique_text(2000), "t", tok, max_length=10, eval_samples=2, max_samples=8,
                     policy=bos_policy(tok))
    a = data.calibration(np.random.default_rng(0), 8)
    b = data.calibration(np.random.default_rng(0), 8)
    c = data.calibration(np.random.default_rng(1), 8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(r) for r in a.tolist()}) == 8  # without replacement


def test_too_little_text_is_a_usage_error():
    tok = CharTokenizer(False)
    with pytest.raises(UsageError, match="too little text"):
        from_text(unique_text(100), "t", tok, max_length=10, eval_samples=5, max_samples=6, policy=bos_policy(tok))
    with pytest.raises(UsageError, match="no text"):
        from_text("   \n", "t", tok, max_length=10, eval_samples=1, max_samples=1, policy=bos_policy(tok))


def test_bundled_corpus_is_substantial_and_original():
    text = sample_corpus()
    assert len(text.split()) >= 8000
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    assert len(paragraphs) == len(set(paragraphs))  # no repeated filler


def test_offline_fallback_is_fast_and_recorded(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import esa.hub
    esa.hub.hub_reachable.cache_clear()
    from transformers import AutoTokenizer

    from tests.realmodels import embedded_dir
    tok = AutoTokenizer.from_pretrained(embedded_dir())
    t0 = time.perf_counter()
    data = load_data(tok, None, None, max_length=256, eval_samples=16, max_samples=32)
    assert time.perf_counter() - t0 < 15
    assert data.data_source.startswith("bundled:")
    with pytest.raises(UsageError, match="cannot load dataset wikitext2"):
        load_data(tok, None, "wikitext2", max_length=256, eval_samples=16, max_samples=32)
    esa.hub.hub_reachable.cache_clear()
