"""The clean CE (issue 30 items 5 and 7): each measured token's clean next-token cross-entropy is stored once per
token (``ce_clean`` on the first intervention's rows of a part), equals an independent Hugging Face forward's
cross-entropy, and the report's clean CE, absolute CE with the SAE and with zero ablation, ce_loss_score and the
SAEBench export's absolute CE fields are the same numbers. A folder whose parts or report predate the column still
reports, without the number."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from klgap.cli.main import main
from klgap.job import cells
from klgap.plan.config import RunConfig
from klgap.plan.sites import hook_name
from klgap.report.read import load_report
from klgap.report.saebench import export_run
from klgap.report.summary import summary_row
from tests.helpers import random_sae, run_config

N_CTX, CTX_LEN = 8, 24
COMMITTED = Path(__file__).resolve().parents[2] / "replications" / "error-decomposition" / "results" / "mlp_out_L10"


def hf_clean_ce(lm, contexts: torch.Tensor) -> np.ndarray:
    """``[n_ctx ctx_len]`` next-token cross-entropy of the clean model, straight from the HF forward and
    torch's cross_entropy (NaN at the last position, whose next token is unknown)."""
    with torch.no_grad():
        logits = lm.hf_model(contexts.to(lm.hf_model.device)).logits.double()  # [b n vocab]
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), contexts[:, 1:].reshape(-1),
                                           reduction="none").reshape(contexts.shape[0], -1)
    return torch.cat([ce, torch.full((contexts.shape[0], 1), float("nan"), dtype=ce.dtype)], dim=1).numpy()


def config(sae: Path, **overrides) -> RunConfig:
    fields = dict(model="tiny-gpt2", sae=str(sae), tokens=N_CTX * CTX_LEN, context_len=CTX_LEN, batch_size=4,
                  device="cpu", dataset="random", interventions=["sae", "zero", "epsilon_random"])
    return RunConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def sae_path(tmp_path_factory, load_model):
    lm = load_model("tiny-gpt2")
    tmp = tmp_path_factory.mktemp("clean_ce")
    return random_sae(tmp / "sae.safetensors", lm.d_model, 4 * lm.d_model, hook_name("resid_pre", 1), seed=5)


@pytest.fixture(scope="module")
def run(tmp_path_factory, sae_path):
    cfg = config(sae_path, mask_special="none")
    out = tmp_path_factory.mktemp("clean_ce_run") / "run"
    run_config(cfg, out)
    return cfg, out


def test_clean_ce_is_the_hf_models_cross_entropy_once_per_token(run, load_model):
    cfg, out = run
    expected = hf_clean_ce(load_model("tiny-gpt2"), cells.prepare(cfg).contexts)
    tokens = pd.read_parquet(out / "tokens.parquet")
    carried = tokens[tokens["ce_clean"].notna()]
    assert set(carried["intervention"]) == {"sae"}  # once per token: on the first intervention's rows only
    sae = tokens[tokens["intervention"] == "sae"]
    assert len(carried) == int(np.isfinite(expected).sum()) == N_CTX * (CTX_LEN - 1)
    ours = carried["ce_clean"].to_numpy(np.float64)
    theirs = expected[carried["context"].to_numpy(), carried["position"].to_numpy()]
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert ours.mean() > 1.0  # a real CE of a (random) tiny model, not 0
    assert sae["ce_clean"].isna().sum() == N_CTX  # the last position of each context: no next token

    report = load_report(out)
    assert report.ce_clean.mean == pytest.approx(np.nanmean(expected), rel=1e-6)
    assert report.ce_clean.ci_low < report.ce_clean.mean < report.ce_clean.ci_high
    assert report.ce_clean.n_contexts == N_CTX


