"""Every installed command works: each ``[project.scripts]`` target imports and answers ``--help``;
the legacy ``set_random_seed`` of esa_runner seeds every global generator."""

from __future__ import annotations

import contextlib
import importlib
import io
import random
import tomllib

import numpy as np
import pytest
import torch

from tests.realmodels import REPO

SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]


def test_every_tool_has_an_installed_command():
    assert set(SCRIPTS) >= {"esa-runner", "esa-baseline", "esa-super-weights", "esa-overlap", "esa-report"}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_each_installed_command_imports_and_answers_help(name):
    module, function = SCRIPTS[name].split(":")
    main = getattr(importlib.import_module(module), function)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["--help"]) == 0
    assert "usage:" in out.getvalue()


def test_set_random_seed_seeds_python_numpy_and_torch():
    from esa_runner import set_random_seed

    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    set_random_seed(123)
    first = draws()
    set_random_seed(123)
    assert draws() == first
    set_random_seed(124)
    assert draws() != first
