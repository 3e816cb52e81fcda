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
    assert (t0["seed"], t1["seed"], t1["token_seed"]) == (4, 5, 4)
    assert "token_seed" not in t0 and "token_seed" not in single
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


def test_a_k_list_trains_one_topk_sae_per_k_each_equal_to_a_run_with_that_k(tmp_path, capsys):
    topk = ["--architecture", "topk"]
    assert main(["train-sae", *BUDGET, *topk, "--top-k", "4,8", "--out", str(tmp_path / "sweep")]) == 0
    assert main(["train-sae", *BUDGET, *topk, "--top-k", "8", "--out", str(tmp_path / "k8")]) == 0
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == ["k-4", "k-8"]
    assert _weights(tmp_path / "sweep" / "k-8") == _weights(tmp_path / "k8")
    trainings = [json.loads((tmp_path / "sweep" / f"k-{k}" / "training.json").read_text()) for k in (4, 8)]
    assert [t["k"] for t in trainings] == [4, 8] and differences(trainings) == ["k"]
    assert glob_members(str(tmp_path / "sweep" / "k-*")) == [tmp_path / "sweep" / "k-4", tmp_path / "sweep" / "k-8"]
    assert main(["train-sae", *BUDGET, "--top-k", "4,8", "--out", str(tmp_path / "std")]) == 2
    assert "needs --architecture topk" in capsys.readouterr().err and not (tmp_path / "std").exists()
    with pytest.raises(SystemExit) as stopped:  # argparse's own refusal: exit 2
        main(["train-sae", *BUDGET, *topk, "--top-k", "4,x", "--out", str(tmp_path / "bad")])
    assert stopped.value.code == 2
    assert "--top-k must be an integer or a comma list of them, got '4,x'" in capsys.readouterr().err


def test_separate_seed_runs_are_seeds_of_one_recipe_and_another_step_count_is_not():
    base = {"site": "mlp_out", "layer": 1, "steps": 100, "architecture": "standard", "l1_coefficient": 5.0,
            "explained_variance": 0.8}
    a, b = {**base, "seed": 0}, {**base, "seed": 1, "explained_variance": 0.7}  # two `train-sae --seed` runs
    assert differences([a, b]) == ["seed", "token_seed"] and same_recipe([a, b])
    assert not same_recipe([a, {**b, "steps": 200}]) and not same_recipe([a]) and not same_recipe([a, None])
    assert not same_recipe([a, {**a}])  # one SAE twice
