"""Text -> token windows: evaluation windows (fixed) and a calibration pool (sampled per seed).

Every window is exactly ``max_length`` tokens, so batches never contain padding and no pad token
can enter a loss.  Calibration and evaluation never overlap:

* ``--data-file``: the file is tokenized once; evaluation = the first ``eval_samples``
  non-overlapping windows; the calibration pool = the non-overlapping windows tiling the tokens
  after the evaluation region.
* ``--dataset wikitext2|wikitext103``: evaluation from the test split, calibration from the train
  split.  Local raw files come first: ``--data-dir DIR`` holding ``wiki.test.raw`` (and
  ``wiki.train.raw``), or, for WikiText-2, the environment variable ``ESA_WIKITEXT2_RAW`` naming
  ``wiki.test.raw`` or its folder.  Otherwise the ``datasets`` library (rows joined with
  ``"\\n\\n"``), failing fast offline.
* neither: WikiText-2 as above when it is available, else the bundled original sample corpus, with
  one warning.  Only an availability failure (offline, not cached, unreachable) falls back; any
  other error of ``datasets`` is raised, and a broken install is a usage error naming the cause.

BOS policy: when the tokenizer itself prepends a BOS token to encoded text (``add_bos``), every
window starts with BOS followed by ``max_length - 1`` text tokens, as the model saw in training;
otherwise windows are raw text tokens.  The policy is recorded in config.json.

May import: esa.errors, esa.registry, esa.naming, esa.seeding, esa.options, esa.model.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from esa.errors import UsageError
from esa.model.offline import offline_unless_reachable
from esa.naming import canonical
from esa.options import check_spec, opt, positive

log = logging.getLogger("esa")

DATASETS = ("wikitext2", "wikitext103")
DATASET_ALIASES = {"wikitext-2": "wikitext2", "wikitext-103": "wikitext103"}
HF_DATASETS = {"wikitext2": ("wikitext", "wikitext-2-raw-v1"), "wikitext103": ("wikitext", "wikitext-103-raw-v1")}
ROW_JOIN = "\n\n"  # the Hugging Face perplexity guide's convention for joining dataset rows
POOL_FACTOR = 64  # calibration pool from a dataset split holds up to 64x the windows needed
WIKITEXT2_ENV = "ESA_WIKITEXT2_RAW"  # path of a local WikiText-2 wiki.test.raw (or its folder)
RAW_SPLIT_FILES = {"test": "wiki.test.raw", "validation": "wiki.valid.raw", "train": "wiki.train.raw"}


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


def parse_dataset(text: str) -> str:
    return canonical(text, DATASETS, DATASET_ALIASES, "--dataset")


@dataclass(frozen=True)
class DataSpec:
    """Where the text comes from and how it is cut into windows (see the module docstring)."""

    data_file: str | None = opt(None, "UTF-8 text file: evaluation = first --eval-samples windows, calibration = "
                                "windows drawn per seed from the text after them")
    dataset: str | None = opt(None, f"one of {', '.join(DATASETS)} (calibration = train split, evaluation = test "
                              "split): from --data-dir, else (wikitext2) the file named by the environment variable "
                              f"{WIKITEXT2_ENV}, else the datasets library (cache or hub)", parse=parse_dataset)
    data_dir: str | None = opt(None, "with --dataset: a folder holding the raw files wiki.test.raw (and "
                               "wiki.train.raw; without it calibration comes from the test split after the "
                               "evaluation windows)", metavar="DIR")
    max_samples: int = opt(32, "calibration windows used for scoring", check=positive)
    eval_samples: int = opt(16, "evaluation windows used for perplexity", check=positive)
    max_length: int = opt(256, "tokens per window",
                          check=lambda v: None if v >= 2 else f"must be at least 2 tokens, got {v}")
    batch_size: int = opt(4, "windows per forward pass", check=positive)


def validate_data(spec: DataSpec) -> None:
    """Everything about the data that can be checked before the model loads (UsageError)."""
    check_spec(spec)
    if spec.data_file is not None and spec.dataset is not None:
        raise UsageError("give either --data-file or --dataset, not both")
    if spec.data_dir is not None:
        if spec.dataset is None:
            raise UsageError("--data-dir needs --dataset (it holds that dataset's raw files)")
        if not os.path.isdir(spec.data_dir):
            raise UsageError(f"--data-dir {spec.data_dir!r} does not exist or is not a folder")
    if spec.data_file is not None:
        check_text_file(spec.data_file, "--data-file")


def check_text_file(path: str, flag: str) -> None:
    """A user-named text file must exist and hold something (checked before any model loads)."""
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path!r} does not exist or is not a file")
    if os.path.getsize(path) == 0:
        raise UsageError(f"{flag} {path!r} is empty")


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


def unavailable_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean "the dataset cannot be reached or is not cached".

    Only these may switch to another corpus: a bug, or a ``datasets`` version that changed its
    API, must surface instead of silently changing the evaluation text."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]  # datasets: ConnectionError offline
    with contextlib.suppress(ImportError):
        from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

        errors += [LocalEntryNotFoundError, OfflineModeIsEnabled]
    with contextlib.suppress(ImportError):
        import requests

        errors += [requests.exceptions.ConnectionError, requests.exceptions.Timeout]
    with contextlib.suppress(ImportError):
        import httpx

        errors.append(httpx.TransportError)
    return tuple(errors)


def _chunk_tokens(tokenizer, texts: Iterable[str], joiner: str, needed_tokens: int) -> torch.Tensor:
    """Tokenize ``texts`` joined with ``joiner`` in chunks of 2000, stopping once ``needed_tokens``
    are collected (a dataset split can be far larger than what the windows need)."""
    chunks, have, buf = [], 0, []

    def flush() -> None:
        nonlocal have, buf
        t = tokenize(tokenizer, joiner.join(buf) + joiner)
        chunks.append(t)
        have += len(t)
        buf = []

    for text in texts:
        buf.append(text)
        if len(buf) >= 2000:
            flush()
            if have >= needed_tokens:
                break
    if buf and have < needed_tokens:
        flush()
    return torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.long)


@dataclass(frozen=True)
class LocalRaw:
    """Local raw files of a dataset: the test split, the train split if present, and who named them."""

    test: Path
    train: Path | None
    via: str  # "--data-dir DIR" or "ESA_WIKITEXT2_RAW"


def local_raw_files(name: str, data_dir: str | None) -> LocalRaw | None:
    """``--data-dir`` (any dataset), else ``ESA_WIKITEXT2_RAW`` (WikiText-2 only), else ``None``.

    A path that is given but holds no ``wiki.test.raw`` is a usage error, never a silent switch to
    the ``datasets`` library or the bundled corpus."""
    if data_dir is not None:
        test, via = Path(data_dir) / RAW_SPLIT_FILES["test"], f"--data-dir {data_dir}"
        if not test.is_file():
            raise UsageError(f"--data-dir {data_dir!r} holds no {RAW_SPLIT_FILES['test']}")
    elif name == "wikitext2" and os.environ.get(WIKITEXT2_ENV):
        given = Path(os.environ[WIKITEXT2_ENV])
        test, via = (given / RAW_SPLIT_FILES["test"] if given.is_dir() else given), WIKITEXT2_ENV
        if not test.is_file():
            raise UsageError(f"{WIKITEXT2_ENV}={str(given)!r} is not a file (name WikiText-2's "
                             f"{RAW_SPLIT_FILES['test']} or the folder holding it, or unset the variable)")
    else:
        return None
    train = test.parent / RAW_SPLIT_FILES["train"]
    return LocalRaw(test.resolve(), train.resolve() if train.is_file() else None, via)


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{what} {str(path)!r} is not UTF-8 text") from None


def from_local_raw(name: str, raw: LocalRaw, tokenizer, max_length: int, eval_samples: int, max_samples: int,
                   policy: dict) -> TokenData:
    """Evaluation = the first windows of the local test split (the same windows as ``--data-file``
    on that file); calibration = the train split, or, without ``wiki.train.raw``, the test split's
    windows after the evaluation region (warned and recorded)."""
    kw = dict(max_length=max_length, eval_samples=eval_samples, max_samples=max_samples, policy=policy)
    test = _read_text(raw.test, raw.via)
    if raw.train is None:
        log.warning("%s: no %s beside %s, so calibration windows come from the test split after the evaluation "
                    "windows (disjoint from them)", raw.via, RAW_SPLIT_FILES["train"], raw.test)
        return from_text(test, f"local:{name} raw files via {raw.via} (eval = first windows of {raw.test}, "
                         f"calibration = windows after them: no {RAW_SPLIT_FILES['train']})", tokenizer, **kw)
    ev = _windows(tokenize(tokenizer, test), max_length, policy, eval_samples)
    lines = _read_text(raw.train, raw.via).splitlines(keepends=True)
    pool = _windows(_chunk_tokens(tokenizer, lines, "", POOL_FACTOR * max_samples * max_length), max_length, policy)
    source = f"local:{name} raw files via {raw.via} (eval = {raw.test}, calibration = {raw.train})"
    return _check(TokenData(ev, pool, source, policy), eval_samples, max_samples, source)


def load_splits(name: str, splits: tuple[str, ...], required: bool, hint: str = "use --data-file PATH instead"):
    """The ``splits`` of dataset ``name`` from the ``datasets`` library (a list), failing fast offline.

    Unavailable (offline and not cached, unreachable): a UsageError if ``required`` (ending with
    ``hint``), else ``None``.  A missing ``datasets`` install is a UsageError naming the cause; any
    other exception propagates.
    """
    try:
        import datasets  # noqa: F401  (a broken install is the user's to fix, not a reason to switch corpus)
    except ImportError as exc:
        raise UsageError(f"cannot load dataset {name}: the datasets library does not import ({exc}); "
                         "reinstall the requirements") from exc
    online = True
    try:
        with offline_unless_reachable() as online:
            return [_load_split(name, split) for split in splits]
    except unavailable_errors() as exc:
        if required:
            raise UsageError(f"cannot load dataset {name} ({'online' if online else 'offline, not cached'}): "
                             f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
                             f"{hint} or point {WIKITEXT2_ENV} / --data-dir at local raw files") from exc
        log.debug("dataset %s unavailable: %r", name, exc)
        return None


def from_dataset(name: str, tokenizer, max_length: int, eval_samples: int, max_samples: int,
                 policy: dict, required: bool, data_dir: str | None = None) -> TokenData | None:
    kw = dict(max_length=max_length, eval_samples=eval_samples, max_samples=max_samples, policy=policy)
    raw = local_raw_files(name, data_dir)
    if raw is not None:
        return from_local_raw(name, raw, tokenizer, **kw)
    loaded = load_splits(name, ("test", "train"), required)
    if loaded is None:
        return None
    test, train = loaded
    ev_tokens = _chunk_tokens(tokenizer, (row["text"] for row in test), ROW_JOIN, eval_samples * max_length)
    ev = _windows(ev_tokens, max_length, policy, eval_samples)
    pool_tokens = POOL_FACTOR * max_samples * max_length
    pool = _windows(_chunk_tokens(tokenizer, (row["text"] for row in train), ROW_JOIN, pool_tokens), max_length,
                    policy)
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
    log.warning("WikiText-2 is not available (offline and not cached, and %s is unset): using the bundled "
                "sample corpus (esa/resources/sample_corpus.txt); pass --data-file for real evaluation text",
                WIKITEXT2_ENV)


def eval_split_text(name: str, required: bool, hint: str = "use --data-file PATH instead",
                    data_dir: str | None = None) -> tuple[str, str] | None:
    """``(text, source)`` of the whole test split of ``name``: the local raw file (see
    :func:`local_raw_files`) as it is, else the ``datasets`` rows joined with ROW_JOIN (``"\\n\\n"``,
    the Hugging Face perplexity guide's convention); ``None`` if unavailable and not ``required``."""
    raw = local_raw_files(name, data_dir)
    if raw is not None:
        return _read_text(raw.test, raw.via), f"local:{name} test split {raw.test} via {raw.via} (whole file)"
    loaded = load_splits(name, ("test",), required, hint)
    if loaded is None:
        return None
    return ROW_JOIN.join(loaded[0]["text"]), f"datasets:{HF_DATASETS[name][1]} (test split, rows joined with '\\n\\n')"


def default_eval_text() -> tuple[str, str]:
    """What evaluation falls back to without a data choice: the WikiText-2 test split when it is
    available (local raw file or ``datasets``), else the bundled sample corpus (with the same
    warning as load_data)."""
    found = eval_split_text("wikitext2", required=False)
    if found is not None:
        return found
    warn_sample_corpus_fallback()
    return sample_corpus(), SAMPLE_SOURCE


def load_data(tokenizer, data_file: str | None, dataset: str | None, max_length: int, eval_samples: int,
              max_samples: int, data_dir: str | None = None) -> TokenData:
    """The evaluation windows and calibration pool of a run (see the module docstring for the order;
    :func:`load_spec` takes a :class:`DataSpec`)."""
    policy = bos_policy(tokenizer)
    kw = dict(max_length=max_length, eval_samples=eval_samples, max_samples=max_samples, policy=policy)
    if data_file is not None:
        text = _read_text(Path(data_file), "--data-file")
        return from_text(text, f"file:{os.path.abspath(data_file)}", tokenizer, **kw)
    if dataset is not None:
        return from_dataset(dataset, tokenizer, required=True, data_dir=data_dir, **kw)
    data = from_dataset("wikitext2", tokenizer, required=False, **kw)
    if data is not None:
        return data
    warn_sample_corpus_fallback()
    return from_text(sample_corpus(), SAMPLE_SOURCE, tokenizer, **kw)


def load_spec(tokenizer, spec: DataSpec) -> TokenData:
    """:func:`load_data` of a run's :class:`DataSpec`."""
    return load_data(tokenizer, spec.data_file, spec.dataset, spec.max_length, spec.eval_samples, spec.max_samples,
                     spec.data_dir)