def test_absolute_ce_and_ce_loss_score_agree_and_the_export_carries_them(run, tmp_path):
    _, out = run
    report = load_report(out)
    scores, clean = report.sae_lens_scores, report.ce_clean.mean
    sae, zero = report.interventions["sae"], report.interventions["zero"]
    assert scores.ce_loss_with_sae == pytest.approx(clean + sae.ce_delta_mean, rel=1e-12)
    assert scores.ce_loss_with_ablation == pytest.approx(clean + zero.ce_delta_mean, rel=1e-12)
    recomputed = (scores.ce_loss_with_ablation - scores.ce_loss_with_sae) / (scores.ce_loss_with_ablation - clean)
    assert (zero.ce_delta_mean - sae.ce_delta_mean) / zero.ce_delta_mean == pytest.approx(recomputed, rel=1e-9)
    if scores.ce_loss_score is not None:  # withheld when CE_zero − CE_clean's interval holds 0
        assert scores.ce_loss_score == pytest.approx(recomputed, rel=1e-9)

    (exported,) = export_run(out, "saebench", tmp_path / "core.json")
    mp = exported.document["eval_result_metrics"]["model_performance_preservation"]
    assert mp["ce_loss_without_sae"] == pytest.approx(clean)
    assert mp["ce_loss_with_sae"] == pytest.approx(scores.ce_loss_with_sae)
    assert mp["ce_loss_with_ablation"] == pytest.approx(scores.ce_loss_with_ablation)
    missing = exported.document["eval_result_unstructured"]["klgap"]["not_measured"]
    assert not [name for name in missing if name.startswith("model_performance_preservation.ce_loss_with")]

    sentence = summary_row(report, report.model, report.mode).verdict()
    assert f"kl_div_score {scores.kl_div_score:.3f}" in sentence and f"clean CE {clean:.3f} nats/token" in sentence
    assert "ce_loss_score" in sentence
    assert main(["report", str(out)]) == 0
    page = (out / "report.md").read_text()
    assert "Clean CE (no patch)" in page and "CE with zero ablation" in page


@pytest.mark.parametrize(("mode", "extra"), [("single_token", {"position": 5, "k": 3}),
                                             ("many_samples", {"position": 7, "n_samples": 6})])
def test_clean_ce_in_the_other_modes(tmp_path, sae_path, load_model, mode, extra):
    # zero too: the committed single-token and many-samples files measure it (kl_div_score at the patched position)
    cfg = config(sae_path, mode=mode, mask_special="none", interventions=["sae", "zero", "epsilon_random"], **extra)
    run_config(cfg, tmp_path / "run")
    expected = hf_clean_ce(load_model("tiny-gpt2"), cells.prepare(cfg).contexts)
    tokens = pd.read_parquet(tmp_path / "run" / "tokens.parquet")
    carried = tokens[tokens["ce_clean"].notna()]
    assert set(carried["intervention"]) == {"sae"} and (carried["draw"] < 0).all()
    measured = tokens[(tokens["intervention"] == "sae") & (tokens["draw"] < 0)]
    assert len(carried) == len(measured)  # each measured token once
    theirs = expected[carried["context"].to_numpy(), carried["position"].to_numpy()]
    np.testing.assert_allclose(carried["ce_clean"].to_numpy(np.float64), theirs, rtol=1e-5, atol=1e-6)
    report = load_report(tmp_path / "run")
    assert report.ce_clean.mean == pytest.approx(theirs.mean(), rel=1e-6)
    scores = report.sae_lens_scores
    assert scores.ce_loss_with_ablation == pytest.approx(report.ce_clean.mean + report.interventions["zero"].ce_delta_mean)
    assert report.interventions["zero"].kl_mean > 0 and scores.kl_div_score is not None


@pytest.mark.parametrize("n_old", [1, None], ids=["resumed-across-versions", "all-parts-old"])
def test_parts_without_the_column_still_report_without_the_number(run, tmp_path, n_old):
    _, out = run
    old = tmp_path / "old"
    shutil.copytree(out, old)
    for part in sorted((old / "parts").glob("*.parquet"))[:n_old]:  # as klgap wrote them before it kept ce_clean
        table = pq.read_table(part)
        pq.write_table(table.drop_columns(["ce_clean"]).replace_schema_metadata(table.schema.metadata), part)
    (old / "report.json").unlink()
    (old / "tokens.parquet").unlink()
    assert main(["report", str(old)]) == 0  # a folder without report.json: built from run.json and the parts
    tokens = pd.read_parquet(old / "tokens.parquet")
    assert len(tokens) == len(pd.read_parquet(out / "tokens.parquet"))
    assert ("ce_clean" in tokens) == (n_old is not None)  # a mixed folder's old parts: nulls there
    report = load_report(old)
    assert report.ce_clean is None and report.sae_lens_scores.ce_loss_with_sae is None
    assert report.sae_lens_scores.kl_div_score == pytest.approx(load_report(out).sae_lens_scores.kl_div_score)
    assert "clean CE" not in summary_row(report, report.model, report.mode).verdict()
    (exported,) = export_run(old, "saebench", tmp_path / "core.json")
    assert exported.document["eval_result_metrics"]["model_performance_preservation"]["ce_loss_without_sae"] == -1


