"""The baselines of issue 31 (klgap_perturbations.fitted / .baselines): each formula's geometry checked against an
independent numpy float64 computation (sizes to 1e-4 relative, distributions within sampling error, PCA's k and
explained variance, OMP's reconstruction), what each fit records, and bad parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from klgap.plugins.capabilities import error_fittable, error_splitter, fit_summary, fittable, sae_fittable
from klgap.errors import KlgapError
from klgap.protocols import FitSummary, Perturbation
from klgap_perturbations import baselines
from klgap_perturbations.sparse import omp, random_unit_dictionary
from tests.plugins.test_perturbations import perturbation_registry

NAMES = ("cov_random_mixture", "real_direction", "epsilon_error_cov", "epsilon_mahalanobis", "pca_matched",
         "random_dictionary", "sae_minus_offset")
D = 6


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def build(spec: str):
    from klgap.plan.resolve import build_intervention

    return build_intervention(spec).perturbation


def anisotropic(n: int, d: int = D, seed: int = 0, scales=None, basis_seed: int = 50) -> torch.Tensor:
    """``[n d]`` Gaussian rows with per-axis scales (default 0.3 … 3) along a random rotation, plus an offset."""
    scales = torch.linspace(0.3, 3.0, d) if scales is None else torch.as_tensor(scales, dtype=torch.float32)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=gen(basis_seed)))
    return (torch.randn(n, d, generator=gen(seed)) * scales) @ basis.T + 0.7


def np_cov(rows: torch.Tensor) -> np.ndarray:
    return np.cov(rows.double().numpy(), rowvar=False)


def second_moment(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """E[u uᵀ] of unit rows ``u: [n d]`` and the standard error of each entry."""
    outer = u[:, :, None] * u[:, None, :]
    return outer.mean(0), outer.std(0) / np.sqrt(len(u))


def unit_np(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def assert_same_distribution(got: np.ndarray, reference: np.ndarray, z: float = 5.0) -> None:
    """The second moments of two sets of unit rows agree entrywise within `z` combined standard errors."""
    m1, se1 = second_moment(got)
    m2, se2 = second_moment(reference)
    worst = (np.abs(m1 - m2) / np.sqrt(se1**2 + se2**2 + 1e-30)).max()
    assert worst < z, f"second moments differ by {worst:.1f} standard errors"


def step_directions(p, x: torch.Tensor, x_hat: torch.Tensor, seed: int = 1) -> np.ndarray:
    out = p(x, x_hat, gen(seed)).double() - x.double()
    return unit_np(out.numpy())


def error_pair(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, x̂) with x anisotropic and an error of its own, differently shaped covariance plus a constant part."""
    x = anisotropic(n, seed=seed)
    e = anisotropic(n, seed=seed + 1, scales=torch.linspace(2.0, 0.1, D), basis_seed=51) - 0.7 + 0.4
    return x, x - e


# --------------------------------------------------------------------------- registration and capabilities


def test_registered_with_the_capabilities_each_fit_needs():
    built = {name: perturbation_registry().get(name)() for name in NAMES}
    assert all(isinstance(p, Perturbation) and isinstance(p, FitSummary) for p in built.values())
    assert [p.name for p in fittable(built.values())] == ["cov_random_mixture", "real_direction", "epsilon_mahalanobis"]
    assert [p.name for p in error_fittable(built.values())] == ["epsilon_error_cov", "pca_matched", "sae_minus_offset"]
    assert [p.name for p in sae_fittable(built.values())] == ["random_dictionary"]
    assert error_splitter(built.values()) is None  # none of them adds the decomposition's columns
    assert {n for n, p in built.items() if p.stochastic} == {"cov_random_mixture", "real_direction",
                                                             "epsilon_error_cov", "epsilon_mahalanobis"}
    x = torch.randn(4, D)
    for p in built.values():
        with pytest.raises(RuntimeError, match="not fitted"):
            p(x, x, gen(0))


