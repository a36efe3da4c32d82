"""Every command in README.md and both runbooks parses and validates (--dry-run, out-dir redirected)."""

from __future__ import annotations

import re
import shlex

import pytest

import esa_runner
from esa.baseline_cli import main as baseline_main
from esa.superweights_cli import main as super_weights_main
from tests.realmodels import REPO

DOCS = ("README.md", "README_ESA_RUNBOOK.md", "README_ESA_RUNBOOK_v2.md")
SCRIPTS = ("esa_runner.py", "phase1_runner_enhanced.py", "scripts/baseline_runner.py", "scripts/find_super_weights.py")
MAINS = {"scripts/baseline_runner.py": baseline_main, "scripts/find_super_weights.py": super_weights_main}


def commands() -> list[tuple[str, str, list[str]]]:
    """(doc, script, argv) for each ``python <script> ...`` line in the docs' code blocks, and for each
    ``torchrun --nproc_per_node N esa_runner.py ...`` line (script ``torchrun:N``)."""
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
                elif words[:2] == ["torchrun", "--nproc_per_node"] and words[3] == "esa_runner.py":
                    out.append((doc, f"torchrun:{words[2]}", words[4:]))
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
    monkeypatch.chdir(REPO)  # the docs' relative paths (../shared/...) are relative to the repo root
    argv = list(argv)
    if "--out-dir" in argv:
        argv[argv.index("--out-dir") + 1] = str(tmp_path / "out")
    else:
        argv += ["--out-dir", str(tmp_path / "out")]
    if script.startswith("torchrun:"):  # what torchrun tells each rank
        monkeypatch.setenv("WORLD_SIZE", script.split(":")[1])
    main = MAINS.get(script, esa_runner.main)
    assert main(argv + ["--dry-run"]) == 0, (doc, script, argv, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()  # a dry run writes nothing
