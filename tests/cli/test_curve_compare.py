"""`klgap curve` (a cosine_matched sweep with the SAE's point) and `klgap compare` (runs side by side)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from klgap.cli.main import main
from klgap.render.formatting import fmt_p
from klgap.report.read import load_report
from klgap.report.summary import summary_row
from tests.helpers import random_sae

FAST = ["--tokens", "600", "--context-len", "32", "--batch-size", "4", "--quiet"]


@pytest.fixture(scope="module")
def saes(tmp_path_factory):
    root = tmp_path_factory.mktemp("curve_saes")
    for layer in (0, 1):
        random_sae(root / f"resid_pre_{layer}.safetensors", 64, 256, f"blocks.{layer}.hook_resid_pre", seed=layer)
    return root


@pytest.fixture(scope="module")
def two_curves(saes, tmp_path_factory):
    root = tmp_path_factory.mktemp("curves")
    for model in ("tiny-gpt2", "tiny-llama"):
        argv = ["curve", "--model", model, "--sae", str(saes / "resid_pre_1.safetensors"), "--cos", "0.5:1.0:3",
                "--norm-frac", "1", "--out", str(root / model), *FAST]
        assert main(argv) == 0
    return root


def test_curve_run(two_curves, capsys):
    report = load_report(two_curves / "tiny-gpt2")
    names = list(report.interventions)
    assert names == ["sae", "epsilon_random", "cosine_matched(cos=0.5,norm_frac=1)",
                     "cosine_matched(cos=0.75,norm_frac=1)", "cosine_matched(cos=1,norm_frac=1)"]
    points = report.curve.points
    assert [p.cos for p in points] == [0.5, 0.75, 1.0]
    kl = [p.kl_mean for p in points]
    assert kl[0] > kl[1] > kl[2] and kl[2] < 1e-6  # cos 1 at the true norm is x itself
    for p in points:
        assert p.kl_mean == pytest.approx(report.interventions[p.intervention].kl_mean, rel=1e-6)
    sae = report.curve.sae
    tokens = pd.read_parquet(two_curves / "tiny-gpt2" / "tokens.parquet")
    assert sae.cos_mean == pytest.approx(tokens[tokens.intervention == "sae"].cos.mean(), rel=1e-6)
    eq = report.curve.sae_equivalent_cos["1"]
    above = [p for p in points if p.kl_mean >= sae.kl_mean][-1]
    below = [p for p in points if p.kl_mean <= sae.kl_mean][0]
    assert above.cos <= eq <= below.cos
    assert (two_curves / "tiny-gpt2" / "robustness.png").stat().st_size > 10_000
    assert "Robustness curve" in (two_curves / "tiny-gpt2" / "report.md").read_text()


def test_curve_over_layers_is_one_study(saes, tmp_path):
    out = tmp_path / "study"
    argv = ["curve", "--model", "tiny-gpt2", "--site", "resid_pre", "--layer", "0,1",
            "--sae", str(saes / "resid_pre_{layer}.safetensors"), "--cos", "0.6,0.9", "--out", str(out), *FAST]
    assert main(argv) == 0
    study = load_report(out)
    assert [r.layer for r in study.runs] == [0, 1]
    assert all(len(r.curve.points) == 2 for r in study.runs)
    assert (out / "robustness.png").is_file()


def test_compare_two_models(two_curves, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", str(two_curves / "tiny-gpt2"), str(two_curves / "tiny-llama"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "tiny-gpt2 resid_pre L1" in printed and "tiny-llama resid_pre L1" in printed
    data = json.loads((out / "compare.json").read_text())
    assert [e["label"] for e in data["runs"]] == ["tiny-gpt2 resid_pre L1", "tiny-llama resid_pre L1"]
    table = pd.read_csv(out / "compare.csv")
    for model, row in zip(("tiny-gpt2", "tiny-llama"), table.itertuples(), strict=True):
        report = load_report(two_curves / model)
        assert row.ratio == pytest.approx(report.comparisons["epsilon_random"].kl_ratio.ratio)
        assert row.kl_sae == pytest.approx(report.interventions["sae"].kl_mean)
    for name in ("robustness_compare.png", "ratio_compare.png", "compare.md"):
        assert (out / name).stat().st_size > 500
    assert "| tiny-llama resid_pre L1 |" in (out / "compare.md").read_text()


@pytest.mark.parametrize(
    "extra,message",
    [(["--label", "only-one"], "--label was given 1 times for 2 run folders"),
     (["--label", "x", "--label", "x"], "share the label 'x'")],
)
def test_compare_bad_input(two_curves, tmp_path, capsys, extra, message):
    argv = ["compare", str(two_curves / "tiny-gpt2"), str(two_curves / "tiny-llama"), "--out", str(tmp_path / "c"), *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_compare_missing_report(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "nothing"), "--out", str(tmp_path / "c")]) == 2
    assert "no report at" in capsys.readouterr().err


def test_curve_bad_grid(tmp_path, saes, capsys):
    argv = ["curve", "--model", "tiny-gpt2", "--sae", str(saes / "resid_pre_1.safetensors"), "--cos", "0.2:1.2:5",
            "--out", str(tmp_path / "c"), *FAST]
    assert main(argv) == 2
    assert "1.2 is not a cosine; valid values lie in [-1, 1]" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_stdout_report_and_compare_show_one_p_whatever_the_cosine_grid(saes, two_curves, tmp_path, capsys):
    """The SAE-vs-epsilon_random p of a run is Holm-corrected within its own family (not with the curve's points):
    a finer grid leaves it alone, and the terminal, report.md and compare.md print the same p."""
    fine = tmp_path / "fine"
    capsys.readouterr()
    assert main(["curve", "--model", "tiny-gpt2", "--sae", str(saes / "resid_pre_1.safetensors"), "--cos",
                 "0.5:1.0:11", "--norm-frac", "1", "--out", str(fine), *FAST]) == 0
    printed = capsys.readouterr().out
    coarse_report, fine_report = load_report(two_curves / "tiny-gpt2"), load_report(fine)
    coarse_test = coarse_report.comparisons["epsilon_random"].wilcoxon_kl
    fine_test = fine_report.comparisons["epsilon_random"].wilcoxon_kl
    assert fine_test.p_value == coarse_test.p_value and fine_test.p_holm == coarse_test.p_holm == coarse_test.p_value
    assert fine_test.holm_family == "sae vs epsilon_random at 1 site/layer"
    curve = [c.wilcoxon_kl for n, c in fine_report.comparisons.items() if n.startswith("cosine_matched")]
    assert len(curve) == 11 and {t.holm_family_size for t in curve} == {11}

    row = summary_row(fine_report, fine_report.model, fine_report.mode)
    p = row.p_text()
    assert p == fmt_p(fine_test.p_value)
    assert f"Wilcoxon p = {p}" in printed and row.verdict() in printed
    assert f"| {row.ratio_text()} | {p} |" in (fine / "report.md").read_text()
    assert main(["compare", str(fine), "--out", str(tmp_path / "cmp")]) == 0
    assert f"| {row.ratio_text()} | {p} |" in (tmp_path / "cmp" / "compare.md").read_text()
    assert p in capsys.readouterr().out.splitlines()[1]
    record = json.loads((tmp_path / "cmp" / "compare.json").read_text())["runs"][0]
    assert (record["p_value"], record["p_holm"], record["holm_family"]) == (
        fine_test.p_value, fine_test.p_holm, fine_test.holm_family)