def test_a_committed_replication_without_clean_ce_still_reports(tmp_path):
    """A committed replication's run (error-decomposition's mlp_out L10: report.json written before klgap kept the
    clean CE, no parts committed): its pages and the SAEBench export are written, the clean CE absent and SAEBench's
    -1 where it would be."""
    folder = tmp_path / "committed"
    shutil.copytree(COMMITTED, folder)
    report = load_report(folder)
    assert report.ce_clean is None
    assert main(["report", str(folder)]) == 0
    assert "Clean CE" not in (folder / "report.md").read_text()
    assert main(["export", str(folder), "--out", str(tmp_path / "core.json")]) == 0
    doc = json.loads((tmp_path / "core.json").read_text())
    assert doc["eval_result_metrics"]["model_performance_preservation"]["ce_loss_without_sae"] == -1
    assert "model_performance_preservation.ce_loss_without_sae" in doc["eval_result_unstructured"]["klgap"]["not_measured"]


def test_a_curve_file_listing_zero_measures_it_beside_the_grid(tmp_path, sae_path, capsys):
    """A committed curve file adds ``interventions = ["zero"]`` (issue 30 item 5): ``klgap curve --config`` keeps
    the file's interventions beside the grid, as ``--interventions`` does, so kl_div_score and the clean CE print."""
    config = tmp_path / "curve.toml"
    config.write_text(f'model = "tiny-gpt2"\nsae = "{sae_path}"\ncos = "0.9"\nnorm_frac = "0.9"\n'
                      f'interventions = ["zero"]\ndataset = "random"\ntokens = {N_CTX * CTX_LEN}\n'
                      f'context_len = {CTX_LEN}\nbatch_size = 4\ndevice = "cpu"\n')
    assert main(["curve", "--config", str(config), "--out", str(tmp_path / "curve"), "--quiet"]) == 0
    report = load_report(tmp_path / "curve")
    assert list(report.interventions) == ["sae", "epsilon_random", "cosine_matched(cos=0.9,norm_frac=0.9)", "zero"]
    sentence = summary_row(report, report.model, report.mode).verdict()
    assert f"kl_div_score {report.sae_lens_scores.kl_div_score:.3f}" in sentence
    assert f"clean CE {report.ce_clean.mean:.3f} nats/token" in sentence


def test_validate_refuses_a_negative_clean_ce(run):
    """`klgap validate`'s value rules: a cross-entropy is −log P ≥ 0 (the clean CE, its interval, the absolute CE)."""
    from klgap.report.validate import value_problem

    _, out = run
    data = json.loads((out / "report.json").read_text())
    assert value_problem({"ce_clean": data["ce_clean"], "sae_lens_scores": data["sae_lens_scores"]}) is None
    data["ce_clean"]["ci_low"] = -0.5
    assert value_problem({"ce_clean": data["ce_clean"]}) == ("ce_clean.ci_low",
                                                              "a cross-entropy of -0.5 is negative (−log P ≥ 0)")
    assert value_problem({"sae_lens_scores": {"ce_loss_with_sae": -1.0}}) == (
        "sae_lens_scores.ce_loss_with_sae", "a cross-entropy of -1.0 is negative (−log P ≥ 0)")


def test_compare_carries_the_scores_and_the_clean_ce(run, tmp_path):
    _, out = run
    assert main(["compare", str(out), "--out", str(tmp_path / "cmp")]) == 0
    (row,) = json.loads((tmp_path / "cmp" / "compare.json").read_text())["runs"]
    report = load_report(out)
    assert row["ce_clean"] == pytest.approx(report.ce_clean.mean)
    assert row["kl_div_score"] == pytest.approx(report.sae_lens_scores.kl_div_score)
    assert row["ce_loss_score"] == report.sae_lens_scores.ce_loss_score  # None where withheld
    assert main(["validate", str(tmp_path / "cmp" / "compare.json")]) == 0
