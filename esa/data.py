"""Text -> token windows: evaluation windows (fixed) and a calibration pool (sampled per seed).

Every window is exactly ``max_length`` tokens, so batches never contain padding and no pad token
can enter a loss.  Calibration and evaluation never overlap:

* ``--data-file``: the file is tokenized once; evaluation = the first ``eval_samples``
  non-overlapping windows; the calibration pool = the non-overlapping windows tiling the tokens
  after the evaluation region.
* ``--dataset wikitext2|wikitext103``: evaluation from the test split, calibration from the train
  split (rows joined with ``"\\n\\n"``).
* neither: WikiText-2 when ``datasets`` can load it (cache or hub, failing fast offline), else the
  bundled original sample corpus, with one warning.

BOS policy: when the tokenizer itself prepends a BOS token to encoded text (``add_bos``), every
window starts with BOS followed by ``max_length - 1`` text tokens, as the model saw in training;
otherwise windows are raw text tokens.  The policy is recorded in config.json.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch

from esa.config import UsageError
from esa.hub import offline_unless_reachable

log = logging.getLogger("esa")

HF_DATASETS = {"wikitext2": ("wikitext", "wikitext-2-raw-v1"), "wikitext103": ("wikitext", "wikitext-103-raw-v1")}
ROW_JOIN = "\n\n"  # the Hugging Face perplexity guide's convention for joining dataset rows
POOL_FACTOR = 64  # calibration pool from a dataset split holds up to 64x the windows needed


@dataclass(frozen=True)
class TokenData:
    """Evaluation windows ``[n_eval, L]`` and calibration pool ``[n_pool, L]`` (int64, cpu)."""

    eval_windows: torch.Tensor
    calib_pool: torch.Tensor
    data_source: str
    bos_policy: dict

    def calibration_indices(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Pool indices of ``n`` windows drawn by ``rng`` without replacement, sorted."""
        if n > len(self.calib_pool):
            raise UsageError(f"too little calibration text: need {n} windows, pool has {len(self.calib_pool)}")
        return np.sort(rng.choice(len(self.calib_pool), size=n, replace=False))

    def calibration(self, rng: np.random.Generator, n: int) -> torch.Tensor:
        """``n`` calibration windows ``[n, L]`` drawn by ``rng`` without replacement, in pool order."""
        return self.calib_pool[torch.from_numpy(self.calibration_indices(rng, n))]


def bos_policy(tokenizer) -> dict:
    bos = tokenizer.bos_token_id
    ids = tokenizer("a").input_ids
    adds = bos is not None and len(ids) > 0 and ids[0] == bos
    return {
        "policy": "prepend_bos" if adds else "none",
        "bos_token_id": bos,
        "reason": ("tokenizer prepends BOS to encoded text, so each window starts with BOS" if adds
                   else "tokenizer does not prepend BOS, so windows are raw text tokens"),
    }


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids ``[N]`` (int64, cpu) of ``text`` without special tokens (BOS is added per window)."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False).input_ids
    return torch.tensor(ids, dtype=torch.long)


def _windows(tokens: torch.Tensor, max_length: int, policy: dict, limit: int | None = None) -> torch.Tensor:
    """Tile ``tokens`` into non-overlapping windows of ``max_length`` (BOS included if policy)."""
    bos = policy["policy"] == "prepend_bos"
    body = max_length - 1 if bos else max_length
    n = len(tokens) // body
    if limit is not None:
        n = min(n, limit)
    w = tokens[: n * body].view(n, body)
    if bos:
        w = torch.cat([torch.full((n, 1), policy["bos_token_id"], dtype=torch.long), w], dim=1)
    return w


def _load_split(name: str, split: str):
    import datasets

    path, conf = HF_DATASETS[name]
    return datasets.load_dataset(path, conf, split=split)


def _split_tokens(tokenizer, rows, needed_tokens: int) -> torch.Tensor:
    """Tokenize rows joined with ROW_JOIN, stopping once ``needed_tokens`` are collected."""
    chunks, have, buf = [], 0, []
    for i, row in enumerate(rows):
        buf.append(row["text"])
        if len(buf) >= 2000 or i == len(rows) - 1:
            t = tokenize(tokenizer, ROW_JOIN.join(buf) + ROW_JOIN)
            chunks.append(t)
            have += len(t)
            buf = []
            if have >= needed_tokens:
                break
    return torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.long)