@pytest.mark.parametrize("spec,match", [
    ("cov_random_mixture:origin=mean", "origin='mean' is not valid.*valid: sample, x"),
    ("real_direction:origin=sample", "origin='sample' is not valid.*valid: other, x"),
    ("epsilon_mahalanobis:ridge=0", "ridge='0' is not valid; ridge must be a number in"),
    ("epsilon_mahalanobis:ridge=nan", "ridge='nan' is not valid"),
    ("random_dictionary:seed=1.5", "seed='1.5' is not valid; seed must be an integer in"),
    ("pca_matched:k=3", "intervention 'pca_matched' has no parameter 'k'; it takes no parameters"),
])
def test_bad_parameters_are_one_clear_error(spec, match):
    with pytest.raises(KlgapError, match=match):
        build(spec)


def test_parameters_name_the_intervention():
    from klgap.plan.resolve import build_intervention

    assert build_intervention("cov_random_mixture:origin=x").name == "cov_random_mixture(origin=x)"
    assert build_intervention("epsilon_mahalanobis:ridge=0.1").name == "epsilon_mahalanobis(ridge=0.1)"
    assert build_intervention("random_dictionary:seed=3").name == "random_dictionary(seed=3)"


# --------------------------------------------------------------------------- sizes: ‖x' − x‖ = ε per token


@pytest.mark.parametrize("spec", ["cov_random_mixture", "cov_random_mixture:origin=x", "real_direction",
                                  "real_direction:origin=x", "epsilon_error_cov"])
def test_step_is_the_sae_error_size(spec):
    p = build(spec)
    fit_x, fit_hat = error_pair(3000, 0)
    for f in fittable([p]):
        f.fit(fit_x)
    for f in error_fittable([p]):
        f.fit_error(fit_x, fit_hat)
    x = anisotropic(500, seed=9) * torch.logspace(-1, 1.5, 500).unsqueeze(1)  # norms over 2.5 decades
    # ε/‖x‖ from ~0.05 to ~1 (a float32 x' − x cannot resolve an ε far below ‖x‖'s rounding)
    scale = (0.05 + torch.rand(500, 1, generator=gen(11))) * x.norm(dim=-1, keepdim=True) / D**0.5
    x_hat = x + torch.randn(x.shape, generator=gen(10)) * scale
    out = p(x, x_hat, gen(12))
    eps = np.linalg.norm(x.double().numpy() - x_hat.double().numpy(), axis=1)
    step = np.linalg.norm(out.double().numpy() - x.double().numpy(), axis=1)
    np.testing.assert_allclose(step, eps, rtol=1e-4)
    assert torch.equal(p(x, x.clone(), gen(12)), x)  # ε = 0: x' = x exactly


# --------------------------------------------------------------------------- cov_random_mixture


def test_cov_random_mixture_fit_is_the_activations_gaussian():
    acts = anisotropic(4000, seed=1)
    state, summary = baselines.fit_gaussian(acts)
    cov = np_cov(acts)
    np.testing.assert_allclose(state.mean.double().numpy(), acts.double().numpy().mean(0), atol=1e-5)
    lam = baselines.DRAW_RIDGE * np.trace(cov) / D
    factor = state.factor.double().numpy()
    np.testing.assert_allclose(factor @ factor.T, cov + lam * np.eye(D), rtol=1e-5, atol=1e-6)
    # many draws L z have covariance Σ within sampling error (Var S_ij = (Σ_ii Σ_jj + Σ_ij²) / N for Gaussians)
    n = 50_000
    draws = (torch.randn(n, D, generator=gen(2)) @ state.factor.T).double().numpy()
    se = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / n)
    assert (np.abs(np.cov(draws, rowvar=False) - cov) / se).max() < 5
    assert summary["top_eigenvalue_share"] == pytest.approx(np.linalg.eigvalsh(cov)[-1] / np.trace(cov), rel=1e-9)


