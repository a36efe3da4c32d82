"""Run under torchrun by tests/runner/test_sharded.py: every configuration of :data:`CONFIGS` with
``--shard fsdp`` in one process group, each into ``OUT_ROOT/<name>``.

    torchrun --standalone --nproc_per_node W tests/runner/sharded_driver.py OUT_ROOT MODEL_ROOT
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import esa_runner  # noqa: E402
from tests.realmodels import CORPUS  # noqa: E402

FAMILIES = ("llama", "qwen3_moe", "gpt2")
MODES = ("per_layer", "per_row", "global")
CONFIGS = {f"{family}-{mode}": (family, mode) for family in FAMILIES for mode in MODES}


def argv(model_dir: Path, mode: str, out: Path) -> list[str]:
    """One run: two metrics (a gradient and an observing one), every control, a sweep, two seeds."""
    return ["--model", str(model_dir), "--device", "cpu", "--dtype", "fp32", "--data-file", str(CORPUS),
            "--max-length", "12", "--max-samples", "3", "--eval-samples", "3", "--batch-size", "2",
            "--metric", "grad_x_weight,act_mag", "--mode", mode, "--topk", "2", "--topk-sweep", "1,2",
            "--perturb", "gauss_noise", "--controls", "random_k,bottom_k,random_mag_k", "--seeds", "0,1",
            "--out-dir", str(out)]


def main(out_root: str, model_root: str) -> int:
    for name, (family, mode) in CONFIGS.items():
        code = esa_runner.main(argv(Path(model_root) / family, mode, Path(out_root) / name) + ["--shard", "fsdp"])
        if code != 0:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
