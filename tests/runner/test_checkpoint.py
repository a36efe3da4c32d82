"""A seed's checkpoint reads back exactly the selections that were written."""

from __future__ import annotations

import torch

from esa.experiment.registry import SeedSelections as SeedResult
from esa.experiment.selection import Selection
from esa.runner.checkpoint import load_seed, save_seed, seed_path
from esa.runner.seeds import SeedScores


def sel(kind: str, gen: torch.Generator, row_k: int = 0) -> Selection:
    idx = {"a.weight": torch.randint(0, 100, (4,), generator=gen), "b.weight": torch.zeros(0, dtype=torch.int64),
           "c.weight": torch.randint(0, 100, (2,), generator=gen)}
    return Selection(kind, idx, {n: torch.rand(len(i), generator=gen) for n, i in idx.items()}, row_k=row_k)


def same(a: Selection, b: Selection) -> bool:
    return (a.kind == b.kind and a.row_k == b.row_k and list(a.indices) == list(b.indices)
            and all(torch.equal(a.indices[n], b.indices[n]) and torch.equal(a.scores[n], b.scores[n])
                    for n in a.indices))


def test_every_selection_of_every_metric_and_k_round_trips(tmp_path):
    gen = torch.Generator().manual_seed(0)
    def controls() -> dict[str, Selection]:
        return {"random_k": sel("random_k", gen), "bottom_k": sel("bottom_k", gen)}
    results = {m: SeedResult(3, sel("top_k", gen, 2), controls(), [5, 1, 9], {2: (sel("top_k", gen), controls())})
               for m in ("grad_x_weight", "act_mag")}
    agreement = {"grad_x_weight|act_mag": {"jaccard": 0.25, "spearman_on_union": None, "union": 10}}
    assert load_seed(tmp_path, 3) is None
    save_seed(tmp_path, 3, SeedScores(results, agreement))
    assert seed_path(tmp_path, 3).is_file()
    back = load_seed(tmp_path, 3)
    assert back.agreement == agreement and list(back.results) == list(results)
    for m, r in results.items():
        b = back.results[m]
        assert b.seed == 3 and b.calibration_windows == [5, 1, 9]
        assert same(b.top, r.top) and list(b.controls) == list(r.controls)
        assert all(same(b.controls[c], r.controls[c]) for c in r.controls)
        assert set(b.sweep) == {2} and same(b.sweep[2][0], r.sweep[2][0])
        assert all(same(b.sweep[2][1][c], r.sweep[2][1][c]) for c in r.sweep[2][1])