def test_cov_random_mixture_directions_follow_the_covariance():
    """origin=sample: directions of v1 − v2 (v ~ N(μ, Σ)); origin=x: of v − x, for one token, against numpy draws."""
    acts = anisotropic(4000, seed=1)
    mean, cov = acts.double().numpy().mean(0), np_cov(acts)
    rng = np.random.default_rng(0)
    n = 40_000
    for origin in ("sample", "x"):
        p = build(f"cov_random_mixture:origin={origin}")
        p.fit(acts)
        x = torch.full((n, D), 2.0)
        x_hat = x + 1.0
        got = step_directions(p, x, x_hat)
        v1 = rng.multivariate_normal(mean, cov, size=n)
        start = rng.multivariate_normal(mean, cov, size=n) if origin == "sample" else x.double().numpy()
        assert_same_distribution(got, unit_np(v1 - start))
    iso = unit_np(rng.standard_normal((n, D)))  # and not the isotropic distribution
    with pytest.raises(AssertionError, match="standard errors"):
        assert_same_distribution(step_directions(build_fitted("cov_random_mixture", acts), x, x_hat), iso)


def build_fitted(spec: str, acts: torch.Tensor):
    p = build(spec)
    p.fit(acts)
    return p


# --------------------------------------------------------------------------- real_direction


@pytest.mark.parametrize("origin", ["other", "x"])
def test_real_direction_steps_along_a_difference_of_fit_activations(origin):
    bank = anisotropic(8, seed=3)
    p = build_fitted(f"real_direction:origin={origin}", bank)
    n = 20_000
    x = anisotropic(n, seed=4)
    x_hat = x + 0.5
    got = step_directions(p, x, x_hat)  # [n d]
    b, xs = bank.double().numpy(), x.double().numpy()
    if origin == "other":  # every direction is (a_j − a_k)/‖a_j − a_k‖ for exactly one ordered pair j ≠ k
        pairs = [(j, k) for j in range(8) for k in range(8) if j != k]
        dirs = unit_np(np.array([b[j] - b[k] for j, k in pairs]))  # [56 d]
        match = got @ dirs.T > 1 - 1e-5
        assert (match.sum(1) == 1).all()
        counts = match.sum(0)  # uniform over the 56 ordered pairs: each ~357 times
        expected = n / len(pairs)
        assert np.abs(counts - expected).max() < 5 * np.sqrt(expected)
    else:  # (a_j − x)/‖a_j − x‖ for one j per token, each j ~ 1/8 of the tokens
        cand = unit_np((b[None, :, :] - xs[:, None, :]).reshape(-1, D)).reshape(n, 8, D)
        match = np.einsum("nd,njd->nj", got, cand) > 1 - 1e-5
        assert (match.sum(1) == 1).all()
        assert np.abs(match.sum(0) - n / 8).max() < 5 * np.sqrt(n / 8)


def test_real_direction_equal_rows_stay_finite():
    bank = torch.ones(5, D)  # every difference is zero: a random direction stands in, at the right size
    p = build_fitted("real_direction", bank)
    x = torch.randn(10, D, generator=gen(0))
    out = p(x, x + 1.0, gen(1))
    np.testing.assert_allclose((out - x).norm(dim=-1).numpy(), np.full(10, np.sqrt(D)), rtol=1e-5)


# --------------------------------------------------------------------------- epsilon_error_cov, sae_minus_offset


def test_epsilon_error_cov_follows_the_errors_covariance_not_the_activations():
    fit_x, fit_hat = error_pair(6000, 20)
    p = build("epsilon_error_cov")
    p.fit_error(fit_x, fit_hat)
    n = 40_000
    x = torch.zeros(n, D)
    x_hat = x - 1.0
    got = step_directions(p, x, x_hat)
    rng = np.random.default_rng(1)
    err_cov = np_cov(fit_x - fit_hat)
    assert_same_distribution(got, unit_np(rng.multivariate_normal(np.zeros(D), err_cov, size=n)))
    with pytest.raises(AssertionError, match="standard errors"):  # x's covariance is another shape
        assert_same_distribution(got, unit_np(rng.multivariate_normal(np.zeros(D), np_cov(fit_x), size=n)))
    summary = fit_summary(p)
    assert summary["top_eigenvalue_share"] == pytest.approx(np.linalg.eigvalsh(err_cov)[-1] / np.trace(err_cov), rel=1e-9)


