"""activations.json in report.md, on the console and as activations.png, from the file alone."""

from __future__ import annotations

import json

from esa.reporting import activations as part
from esa.reporting.format import layer_span


def layer(i: int, top: float, median: float = 2.0) -> dict:
    return {"layer": i, "max": top, "channel": 507, "window": 0, "position": 0, "value": top, "median": median}


def condition(name: str, still: int, gone: int | None, ppl_ratio: float, seed: int = 0) -> dict:
    return {"experiment": "perturbation", "seed": seed, "group": "10", "condition": name, "ppl": 37.5 * ppl_ratio,
            "ppl_ratio": ppl_ratio, "n_massive": still, "layers": [layer(i, 5e3 if still else 20.0) for i in range(4)],
            "massive": [{"channel": 507, "layers": [2, 3], "count": still, "max": 5e3}] if still else [],
            "n_channels": 1 if still else 0, "still_massive": still, "baseline_massive": 6,
            "gone_from_layer": {"507": gone}, "change": []}


def results() -> dict:
    base = {"n_massive": 6, "layers": [layer(0, 9.0), layer(1, 90.0), layer(2, 5e3), layer(3, 4e3)],
            "massive": [{"channel": 507, "layers": [2, 3], "count": 6, "max": 5e3, "positions": [0], "n_positions": 1}],
            "n_channels": 1, "truncated": False}
    return {"rule": "the rule", "massive_min": 100.0, "massive_ratio": 1000.0, "windows": 3, "tokens_per_window": 8,
            "baseline_ppl": 37.5, "baseline": base,
            "conditions": [condition("top_k", 0, 2, 8.8), condition("top_k+restored", 6, None, 1.1),
                           condition("random_k", 6, None, 1.0), condition("top_k", 6, None, 1.0, seed=1)]}


def test_layer_span():
    assert layer_span([3, 4, 5, 9]) == "layers 3–5, 9" and layer_span([7]) == "layer 7"
    assert layer_span([1, 3]) == "layers 1, 3" and layer_span([]) == "no layer"


def test_section_console_and_plot_from_the_file(tmp_path):
    (tmp_path / part.RESULTS).write_text(json.dumps(results()))
    console = part.console_lines(tmp_path)
    assert console[0] == "massive activations: 6 at channels 507 (layers 2–3)"
    text = console[1]
    assert "6 massive activations" in text and "2500× its median" in text
    assert "k=10, seed 0" in text and "leaves 0 of them massive (channel 507 gone from layer 2 on)" in text
    assert "×8.80" in text and "×1.10 with the massive activations restored" in text
    assert part.plot(tmp_path).stat().st_size > 1000
    section = part.markdown_section(tmp_path)
    rows = [r for r in section if r.startswith("| top_k")]
    assert rows == ["| top_k, k=10 | ×8.80 | 0 of 6 | channel 507 gone from layer 2 on | 20 |",
                    "| top_k+restored, k=10 | ×1.10 | 6 of 6 | every channel still massive | 5000 |"]  # seed 0 only
    assert "![massive activations](activations.png)" in section


def test_no_massive_activation_is_said_so(tmp_path):
    res = results()
    res["baseline"].update(n_massive=0, massive=[], n_channels=0)
    res["conditions"] = []
    (tmp_path / part.RESULTS).write_text(json.dumps(res))
    head, text = part.console_lines(tmp_path)
    assert head == "massive activations: none (|h| > 100 and > 1000x the layer median)"
    assert text.startswith("The unmodified model has no massive activation") and "layer 2, channel 507" in text
