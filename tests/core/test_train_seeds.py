"""train-sae --seeds N: SAEs of one recipe and several seeds, side by side (klgap/sae/seeds.py)."""

from __future__ import annotations

import json

import pytest

from klgap.cli.main import main
from klgap.sae.seeds import architecture_only, differences, glob_members, same_recipe
from klgap.sae.tokens import TrainingTokens

BUDGET = ["--model", "tiny-gpt2", "--site", "mlp_out", "--layer", "1", "--tokens", "3000", "--context-len", "32",
          "--steps", "15", "--dataset", "random", "--quiet"]


def _weights(folder):
    return (folder / "sae_weights.safetensors").read_bytes()


def test_seeds_give_distinct_weights_reproducibly_and_seed_0_is_the_single_sae(tmp_path, capsys):
    assert main(["train-sae", *BUDGET, "--seeds", "2", "--seed", "4", "--out", str(tmp_path / "a")]) == 0
    assert main(["train-sae", *BUDGET, "--seeds", "2", "--seed", "4", "--out", str(tmp_path / "b")]) == 0
    assert main(["train-sae", *BUDGET, "--seed", "4", "--out", str(tmp_path / "one")]) == 0
    a0, a1, b0, b1 = (tmp_path / x / f"seed-{i}" for x in "ab" for i in (0, 1))
    assert _weights(a0) == _weights(b0) and _weights(a1) == _weights(b1)  # reproducible
    assert _weights(a0) != _weights(a1)  # distinct
    assert _weights(tmp_path / "one") == _weights(a0)  # --seeds 1 (the default) writes what seed-0 holds, at OUT
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["seed-0", "seed-1"]
    t0, t1, single = (json.loads((f / "training.json").read_text()) for f in (a0, a1, tmp_path / "one"))
    assert (t0["seed"], t1["seed"], t1["token_seed"]) == (4, 5, 4) and "token_seed" not in t0 and "token_seed" not in single
    assert {k: v for k, v in single.items() if k != "wall_time_s"} == {k: v for k, v in t0.items() if k != "wall_time_s"}
    # the same tokens and the same held-out tokens: the recipes differ in the seed only
    assert TrainingTokens.of(t1) == TrainingTokens.of(t0) and TrainingTokens.of(t1).seed == 4
    assert differences([t0, t1]) == ["seed"] and same_recipe([t0, t1]) and not architecture_only([t0, t1])
    assert differences([t0, single]) == [] and not same_recipe([t0, single])  # one SAE twice is not two seeds
    assert glob_members(str(tmp_path / "a" / "seed-*")) == [a0, a1]


def test_a_topk_and_a_standard_sae_of_one_budget_differ_in_architecture_only(tmp_path):
    assert main(["train-sae", *BUDGET, "--out", str(tmp_path / "std")]) == 0
    assert main(["train-sae", *BUDGET, "--architecture", "topk", "--top-k", "8", "--out", str(tmp_path / "topk")]) == 0
    trainings = [json.loads((tmp_path / x / "training.json").read_text()) for x in ("std", "topk")]
    assert differences(trainings) == ["architecture", "k", "l1_coefficient"]
    assert architecture_only(trainings) and not same_recipe(trainings)
    trainings[1]["steps"] = 16  # another budget is no architecture control
    assert not architecture_only(trainings)


@pytest.mark.parametrize("value", ["0", "-2"])
def test_seeds_below_one_is_refused_before_anything_loads(tmp_path, capsys, value):
    assert main(["train-sae", *BUDGET, "--seeds", value, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--seeds" in err and value in err and not (tmp_path / "x").exists()