def test_sae_minus_offset_removes_the_mean_error_and_records_its_share():
    fit_x, fit_hat = error_pair(5000, 30)
    p = build("sae_minus_offset")
    p.fit_error(fit_x, fit_hat)
    e = fit_x.double().numpy() - fit_hat.double().numpy()
    e_bar = e.mean(0)
    x, x_hat = error_pair(300, 40)
    np.testing.assert_allclose(p(x, x_hat, gen(0)).double().numpy(), x_hat.double().numpy() + e_bar, rtol=1e-6,
                               atol=1e-6)
    summary = fit_summary(p)
    mean_sq = (e**2).sum(1).mean()
    assert summary["error_offset_norm"] == pytest.approx(np.linalg.norm(e_bar), rel=1e-9)
    assert summary["error_offset_frac"] == pytest.approx(np.linalg.norm(e_bar) / np.sqrt(mean_sq), rel=1e-9)
    # mean ‖e‖² = ‖ē‖² + mean ‖e − ē‖²: the constant part's share plus the token-specific part's is 1
    token_part = ((e - e_bar) ** 2).sum(1).mean() / mean_sq
    assert summary["error_offset_energy_share"] + token_part == pytest.approx(1.0, abs=1e-9)
    assert 0.05 < summary["error_offset_energy_share"] < 0.9  # the test's error has both parts
    assert fit_summary(build_error_fitted("epsilon_error_cov", fit_x, fit_hat))["error_offset_frac"] == \
        summary["error_offset_frac"]


def build_error_fitted(spec: str, x: torch.Tensor, x_hat: torch.Tensor):
    p = build(spec)
    p.fit_error(x, x_hat)
    return p


# --------------------------------------------------------------------------- epsilon_mahalanobis


@pytest.mark.parametrize("ridge", [None, 0.3])
def test_epsilon_mahalanobis_matches_the_error_in_the_inverse_covariance_metric(ridge):
    acts = anisotropic(5000, seed=5, scales=torch.logspace(-1.5, 0.5, D))  # variances over 4 decades
    p = build_fitted("epsilon_mahalanobis" + ("" if ridge is None else f":ridge={ridge}"), acts)
    ridge = baselines.MAHALANOBIS_RIDGE if ridge is None else ridge
    cov = np_cov(acts)
    lam = ridge * np.trace(cov) / D
    metric = np.linalg.inv(cov + lam * np.eye(D))
    n = 20_000
    x = anisotropic(n, seed=6)
    x_hat = x + torch.randn(n, D, generator=gen(7)) * (0.05 + torch.rand(n, 1, generator=gen(8)))
    delta = p(x, x_hat, gen(9)).double().numpy() - x.double().numpy()
    e = x.double().numpy() - x_hat.double().numpy()
    size = lambda v: np.sqrt(np.einsum("nd,de,ne->n", v, metric, v))  # noqa: E731
    np.testing.assert_allclose(size(delta), size(e), rtol=1e-4)
    # the direction is isotropic (uniform on the sphere): E[u uᵀ] = I/d
    assert_same_distribution(unit_np(delta), unit_np(np.random.default_rng(2).standard_normal((n, D))))
    summary = fit_summary(p)
    assert summary["ridge"] == ridge and summary["ridge_abs"] == pytest.approx(lam, rel=1e-9)
    values = np.linalg.eigvalsh(cov)
    assert summary["condition_number"] == pytest.approx((values[-1] + lam) / (values[0] + lam), rel=1e-6)
    assert torch.equal(p(x, x.clone(), gen(9)), x)


# --------------------------------------------------------------------------- pca_matched


def np_pca_k(x: np.ndarray, x_hat: np.ndarray) -> tuple[int, float, float, np.ndarray, np.ndarray]:
    """(k, EV_k, EV_sae, mean, basis [d k]) by direct residuals: the smallest k whose projection explains at least
    the SAE's variance, 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖²."""
    mean = x.mean(0)
    c = x - mean
    total = (c**2).sum()
    ev_sae = 1 - ((x - x_hat) ** 2).sum() / total
    _, vectors = np.linalg.eigh(c.T @ c)
    vectors = vectors[:, ::-1]
    for k in range(0, x.shape[1] + 1):
        basis = vectors[:, :k]
        ev = 1 - ((c - c @ basis @ basis.T) ** 2).sum() / total
        if ev >= ev_sae or k == x.shape[1]:
            return k, ev, ev_sae, mean, basis
    raise AssertionError


