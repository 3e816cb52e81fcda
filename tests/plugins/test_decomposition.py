"""The error decomposition's perturbations (klgap_perturbations.decomposition): the ridge fit of e = x − x̂ from x,
the four interventions and their norms, on synthetic errors whose linear part is known."""

from __future__ import annotations

import pytest
import torch

from klgap.plugins.capabilities import error_fittable, error_splitter, fittable
from klgap.errors import KlgapError
from klgap_perturbations import geometry
from klgap_perturbations.decomposition import DECOMPOSITION_FACTORIES, fit_linear_error
from tests.plugins.test_perturbations import perturbation_registry

D = 16
NAMES = ("sae_plus_linear_error", "sae_plus_nonlinear_error", "epsilon_random_nonlinear", "epsilon_random_linear")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def acts(n: int, seed: int) -> torch.Tensor:
    """``[n D]`` anisotropic Gaussian activations with an offset (scales 0.2..3)."""
    return torch.randn(n, D, generator=gen(seed)) * torch.linspace(0.2, 3.0, D) + 0.5


def linear_error_pair(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, x̂) whose error e = x − x̂ is exactly x Mᵀ + c (M, c fixed by seed 100)."""
    x = acts(n, seed)
    M, c = 0.3 * torch.randn(D, D, generator=gen(100)), torch.randn(D, generator=gen(101))
    return x, x - (x @ M.T + c)


def noise_error_pair(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, x̂) whose error is Gaussian noise independent of x."""
    x = acts(n, seed)
    return x, x - torch.randn(n, D, generator=gen(seed + 1000))


def mixed_error_pair(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, x̂) whose error is part linear in x, part independent noise (both parts of comparable size)."""
    x, x_hat = linear_error_pair(n, seed)
    return x, x_hat - 2.0 * torch.randn(n, D, generator=gen(seed + 2000))


def fitted(name: str, pair) -> object:
    p = perturbation_registry().get(name)()
    p.fit_error(*pair)
    return p


def r2(p, x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """1 − Σ‖e_nl‖² / Σ‖e‖² on (x, x̂) — the report's R² (klgap.report.decomposition.r2) on one context."""
    _, e_nl = p.error_parts(x, x_hat)
    return 1.0 - float(e_nl.double().pow(2).sum() / (x - x_hat).double().pow(2).sum())


def test_registered_and_declare_the_error_capabilities():
    built = {name: perturbation_registry().get(name)() for name in NAMES}
    assert set(DECOMPOSITION_FACTORIES) == set(NAMES)
    assert error_fittable(built.values()) == list(built.values())
    assert fittable(built.values()) == []  # fitted on (x, x̂), not on x alone
    assert error_splitter(built.values()) is built["sae_plus_linear_error"]
    assert {n for n, p in built.items() if p.stochastic} == {"epsilon_random_nonlinear", "epsilon_random_linear"}


def test_not_fitted_and_bad_parameters():
    p = perturbation_registry().get("sae_plus_linear_error")()
    x, x_hat = linear_error_pair(8, 0)
    with pytest.raises(RuntimeError, match="not fitted"):
        p(x, x_hat, gen(0))
    with pytest.raises(KlgapError, match="takes no parameters"):
        perturbation_registry().get("epsilon_random_linear")(scale="2")
    p.fit_error(x, x_hat)
    with pytest.raises(ValueError, match="16-wide"):
        p(torch.zeros(4, 8), torch.zeros(4, 8), gen(0))


def test_exactly_linear_error_gives_r2_one_and_x_back():
    p = fitted("sae_plus_linear_error", linear_error_pair(4096, 0))
    x, x_hat = linear_error_pair(2048, 1)  # held out: other tokens
    assert r2(p, x, x_hat) == pytest.approx(1.0, abs=1e-9)
    out = p(x, x_hat, gen(0))  # x̂ + e_lin = x
    assert torch.allclose(out, x, atol=1e-4 * float(x.abs().max()))
    assert fitted("sae_plus_nonlinear_error", linear_error_pair(4096, 0))(x, x_hat, gen(0)) == pytest.approx(x_hat, abs=1e-4)


def test_independent_noise_error_gives_r2_near_zero():
    p = fitted("sae_plus_linear_error", noise_error_pair(8192, 0))
    x, x_hat = noise_error_pair(8192, 1)
    held_out = r2(p, x, x_hat)
    assert abs(held_out) < 0.01  # the fit explains nothing out of sample (in-sample it overfits by ~D/n)
    e_lin, e_nl = p.error_parts(x, x_hat)
    assert float(e_lin.norm(dim=-1).mean() / (x - x_hat).norm(dim=-1).mean()) < 0.1


def test_the_fit_matches_lstsq():
    """Without a ridge the centred normal equations give lstsq's solution of [x 1] β = e."""
    x, x_hat = acts(1000, 3), acts(1000, 4)
    fit = fit_linear_error(x, x_hat, ridge=0.0)
    design = torch.cat([x.double(), torch.ones(1000, 1, dtype=torch.float64)], dim=1)
    beta = torch.linalg.lstsq(design, (x - x_hat).double()).solution  # [D+1 D]
    assert torch.allclose(fit.weight.double(), beta[:D].T, atol=1e-5)
    assert torch.allclose(fit.bias.double(), beta[D], atol=1e-5)


@pytest.mark.parametrize("pair", [mixed_error_pair, noise_error_pair])
def test_twins_match_their_parts_norms(pair):
    x, x_hat = pair(1000, 7)
    train = pair(4096, 8)
    e_lin, e_nl = fitted("sae_plus_linear_error", train).error_parts(x, x_hat)
    rows = lambda t: t.double().norm(dim=-1)  # noqa: E731
    for name, part in (("epsilon_random_nonlinear", e_nl), ("sae_plus_linear_error", e_nl),
                       ("epsilon_random_linear", e_lin), ("sae_plus_nonlinear_error", e_lin)):
        out = fitted(name, train)(x, x_hat, gen(5))
        assert torch.allclose(rows(out - x), rows(part), rtol=1e-4, atol=0), name


def test_twins_draw_like_epsilon_random():
    """The twin's direction is epsilon_random's under the same generator: only the norm differs."""
    x, x_hat = noise_error_pair(200, 9)
    twin = fitted("epsilon_random_linear", noise_error_pair(4096, 10))(x, x_hat, gen(11))
    base = geometry.epsilon_random(x, x_hat, gen(11))
    unit = lambda t: t / t.norm(dim=-1, keepdim=True)  # noqa: E731
    assert torch.allclose(unit(twin - x), unit(base - x), atol=1e-5)


def test_fit_memory_is_chunked(monkeypatch):
    """The normal equations are accumulated a chunk at a time: the same fit from chunks of 7 rows."""
    from klgap_perturbations import decomposition

    x, x_hat = linear_error_pair(100, 12)
    whole = fit_linear_error(x, x_hat)
    monkeypatch.setattr(decomposition, "FIT_CHUNK", 7)
    chunked = fit_linear_error(x, x_hat)
    assert torch.allclose(whole.weight, chunked.weight, atol=1e-5) and torch.allclose(whole.bias, chunked.bias, atol=1e-5)
