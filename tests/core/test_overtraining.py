"""A study over an SAE's checkpoints (klgap/report/over_training.py): the same numbers as a run on each checkpoint alone,
and its over-training section, figure and pages."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from klgap.sae.checkpoints import expand
from klgap.plan.config import RunConfig
from klgap.errors import KlgapError
from klgap.render.formatting import fmt
from klgap.report.read import load_report
from tests.close import assert_identical_frames
from tests.helpers import checkpointed_sae, run_config

RUN = dict(model="tiny-gpt2", tokens=192, context_len=32, batch_size=2, device="cpu", dataset="random", seed=3,
           interventions=["sae", "epsilon_random"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, load_model):
    """An SAE at tiny-gpt2 mlp_out L1 with 3 checkpoints (the last the final SAE)."""
    return checkpointed_sae(load_model("tiny-gpt2"), tmp_path_factory.mktemp("saes") / "blocks.1.hook_mlp_out")


def test_study_over_checkpoints_equals_a_run_on_each_checkpoint(tmp_path, trained):
    from klgap.cli.main import main

    out = tmp_path / "study"
    argv = ["replicate", "--model", "tiny-gpt2", "--sae", str(trained / "checkpoints" / "*"), "--tokens", "192",
            "--context-len", "32", "--batch-size", "2", "--device", "cpu", "--dataset", "random", "--seed", "3",
            "--interventions", "sae,epsilon_random", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    study = load_report(out)
    found = expand(str(trained))
    assert [run.path for run in study.runs] == [f"mlp_out_L01/{c.path.name}" for c in found]
    (curve,) = study.over_training
    assert (curve.site, curve.layer, curve.hook_name) == ("mlp_out", 1, "blocks.1.hook_mlp_out")
    assert [p.step for p in curve.points] == [c.step for c in found] == [11, 21, 30]
    assert [p.explained_variance for p in curve.points] == [c.explained_variance for c in found]
    for point, run, checkpoint in zip(curve.points, study.runs, found, strict=True):
        sub = out / run.path
        assert json.loads((sub / "run.json").read_text())["execution"]["clean_forward"] == "shared by 3 sites/layers"
        alone = run_config(RunConfig(sae=str(checkpoint.path), **RUN), tmp_path / f"alone-{checkpoint.step}",
                           progress=False)
        assert_identical_frames(pd.read_parquet(sub / "tokens.parquet"),
                                      pd.read_parquet(tmp_path / f"alone-{checkpoint.step}" / "tokens.parquet"))
        assert run.interventions == alone.interventions
        assert point.kl_sae.mean == pytest.approx(alone.interventions["sae"].kl_mean, rel=1e-6)
        assert point.kl_baseline.mean == pytest.approx(alone.interventions["epsilon_random"].kl_mean, rel=1e-6)
        assert point.kl_ratio.model_dump() == alone.comparisons["epsilon_random"].kl_ratio.model_dump()
        assert point.kl_gap.mean == pytest.approx(point.kl_sae.mean - point.kl_baseline.mean, rel=1e-5, abs=1e-9)
        assert point.kl_sae.ci_low <= point.kl_sae.mean <= point.kl_sae.ci_high
        # EV and L0 on the study's tokens: those of the run on this checkpoint alone, not the trainer's held-out ones
        assert point.run_explained_variance == alone.sae_metrics.explained_variance
        assert point.run_l0_mean == alone.sae_metrics.l0_mean
        assert point.run_explained_variance != point.explained_variance
    # the checkpoints differ, so do their numbers; the draws' directions do not (same seed, same tokens)
    assert len({p.kl_sae.mean for p in curve.points}) == 3
    assert curve.finding.startswith("At blocks.1.hook_mlp_out, the SAE's excess KL over epsilon_random ")
    page = (out / "report.md").read_text()
    assert "## Over training" in page and curve.finding in page and "over_training.png" in page
    assert "| EV | L0 | EV held-out | L0 held-out |" in page
    last = curve.points[-1]
    assert f"EV {fmt(last.run_explained_variance)}, L0 {fmt(last.run_l0_mean)})" in curve.finding
    assert (out / "over_training.png").stat().st_size > 10_000 and not (out / "kl_bars.png").exists()
    from klgap.figures.training import over_training
    from klgap.report.validate import validate_file
    from tests.core.test_figstyle import _check

    _check(over_training(study, None), model="tiny-gpt2", where="mlp_out L1")  # title, units, legend beside
    validate_file(out / "report.json")


def test_a_config_key_names_the_checkpoints_and_bad_specs_say_what_to_do(tmp_path, trained, capsys, caplog):
    from klgap.cli.main import main

    lines = ['model = "tiny-gpt2"', 'site = "mlp_out"', "layer = 1", "tokens = 64", "context_len = 32",
             'dataset = "random"', 'device = "cpu"', 'interventions = ["sae", "epsilon_random"]']
    for key, out in (("sae_checkpoints", "cfg"), ("checkpoints", "old")):  # the old key still works, with a warning
        config = tmp_path / f"{out}.toml"
        config.write_text("\n".join([f'{key} = "{trained}"', *lines, f'out = "{tmp_path / out}"']))
        assert main(["replicate", "--config", str(config), "--quiet"]) == 0
        assert [p.step for p in load_report(tmp_path / out).over_training[0].points] == [11, 21, 30]
    assert "config key 'checkpoints' is deprecated: write sae_checkpoints" in caplog.text
    assert main(["replicate", "--model", "tiny-gpt2", "--sae", str(tmp_path / "none" / "*"), "--out",
                 str(tmp_path / "x"), "--dataset", "random"]) == 2
    assert "matches no folder" in capsys.readouterr().err


def test_checkpoint_spec_is_one_of_a_glob_or_a_folder(tmp_path):
    from klgap.job.plan import checkpoint_spec

    assert checkpoint_spec("a/checkpoints/*", None) == "a/checkpoints/*"
    assert checkpoint_spec("a/sae", None) is None and checkpoint_spec(None, "a/sae") == "a/sae"
    with pytest.raises(KlgapError, match="not both"):
        checkpoint_spec("b/sae", "a/sae")
    with pytest.raises(KlgapError, match="not a glob"):
        checkpoint_spec(None, "a/checkpoints/*")
    with pytest.raises(KlgapError, match="use that key instead of a glob"):
        checkpoint_spec("a/checkpoints/*", None, trains=True)
