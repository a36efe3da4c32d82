"""One source for every setting: each flag's default is its config's default, parsing no flag gives
the default config, and an option declared by a registered metric/experiment/evaluator becomes a
flag (and a config entry) without touching the command line's code."""

from __future__ import annotations

import dataclasses
import re

import pytest

from esa.cli import baseline as baseline_cli
from esa.cli import flags
from esa.cli import overlap as overlap_cli
from esa.cli import runner as runner_cli
from esa.cli import superweights as superweights_cli
from esa.config import RunConfig
from esa.errors import UsageError
from esa.evaluators import EVALUATORS, Evaluator
from esa.metrics import METRICS
from esa.metrics.registry import Collector, Metric
from esa.options import Option, flat_json
from esa.superweights.config import SuperWeightConfig

NOT_SETTINGS = {"help", "resume_dir"}  # --resume OUT_DIR names the out-dir and sets OutputSpec.resume


def as_config(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def test_every_runner_flag_defaults_to_the_config_default():
    defaults = RunConfig().to_json()
    actions = [a for a in runner_cli.build_parser()._actions if a.dest not in NOT_SETTINGS]
    assert {a.dest for a in actions} == set(defaults) - {"metric", "device_explicit", "dtype_explicit", "resume"}
    for a in actions:
        assert as_config(a.default) == defaults[a.dest], a.dest


def test_no_flag_gives_the_default_config():
    cfg, given = runner_cli.config_from_args([])
    assert cfg == RunConfig() and given == set()


def test_a_typed_flag_is_known_as_typed_even_when_it_equals_the_default():
    cfg, given = runner_cli.config_from_args(["--topk", "100", "--device", "cuda"])
    assert given == {"topk", "device"} and cfg.model.device_explicit and not cfg.model.dtype_explicit


def test_every_stand_alone_flag_defaults_to_the_config_default():
    sw = flat_json(SuperWeightConfig())
    for a in superweights_cli.build_parser()._actions:
        if a.dest != "help":
            assert as_config(a.default) == sw[a.dest], a.dest
    base = baseline_cli.config_from_args([])
    declared = {o.name for o in flags.spec_options(type(base))} | {"evaluate"}
    for a in baseline_cli.build_parser()._actions:
        if a.dest in declared:  # the others default to the chosen --baseline preset
            assert as_config(a.default) == as_config(flat_json(base)[a.dest]), a.dest


def test_an_option_declared_by_a_metric_and_an_evaluator_becomes_a_flag():
    class Toy(Collector):
        pass

    toy_metric = Metric("toy_metric", Toy, "toy", "unit", frozenset({"forward"}),
                        options=(Option("toy_level", 3, "a toy metric option"),))

    class ToyEvaluator(Evaluator):
        name, help, options = "toy_eval", "toy", (Option("toy_eval_depth", 2, "a toy evaluator option"),)

    with METRICS.temporary("toy_metric", toy_metric), EVALUATORS.temporary("toy_eval", ToyEvaluator):
        help_text = runner_cli.build_parser().format_help()
        assert "--toy-level" in help_text and "--toy-eval-depth" in help_text
        cfg, _ = runner_cli.config_from_args(["--toy-level", "5", "--toy-eval-depth", "4"])
        assert cfg.scoring.options.toy_level == 5 and cfg.evaluation.options.toy_eval_depth == 4
        assert cfg.evaluation.evaluate == ("perplexity", "toy_eval")  # its option typed: the evaluator runs
        assert runner_cli.config_from_args([])[0].evaluation.evaluate == ("perplexity",)
        assert cfg.to_json()["toy_level"] == 5  # recorded in config.json with every other setting
    assert "--toy-level" not in runner_cli.build_parser().format_help()


def test_a_flag_that_needs_another_names_both():
    with pytest.raises(UsageError, match="--bits, --clip-z only apply with --quantize"):
        runner_cli.config_from_args(["--bits", "3", "--clip-z", "2"])


def test_the_config_round_trips_through_its_flat_record():
    cfg, _ = runner_cli.config_from_args(["--metric", "act_mag,magnitude", "--perturb", "zero", "--topk-sweep",
                                          "1,5", "--seeds", "3,4", "--include", "mlp", "--obs-damp", "0.1"])
    assert RunConfig.of(**{k: v for k, v in cfg.to_json().items() if k != "metric"}) == cfg
    assert dataclasses.replace(cfg.scoring, topk=7) != cfg.scoring


@pytest.mark.parametrize("tool", [runner_cli, baseline_cli, superweights_cli, overlap_cli])
def test_help_shows_each_default_once(tool):
    """``--help`` appends each flag's default; a help text must not state it again (``(default 8)
    (default: 8)``, as find_super_weights.py once printed)."""
    parser = tool.build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.help:
            text = " ".join(formatter._get_help_string(action).split())
            assert text.count("default") <= 1, (action.option_strings, text)
            assert len(re.findall(r"\(default:? ", text)) <= 1, (action.option_strings, text)