def load_splits(name: str, splits: tuple[str, ...], required: bool, hint: str = "use --data-file PATH instead"):
    """The ``splits`` of dataset ``name`` (a list), failing fast offline.

    Unloadable: a UsageError if ``required`` (ending with ``hint``), else ``None``.
    """
    online = True
    try:
        with offline_unless_reachable() as online:
            return [_load_split(name, split) for split in splits]
    except Exception as exc:  # datasets raises many types (ConnectionError, FileNotFoundError...)
        if required:
            raise UsageError(f"cannot load dataset {name} ({'online' if online else 'offline, not cached'}): "
                             f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
                             f"{hint}") from exc
        return None


def from_dataset(name: str, tokenizer, max_length: int, eval_samples: int, max_samples: int,
                 policy: dict, required: bool) -> TokenData | None:
    loaded = load_splits(name, ("test", "train"), required)
    if loaded is None:
        return None
    test, train = loaded
    ev = _windows(_split_tokens(tokenizer, test, eval_samples * max_length), max_length, policy, eval_samples)
    pool_tokens = POOL_FACTOR * max_samples * max_length
    pool = _windows(_split_tokens(tokenizer, train, pool_tokens), max_length, policy)
    return _check(TokenData(ev, pool, f"datasets:{HF_DATASETS[name][1]} (eval=test, calibration=train)", policy),
                  eval_samples, max_samples, name)


def _check(data: TokenData, eval_samples: int, max_samples: int, source: str) -> TokenData:
    if len(data.eval_windows) < eval_samples or len(data.calib_pool) < max_samples:
        raise UsageError(
            f"too little text in {source}: need {eval_samples} evaluation + {max_samples} calibration windows, "
            f"got {len(data.eval_windows)} + {len(data.calib_pool)} (lower --eval-samples/--max-samples/--max-length)")
    return data


def from_text(text: str, source: str, tokenizer, max_length: int, eval_samples: int, max_samples: int,
              policy: dict) -> TokenData:
    """Split one text: first ``eval_samples`` windows evaluate, the rest form the calibration pool."""
    if not text.strip():
        raise UsageError(f"{source} contains no text")
    tokens = tokenize(tokenizer, text)
    body = max_length - 1 if policy["policy"] == "prepend_bos" else max_length
    ev = _windows(tokens, max_length, policy, eval_samples)
    pool = _windows(tokens[len(ev) * body:], max_length, policy)
    return _check(TokenData(ev, pool, source, policy), eval_samples, max_samples, source)


def sample_corpus() -> str:
    return resources.files("esa").joinpath("resources/sample_corpus.txt").read_text(encoding="utf-8")


SAMPLE_SOURCE = "bundled:esa/resources/sample_corpus.txt"


def warn_sample_corpus_fallback() -> None:
    log.warning("WikiText-2 is not available (offline and not cached): using the bundled sample corpus "
                "(esa/resources/sample_corpus.txt); pass --data-file for real evaluation text")


def eval_split_text(name: str, required: bool, hint: str = "use --data-file PATH instead") -> tuple[str, str] | None:
    """``(text, source)`` of the whole test split of ``name``: rows joined with ROW_JOIN (``"\\n\\n"``,
    the Hugging Face perplexity guide's convention); ``None`` if unloadable and not ``required``."""
    loaded = load_splits(name, ("test",), required, hint)
    if loaded is None:
        return None
    return ROW_JOIN.join(loaded[0]["text"]), f"datasets:{HF_DATASETS[name][1]} (test split, rows joined with '\\n\\n')"


def default_eval_text() -> tuple[str, str]:
    """What evaluation falls back to without a data choice: the WikiText-2 test split when
    ``datasets`` can load it, else the bundled sample corpus (with the same warning as load_data)."""
    found = eval_split_text("wikitext2", required=False)
    if found is not None:
        return found
    warn_sample_corpus_fallback()
    return sample_corpus(), SAMPLE_SOURCE


def load_data(tokenizer, data_file: str | None, dataset: str | None, max_length: int, eval_samples: int,
              max_samples: int) -> TokenData:
    policy = bos_policy(tokenizer)
    kw = dict(max_length=max_length, eval_samples=eval_samples, max_samples=max_samples, policy=policy)
    if data_file is not None:
        try:
            with open(data_file, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError:
            raise UsageError(f"--data-file {data_file!r} is not UTF-8 text") from None
        return from_text(text, f"file:{os.path.abspath(data_file)}", tokenizer, **kw)
    if dataset is not None:
        return from_dataset(dataset, tokenizer, required=True, **kw)
    data = from_dataset("wikitext2", tokenizer, required=False, **kw)
    if data is not None:
        return data
    warn_sample_corpus_fallback()
    return from_text(sample_corpus(), SAMPLE_SOURCE, tokenizer, **kw)
