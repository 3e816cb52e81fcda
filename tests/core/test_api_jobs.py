"""Every job shape from Python (klgap/job/plan.py): ``klgap.measure`` with lists of SAEs, sites and layers, joint or
not, over checkpoints, or as a dry run, and ``klgap.run`` of a replication file: the numbers of the CLI."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

import klgap
from klgap.cli.main import main
from klgap.plan.sites import hook_name
from klgap.report.read import load_report
from tests.helpers import checkpointed_sae, random_sae

FLAGS = {"tokens": 128, "context_len": 32, "batch_size": 2, "dataset": "random", "device": "cpu", "seed": 2}
ARGS = [x for key, value in FLAGS.items() for x in (f"--{key.replace('_', '-')}", str(value))]


def _numbers(report) -> dict:
    return {"interventions": report.interventions, "comparisons": report.comparisons, "sae_metrics": report.sae_metrics}


def _tokens(folder) -> pd.DataFrame:
    return pd.read_parquet(folder / "tokens.parquet")


@pytest.fixture(scope="module")
def saes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saes")
    for layer in (0, 1):
        random_sae(folder / f"resid_post-L{layer}.safetensors", 64, 128, hook_name("resid_post", layer), seed=layer)
    return str(folder / "{site}-L{layer}.safetensors")


def test_measure_a_list_of_saes_jointly_equals_the_cli(tmp_path, saes):
    """``klgap.measure(model, [sae_a, sae_b], site=..., layer=[0, 1], joint=True, out=DIR)``: the CLI's joint run,
    folder for folder (the joint rows, each site alone, the compounding section)."""
    from klgap.job.loading import load_sae

    cli = tmp_path / "cli"
    assert main(["replicate", "--model", "tiny-gpt2", "--site", "resid_post", "--layer", "0,1", "--joint", "--sae",
                 saes, "--interventions", "sae,epsilon_random", *ARGS, "--out", str(cli), "--quiet"]) == 0
    objects = [load_sae(saes.format(site="resid_post", layer=v), torch.device("cpu")).module for v in (0, 1)]
    result = klgap.measure("tiny-gpt2", objects, site="resid_post", layer=[0, 1], joint=True,
                           interventions="sae,epsilon_random", out=tmp_path / "py", progress=False, **FLAGS)
    assert isinstance(result, klgap.Result) and result.path == tmp_path / "py"
    ours, theirs = result.report, load_report(cli)
    assert _numbers(ours) == _numbers(theirs)
    assert ours.compounding.model_dump(exclude={"sites"}) == theirs.compounding.model_dump(exclude={"sites"})
    for folder in [".", "single/resid_post_L00", "single/resid_post_L01"]:
        pd.testing.assert_frame_equal(_tokens(tmp_path / "py" / folder), _tokens(cli / folder))


def test_measure_sites_and_layers_makes_a_study_with_the_cli_numbers(tmp_path, saes):
    cli = tmp_path / "cli"
    assert main(["replicate", "--model", "tiny-gpt2", "--site", "resid_post", "--layer", "0,1", "--sae", saes,
                 "--interventions", "sae,epsilon_random", *ARGS, "--out", str(cli), "--quiet"]) == 0
    study = klgap.measure("tiny-gpt2", saes, site=["resid_post"], layer=[0, 1], interventions="sae,epsilon_random",
                          progress=False, **FLAGS)
    assert isinstance(study, klgap.StudyResult) and study.path is None
    assert [run.path for run in study.report.runs] == ["resid_post_L00", "resid_post_L01"]
    assert study.report.runs == load_report(cli).runs
    assert set(study.tokens["layer"]) == {0, 1} and len(study.tokens) == 2 * len(_tokens(cli / "resid_post_L00"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, load_model):
    """An SAE at tiny-gpt2 mlp_out L1 with 3 checkpoints."""
    return checkpointed_sae(load_model("tiny-gpt2"), tmp_path_factory.mktemp("trained") / "blocks.1.hook_mlp_out")


def test_a_study_over_checkpoints_from_python_equals_the_cli(tmp_path, trained):
    cli = tmp_path / "cli"
    assert main(["replicate", "--model", "tiny-gpt2", "--sae", str(trained / "checkpoints" / "*"),
                 "--interventions", "sae,epsilon_random", *ARGS, "--out", str(cli), "--quiet"]) == 0
    by_glob = klgap.measure("tiny-gpt2", str(trained / "checkpoints" / "*"), interventions="sae,epsilon_random",
                            out=tmp_path / "glob", progress=False, **FLAGS)
    by_folder = klgap.measure("tiny-gpt2", None, checkpoints=trained, interventions="sae,epsilon_random",
                              progress=False, **FLAGS)
    theirs = load_report(cli)
    assert len(theirs.over_training[0].points) == 3
    for study in (by_glob, by_folder):
        assert study.report.runs == theirs.runs and study.report.over_training == theirs.over_training
    for run in theirs.runs:
        pd.testing.assert_frame_equal(_tokens(tmp_path / "glob" / run.path), _tokens(cli / run.path))


def test_a_dry_run_from_python_loads_nothing(saes, monkeypatch):
    from klgap.job import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    plan = klgap.measure("tiny-gpt2", saes, site="resid_post", layer="0,1", joint=True, dry_run=True, **FLAGS)
    assert [(p.site, p.layer) for p in plan.plans] == [("resid_post", 0), ("resid_post", 1)]
    assert plan.saes == [saes.format(site="resid_post", layer=v) for v in (0, 1)]


def test_run_a_replication_file_as_the_cli_does(tmp_path, saes, capsys):
    """``klgap.run(FILE)``: what ``klgap replicate --config FILE`` does (pages, expected.json checked), returning
    the typed result; the CLI prints it."""
    config = tmp_path / "rep.toml"
    config.write_text("\n".join([
        'model = "tiny-gpt2"', 'site = "resid_post"', "layer = 1", f'sae = "{saes.format(site="resid_post", layer=1)}"',
        'interventions = ["sae", "epsilon_random"]', *(f"{k} = {json.dumps(v)}" for k, v in FLAGS.items()),
        f'out = "{tmp_path / "py"}"']))
    (tmp_path / "expected.json").write_text(json.dumps({"targets": [{
        "name": "ratio", "config": "rep.toml", "quantity": "kl_ratio", "site": "resid_post", "layers": [1],
        "interval": [0.0, None], "source": "a test"}]}))
    found = klgap.run(config, progress=False)
    assert found.out == tmp_path / "py" and found.pages_failure is None and found.job.shape == "run"
    assert (found.out / "report.md").is_file() and found.check is not None and found.check.replicated
    assert main(["replicate", "--config", str(config), "--out", str(tmp_path / "cli"), "--quiet"]) == 0
    assert _numbers(found.report) == _numbers(load_report(tmp_path / "cli"))
    plan = klgap.run(config, dry_run=True)
    assert plan.report is None and [p.layer for p in plan.plan.plans] == [1]
