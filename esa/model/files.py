"""Model files checked before loading: a truncated or corrupt GGUF or safetensors file is bad input.

Loaders fail on such files deep inside their readers (``struct.error``, a reshape of too few bytes,
``SafetensorError``), with messages that name neither the file nor the fault.  These checks read
only the files' headers (bytes, never tensors) and compare the data the header describes with the
file's size, so a damaged download is one line naming the file and what is wrong with it.

* safetensors: ``u64`` little-endian header length ``N``, ``N`` bytes of JSON
  ``{name: {dtype, shape, data_offsets: [begin, end]}}``, then the data, which must end exactly where
  the largest ``end`` says.
* GGUF (v2/v3): magic ``GGUF``, version, tensor and key-value counts, the key-values, the tensor
  infos (name, dims, type, offset), then the data aligned to ``general.alignment`` (default 32).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import BinaryIO

from esa.errors import UsageError

SAFETENSORS_ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                          "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
# GGUF value types: 0..7, 10..12 fixed-size scalars (struct format), 8 string, 9 array
GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
GGUF_STRING, GGUF_ARRAY = 8, 9
HEADER, DATA = "its header", "the tensor data its header describes"


class BadFile(Exception):
    """What is wrong with a model file (the message, without the file name)."""


def check_model_files(path: Path) -> None:
    """Check a ``.gguf`` file, or every ``*.safetensors`` file of a model folder; a damaged one is a
    :class:`UsageError` naming the file and the fault."""
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    for f in files:
        try:
            check_gguf(f) if f.suffix.lower() == ".gguf" else check_safetensors(f)
        except BadFile as exc:
            kind = "GGUF" if f.suffix.lower() == ".gguf" else "safetensors"
            raise UsageError(f"model file {str(f)!r} cannot be read as {kind}: {exc}") from None


def _truncated(need: int, size: int, what: str) -> BadFile:
    """``what``: "its header" (``need`` is then a lower bound) or the tensor data (exact)."""
    bound = "at least " if what == HEADER else ""
    return BadFile(f"truncated: {what} needs {bound}{need:,} bytes, the file has {size:,} "
                   f"({100 * size / need:.1f} %); download it again")


def check_safetensors(path: Path) -> None:
    """Raise :class:`BadFile` unless ``path``'s header is valid JSON whose tensors fit the file exactly."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _truncated(8, size, HEADER)
        n = struct.unpack("<Q", head)[0]
        if n > size - 8:
            raise _truncated(8 + n, size, HEADER) if n < 100_000_000 else BadFile(
                f"corrupt: the header length field says {n:,} bytes")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadFile(f"corrupt: the header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise BadFile("corrupt: the header is not a JSON object")
    end = 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = (int(v) for v in t["data_offsets"])
            width = SAFETENSORS_ITEM_BYTES.get(t["dtype"])
            shape = [int(d) for d in t["shape"]]
        except (KeyError, TypeError, ValueError):
            raise BadFile(f"corrupt: the header entry of {name!r} lacks dtype, shape or data_offsets") from None
        if width is not None and stop - begin != width * math.prod(shape):
            raise BadFile(f"corrupt: {name!r} takes {stop - begin:,} bytes, its dtype and shape need "
                          f"{width * math.prod(shape):,}")
        end = max(end, stop)
    if 8 + n + end > size:
        raise _truncated(8 + n + end, size, DATA)
    if 8 + n + end < size:
        raise BadFile(f"corrupt: {size - 8 - n - end:,} bytes after the last tensor the header describes")


class _Reader:
    """Little-endian fields of a GGUF header, each read checked against the end of the file."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self.f, self.size = f, size

    def take(self, fmt: str) -> int | float:
        n = struct.calcsize("<" + fmt)
        raw = self.f.read(n)
        if len(raw) < n:
            raise _truncated(self.f.tell() - len(raw) + n, self.size, HEADER)
        return struct.unpack("<" + fmt, raw)[0]

    def string(self) -> str:
        n = int(self.take("Q"))
        if self.f.tell() + n > self.size:
            raise _truncated(self.f.tell() + n, self.size, HEADER)
        return self.f.read(n).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> object:
        """One key-value's value (arrays of strings or scalars; only ``general.alignment`` is kept)."""
        if vtype in GGUF_SCALARS:
            return self.take(GGUF_SCALARS[vtype])
        if vtype == GGUF_STRING:
            return self.string()
        if vtype == GGUF_ARRAY:
            item, count = int(self.take("I")), int(self.take("Q"))
            if item in GGUF_SCALARS:  # skipped in one seek: a vocabulary holds tens of thousands of scores
                need = self.f.tell() + count * struct.calcsize("<" + GGUF_SCALARS[item])
                if need > self.size:
                    raise _truncated(need, self.size, HEADER)
                self.f.seek(need)
                return None
            for _ in range(count):
                self.value(item)
            return None
        raise BadFile(f"corrupt: unknown GGUF value type {vtype} at byte {self.f.tell() - 4:,}")


def check_gguf(path: Path) -> None:
    """Raise :class:`BadFile` unless ``path`` is a GGUF file whose header can be read and whose tensor
    data (sizes from the gguf package's block sizes per quantisation type) lies within the file."""
    from gguf.constants import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType

    size = path.stat().st_size
    with open(path, "rb") as f:
        r = _Reader(f, size)
        if f.read(4) != b"GGUF":
            raise BadFile("not a GGUF file (it does not start with the bytes 'GGUF')")
        version, n_tensors, n_kv = r.take("I"), r.take("Q"), r.take("Q")
        if version not in (2, 3):
            raise BadFile(f"unsupported or corrupt GGUF version {version}")
        alignment = GGUF_DEFAULT_ALIGNMENT
        for _ in range(int(n_kv)):
            key = r.string()
            value = r.value(int(r.take("I")))
            if key == "general.alignment":
                alignment = int(value)
        end = 0
        for _ in range(int(n_tensors)):
            name = r.string()
            dims = [int(r.take("Q")) for _ in range(int(r.take("I")))]
            kind, offset = int(r.take("I")), int(r.take("Q"))
            try:
                block, type_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            except (ValueError, KeyError):
                raise BadFile(f"corrupt: tensor {name!r} has unknown type {kind}") from None
            end = max(end, offset + math.prod(dims) // block * type_bytes)
        data_start = -(-f.tell() // alignment) * alignment
    if data_start + end > size:
        raise _truncated(data_start + end, size, DATA)
