"""The run flags come from RunConfig's fields (issue 29 item 4): one place for each flag's name, default and help."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from klgap.cli.args import build_parser
from klgap.cli.main import request_of
from klgap.plan.config import RunConfig, flag_help

#: every run flag as users have typed it since 0.2: none may change spelling (--include-first-position, now
#: --mask-special none, still parses: test_each_flag_sets_its_field)
FLAGS = {"--model", "--site", "--layer", "--sae", "--mode", "--interventions", "--tokens", "--context-len",
         "--batch-size", "--seed", "--device", "--dtype", "--dataset", "--no-bos", "--mask-special",
         "--drop-last-position", "--position", "--k", "--n-samples", "--sample-intervention", "--no-fast",
         "--device-map", "--remote", "--joint", "--fit-tokens", "--joint-subsets", "--joint-baseline",
         "--second-order"}



def run_config_from_args(parsed):
    """The RunConfig and the file's other keys the flags make (klgap.cli.main.request_of)."""
    request = request_of(parsed)
    return request.config, request.extra

def _actions(command: str) -> dict[str, argparse.Action]:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return {a.option_strings[0]: a for a in sub.choices[command]._actions if a.option_strings}


def test_every_runconfig_field_is_a_flag_with_its_help_and_default():
    fields = dataclasses.fields(RunConfig)
    assert {"--" + f.name.replace("_", "-") for f in fields} == FLAGS
    for command in ("replicate", "curve"):
        actions = _actions(command)
        for item in fields:
            action = actions["--" + item.name.replace("_", "-")]
            derived = item.name == "sae" or (command == "curve" and item.name == "interventions")
            assert item.metadata["help"] and (derived or action.help == flag_help(item)), item.name  # derived:
            # from the loader registry or the command (tests/cli/test_help_texts.py)
            assert action.default is None  # a --config file's value stands unless the flag is given
            value = item.default_factory() if item.default_factory is not dataclasses.MISSING else item.default
            if item.type != "bool" and value not in (None, dataclasses.MISSING) and not derived:
                shown = ", ".join(value) if isinstance(value, list) else str(value)
                assert action.help.endswith(f"(default {shown})"), (item.name, action.help)


def test_the_cli_default_of_every_run_flag_is_the_dataclass_default():
    parsed = build_parser().parse_args(["replicate", "--model", "tiny-gpt2"])
    config, extra = run_config_from_args(parsed)
    assert config == RunConfig(model="tiny-gpt2") and extra == {}


@pytest.mark.parametrize("argv,field,value", [
    (["--tokens", "64"], "tokens", 64), (["--context-len", "32"], "context_len", 32), (["--no-bos"], "no_bos", True),
    (["--include-first-position"], "mask_special", "none"), (["--mask-special", "first"], "mask_special", "first"),
    (["--layer", "3,10"], "layer", "3,10"),
    (["--interventions", "sae,zero"], "interventions", ["sae", "zero"]), (["--fit-tokens", "100"], "fit_tokens", 100),
    (["--joint"], "joint", True), (["--no-fast"], "no_fast", True), (["--dtype", "float16"], "dtype", "float16"),
])
def test_each_flag_sets_its_field(argv, field, value):
    config, _ = run_config_from_args(build_parser().parse_args(["replicate", "--model", "m", *argv]))
    assert getattr(config, field) == value
