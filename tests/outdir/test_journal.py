"""The evaluation journal keeps every complete row exactly and ignores a line cut by a kill."""

from __future__ import annotations

import math

from esa.outdir.journal import Journal


def test_rows_round_trip_exactly_and_a_partial_last_line_is_ignored(tmp_path):
    j = Journal(tmp_path)
    rows = {"baseline": {"ppl": 23.148476736988118, "tokens": 4080},
            "k1": {"ppl": math.inf, "mean_nll": math.nan, "ratio": 1.0000000000000002}}
    for k, r in rows.items():
        j.append(k, r)
    with open(j.path, "a") as f:
        f.write('{"key": "k2", "row": {"ppl": 2')  # killed mid-line
    back = Journal(tmp_path, write=False).load()
    assert set(back) == {"baseline", "k1"}
    assert back["baseline"] == rows["baseline"] and back["k1"]["ppl"] == math.inf
    assert math.isnan(back["k1"]["mean_nll"]) and back["k1"]["ratio"] == 1.0000000000000002
    Journal(tmp_path, write=False).append("k3", {})  # a rank other than 0 writes nothing
    assert "k3" not in Journal(tmp_path).load()