@pytest.mark.parametrize("noise", [0.3, 0.8, 1.5])
def test_pca_matched_k_and_explained_variance(noise):
    x = anisotropic(4000, d=12, seed=10, scales=torch.logspace(-1, 0.6, 12))
    x_hat = x + noise * torch.randn(x.shape, generator=gen(11)) * 0.5
    p = build("pca_matched")
    p.fit_error(x, x_hat)
    k, ev, ev_sae, mean, basis = np_pca_k(x.double().numpy(), x_hat.double().numpy())
    summary = fit_summary(p)
    assert summary["k"] == k and 0 < k < 12
    assert summary["ev_sae"] == pytest.approx(ev_sae, abs=1e-9)
    assert summary["ev_pca"] == pytest.approx(ev, abs=1e-6) and summary["ev_pca"] >= summary["ev_sae"]
    held = anisotropic(200, d=12, seed=12, scales=torch.logspace(-1, 0.6, 12)).double().numpy()
    expected = mean + (held - mean) @ basis @ basis.T
    got = p(torch.tensor(held, dtype=torch.float32), torch.zeros(200, 12), gen(0)).double().numpy()
    assert (np.linalg.norm(got - expected, axis=1) / np.linalg.norm(expected, axis=1)).max() < 1e-4


def test_pca_matched_with_no_variance_explained_is_the_fit_mean():
    x = anisotropic(500, seed=13)
    p = build("pca_matched")
    p.fit_error(x, x + 10.0 * torch.randn(x.shape, generator=gen(14)))
    assert fit_summary(p)["k"] == 0 and fit_summary(p)["ev_sae"] < 0
    out = p(x[:5], x[:5], gen(0))
    np.testing.assert_allclose(out.numpy(), np.broadcast_to(x.double().numpy().mean(0), (5, D)), rtol=1e-5)


# --------------------------------------------------------------------------- random_dictionary


def np_omp(x: np.ndarray, dictionary: np.ndarray, n_atoms: int) -> np.ndarray:
    """Textbook OMP per row in float64: the atom most correlated with the residual, then least squares on all."""
    out = np.zeros_like(x)
    for i, row in enumerate(x):
        support, residual = [], row.copy()
        for _ in range(n_atoms):
            corr = np.abs(dictionary @ residual)
            corr[support] = -1
            support.append(int(corr.argmax()))
            coef, *_ = np.linalg.lstsq(dictionary[support].T, row, rcond=None)
            residual = row - dictionary[support].T @ coef
        out[i] = row - residual
    return out


def test_omp_equals_textbook_omp_and_recovers_sparse_codes():
    dictionary = random_unit_dictionary(64, 16, seed=0)
    assert dictionary.shape == (64, 16)
    np.testing.assert_allclose(dictionary.norm(dim=-1).numpy(), 1.0, rtol=1e-6)
    x = torch.randn(60, 16, generator=gen(1))
    got = omp(x, dictionary, 5).double().numpy()
    expected = np_omp(x.double().numpy(), dictionary.double().numpy(), 5)
    assert (np.linalg.norm(got - expected, axis=1) / np.linalg.norm(expected, axis=1)).max() < 1e-4
    # exactly 2-sparse rows are recovered exactly when the dictionary's coherence is below 1/(2·2 − 1) (Tropp 2004)
    incoherent = random_unit_dictionary(32, 256, seed=1)
    gram = (incoherent @ incoherent.T).abs() - torch.eye(32)
    assert gram.max() < 1 / 3
    support = torch.stack([torch.randperm(32, generator=gen(i))[:2] for i in range(40)])
    coef = torch.randn(40, 2, generator=gen(2))
    sparse = (coef.unsqueeze(-1) * incoherent[support]).sum(1)
    assert ((omp(sparse, incoherent, 2) - sparse).norm(dim=-1) / sparse.norm(dim=-1)).max() < 1e-5
    with pytest.raises(ValueError, match="n_atoms=17"):
        omp(x, dictionary, 17)


