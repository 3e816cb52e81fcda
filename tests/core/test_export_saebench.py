"""`klgap export RUN --format saebench`: a tiny-gpt2 run (sae, zero, epsilon_random) as SAEBench's core-eval file,
validated against SAEBench's JSON Schema (committed from its source) and, when sae_bench is importable (``pip install
--no-deps --target DIR sae-bench`` and DIR on PYTHONPATH: it needs only pydantic), by its own pydantic classes."""

from __future__ import annotations

import json

import pytest

from klgap.cli.main import main
from klgap.plan.config import RunConfig
from klgap.plan.sites import hook_name
from klgap.report.read import load_report
from klgap.report.saebench import SCHEMA_FILE
from tests.helpers import random_sae, run_config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, load_model):
    tmp = tmp_path_factory.mktemp("export")
    lm = load_model("tiny-gpt2")
    sae = random_sae(tmp / "sae.safetensors", lm.d_model, 4 * lm.d_model, hook_name("mlp_out", 1), seed=3)
    cfg = RunConfig(model="tiny-gpt2", sae=str(sae), tokens=16 * 32, context_len=32, batch_size=4, device="cpu",
                    dataset="random", interventions=["sae", "zero", "epsilon_random"])
    run_config(cfg, tmp / "run")
    return tmp / "run"


def test_export_writes_saebench_core_file_with_the_reports_numbers(run_dir, tmp_path, capsys):
    jsonschema = pytest.importorskip("jsonschema")
    out = tmp_path / "core.json"
    assert main(["export", str(run_dir), "--format", "saebench", "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    jsonschema.validate(doc, json.loads(SCHEMA_FILE.read_text()))

    report = load_report(run_dir)
    m = doc["eval_result_metrics"]
    assert m["model_behavior_preservation"]["kl_div_with_sae"] == pytest.approx(report.interventions["sae"].kl_mean)
    assert m["model_behavior_preservation"]["kl_div_with_ablation"] == pytest.approx(report.interventions["zero"].kl_mean)
    assert m["model_behavior_preservation"]["kl_div_score"] == pytest.approx(report.sae_lens_scores.kl_div_score)
    sae_kl, zero_kl = report.interventions["sae"].kl_mean, report.interventions["zero"].kl_mean
    assert m["model_behavior_preservation"]["kl_div_score"] == pytest.approx((zero_kl - sae_kl) / zero_kl)
    assert m["reconstruction_quality"]["explained_variance"] == pytest.approx(report.sae_metrics.explained_variance)
    assert m["reconstruction_quality"]["cossim"] == pytest.approx(report.sae_metrics.cos_mean)
    assert m["sparsity"]["l0"] == pytest.approx(report.sae_metrics.l0_mean) and m["sparsity"]["l0"] > 0
    assert m["token_stats"]["total_tokens_eval_reconstruction"] == report.n_tokens
    ratio = report.comparisons["epsilon_random"].kl_ratio
    assert m["kl_gap"]["kl_ratio_sae_over_epsilon_random"] == pytest.approx(ratio.ratio)
    assert (m["kl_gap"]["kl_ratio_ci_low"], m["kl_gap"]["kl_ratio_ci_high"]) == pytest.approx((ratio.ci_low, ratio.ci_high))
    klgap_part = doc["eval_result_unstructured"]["klgap"]
    # absolute CE, nats per measured token: the clean CE and clean CE + mean ΔCE, as the report holds them
    mp, scores = m["model_performance_preservation"], report.sae_lens_scores
    assert mp["ce_loss_without_sae"] == pytest.approx(report.ce_clean.mean) and mp["ce_loss_without_sae"] > 0
    assert mp["ce_loss_with_sae"] == pytest.approx(report.ce_clean.mean + report.interventions["sae"].ce_delta_mean)
    assert mp["ce_loss_with_ablation"] == pytest.approx(scores.ce_loss_with_ablation)
    assert mp["ce_loss_with_ablation"] - mp["ce_loss_without_sae"] == pytest.approx(
        report.interventions["zero"].ce_delta_mean)
    assert m["reconstruction_quality"]["explained_variance_legacy"] == pytest.approx(
        report.sae_metrics.explained_variance_legacy)
    # what klgap cannot know is SAEBench's -1, and named
    assert m["sparsity"]["l1"] == -1 and not [n for n in klgap_part["not_measured"] if ".ce_loss_with" in n]
    assert "sparsity.l1" in klgap_part["not_measured"] and "sparsity.l0" not in klgap_part["not_measured"]
    assert "epsilon_random" in [row["baseline"] for row in klgap_part["panel"]]
    assert [note.text for note in report.quality_notes] == klgap_part["notes"][-len(report.quality_notes):]
    assert doc["eval_config"]["context_size"] == 32 and doc["eval_config"]["model_name"] == "tiny-gpt2"
    assert doc["sae_lens_id"] is None and doc["sae_cfg_dict"]["d_sae"] == report.sae.d_sae


def test_export_validates_with_saebenchs_own_classes(run_dir, tmp_path):
    eval_output = pytest.importorskip("sae_bench.evals.core.eval_output", reason="sae_bench not importable "
                                      "(pip install --no-deps --target DIR sae-bench, then DIR on PYTHONPATH)")
    from pydantic import TypeAdapter

    from klgap.report.saebench import export_run

    (exported,) = export_run(run_dir, "saebench", tmp_path / "core.json")
    parsed = TypeAdapter(eval_output.CoreEvalOutput).validate_python(json.loads(exported.path.read_text()))
    report = load_report(run_dir)
    assert parsed.eval_result_metrics.sparsity.l0 == pytest.approx(report.sae_metrics.l0_mean)
    assert parsed.eval_result_metrics.model_behavior_preservation.kl_div_with_sae == pytest.approx(
        report.interventions["sae"].kl_mean)


def test_export_default_folder_names_the_file_as_saebench_does(run_dir):
    assert main(["export", str(run_dir)]) == 0
    (written,) = (run_dir / "saebench").iterdir()
    assert written.name == "klgap_tiny-gpt2_blocks.1.hook_mlp_out_eval_results.json"
    assert main(["validate", str(run_dir)]) == 0


def test_export_bad_input_is_one_line_exit_2(run_dir, tmp_path, capsys):
    assert main(["export", str(run_dir), "--format", "csv"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "klgap: error: unknown export format 'csv'; valid: saebench"
    assert main(["export", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("klgap: error: ") and "not a run or study folder" in err and "\n" not in err
    assert not list(tmp_path.iterdir())
