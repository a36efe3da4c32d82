"""Token windows: evaluation and calibration never overlap, seeds resample, BOS policy, fallbacks."""

from __future__ import annotations

import contextlib
import sys
import time

import numpy as np
import pytest
import torch

import esa.data
from esa.data import WIKITEXT2_ENV, bos_policy, from_text, load_data, sample_corpus
from esa.errors import UsageError


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
    monkeypatch.delenv(WIKITEXT2_ENV, raising=False)  # CI sets it; this test is about having nothing local
    import esa.model.offline
    esa.model.offline.hub_reachable.cache_clear()
    from transformers import AutoTokenizer

    from tests.realmodels import embedded_dir
    tok = AutoTokenizer.from_pretrained(embedded_dir())
    t0 = time.perf_counter()
    data = load_data(tok, None, None, max_length=256, eval_samples=16, max_samples=32)
    assert time.perf_counter() - t0 < 15
    assert data.data_source.startswith("bundled:")
    with pytest.raises(UsageError, match="cannot load dataset wikitext2"):
        load_data(tok, None, "wikitext2", max_length=256, eval_samples=16, max_samples=32)
    esa.model.offline.hub_reachable.cache_clear()


# ---------------------------------------------------------------- local raw files and what may fall back


def _raw_dir(path, train: bool):
    """A folder shaped like WikiText-2's raw release, holding distinct text per split."""
    path.mkdir()
    (path / "wiki.test.raw").write_text(unique_text(400), encoding="utf-8")
    if train:
        (path / "wiki.train.raw").write_text("\n".join(unique_text(3000)[1000 + 100 * i:1100 + 100 * i]
                                                      for i in range(20)), encoding="utf-8")
    return path


def test_data_dir_evaluates_the_test_split_and_calibrates_on_train(tmp_path, monkeypatch):
    monkeypatch.delenv(WIKITEXT2_ENV, raising=False)
    tok, raw = CharTokenizer(False), _raw_dir(tmp_path / "raw", train=True)
    data = load_data(tok, None, "wikitext2", max_length=10, eval_samples=5, max_samples=20, data_dir=str(raw))
    same = load_data(tok, str(raw / "wiki.test.raw"), None, max_length=10, eval_samples=5, max_samples=20)
    assert torch.equal(data.eval_windows, same.eval_windows)  # the windows --data-file gives on the test file
    train_ids = {ord(c) + 2 for c in (raw / "wiki.train.raw").read_text()}
    assert set(data.calib_pool.flatten().tolist()) <= train_ids
    assert not set(data.calib_pool.flatten().tolist()) & set(data.eval_windows.flatten().tolist())
    assert data.data_source.startswith("local:wikitext2") and "wiki.train.raw" in data.data_source


def test_env_variable_without_train_split_calibrates_after_the_eval_windows(tmp_path, monkeypatch, caplog):
    tok, raw = CharTokenizer(False), _raw_dir(tmp_path / "raw", train=False)
    monkeypatch.setenv(WIKITEXT2_ENV, str(raw / "wiki.test.raw"))
    data = load_data(tok, None, "wikitext2", max_length=10, eval_samples=5, max_samples=20)
    assert "no wiki.train.raw" in caplog.text and WIKITEXT2_ENV in data.data_source
    assert min(data.calib_pool.flatten().tolist()) > max(data.eval_windows.flatten().tolist())
    default = load_data(tok, None, None, max_length=10, eval_samples=5, max_samples=20)  # no data flag at all
    assert default.data_source == data.data_source
    monkeypatch.setenv(WIKITEXT2_ENV, str(raw))  # the folder works too
    assert load_data(tok, None, "wikitext2", max_length=10, eval_samples=5, max_samples=20).data_source.startswith(
        "local:wikitext2")


def test_a_named_local_path_that_is_missing_is_a_usage_error(tmp_path, monkeypatch):
    tok = CharTokenizer(False)
    monkeypatch.setenv(WIKITEXT2_ENV, str(tmp_path / "nope.raw"))
    for dataset in ("wikitext2", None):  # never a silent switch to the hub or the bundled corpus
        with pytest.raises(UsageError, match=f"{WIKITEXT2_ENV}=.*is not a file"):
            load_data(tok, None, dataset, max_length=10, eval_samples=1, max_samples=1)
    monkeypatch.delenv(WIKITEXT2_ENV)
    with pytest.raises(UsageError, match="holds no wiki.test.raw"):
        load_data(tok, None, "wikitext103", max_length=10, eval_samples=1, max_samples=1, data_dir=str(tmp_path))


@pytest.fixture
def no_local_wikitext(monkeypatch):
    monkeypatch.delenv(WIKITEXT2_ENV, raising=False)
    monkeypatch.setattr(esa.data, "offline_unless_reachable", contextlib.nullcontext)  # no 2 s probe


def test_only_an_availability_failure_falls_back_to_the_bundled_corpus(no_local_wikitext, monkeypatch):
    tok = CharTokenizer(False)

    def unreachable(name, split):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setattr(esa.data, "_load_split", unreachable)
    assert load_data(tok, None, None, 32, 2, 2).data_source.startswith("bundled:")

    def broken(name, split):  # a bug, or a datasets release that changed its API
        raise TypeError("load_dataset() got an unexpected keyword argument")
    monkeypatch.setattr(esa.data, "_load_split", broken)
    with pytest.raises(TypeError, match="unexpected keyword"):
        load_data(tok, None, None, 32, 2, 2)


def test_a_broken_datasets_install_is_a_usage_error(no_local_wikitext, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    for dataset in (None, "wikitext2"):
        with pytest.raises(UsageError, match="datasets library does not import"):
            load_data(CharTokenizer(False), None, dataset, 32, 2, 2)
