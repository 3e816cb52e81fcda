"""mean_ablation's mean, over the batch (default), over the run's fit tokens (over=run) or the study's, over a
batch of 64 contexts at every position, BOS included (over=batch64)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from klgap.errors import KlgapError
from klgap.plan.config import RunConfig
from klgap.report.read import load_report
from klgap_perturbations.perturbations import MEAN_ABLATION_DEFINITIONS, mean_ablation
from tests.helpers import random_sae, run_config


def _kl(run_dir) -> pd.DataFrame:
    tokens = pd.read_parquet(run_dir / "tokens.parquet")
    return tokens.pivot_table(index=["context", "position"], columns="intervention", values="kl")


def test_run_wide_mean_does_not_depend_on_batch_size(tmp_path):
    """Two batch sizes: mean_ablation:over=run gives the same per-token KL, the batch mean does not; run.json
    records the fit and the report states each definition."""
    sae = random_sae(tmp_path / "sae.safetensors", 64, 256, "blocks.1.hook_resid_pre", seed=3)
    runs = {}
    for batch_size in (2, 3):
        cfg = RunConfig(model="tiny-gpt2", sae=str(sae), tokens=6 * 16, context_len=16, batch_size=batch_size,
                        device="cpu", dtype="float64", dataset="random",
                        interventions=["sae", "mean_ablation", "mean_ablation:over=run"])
        run_config(cfg, tmp_path / f"bs{batch_size}")
        runs[batch_size] = _kl(tmp_path / f"bs{batch_size}")
    a, b = runs[2], runs[3]
    assert a["mean_ablation(over=run)"].mean() > 1e-3
    np.testing.assert_allclose(a["mean_ablation(over=run)"], b["mean_ablation(over=run)"], rtol=1e-12, atol=0)
    np.testing.assert_allclose(a["sae"], b["sae"], rtol=1e-12, atol=0)
    assert not np.allclose(a["mean_ablation"], b["mean_ablation"], rtol=1e-6)  # the default: one mean per batch
    report = load_report(tmp_path / "bs2")
    assert report.definitions["mean_ablation"] == MEAN_ABLATION_DEFINITIONS["batch"]
    assert report.definitions["mean_ablation(over=run)"] == MEAN_ABLATION_DEFINITIONS["run"]
    fitted = report.execution["fitted"]["mean_ablation(over=run)"]
    assert fitted["over"] == "run" and fitted["n_activations"] == 6 * 15  # position 0 masked (--mask-special)
    assert fitted["mean_norm"] > 0


def test_over_parameter():
    assert mean_ablation().name == "mean_ablation"
    assert mean_ablation(over="batch").name == "mean_ablation(over=batch)"
    assert mean_ablation(over="run").name == "mean_ablation(over=run)"
    assert mean_ablation(over="batch64").name == "mean_ablation(over=batch64)"
    with pytest.raises(KlgapError, match="over='study'.*valid: batch, run, batch64"):
        mean_ablation(over="study")


def test_the_studys_mean_over_64_contexts_with_bos(tmp_path):
    """over=batch64: x' is the mean of the site's activations over the run's first 64 contexts at every position
    (BOS included), whatever --batch-size; patched where the run patches; the report states the definition."""
    import torch

    from klgap.forward import activations
    from klgap.job import cells

    sae = random_sae(tmp_path / "sae.safetensors", 64, 256, "blocks.1.hook_resid_pre", seed=3)
    runs = {}
    for batch_size in (4, 6):
        cfg = RunConfig(model="tiny-gpt2", sae=str(sae), tokens=70 * 16, context_len=16, batch_size=batch_size,
                        device="cpu", dtype="float64", dataset="random",
                        interventions=["sae", "mean_ablation:over=batch64"])
        run_config(cfg, tmp_path / f"bs{batch_size}")
        runs[batch_size] = _kl(tmp_path / f"bs{batch_size}")
    np.testing.assert_allclose(runs[4]["mean_ablation(over=batch64)"], runs[6]["mean_ablation(over=batch64)"],
                               rtol=1e-12, atol=0)
    report = load_report(tmp_path / "bs4")
    assert report.definitions["mean_ablation(over=batch64)"] == MEAN_ABLATION_DEFINITIONS["batch64"]
    fitted = report.execution["fitted"]["mean_ablation(over=batch64)"]
    assert fitted["n_contexts"] == 64 and fitted["n_activations"] == 64 * 16 and fitted["every_position"]

    # the mean by hand: activation.mean((0, 1)) over the first 64 contexts, position 0 included
    loaded = cells.prepare(cfg)
    acts = activations.collect(loaded.model, loaded.spec, loaded.contexts[:64]).double()  # [64 16 d]
    by_hand = acts.mean((0, 1))
    assert fitted["mean_norm"] == pytest.approx(float(by_hand.norm()), rel=1e-9)
    without_bos = acts[:, 1:].mean((0, 1))
    assert float((by_hand - without_bos).norm()) > 1e-3 * float(by_hand.norm())  # BOS moves the mean
    p = next(i.perturbation for i in loaded.interventions if i.name == "mean_ablation(over=batch64)")
    from klgap.job.loading import fit_perturbations

    fit_perturbations(loaded)
    x = torch.randn(5, 64, dtype=torch.float64)
    torch.testing.assert_close(p(x, x, torch.Generator()).double(), by_hand.expand(5, -1), rtol=1e-6, atol=1e-6)
