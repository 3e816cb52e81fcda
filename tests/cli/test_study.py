"""Several sites and layers from one command: one study report, Holm across all tests."""

from __future__ import annotations

import json

import pytest

from klgap.cli import main
from klgap.errors import KlgapError
from klgap.schema import load_report
from klgap.sites import hook_name
from klgap.study import parse_layers
from tests.helpers import random_sae


def test_parse_layers():
    assert parse_layers("3") == [3]
    assert parse_layers("3,1,3") == [1, 3]
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
    assert study["kind"] == "study" and len(study["runs"]) == 4
    assert [(r["site"], r["layer"]) for r in study["runs"]] == [("mlp_out", 0), ("mlp_out", 1), ("attn_out", 0), ("attn_out", 1)]
    for run in study["runs"]:
        sub = json.loads((out / run["path"] / "report.json").read_text())
        assert sub["interventions"] == run["interventions"]
        for name, comp in run["comparisons"].items():
            # Holm over 4 runs x 2 baselines: never below the raw p, at most 8x it
            p, p_holm = comp["wilcoxon_kl"]["p_value"], comp["wilcoxon_kl"]["p_holm"]
            assert p <= p_holm <= min(1.0, 8 * p) + 1e-12
    assert len(study["gap_correlation_between_runs"]) == 6
    assert "ratio [95% CI]" in capsys.readouterr().out
    # a single SAE for several layers is refused clearly
    assert main([*argv[:7], "--sae", str(tmp_path / "sae_mlp_out_0.safetensors"), "--out", str(tmp_path / "x")]) == 2
    assert "put {layer}" in capsys.readouterr().err
