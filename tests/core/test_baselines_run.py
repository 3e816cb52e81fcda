"""The baselines of issue 31 in a run (klgap_perturbations.fitted): fitted on the fit tokens only (--fit-tokens,
disjoint from the measured ones), their fit summaries in run.json / report.json, and ``klgap replicate`` with every
one of them end to end on tiny-gpt2."""

from __future__ import annotations

import json
import math

import pytest
import torch

from klgap.forward import activations

from klgap.job.loading import load_plan
from klgap.cli.main import main
from klgap.plan.config import RunConfig
from klgap.plan.resolve import resolve
from klgap.plan.sites import hook_name
from tests.helpers import pca_sae

SITE = hook_name("resid_pre", 1)
BASELINES = ["cov_random_mixture", "real_direction", "epsilon_error_cov", "epsilon_mahalanobis", "pca_matched",
             "random_dictionary", "sae_minus_offset"]
M = 12  # the SAE's principal components (its L0)


@pytest.fixture(scope="module")
def sae(tmp_path_factory, load_model):
    """A PCA-like SAE for tiny-gpt2 resid_pre L1 (d 64, d_sae 256, L0 12), from activations of other random text."""
    lm = load_model("tiny-gpt2")
    ids = torch.randint(0, lm.vocab_size, (16, 64), generator=torch.Generator().manual_seed(99))
    acts = activations.collect(lm, lm.site_map("resid_pre", 1), ids)[:, 1:].reshape(-1, lm.d_model)
    return pca_sae(tmp_path_factory.mktemp("sae") / "sae.safetensors", acts, M, 4 * lm.d_model, SITE)


def collect(loaded, ids: torch.Tensor) -> torch.Tensor:
    """The site's activations ``[n d]`` at the measured positions (1:) of contexts `ids`."""
    return torch.cat([activations.collect(loaded.model, loaded.spec, ids[i:i + 4])[:, 1:].reshape(-1, loaded.sae.d_in)
                      for i in range(0, len(ids), 4)]).float()


def test_fitted_on_the_fit_tokens_only(sae):
    cfg = RunConfig(model="tiny-gpt2", sae=str(sae), tokens=512, context_len=64, batch_size=4, device="cpu",
                    dataset="random", fit_tokens=1024, interventions=["sae", *BASELINES])
    loaded = load_plan(resolve(cfg))
    measured_ids, fit_ids = loaded.contexts, loaded.fit_contexts
    assert not {tuple(c) for c in measured_ids.tolist()} & {tuple(c) for c in fit_ids.tolist()}
    fit_x, measured_x = collect(loaded, fit_ids), collect(loaded, measured_ids)
    fit_hat = loaded.sae.decode(loaded.sae.encode(fit_x)).float()
    measured_hat = loaded.sae.decode(loaded.sae.encode(measured_x)).float()
    p = {i.name: i.perturbation for i in loaded.interventions}

    # the bank real_direction draws from is the fit contexts' activations, row for row (not the measured ones')
    assert torch.equal(p["real_direction"].state.rows, fit_x) and fit_x.shape != measured_x.shape
    # the means and the error offset are the fit tokens', not the measured tokens'
    fit_mean = fit_x.double().mean(0)
    for name in ("cov_random_mixture", "pca_matched"):
        torch.testing.assert_close(p[name].state.mean.double(), fit_mean, rtol=0, atol=1e-5)
    fit_offset = (fit_x.double() - fit_hat.double()).mean(0)
    measured_offset = (measured_x.double() - measured_hat.double()).mean(0)
    torch.testing.assert_close(p["sae_minus_offset"].state.double(), fit_offset, rtol=0, atol=1e-5)
    assert (fit_offset - measured_offset).norm() > 100 * 1e-5
    # the SAE's L0 and width reach random_dictionary
    fitted = loaded.execution["fitted"]
    assert set(fitted) == set(BASELINES)
    assert (fitted["random_dictionary"]["d_sae"], fitted["random_dictionary"]["n_atoms"]) == (256, M)
    for name in BASELINES:
        assert fitted[name]["n_activations"] == len(fit_x) == 17 * 63  # ceil(1024 / 63) contexts
        assert "drawn after the measured ones" in fitted[name]["source"]


def test_replicate_with_every_baseline_end_to_end(sae, tmp_path, capsys):
    out = tmp_path / "run"
    names = ["sae", "epsilon_random", *BASELINES]
    assert main(["replicate", "--model", "tiny-gpt2", "--sae", str(sae), "--tokens", "1024", "--context-len", "128",
                 "--batch-size", "8", "--dataset", "random", "--interventions", ",".join(names), "--fit-tokens", "2048",
                 "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["interventions"]) == names and report["n_tokens"] == 8 * 127
    for name, row in report["interventions"].items():
        assert row["n_tokens"] == 8 * 127 and math.isfinite(row["kl_mean"]) and row["kl_mean"] > 0, name
    assert set(report["comparisons"]) >= set(BASELINES)
    fitted = report["execution"]["fitted"]
    assert set(fitted) == set(BASELINES)
    pca = fitted["pca_matched"]  # the SAE is a 12-component PCA of other text: PCA needs about as many here
    assert abs(pca["k"] - M) <= 3 and pca["ev_pca"] >= pca["ev_sae"] > 0.2
    assert pca["ev_sae"] == pytest.approx(report["sae_metrics"]["explained_variance"], abs=0.05)  # fit vs measured
    coder = fitted["random_dictionary"]  # 12 atoms chosen per token beat 12 fixed components on this near-isotropic site
    assert (coder["d_sae"], coder["n_atoms"], coder["l0_mean"]) == (256, M, M)
    assert pca["ev_sae"] < coder["ev_random_dictionary"] < 1
    assert 0 <= fitted["sae_minus_offset"]["error_offset_frac"] <= 1
    assert all(0 < fitted[n]["top_eigenvalue_share"] <= 1 for n in ("cov_random_mixture", "epsilon_error_cov"))
    assert "sae_minus_offset" in (out / "report.md").read_text()
