"""Every command in README.md and both runbooks parses and validates (--dry-run, out-dir redirected).

Documented commands stand alone on a user's clone: data is ``--dataset wikitext2`` (local raw files
or the hub) or the placeholder ``"$ESA_WIKITEXT2_RAW"`` that the docs explain.  The placeholder is
replaced by a real file here, so validation is checked without depending on WikiText-2 being on
this machine; that a missing file fails validation is tested in test_cli.py.
"""

from __future__ import annotations

import re
import shlex

import pytest

import esa_runner
from esa.cli.baseline import main as baseline_main
from esa.cli.superweights import main as super_weights_main
from tests.realmodels import CORPUS, REPO

DOCS = ("README.md", "README_ESA_RUNBOOK.md", "README_ESA_RUNBOOK_v2.md")
SCRIPTS = ("esa_runner.py", "phase1_runner_enhanced.py", "scripts/baseline_runner.py", "scripts/find_super_weights.py")
PLACEHOLDER = "$ESA_WIKITEXT2_RAW"  # a user's path to WikiText-2's wiki.test.raw, explained in the docs
MAINS = {"scripts/baseline_runner.py": baseline_main, "scripts/find_super_weights.py": super_weights_main}


def commands() -> list[tuple[str, str, list[str]]]:
    """(doc, script, argv) for each ``python <script> ...`` line in the docs' code blocks, and for each
    ``torchrun [--nnodes M] --nproc_per_node N ... esa_runner.py ...`` line (script ``torchrun:<M*N>``)."""
    out = []
    for doc in DOCS:
        path = REPO / doc
        if not path.is_file():
            continue
        for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", path.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                if len(words) >= 2 and words[0] == "python" and words[1] in SCRIPTS:
                    out.append((doc, words[1], words[2:]))
                elif words[:1] == ["torchrun"] and "esa_runner.py" in words:
                    at = words.index("esa_runner.py")
                    launcher = dict(zip(words[1:at:2], words[2:at:2]))  # --nnodes 8 --nproc_per_node 8 ...
                    world = int(launcher.get("--nnodes", 1)) * int(launcher["--nproc_per_node"])
                    out.append((doc, f"torchrun:{world}", words[at + 1:]))
    return out


def test_the_docs_exist_and_have_commands():
    found = commands()
    for doc in DOCS:
        assert (REPO / doc).is_file(), doc
        assert any(d == doc for d, _, _ in found), f"{doc} has no runnable command"
    assert {s for _, s, _ in found if not s.startswith("torchrun:")} == set(SCRIPTS)
    assert any(s.startswith("torchrun:") for _, s, _ in found)


@pytest.mark.parametrize("doc,script,argv", commands(), ids=lambda x: x if isinstance(x, str) else None)
def test_command_parses_and_validates(doc, script, argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # the docs' relative paths are relative to the repo root
    argv = [str(CORPUS) if a == PLACEHOLDER else a for a in argv]
    if "--out-dir" in argv:
        argv[argv.index("--out-dir") + 1] = str(tmp_path / "out")
    else:
        argv += ["--out-dir", str(tmp_path / "out")]
    if script.startswith("torchrun:"):  # what torchrun tells each rank
        monkeypatch.setenv("WORLD_SIZE", script.split(":")[1])
        monkeypatch.setenv("RANK", "0")
    main = MAINS.get(script, esa_runner.main)
    assert main(argv + ["--dry-run"]) == 0, (doc, script, argv, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_docs_name_no_path_outside_the_repository():
    """A user's clone has no sibling folders: no documented command, build file or code may name one."""
    sibling = "../" + "shared"  # spelled so that this file does not match itself
    files = [REPO / "Makefile", *REPO.glob("README*.md")]
    for folder in ("esa", "scripts", "tests", "benchmarks"):
        files += [f for f in (REPO / folder).rglob("*") if f.suffix in (".py", ".md", ".txt", ".sh", ".toml")]
    offenders = [str(f.relative_to(REPO)) for f in files if sibling in f.read_text(encoding="utf-8")]
    assert offenders == []
    for doc, _script, argv in commands():
        for i, word in enumerate(argv[:-1]):
            if word in ("--data-file", "--datasets", "--data-dir") and "/" in argv[i + 1]:
                assert argv[i + 1] == PLACEHOLDER, (doc, argv)  # only the explained placeholder, no real path
