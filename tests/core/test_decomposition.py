"""The error-decomposition section of a report (klgap/report/decomposition.py, klgap/render/decomposition_page.py) and the
fit tokens it is fitted on (--fit-tokens, klgap/job/loading.py), on tiny models."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import scipy.stats as sps
import torch

from klgap.job import cells, loading
from klgap.plan.config import RunConfig
from klgap.errors import KlgapError
from klgap.render.pages import render_markdown
from klgap.report.read import load_report
from klgap.plan.sites import hook_name
from tests.helpers import random_sae, write_sae, run_config

SIX = ["sae", "epsilon_random", "sae_plus_linear_error", "epsilon_random_nonlinear", "sae_plus_nonlinear_error",
       "epsilon_random_linear"]
SITE = hook_name("resid_pre", 1)


def linear_sae(path, d: int, seed: int = 0):
    """An SAE whose reconstruction is exactly x A + c (features relu(x − b_dec), relu(b_dec − x); decoder ±A), so
    its error x − x̂ is exactly linear in x."""
    gen = torch.Generator().manual_seed(seed)
    eye = torch.eye(d)
    A = 0.6 * eye + 0.1 * torch.randn(d, d, generator=gen) / d**0.5
    return write_sae(path, torch.cat([eye, -eye], dim=1), torch.cat([A, -A], dim=0), torch.zeros(2 * d),
                     0.1 * torch.randn(d, generator=gen), SITE)


def config(sae, **kw) -> RunConfig:
    base = dict(model="tiny-llama", sae=str(sae), tokens=256, context_len=32, batch_size=4, device="cpu",
                dataset="random", fit_tokens=1024, interventions=SIX)
    return RunConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def d_model(load_model):
    return load_model("tiny-llama").d_model


def test_exactly_linear_error_gives_r2_one_and_no_kl(tmp_path, d_model):
    report = run_config(config(linear_sae(tmp_path / "sae.safetensors", d_model)), tmp_path / "run", progress=False)
    found = report.error_decomposition
    assert found.held_out and found.n_fit_tokens == 34 * 31  # ceil(1024 / 31) contexts of 31 patched positions
    assert found.r2.mean == pytest.approx(1.0, abs=1e-6) and found.r2_centred == pytest.approx(1.0, abs=1e-6)
    assert found.lin_norm_frac.mean == pytest.approx(1.0, abs=1e-3)
    assert report.interventions["sae"].kl_mean > 1e-3
    assert report.interventions["sae_plus_linear_error"].kl_mean < 1e-9  # x̂ + e_lin = x to float32 rounding
    linear = next(p for p in found.parts if p.kept == "linear")  # x̂ + e_nl = x̂: the whole error is linear
    assert linear.kl.mean == pytest.approx(report.interventions["sae"].kl_mean, rel=1e-4)


def test_fit_tokens_are_drawn_after_the_measured_ones(d_model, tmp_path):
    from klgap.plan.resolve import resolve

    sae = random_sae(tmp_path / "sae.safetensors", d_model, 128, SITE)
    with_fit = loading.load_plan(resolve(config(sae)))
    without = loading.load_plan(resolve(config(sae, fit_tokens=None)))
    assert torch.equal(with_fit.contexts, without.contexts) and without.fit_contexts is None
    assert with_fit.fit_contexts.shape == (34, 32)
    measured = {tuple(c) for c in with_fit.contexts.tolist()}
    assert not measured & {tuple(c) for c in with_fit.fit_contexts.tolist()}
    assert "drawn after the measured ones" in with_fit.execution["fitted"]["sae_plus_linear_error"]["source"]
    assert without.execution["fitted"]["sae_plus_linear_error"]["source"] == "the run's first contexts"
    with pytest.raises(KlgapError, match="--fit-tokens must be an integer ≥ 2"):
        config(sae, fit_tokens=1).validate()


def test_section_equals_a_hand_computation(tmp_path, d_model):
    sae = random_sae(tmp_path / "sae.safetensors", d_model, 128, SITE, seed=3)
    report = run_config(config(sae), tmp_path / "run", progress=False)
    found = report.error_decomposition
    rows = pd.read_parquet(tmp_path / "run" / "tokens.parquet")
    one = rows[rows["intervention"] == "sae_plus_linear_error"]
    assert found.r2.mean == pytest.approx(1 - (one["eps_nl"].astype(float) ** 2).sum()
                                          / (one["eps"].astype(float) ** 2).sum(), rel=1e-9)
    assert found.r2.ci_low <= found.r2.mean <= found.r2.ci_high
    assert found.lin_norm_frac.mean == pytest.approx((one["eps_lin"].astype(float) / one["eps"]).mean(), rel=1e-6)

    kl = {name: rows[rows["intervention"] == name]["kl"].astype(float).mean() for name in SIX}
    per_ctx = {name: rows[rows["intervention"] == name].groupby("context")["kl"].mean() for name in SIX}
    sae_excess = kl["sae"] - kl["epsilon_random"]
    assert found.sae_excess.mean == pytest.approx(sae_excess, rel=1e-6)
    for part in found.parts:
        assert part.kl.mean == pytest.approx(kl[part.intervention], rel=1e-6)
        assert part.twin_kl.mean == pytest.approx(kl[part.twin], rel=1e-6)
        assert part.kl_ratio.ratio == pytest.approx(kl[part.intervention] / kl[part.twin], rel=1e-6)
        assert part.excess.mean == pytest.approx(kl[part.intervention] - kl[part.twin], rel=1e-6)
        assert part.excess_left.ratio == pytest.approx((kl[part.intervention] - kl[part.twin]) / sae_excess, rel=1e-6)
        diff = (per_ctx[part.intervention] - per_ctx[part.twin]).to_numpy()
        assert part.wilcoxon_kl.p_value == pytest.approx(sps.wilcoxon(diff).pvalue, rel=1e-9)
    assert [p.intervention for p in found.parts] == ["sae_plus_linear_error", "sae_plus_nonlinear_error"]

    # the centred R² from the tokens' full error vectors, measured again through the run's own objects
    loaded = cells.prepare(config(sae))
    from klgap.forward import activations
    from klgap.job.view import SaeView

    x = torch.cat([activations.collect(loaded.model, loaded.spec, loaded.contexts[i:i + 4])[:, 1:].reshape(-1, d_model)
                   for i in range(0, len(loaded.contexts), 4)])
    view = SaeView.of(x, loaded.sae, loaded.center, loaded.error_split)
    e, e_nl = (view.x - view.x_hat).double(), view.parts[1].double()
    centred = 1 - ((e_nl - e_nl.mean(0)) ** 2).sum() / ((e - e.mean(0)) ** 2).sum()
    assert found.r2_centred == pytest.approx(float(centred), rel=1e-5)
    # Engels et al.'s definitions from the same vectors: per-dimension R² averaged unweighted, ‖e‖² predicted from x
    e_lin = view.parts[0].double()
    assert found.r2_dims == pytest.approx(engels_r2(e.numpy(), e_nl.numpy()), rel=1e-5)
    sq = (e**2).sum(-1)
    assert found.r2_norm == pytest.approx(engels_r2(sq.numpy(), (sq - view.err_sq_pred.double()).numpy()), rel=1e-5)
    total = float(sq.sum())
    assert found.lin_sq_share.mean == pytest.approx(float((e_lin**2).sum()) / total, rel=1e-4)
    assert found.nl_sq_share.mean == pytest.approx(float((e_nl**2).sum()) / total, rel=1e-4)
    assert found.cross_share.mean == pytest.approx(2 * float((e_lin * e_nl).sum()) / total, abs=1e-4)
    assert found.cross_share.ci_low <= found.cross_share.mean <= found.cross_share.ci_high

    text = render_markdown(load_report(tmp_path / "run"), [])
    assert "## Error decomposition" in text and "held out" in text and "epsilon_random_nonlinear" in text
    assert "2Σ e_lin·e_nl/Σ‖e‖²" in text and "R² per dimension, unweighted mean (Engels)" in text


def engels_r2(target: np.ndarray, residuals: np.ndarray) -> float:
    """Engels et al.'s R² (SAE-Dark-Matter utils.calculate_r_squared), in numpy: per target column 1 − Σ residual² /
    Σ (target − column mean)², then the unweighted mean over columns."""
    total = ((target - target.mean(axis=0)) ** 2).sum(axis=0)
    return float(np.mean(1 - (residuals**2).sum(axis=0) / total))


def sides_of(e: np.ndarray, e_nl: np.ndarray, pred_sq: np.ndarray, chunks: int = 3) -> list[dict]:
    """The side sums klgap.job.view.SaeView.side_stats writes, in `chunks` batches, from e, e_nl ``[n d]`` and the
    prediction of ‖e‖² ``[n]``."""
    out = []
    for rows in np.array_split(np.arange(len(e)), chunks):
        err, nl, sq = e[rows], e_nl[rows], (e[rows] ** 2).sum(-1)
        out.append({"n": len(rows), "sum_err": err.sum(0).tolist(), "sum_err_nl": nl.sum(0).tolist(),
                    "sum_sq_err": float((err**2).sum()), "sum_sq_err_nl": float((nl**2).sum()),
                    "sum_sq_err_dims": (err**2).sum(0).tolist(), "sum_sq_err_nl_dims": (nl**2).sum(0).tolist(),
                    "sum_err_sq_sq": float((sq**2).sum()), "sum_err_sq_resid_sq": float(((sq - pred_sq[rows]) ** 2).sum())})
    return out


def test_engels_r2s_and_shares_on_synthetic_errors_with_known_answers():
    from klgap.report import decomposition as dec

    rng = np.random.default_rng(0)
    n, d = 20000, 4
    # dimension 0 fully predicted (R² 1), dimension 1 half its variance (R² 0.5), 2 and 3 not at all (R² 0):
    # unweighted mean 0.375; the pooled R² weighs dimension 1's large variance instead
    e = rng.normal(size=(n, d)) * np.array([1.0, 10.0, 1.0, 1.0])
    e_lin = np.zeros_like(e)
    e_lin[:, 0] = e[:, 0]
    noise = rng.normal(size=n) * 10 / np.sqrt(2)
    e[:, 1] = rng.normal(size=n) * 10 / np.sqrt(2) + noise
    e_lin[:, 1] = e[:, 1] - noise
    e_nl = e - e_lin
    pred = (e**2).sum(-1)  # a perfect prediction of ‖e‖²: R² 1; the mean: R² 0
    sides = sides_of(e, e_nl, pred)
    assert dec.r2_dims(sides) == pytest.approx(0.375, abs=0.01)
    assert dec.r2_dims(sides) == pytest.approx(engels_r2(e, e_nl), rel=1e-9)
    assert dec.r2_norm(sides) == pytest.approx(1.0, abs=1e-12)
    assert dec.r2_norm(sides_of(e, e_nl, np.full(n, (e**2).sum(-1).mean()))) == pytest.approx(0.0, abs=1e-9)
    pooled = 1 - (e_nl**2).sum() / (e**2).sum()
    assert abs(pooled - 0.375) > 0.05  # the two definitions differ on these errors
    assert np.isnan(dec.r2_dims([{k: v for k, v in s.items() if k != "sum_sq_err_dims"} for s in sides]))

    # the shares: ‖e‖² = ‖e_lin‖² + ‖e_nl‖² + 2 e_lin·e_nl, per token and summed over the run
    contexts = np.repeat(np.arange(100), n // 100)
    norms = pd.DataFrame({"context": contexts, "n": 1, "sq": (e**2).sum(-1), "sq_lin": (e_lin**2).sum(-1),
                          "sq_nl": (e_nl**2).sum(-1)})
    norms["sq_cross"] = norms["sq"] - norms["sq_lin"] - norms["sq_nl"]
    sums = norms.groupby("context").sum()
    lin, nl, cross = dec.sq_shares(sums, seed=0)
    total = (e**2).sum()
    assert lin.mean == pytest.approx((e_lin**2).sum() / total, rel=1e-9)
    assert nl.mean == pytest.approx((e_nl**2).sum() / total, rel=1e-9)
    assert cross.mean == pytest.approx(2 * (e_lin * e_nl).sum() / total, rel=1e-6)
    assert lin.mean + nl.mean + cross.mean == pytest.approx(1.0, abs=1e-12)
    assert cross.ci_low < cross.mean < cross.ci_high


def test_no_section_without_the_interventions_and_in_sample_without_fit_tokens(tmp_path, d_model):
    sae = random_sae(tmp_path / "sae.safetensors", d_model, 128, SITE)
    plain = run_config(config(sae, interventions=["sae", "epsilon_random"], fit_tokens=None), tmp_path / "a",
                       progress=False)
    assert plain.error_decomposition is None and "Error decomposition" not in render_markdown(plain, [])
    assert "eps_lin" not in pd.read_parquet(tmp_path / "a" / "tokens.parquet").columns
    alone = run_config(config(sae, interventions=["sae", "sae_plus_linear_error"], fit_tokens=None), tmp_path / "b",
                       progress=False)
    found = alone.error_decomposition
    assert not found.held_out and found.parts == [] and found.sae_excess is None
    assert "in-sample" in render_markdown(alone, [])


def test_study_table_across_sites(tmp_path, d_model):
    base = config(str(tmp_path / "sae_{site}_{layer}.safetensors"), tokens=128)
    for layer in (0, 1):
        random_sae(tmp_path / f"sae_resid_pre_{layer}.safetensors", d_model, 128, hook_name("resid_pre", layer), seed=layer)
    study = run_config(dataclasses.replace(base, site="resid_pre", layer="0,1"), tmp_path / "study")
    assert [r.error_decomposition is not None for r in study.runs] == [True, True]
    r2s = [r.error_decomposition.r2.mean for r in study.runs]
    assert r2s == [load_report(tmp_path / "study" / r.path).error_decomposition.r2.mean for r in study.runs]
    text = render_markdown(study, [])
    assert "## Error decomposition across sites" in text
    assert "resid_pre L0" in text and "resid_pre L1" in text
    assert np.all(np.isfinite(r2s))


def test_shares_with_a_known_cross_term():
    """e_lin = v, e_nl = −v/2 + w (v, w independent, unit variance): e = v/2 + w, E‖e‖² = 1.25 per dimension, so
    Σ‖e_lin‖²/Σ‖e‖² = 0.8, Σ‖e_nl‖²/Σ‖e‖² = 1.0 and 2Σ e_lin·e_nl/Σ‖e‖² = −0.8: e_lin overshoots, the parts cancel."""
    from klgap.report import decomposition as dec

    rng = np.random.default_rng(4)
    v, w = rng.normal(size=(50000, 8)), rng.normal(size=(50000, 8))
    e_lin, e_nl = v, -0.5 * v + w
    e = e_lin + e_nl
    norms = pd.DataFrame({"context": np.repeat(np.arange(500), 100), "n": 1, "sq": (e**2).sum(-1),
                          "sq_lin": (e_lin**2).sum(-1), "sq_nl": (e_nl**2).sum(-1)})
    norms["sq_cross"] = norms["sq"] - norms["sq_lin"] - norms["sq_nl"]
    lin, nl, cross = dec.sq_shares(norms.groupby("context").sum(), seed=0)
    assert (lin.mean, nl.mean, cross.mean) == pytest.approx((0.8, 1.0, -0.8), abs=0.02)
    assert cross.ci_high < -0.7


def test_the_norm_regression_is_least_squares_of_the_squared_error_on_x():
    """fit_linear_error's ‖e‖² regression on [x, 1] equals numpy's least squares; when ‖e‖² is exactly linear in x
    its held-out R² is 1."""
    from klgap.report import decomposition as dec
    from klgap_perturbations.decomposition import fit_linear_error

    rng = np.random.default_rng(5)
    n, d = 4000, 6
    x = rng.normal(size=(n, d)) + 3.0
    scale = np.sqrt(x @ np.array([0.5, 0.2, 0.1, 0.3, 0.4, 0.1]) + 1.0)  # ‖e‖² = a·x + 1, exactly linear in x
    direction = rng.normal(size=(n, d))
    e = direction / np.linalg.norm(direction, axis=1, keepdims=True) * scale[:, None]
    fit = fit_linear_error(torch.from_numpy(x[:2000]), torch.from_numpy(x[:2000] - e[:2000]))
    design = np.c_[x[:2000], np.ones(2000)]
    coef = np.linalg.lstsq(design, (e[:2000] ** 2).sum(-1), rcond=None)[0]
    np.testing.assert_allclose(fit.norm_weight.numpy(), coef[:d], rtol=1e-3, atol=1e-4)
    assert fit.norm_bias == pytest.approx(coef[d], rel=1e-3, abs=1e-3)
    pred = fit.predict_norm_sq(torch.from_numpy(x[2000:])).double().numpy()
    sides = sides_of(e[2000:], e[2000:] - fit.predict(torch.from_numpy(x[2000:])).double().numpy(), pred)
    assert dec.r2_norm(sides) == pytest.approx(1.0, abs=1e-4)
    assert dec.r2_norm(sides) == pytest.approx(engels_r2((e[2000:] ** 2).sum(-1), (e[2000:] ** 2).sum(-1) - pred),
                                               rel=1e-9)
