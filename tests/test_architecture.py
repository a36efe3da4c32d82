"""The package's shape: no import cycle, dependencies only downward, the report needs no torch,
registries refuse duplicates, no module grows past ~400 lines."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from esa.evaluators import EVALUATORS
from esa.experiment.controls import CONTROLS
from esa.experiment.perturb import PERTURBATIONS
from esa.experiment.registry import EXPERIMENTS
from esa.metrics import METRICS
from esa.registry import Registry
from tests.realmodels import REPO

ESA = REPO / "esa"

ANYTHING = "*"


def part_doc(root: Path, part: str) -> str:
    """The docstring of a part of esa/: a package's ``__init__`` or a module's own."""
    path = root / part / "__init__.py" if (root / part).is_dir() else root / f"{part}.py"
    return ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""


def allowed_imports(root: Path) -> dict[str, set[str] | str]:
    """What each part of esa/ may import from the others, read from the sentence ``May import: ...``
    of its own docstring (the one place it is written): ``esa.<part>`` names, ``nothing``, or
    ``anything in esa``.  A part without the sentence is missing from the result."""
    parts = {p.stem for p in root.glob("*.py") if p.stem != "__init__"} | {
        p.name for p in root.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    out: dict[str, set[str] | str] = {}
    for part in sorted(parts):
        doc = part_doc(root, part)
        if "May import:" not in doc:
            continue
        sentence = re.split(r"\.(?:\s|$)", doc.split("May import:", 1)[1], maxsplit=1)[0]
        out[part] = ANYTHING if "anything in esa" in sentence else set(re.findall(r"\besa\.(\w+)", sentence))
    return out


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def esa_imports(path: Path) -> set[str]:
    """Every ``esa.*`` module imported anywhere in the file (function-level imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("esa.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "esa":
                out |= {f"esa.{a.name}" for a in node.names}
            elif node.module.startswith("esa."):
                out.add(node.module)
    return out


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in ESA.rglob("*.py")}
    g = {}
    for name, path in modules.items():
        deps = set()
        for imp in esa_imports(path):
            while imp not in modules and "." in imp:  # "from esa.x import y" where y is a name, not a module
                imp = imp.rsplit(".", 1)[0]
            if imp in modules and imp != name:
                deps.add(imp)
        g[name] = deps
    return g


def part(module: str) -> str:
    return module.split(".")[1] if module.count(".") else module


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for d in sorted(g[m]):
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)


def upward(root: Path) -> list[str]:
    """Every import of one part by another that the importer's docstring does not allow."""
    allowed = allowed_imports(root)
    missing = sorted({part(m) for m in graph() if m != "esa"} - set(allowed))
    assert missing == [], f"parts without a 'May import:' sentence: {missing}"
    return [f"{m} imports {d}" for m, deps in graph().items() for d in sorted(deps)
            if part(d) != part(m) and part(m) != "esa" and allowed[part(m)] != ANYTHING
            and part(d) not in allowed[part(m)]]


def test_dependencies_point_downward():
    assert upward(ESA) == []


def test_a_drift_between_the_documented_layers_and_the_imports_fails(tmp_path, monkeypatch):
    """The rule lives in the docstrings: a part importing what its own docstring does not list fails."""
    pkg = tmp_path / "esa"
    (pkg / "low").mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""Top.\n\nMay import: nothing."""\n')
    (pkg / "low" / "__init__.py").write_text('"""Low.\n\nMay import: nothing."""\n')
    (pkg / "high.py").write_text('"""High.\n\nMay import: esa.low."""\nfrom esa.low import x\n')
    (pkg / "mid.py").write_text('"""Mid.\n\nMay import: nothing."""\nfrom esa.high import y\n')
    monkeypatch.setattr(sys.modules[__name__], "ESA", pkg)
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert upward(pkg) == ["esa.mid imports esa.high"]
    assert allowed_imports(pkg)["high"] == {"low"}


def test_the_cycle_check_can_fail(tmp_path, monkeypatch):
    """The checker itself finds a planted cycle (a test that cannot fail proves nothing)."""
    pkg = tmp_path / "esa"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from esa.b import x\n")
    (pkg / "b.py").write_text("def f():\n    from esa import a\n")
    monkeypatch.setattr(sys.modules[__name__], "ESA", pkg)
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    with pytest.raises(pytest.fail.Exception, match="import cycle: esa.a -> esa.b -> esa.a"):
        test_no_import_cycle()


def test_report_runs_without_torch_or_transformers(tmp_path):
    """``python -m esa.report OUT_DIR`` reads an out-dir only: it must work where torch cannot load."""
    from tests.synthetic_outdir import make_out_dir

    out = make_out_dir(tmp_path / "out", layers=4, seeds=(0, 1), sweep=())
    code = textwrap.dedent(f"""
        import sys, runpy
        for name in ("torch", "transformers", "accelerate", "datasets"):
            sys.modules[name] = None  # import raises ImportError
        sys.argv = ["esa.report", {str(out)!r}, "--save-plots"]
        runpy.run_module("esa.report", run_name="__main__")
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (out / "report.md").is_file() and (out / "plots" / "topk_locations.png").is_file()


@pytest.mark.parametrize("registry", [METRICS, PERTURBATIONS, CONTROLS, EXPERIMENTS, EVALUATORS],
                         ids=lambda r: r.kind)
def test_registries_refuse_duplicates_and_list_names_on_a_miss(registry):
    first = registry.names()[0]
    with pytest.raises(ValueError, match="already registered"):
        registry.add(first, registry[first])
    alias = next(iter(registry.aliases()), None)
    if alias is not None:
        with pytest.raises(ValueError, match="already registered"):
            registry.add("brand_new_name", registry[first], aliases=(alias,))
    assert "brand_new_name" not in registry
    with pytest.raises(KeyError, match=f"registered: {first}"):
        registry["no_such_name"]


def test_temporary_registration_is_undone():
    r: Registry[int] = Registry("thing")
    with r.temporary("x", 1):
        assert r["x"] == 1
    assert "x" not in r


def test_every_registered_metric_says_what_it_needs():
    for name in METRICS:
        m = METRICS[name]
        assert m.help and m.unit and m.needs <= {"forward", "backward", "per_window", "hvp"}, name


def test_no_module_over_400_lines():
    long = {str(p.relative_to(REPO)): n for p in [*ESA.rglob("*.py"), REPO / "esa_runner.py"]
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 400}
    assert long == {}


def test_every_part_says_what_lives_there_and_what_it_may_import():
    for init in [*ESA.rglob("__init__.py"), *ESA.glob("*.py")]:
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
        assert len(doc) > 40 and ("May import" in doc or init.name == "__init__.py" and init.parent == ESA), init
