"""Run under torchrun by tests/runner/test_sharded.py: every configuration of :data:`CONFIGS` with
``--shard fsdp`` in one process group, each into ``OUT_ROOT/<name>``.

    torchrun --standalone --nproc_per_node W tests/runner/sharded_driver.py OUT_ROOT MODEL_ROOT   (W = 1, 2 or 4)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import esa_runner  # noqa: E402
from tests.realmodels import CORPUS  # noqa: E402

FAMILIES = ("llama", "qwen3_moe", "gpt2")
MODES = ("per_layer", "per_row", "global")
# Every world size runs every family and every mode once; over the three world sizes every pair is run
# (a Latin square: nine sharded runs instead of twenty-seven, each checked against one process)
CONFIGS = {world: {f"{family}-{MODES[(i + j) % 3]}": (family, MODES[(i + j) % 3]) for i, family in enumerate(FAMILIES)}
           for j, world in enumerate((1, 2, 4))}


def argv(model_dir: Path, mode: str, out: Path) -> list[str]:
    """One run: two metrics (a gradient and an observing one), every control, a sweep, two seeds.
    random_mag_k ranks |w| row by row in Python under per_row, which over a 49,152-row output head
    takes minutes: per_row runs the other controls (tests/experiment/test_sharded.py covers it)."""
    controls = "random_k,bottom_k" + (",random_mag_k" if mode != "per_row" else "")
    return ["--model", str(model_dir), "--device", "cpu", "--dtype", "fp32", "--data-file", str(CORPUS),
            "--max-length", "12", "--max-samples", "3", "--eval-samples", "3", "--batch-size", "2",
            "--metric", "grad_x_weight,act_mag", "--mode", mode, "--topk", "2", "--topk-sweep", "1,2",
            "--perturb", "gauss_noise", "--controls", controls, "--seeds", "0,1", "--out-dir", str(out)]


def main(out_root: str, model_root: str) -> int:
    """The group is made here, once, and every run uses it as it is: a run that destroyed its group
    and made a new one under the same torchrun store could meet a rank still writing the last
    run's reports in a stale rendezvous (a user launches one run per torchrun)."""
    import torch.distributed as tdist

    from esa.model.distributed import collective_timeout, launched_world_size

    tdist.init_process_group(backend="gloo", timeout=collective_timeout())
    try:
        for name, (family, mode) in CONFIGS[launched_world_size()].items():
            code = esa_runner.main(argv(Path(model_root) / family, mode, Path(out_root) / name) + ["--shard", "fsdp"])
            if code != 0:
                return code
        return 0
    finally:
        tdist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