def test_random_dictionary_has_the_sae_width_and_l0():
    x = anisotropic(1500, d=16, seed=15, scales=torch.linspace(0.2, 2, 16))
    x_hat = x + 0.3 * torch.randn(x.shape, generator=gen(16))
    l0 = torch.full((1500,), 4.6)
    p = build("random_dictionary")
    p.fit_sae(x, x_hat, l0, 64)
    summary = fit_summary(p)
    assert (summary["d_sae"], summary["n_atoms"], summary["seed"]) == (64, 5, 0)
    assert p.state.dictionary.shape == (64, 16)
    assert torch.equal(p.state.dictionary, random_unit_dictionary(64, 16, seed=0))
    mean = x.double().numpy().mean(0)
    held = anisotropic(50, d=16, seed=17, scales=torch.linspace(0.2, 2, 16))
    expected = mean + np_omp(held.double().numpy() - mean, p.state.dictionary.double().numpy(), 5)
    got = p(held, held, gen(0)).double().numpy()
    assert (np.linalg.norm(got - expected, axis=1) / np.linalg.norm(expected, axis=1)).max() < 1e-4
    rows = x[: baselines.EV_ROWS].double().numpy()
    coded = mean + np_omp(rows - mean, p.state.dictionary.double().numpy(), 5)
    ev = 1 - ((rows - coded) ** 2).sum() / ((rows - rows.mean(0)) ** 2).sum()
    assert summary["ev_random_dictionary"] == pytest.approx(ev, abs=1e-5) and 0 < ev < 1
    other = build("random_dictionary:seed=3")
    other.fit_sae(x, x_hat, torch.full((1500,), 100.0), 64)  # an L0 above d is capped at d: x' = x
    assert fit_summary(other)["n_atoms"] == 16 and not torch.equal(other.state.dictionary, p.state.dictionary)
    np.testing.assert_allclose(other(held, held, gen(0)).numpy(), held.numpy(), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- what every fit records


def test_a_nearly_degenerate_covariance_is_flagged():
    scales = torch.ones(D)
    scales[2] = 10.0  # one axis holds 100 / 105 of the variance
    wide = anisotropic(3000, seed=18, scales=scales)
    for spec in ("cov_random_mixture", "real_direction", "epsilon_mahalanobis"):
        summary = fit_summary(build_fitted(spec, wide))
        values = np.linalg.eigvalsh(np_cov(wide))
        assert summary["top_eigenvalue_share"] == pytest.approx(values[-1] / values.sum(), rel=1e-9)
        assert summary["top_eigenvalue_share"] > 0.9 and summary["nearly_degenerate"] is True
    assert fit_summary(build_fitted("cov_random_mixture", anisotropic(3000, seed=18)))["nearly_degenerate"] is False


def test_explained_variance_is_the_reports_definition():
    from klgap.report.aggregate import explained_variance

    x, x_hat = error_pair(400, 50)
    xs, err = x.double(), x.double() - x_hat.double()
    sides = [{"n": 400, "sum_x": xs.sum(0).tolist(), "sum_sq_x": float((xs**2).sum()), "sum_sq_err": float((err**2).sum())}]
    assert baselines.explained_variance(x, x_hat) == pytest.approx(explained_variance(sides), rel=1e-9)


def test_epsilon_anisotropic_records_its_top_eigenvalue_share():
    """The covariance behind the existing anisotropic baseline is flagged the same way (issue 31: one dimension held
    78% of the variance at a committed site)."""
    scales = torch.ones(D)
    scales[0] = 10.0
    wide = anisotropic(3000, seed=19, scales=scales)
    p = build_fitted("epsilon_anisotropic", wide)
    values = np.linalg.eigvalsh(np_cov(wide))
    assert fit_summary(p) == {"d": D, "top_eigenvalue_share": pytest.approx(values[-1] / values.sum(), rel=1e-9),
                              "nearly_degenerate": True}
