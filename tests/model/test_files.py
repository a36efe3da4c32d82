"""A truncated or corrupt model file (GGUF, safetensors) is bad input: exit 2, one line naming the file."""

from __future__ import annotations

import shutil

import gguf
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import esa_runner
from esa.errors import UsageError
from esa.model.files import check_model_files
from esa.model.loading import embedded_gguf_path
from tests.realmodels import CORPUS, tiny_model_dir


def _one_line(capsys) -> str:
    """The one error line of stderr (the log lines before it are the run's progress), no traceback."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _run(model: str, out) -> int:
    return esa_runner.main(["--model", model, "--device", "cpu", "--dtype", "fp32", "--data-file", str(CORPUS),
                            "--max-length", "32", "--max-samples", "2", "--out-dir", str(out)])


def _library_refuses(path) -> bool:
    """The safetensors library itself cannot open the file (the reference for what is damaged)."""
    try:
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                f.get_tensor(name)
    except Exception:  # noqa: BLE001 - any failure of the library's reader counts
        return True
    return False


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("cut, needle", [(0.5, "truncated: the tensor data its header describes needs"),
                                         (40 / 3_000_000, "truncated: its header needs at least")])
def test_truncated_safetensors_exit_2_naming_the_file(tiny, tmp_path, capsys, cut, needle):
    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:max(9, int(len(data) * cut))])
    assert _library_refuses(weights) and not _library_refuses(tiny / "model.safetensors")
    assert _run(str(model), tmp_path / "out") == 2
    err = _one_line(capsys)
    assert f"model file '{weights}' cannot be read as safetensors: {needle}" in err


def test_corrupt_safetensors(tmp_path):
    """Each kind of damage the check names is one the library refuses too."""
    good = tmp_path / "good.safetensors"
    save_file({"a": torch.ones(3, 4), "b": torch.zeros(5)}, str(good))
    check_model_files(good)
    data = good.read_bytes()
    n = int.from_bytes(data[:8], "little")
    damaged = {"trailing bytes": data + b"\0" * 16,
               "not valid JSON": data[:8] + b"{" * n + data[8 + n:],
               "header length": (10**12).to_bytes(8, "little") + data[8:]}
    for what, content in damaged.items():
        bad = tmp_path / f"{what}.safetensors"
        bad.write_bytes(content)
        assert _library_refuses(bad), what
        with pytest.raises(UsageError, match="cannot be read as safetensors: corrupt"):
            check_model_files(bad)


@pytest.mark.parametrize("keep", [100_000, 3_000_000, 0])
def test_truncated_gguf_exit_2_naming_the_file(tmp_path, capsys, keep):
    src = embedded_gguf_path()  # intact: its tensor data ends where the file does
    check_model_files(src)
    bad = tmp_path / "model.gguf"
    with open(src, "rb") as f:
        bad.write_bytes(f.read(keep) if keep else b"PK\x03\x04 not a gguf file at all")
    if keep < 1_000_000:  # the gguf package's own reader refuses it too (its message names neither file nor fault;
        with pytest.raises(ValueError):  # it parses a whole header in seconds, so only the short files are tried)
            gguf.GGUFReader(str(bad))
    needle = {100_000: "truncated: its header needs at least",
              3_000_000: f"truncated: the tensor data its header describes needs {src.stat().st_size:,} bytes, the "
                         "file has 3,000,000",
              0: "not a GGUF file"}[keep]
    assert _run(str(bad), tmp_path / "out") == 2
    assert f"model file '{bad}' cannot be read as GGUF: {needle}" in _one_line(capsys)
