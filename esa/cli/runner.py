"""``esa_runner.py``: the ESA command line.

Builds the parser in argument groups, normalises aliases, freezes the result into an
:class:`esa.config.RunConfig`, validates it and calls :func:`esa.runner.pipeline.run`.
``main(argv)`` returns the exit code: 0 success, 2 bad input (one line on stderr), 1 crash,
130 interrupted.  Metric, perturbation and control names (and their help) come from the registries.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from esa.cli.common import Parser, add_model_args, add_output_args, guarded, model_spec_args, setup_logging
from esa.cli.plan import runner_plan
from esa.config import (
    CONTROLS,
    METRICS,
    MODES,
    PERTURBATIONS,
    QUANTIZERS,
    RunConfig,
    canonical,
    parse_block_sizes,
    parse_controls,
    parse_metrics,
    parse_seeds,
    parse_topk_sweep,
    resume_config,
    validate,
)
from esa.data import DATASET_ALIASES, DATASETS
from esa.errors import UsageError

log = logging.getLogger("esa")

def _catalogue(registry) -> str:
    """``name = definition; ...`` of every registered item (the --help text grows with the registry)."""
    return "; ".join(f"{name} = {registry[name].help}" for name in registry)


def build_parser() -> Parser:
    p = Parser(prog=os.path.basename(sys.argv[0]) or "esa_runner.py",
               description="Extreme Sensitivity Analysis: score every weight of a causal LM, perturb the "
                           "Top-K against random_k/bottom_k controls and measure the perplexity change. "
                           "Scores always accumulate in fp32.")
    g = p.add_argument_group("model and runtime")
    add_model_args(g)
    g = p.add_argument_group("large models (see README 'Large models'; data parallel: torchrun --nproc_per_node N)")
    g.add_argument("--device-map", choices=("auto",), default=None,
                   help="spread the model and its fp32 score accumulators over all visible GPUs with accelerate")
    g.add_argument("--offload", action="store_true",
                   help="with --device-map auto: also place (and run) layers in CPU memory when the GPUs are full")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each decoder block in backward instead of storing its activations "
                        "(long contexts; gradient metrics only; same scores, slower)")
    g = p.add_argument_group("data")
    g.add_argument("--data-file", default=None, help="UTF-8 text file: evaluation = first --eval-samples "
                   "windows, calibration = windows drawn per seed from the text after them")
    g.add_argument("--dataset", default=None, help=f"one of {', '.join(DATASETS)} (calibration = train split, "
                   "evaluation = test split): from --data-dir, else (wikitext2) the file named by the environment "
                   "variable ESA_WIKITEXT2_RAW, else the datasets library (cache or hub)")
    g.add_argument("--data-dir", default=None, metavar="DIR",
                   help="with --dataset: a folder holding the raw files wiki.test.raw (and wiki.train.raw; "
                        "without it calibration comes from the test split after the evaluation windows)")
    g.add_argument("--max-samples", type=int, default=32, help="calibration windows used for scoring")
    g.add_argument("--eval-samples", type=int, default=16, help="evaluation windows used for perplexity")
    g.add_argument("--max-length", type=int, default=256, help="tokens per window")
    g.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    g = p.add_argument_group("scoring and selection")
    g.add_argument("--metric", default="grad_x_weight",
                   help=f"sensitivity metric, or a comma list of them scored in one pass (shared forward and "
                        f"backward passes; per-metric results under OUT_DIR/metrics/<name>/, their agreement in "
                        f"metric_agreement.json): {', '.join(METRICS)} (aliases such as activation_magnitude -> "
                        "act_mag are accepted). " + _catalogue(METRICS))
    g.add_argument("--mode", choices=MODES, default="per_layer",
                   help="per_layer: k highest scores in each target tensor; per_row: k highest in each output row "
                        "of each tensor (Wanda's comparison group; per expert and row for fused experts); global: "
                        "k highest overall")
    g.add_argument("--topk", type=int, default=100, help="k")
    g.add_argument("--hutchinson-samples", type=int, default=16,
                   help="Rademacher probes for hutchinson_diag (one Hessian-vector product each)")
    g.add_argument("--curvature-samples", type=int, default=1,
                   help="Monte-Carlo label draws per calibration window for hessian_diag")
    g.add_argument("--obs-damp", type=float, default=0.01,
                   help="obs: dampening added to H as a fraction of mean(diag H) (SparseGPT's 0.01); raised "
                        "tenfold (and recorded) while H is not positive definite")
    g.add_argument("--targets", choices=("matrices", "all"), default="matrices",
                   help="which weights are scored: matrices = every floating-point parameter with 2 or more "
                        "dimensions (Linear, Conv1D, embeddings, fused MoE experts, routers, ...); all = also the "
                        "1-D norm scales and biases")
    g.add_argument("--include", action="append", default=[], metavar="REGEX",
                   help="only parameters whose name matches (repeatable)")
    g.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                   help="skip parameters whose name matches (repeatable)")
    g = p.add_argument_group("perturbation")
    g.add_argument("--perturb", default=None,
                   help=f"perturb the Top-K and controls: {', '.join(PERTURBATIONS)} (alias gaussian -> "
                        f"gauss_noise); {_catalogue(PERTURBATIONS)}. Omit to only score")
    g.add_argument("--perturb-scale", type=float, default=1.0, help="scale of sign_flip / gauss_noise")
    g.add_argument("--perturb-prob", type=float, default=1.0,
                   help="probability that each selected weight is perturbed (seeded)")
    g.add_argument("--bit-index", type=int, default=None,
                   help="bit flipped by bit_flip (0 = least significant; default: the most significant "
                        "exponent bit: 30 for fp32, 14 for bf16/fp16)")
    g.add_argument("--controls", default=None,
                   help=f"comma list of {', '.join(CONTROLS)}, or 'none' (default: random_k,bottom_k): "
                        f"{_catalogue(CONTROLS)}")
    g.add_argument("--topk-sweep", default="", metavar="K1,K2,...",
                   help="dose-response: also perturb the Top-K and controls for each of these k (scores are "
                        "computed once per seed); --topk stays the main k of the table, top_weights.csv and "
                        "stability. Each k must fit the weight count like --topk. Needs --perturb")
    g = p.add_argument_group("quantization (instead of --perturb; see README 'Quantization')")
    g.add_argument("--quantize", default=None, choices=QUANTIZERS,
                   help="rtn: quantize every targeted linear weight (not embeddings, lm_head or norms unless "
                        "--include names them) by asymmetric min-max round-to-nearest, per block size, with and "
                        "without keeping the Top-K (protect_topk), as many random weights (protect_random_k) and "
                        "the super-weight candidates (protect_super_weights, with --detect-super-weights) in full "
                        "precision; perplexity of each on the evaluation windows")
    g.add_argument("--bits", type=int, default=None, help="bits per weight, 2..8 (default 4)")
    g.add_argument("--block-size", default=None, metavar="B1,B2,...",
                   help="comma list of block sizes: channel (one block per output row), tensor, or a count of "
                        "contiguous weights of the flattened tensor, e.g. 16384,65536,262144,1048576 (default: "
                        "channel)")
    g.add_argument("--clip-z", type=float, default=None,
                   help="clip each block to mean +- z standard deviations of its unprotected weights before "
                        "computing its scale")
    g = p.add_argument_group("super weights (Yu et al. 2024; see also scripts/find_super_weights.py)")
    g.add_argument("--detect-super-weights", action="store_true",
                   help="also find super-weight candidates from activation spikes at every MLP down-projection "
                        "(one forward pass, iterated), validate them by ablation on the evaluation windows, and "
                        "report their overlap with the metric's Top-K: super_weights.json/.txt/.png")
    g.add_argument("--super-weight-threshold", type=float, default=50.0,
                   help="a layer spikes when its max |down-projection output| is this many times the median "
                        "over layers")
    g.add_argument("--max-super-weights", type=int, default=8, help="stop the iterative search after this many")
    g.add_argument("--super-weight-prompt", default=None,
                   help="detect on this text (default: a neutral sentence)")
    g.add_argument("--detect-on-data", action="store_true",
                   help="detect on the first calibration windows instead of a prompt")
    g = p.add_argument_group("seeds")
    g.add_argument("--seeds", default="0", help="comma list of seeds; the first is the primary seed")
    g.add_argument("--stability-check", action="store_true", help="Jaccard overlap of Top-K across seeds")
    g = p.add_argument_group("output")
    add_output_args(g, "output directory (default: outputs/<model>_<metric>_<mode>_k<K>[_<perturb>]_<time>)")
    g.add_argument("--save-plots", action="store_true", help="write PNG plots to OUT_DIR/plots/")
    g.add_argument("--resume", default=None, metavar="OUT_DIR",
                   help="continue the run in OUT_DIR where it stopped: its configuration (give no other flag that "
                        "affects results, or exactly the run's own), its checkpoints (finished seeds, evaluated "
                        "conditions, super weights); the model and data must be unchanged (fingerprints)")
    g.add_argument("--overwrite", action="store_true",
                   help="remove an earlier run's files from --out-dir before starting (only the tool's own files)")
    return p


def explicit_flags(argv: list[str]) -> set[str]:
    """The destinations of the flags ``argv`` sets (a second parse with every default suppressed)."""
    p = build_parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv)))


def resumed(cfg: RunConfig, argv: list[str]) -> RunConfig:
    """--resume OUT_DIR: the run's recorded configuration, checked against the command line."""
    try:
        recorded = json.loads((Path(cfg.out_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"--resume {cfg.out_dir!r}: cannot read its config.json ({exc})") from None
    given = explicit_flags(argv) - {"resume", "out_dir", "verbose", "dry_run", "save_plots", "overwrite"}
    return validate(resume_config(cfg, recorded, explicit=bool(given)))


def config_from_args(ns: argparse.Namespace) -> RunConfig:
    """Normalise aliases and freeze the parsed flags into a RunConfig (nothing else sees ns)."""
    given = [f for f, v in (("--bits", ns.bits), ("--block-size", ns.block_size), ("--clip-z", ns.clip_z))
             if v is not None]
    if given and not ns.quantize:
        raise UsageError(f"{', '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} with --quantize")
    if ns.resume and ns.out_dir and Path(ns.out_dir) != Path(ns.resume):
        raise UsageError("--resume names the out-dir; give --out-dir only if it is the same folder")
    if ns.quantize and ns.controls is not None:
        raise UsageError("--controls applies to --perturb; --quantize compares its own conditions (none, "
                         "protect_topk, protect_random_k, protect_super_weights)")
    return RunConfig(
        **model_spec_args(ns),
        device_map=ns.device_map, offload=ns.offload, gradient_checkpointing=ns.gradient_checkpointing,
        metrics=parse_metrics(ns.metric),
        mode=ns.mode, topk=ns.topk, topk_sweep=parse_topk_sweep(ns.topk_sweep),
        perturb=canonical(ns.perturb, PERTURBATIONS.names(), PERTURBATIONS.aliases(), "--perturb") if ns.perturb
        else None,
        perturb_scale=ns.perturb_scale, perturb_prob=ns.perturb_prob, bit_index=ns.bit_index,
        hutchinson_samples=ns.hutchinson_samples, curvature_samples=ns.curvature_samples, obs_damp=ns.obs_damp,
        controls=() if ns.quantize else parse_controls(ns.controls or "random_k,bottom_k"),
        seeds=parse_seeds(ns.seeds), quantize=ns.quantize, bits=4 if ns.bits is None else ns.bits,
        block_sizes=parse_block_sizes(ns.block_size or "channel"), clip_z=ns.clip_z,
        stability_check=ns.stability_check, data_file=ns.data_file, data_dir=ns.data_dir,
        dataset=canonical(ns.dataset, DATASETS, DATASET_ALIASES, "--dataset") if ns.dataset else None,
        max_samples=ns.max_samples, eval_samples=ns.eval_samples, max_length=ns.max_length,
        batch_size=ns.batch_size, include=tuple(ns.include), exclude=tuple(ns.exclude), targets=ns.targets,
        out_dir=ns.resume or ns.out_dir, save_plots=ns.save_plots, resume=ns.resume is not None,
        overwrite=ns.overwrite, detect_super_weights=ns.detect_super_weights,
        super_weight_threshold=ns.super_weight_threshold, max_super_weights=ns.max_super_weights,
        super_weight_prompt=ns.super_weight_prompt, detect_on_data=ns.detect_on_data, dry_run=ns.dry_run,
        verbose=ns.verbose,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)

    def body() -> int:
        cfg = validate(config_from_args(build_parser().parse_args(argv)))
        if cfg.resume:
            cfg = resumed(cfg, argv)
        setup_logging(cfg.verbose)
        if cfg.dry_run:
            print(runner_plan(cfg))
            return 0
        from esa.runner.pipeline import run  # heavy imports (transformers, matplotlib, scipy) only for a real run

        run(cfg)
        return 0

    return guarded(body, argv, "interrupted (the manifest says so; the model was restored)")
