"""A study over seeds of one recipe (train-sae --seeds, then --sae 'DIR/seed-*'): each seed's numbers equal a run
on that seed alone, and the between-SAE section pools them with the two-level bootstrap (klgap/report/between_saes.py)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from klgap.job.folder import RunDir
from klgap.plan.config import RunConfig
from klgap.report import stats
from klgap.report.aggregate import context_sums
from klgap.report.read import load_report
from tests.close import assert_identical_frames
from tests.helpers import run_config

RUN = dict(model="tiny-gpt2", tokens=192, context_len=32, batch_size=2, device="cpu", dataset="random", seed=3,
           interventions=["sae", "epsilon_random"])
FLAGS = ["--model", "tiny-gpt2", "--tokens", "192", "--context-len", "32", "--batch-size", "2", "--device", "cpu",
         "--dataset", "random", "--seed", "3", "--interventions", "sae,epsilon_random", "--quiet"]


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """3 SAEs of one recipe at tiny-gpt2 mlp_out L1 (train-sae --seeds 3)."""
    from klgap.sae.train import train_saes

    root = tmp_path_factory.mktemp("saes") / "s"
    train_saes("tiny-gpt2", "mlp_out", 1, root, tokens=3000, context_len=32, dataset="random", steps=15,
               seeds=3, device="cpu", progress=False)
    return root


def test_a_study_over_seeds_equals_a_run_on_each_seed_and_pools_them(tmp_path, seeds, capsys):
    from klgap.cli.main import main

    out = tmp_path / "study"
    assert main(["replicate", *FLAGS, "--sae", str(seeds / "seed-*"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    study = load_report(out)
    assert [run.sae.source for run in study.runs] == [str(seeds / f"seed-{i}") for i in range(3)]
    for i, run in enumerate(study.runs):
        alone = run_config(RunConfig(sae=str(seeds / f"seed-{i}"), **RUN), tmp_path / f"alone-{i}")
        assert_identical_frames(pd.read_parquet(out / run.path / "tokens.parquet"),
                                pd.read_parquet(tmp_path / f"alone-{i}" / "tokens.parquet"))
        assert run.comparisons["epsilon_random"].kl_ratio == alone.comparisons["epsilon_random"].kl_ratio
    (group,) = study.between_saes
    assert (group.kind, group.differ_in, group.site, group.layer) == ("seeds", ["seed"], "mlp_out", 1)
    ratios = [run.comparisons["epsilon_random"].kl_ratio.ratio for run in study.runs]
    assert [s.kl_ratio.ratio for s in group.saes] == ratios and [s.seed for s in group.saes] == [0, 1, 2]
    assert len(set(ratios)) == 3  # three SAEs, three ratios
    assert (group.ratio_min, group.ratio_max) == (min(ratios), max(ratios))
    assert group.kl_ratio.ratio == pytest.approx(np.mean(ratios), rel=1e-6)
    # the interval is the two-level bootstrap of the runs' parts, recomputed here
    frames = [[sums("sae", "kl"), sums("epsilon_random", "kl")]
              for sums in (context_sums(RunDir(out / run.path).finished_parts()[0]) for run in study.runs)]
    found = stats.sae_context_bootstrap(frames, lambda m: m[0] / m[1], seed=3)
    assert (group.kl_ratio.ci_low, group.kl_ratio.ci_high) == pytest.approx((found.low, found.high), rel=1e-9)
    assert group.kl_ratio.ci_low <= group.kl_ratio.ratio <= group.kl_ratio.ci_high
    assert 0 <= group.sae_variance_share <= 1 and group.sae_variance_share == pytest.approx(found.sae_share)
    assert group.finding.startswith("At blocks.1.hook_mlp_out, across 3 seeds of one recipe KL(sae)/KL(epsilon_random)")
    assert group.finding in printed  # the headline over seeds and contexts, on the terminal
    page = (out / "report.md").read_text()
    assert "## Between SAEs" in page and group.finding in page
    from klgap.report.validate import validate_any, validate_file
    from klgap.result import load_result

    validate_file(out / "report.json")
    frame = load_result(out).between_saes()
    assert list(frame["seed"]) == [0, 1, 2] and list(frame["ratio"]) == ratios
    assert (frame["recipe_ratio"] == group.kl_ratio.ratio).all() and frame.attrs["findings"] == [group.finding]
    from klgap.report.compare import compare_runs

    compared = compare_runs([str(out)], tmp_path / "cmp")  # each seed a row, told apart by its folder; the group too
    assert [e.label for e in compared["entries"]] == [f"tiny-gpt2 mlp_out L1 ({run.path})" for run in study.runs]
    (pooled,) = json.loads((tmp_path / "cmp" / "compare.json").read_text())["between_saes"]
    assert pooled["label"] == "tiny-gpt2 mlp_out L1" and pooled["kl_ratio"] == group.kl_ratio.model_dump()
    assert group.finding in compared["table_text"] and group.finding in (tmp_path / "cmp" / "compare.md").read_text()
    assert validate_any(tmp_path / "cmp").model.between_saes[0].finding == group.finding  # compare.json, checked


def test_measure_over_a_list_of_seeds_gives_the_same_section(tmp_path, seeds):
    import klgap

    result = klgap.measure("tiny-gpt2", sae=[str(seeds / f"seed-{i}") for i in range(3)], site="mlp_out", layer=1,
                           **{k: v for k, v in RUN.items() if k != "model"}, out=tmp_path / "api")
    cli = tmp_path / "cli"
    from klgap.cli.main import main

    assert main(["replicate", *FLAGS, "--sae", str(seeds / "seed-*"), "--out", str(cli)]) == 0
    (group,) = result.report.between_saes
    assert group.model_dump() | {"saes": None} == load_report(cli).between_saes[0].model_dump() | {"saes": None}


def test_a_target_may_take_its_tolerance_from_the_seeds_spread(tmp_path, seeds):
    from klgap.cli.main import main
    from klgap.report.expectations import Target, check_run

    out = tmp_path / "study"
    assert main(["replicate", *FLAGS, "--sae", str(seeds / "seed-*"), "--out", str(out)]) == 0
    (group,) = load_report(out).between_saes
    half = (group.ratio_max - group.ratio_min) / 2
    (tmp_path / "seeds.toml").write_text('model = "tiny-gpt2"\n')
    expected = tmp_path / "expected.json"

    def status(value: float, spread: float) -> str:
        target = dict(name="ratio across seeds", config="seeds.toml", quantity="kl_ratio_across_seeds", value=value,
                      seed_spread=spread)
        expected.write_text(json.dumps({"targets": [target]}))
        (verdict,) = check_run(out, expected, [Target(**target)]).verdicts
        return verdict.status

    pooled = group.kl_ratio.ratio
    assert status(pooled + 0.9 * half, 1) == "matches" and status(pooled + 1.1 * half, 1) == "differs"
    assert status(pooled + 1.9 * half, 2) == "matches"
    with pytest.raises(ValueError, match="seed_spread"):
        Target(name="x", config="a.toml", quantity="kl_ratio", value=1.0, seed_spread=1)


def test_a_replication_file_with_train_sae_seeds_trains_the_seeds_then_measures_them(tmp_path, capsys):
    from klgap.cli.main import main

    saes = tmp_path / "saes" / "s"
    config = tmp_path / "seeds.toml"
    config.write_text(f'''model = "tiny-gpt2"
site = "mlp_out"
layer = 1
sae = "{saes}/seed-*"
interventions = ["sae", "epsilon_random"]
dataset = "random"
context_len = 32
tokens = 192
batch_size = 2
seed = 3
device = "cpu"
out = "{tmp_path / 'run'}"

[train_sae]
tokens = 3000
steps = 15
seeds = 2
''')
    assert main(["replicate", "--config", str(config), "--quiet"]) == 0
    assert sorted(p.name for p in saes.iterdir()) == ["seed-0", "seed-1"]
    (group,) = load_report(tmp_path / "run").between_saes
    assert [s.seed for s in group.saes] == [3, 4] and group.kind == "seeds"
    assert group.finding in capsys.readouterr().out
    other = tmp_path / "other"
    config.write_text(config.read_text().replace(f'sae = "{saes}/seed-*"', f'sae = "{other}"')
                      .replace(str(tmp_path / "run"), str(tmp_path / "run2")))
    assert main(["replicate", "--config", str(config), "--quiet"]) == 2
    assert f'name them as sae = "DIR/seed-*", not {str(other)!r}' in capsys.readouterr().err
    assert not other.exists()


def test_saes_that_differ_in_architecture_only_are_named_as_such_and_not_pooled(tmp_path):
    import klgap
    from klgap.sae.train import train_saes

    budget = dict(tokens=3000, context_len=32, dataset="random", steps=15, device="cpu", progress=False)
    train_saes("tiny-gpt2", "mlp_out", 1, tmp_path / "std", **budget)
    train_saes("tiny-gpt2", "mlp_out", 1, tmp_path / "topk", architecture="topk", k=8, **budget)
    result = klgap.measure("tiny-gpt2", sae=[str(tmp_path / "std"), str(tmp_path / "topk")], site="mlp_out", layer=1,
                           **{k: v for k, v in RUN.items() if k != "model"}, out=tmp_path / "run")
    (group,) = result.report.between_saes
    assert (group.kind, group.differ_in, group.kl_ratio) == ("architecture", ["architecture", "k", "l1_coefficient"],
                                                             None)
    assert [s.architecture for s in group.saes] == ["standard", "topk"]
    assert group.finding.startswith("At blocks.1.hook_mlp_out, these SAEs differ in architecture only (standard, topk;")
    assert group.finding in (tmp_path / "run" / "report.md").read_text()
