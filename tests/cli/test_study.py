"""Several sites and layers from one command: one study report, Holm across all tests."""

from __future__ import annotations

import json

import pytest

from klgap.report import stats
from klgap.cli.main import main
from klgap.errors import KlgapError
from klgap.report.read import load_report
from klgap.plan.sites import hook_name
from klgap.plan.grid import parse_layers
from tests.helpers import random_sae


def test_parse_layers():
    assert parse_layers("3") == [3]
    assert parse_layers("3,1") == [1, 3]
    with pytest.raises(KlgapError, match="lists layer 3 twice"):  # was merged silently (issue 28)
        parse_layers("3,1,3")
    assert parse_layers("0-2,5") == [0, 1, 2, 5]
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    with pytest.raises(KlgapError, match="'x' is not a layer"):
        parse_layers("1,x")


def test_two_sites_two_layers(tmp_path, capsys):
    for site in ("mlp_out", "attn_out"):
        for layer in (0, 1):
            random_sae(tmp_path / f"sae_{site}_{layer}.safetensors", 64, 128, hook_name(site, layer), seed=layer)
    out = tmp_path / "study"
    argv = ["replicate", "--model", "tiny-gpt2", "--site", "mlp_out,attn_out", "--layer", "all",
            "--sae", str(tmp_path / "sae_{site}_{layer}.safetensors"), "--dataset", "random", "--tokens", "256",
            "--context-len", "32", "--interventions", "sae,epsilon_random,theta_random", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    study = load_report(out)
    assert study.kind == "study" and len(study.runs) == 4
    assert [(r.site, r.layer) for r in study.runs] == [("mlp_out", 0), ("mlp_out", 1), ("attn_out", 0), ("attn_out", 1)]
    for run in study.runs:
        sub = load_report(out / run.path)
        assert sub.interventions == run.interventions
        for name, comp in run.comparisons.items():
            # the sub-run's family is its one test; the study's is the SAE against this baseline at its 4 sites/layers
            assert sub.comparisons[name].wilcoxon_kl.p_value == comp.wilcoxon_kl.p_value
            assert sub.comparisons[name].wilcoxon_kl.p_holm == comp.wilcoxon_kl.p_value
            assert comp.wilcoxon_kl.holm_family == f"sae vs {name} at 4 sites/layers"
    for name in ("epsilon_random", "theta_random"):
        raw = [run.comparisons[name].wilcoxon_kl.p_value for run in study.runs]
        assert [run.comparisons[name].wilcoxon_kl.p_holm for run in study.runs] == stats.holm(raw)
    assert len(study.gap_correlation_between_runs) == 6
    printed = capsys.readouterr().out.splitlines()
    assert "ratio [95% CI]" in printed[1]
    for run, line in zip(study.runs, printed[2:6], strict=True):
        ratio = run.comparisons["epsilon_random"].kl_ratio
        assert line.split()[:2] == [run.site, str(run.layer)]
        assert f"{ratio.ratio:.3f} [{ratio.ci_low:.3f}, {ratio.ci_high:.3f}]" in line
    # a single SAE for several layers is refused clearly
    assert main([*argv[:7], "--sae", str(tmp_path / "sae_mlp_out_0.safetensors"), "--out", str(tmp_path / "x")]) == 2
    assert "put {layer}" in capsys.readouterr().err


def test_config_with_train_sae_trains_every_missing_sae_of_a_study_then_runs(tmp_path, capsys):
    """A replication file names a study's SAEs by template; the missing ones are trained in one pass first."""
    from klgap.cli.main import main

    config = tmp_path / "rep.toml"
    config.write_text(f"""
model = "tiny-gpt2"
site = "mlp_out,attn_out"
layer = "0,1"
sae = "{tmp_path}/saes/blocks.{{layer}}.hook_{{site}}"
dataset = "random"
tokens = 64
context_len = 32
batch_size = 2
interventions = ["sae", "epsilon_random"]
cos = "0.8,1.0"
norm_frac = "0.9"
out = "{tmp_path}/study"

[train_sae]
tokens = 6000
steps = 20
dataset = "random"

[train_sae.sites.attn_out_L1]
steps = 25
b_dec_init = "mean"
""")
    assert main(["replicate", "--config", str(config), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "4 SAE(s) not found" in err
    study = json.loads((tmp_path / "study" / "report.json").read_text())
    for sub in ("mlp_out_L00", "attn_out_L01"):  # every site/layer gets its own page and figures too
        assert (tmp_path / "study" / sub / "report.md").is_file() and (tmp_path / "study" / sub / "kl_hist.png").is_file()
    assert sorted((r["site"], r["layer"]) for r in study["runs"]) == [("attn_out", 0), ("attn_out", 1), ("mlp_out", 0), ("mlp_out", 1)]
    for site in ("mlp_out", "attn_out"):
        for layer in (0, 1):
            training = json.loads((tmp_path / "saes" / f"blocks.{layer}.hook_{site}" / "training.json").read_text())
            override = (site, layer) == ("attn_out", 1)  # [train_sae.sites.attn_out_L1] changes that SAE's recipe only
            assert training["steps"] == (25 if override else 20)
            assert training["b_dec_init"] == ("mean" if override else "zeros")
    # the same file drives a curve; its grid comes from the file's cos / norm_frac
    assert main(["curve", "--config", str(config), "--out", str(tmp_path / "curve"), "--quiet"]) == 0
    assert "SAE(s) not found" not in capsys.readouterr().err  # trained once, reused
    run = json.loads((tmp_path / "curve" / "mlp_out_L00" / "report.json").read_text())
    assert [p["cos"] for p in run["curve"]["points"]] == [0.8, 1.0]
