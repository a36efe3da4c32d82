"""Names: coarse module types and block (layer) index of parameter names, --include/--exclude
patterns, and the canonical spelling of a registered name (aliases).

Pure string work (no torch), shared by the model code, the analysis and the reports.  Module types
come from generic naming conventions (no per-model tables) and group weights in plots: q, k, v, o
(attention), gate, up, down (MLP), embeddings, lm_head and other (fused projections such as
GPT-2's ``c_attn``, norms, anything unrecognised).

May import: esa.errors.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from esa.errors import UsageError

MODULE_TYPES = ("q", "k", "v", "o", "gate", "up", "down", "embeddings", "lm_head", "other")
_TYPE_PATTERNS = [
    ("embeddings", r"(embed|wte|wpe|word_embeddings|position_embeddings)"),
    ("lm_head", r"(lm_head|embed_out|output\.weight$)"),
    ("q", r"(q_proj|\.query\b|\.wq\b)"), ("k", r"(k_proj|\.key\b|\.wk\b)"), ("v", r"(v_proj|\.value\b|\.wv\b)"),
    ("o", r"(o_proj|out_proj|attn\.c_proj|attention\.dense|\.wo\b)"),
    ("gate", r"(gate_proj|\.w1\b)"), ("up", r"(up_proj|c_fc|fc1|dense_h_to_4h|\.w3\b)"),
    ("down", r"(down_proj|mlp\.c_proj|fc2|dense_4h_to_h|\.w2\b)"),
]


def module_type(name: str) -> str:
    """Coarse module type (one of :data:`MODULE_TYPES`) of a parameter name."""
    for kind, pattern in _TYPE_PATTERNS:
        if re.search(pattern, name):
            return kind
    return "other"


_LAYER_RE = re.compile(r"\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """First ``.N.`` integer in a parameter name (the block index), or None (embeddings, head)."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def compile_patterns(patterns: tuple[str, ...], flag: str) -> tuple[re.Pattern[str], ...]:
    """Compile --include/--exclude regexes, turning syntax errors into usage errors."""
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as exc:
            raise UsageError(f"{flag} {p!r} is not a valid regular expression: {exc}") from None
    return tuple(out)


def canonical(value: str, choices: Iterable[str], aliases: Mapping[str, str], what: str) -> str:
    """Map ``value`` (or one of its aliases, case-insensitively, ``-`` read as ``_``) to its canonical
    name among ``choices``; anything else is a usage error listing them."""
    key = value.strip().lower().replace("-", "_")
    key = aliases.get(key, aliases.get(value.strip().lower(), key))
    choices = tuple(choices)
    if key not in choices:
        raise UsageError(f"unknown {what} {value!r}; choose from {', '.join(choices)}")
    return key
