"""The formulas and fits of the baselines the field argues about (issue 31; METHOD.md §9), as plain functions.

Each baseline is a fit on the run's fit tokens (``--fit-tokens N``: tokens drawn after the measured ones; else the
run's first contexts) returning ``(state, summary)`` — the state the formula needs and a flat dict of what the fit
found, which the engine records in run.json / report.json ``execution["fitted"][name]`` — and a formula
``apply(state, x, x_hat, generator) -> x'`` on ``[n d]`` tensors (x' float32). ε = ‖x − x̂‖ and e = x − x̂ per token.

``cov_random_mixture`` and ``real_direction`` follow Lee & Heimersheim 2024 (arXiv 2410.12555); their code
(github.com/dajale423/error_pathology, ``scripts/sensitive_direction.py``: ``covariance_random``, ``real_direction``)
differs from klgap's in five places:

1. direction: theirs is (v − x)/‖v − x‖, from the token towards one sampled point v (``origin="x"`` here); klgap's
   default is v1 − v2 (two samples; two real activations), as METHOD.md §9 describes the baseline. With the default,
   v1 − v2 ~ N(0, 2Σ), so after the rescale ``cov_random_mixture`` has exactly ``epsilon_anisotropic``'s distribution;
2. draws: theirs draws one v (``multiNormal.sample()``, one random real activation) per forward pass, shared by
   every token of the batch; klgap draws per token from the run's generator;
3. length: theirs is an absolute length swept over 1, 11, …, 201; klgap's is the SAE's ε per token;
4. fit: theirs fits μ and Σ (``torch.cov``) on every position of the very tokens it measures, the first included;
   klgap fits on the measured positions of the fit tokens (held out with ``--fit-tokens``);
5. real activations: theirs draws from every activation of the dataset, the measured token itself included;
   klgap's from the fit tokens.

(Their ``error_eval.py`` has a covariance variant of the ε-preserving error too,
``l2_error_preserving_perturbation_hook_covariance``, but it overwrites its Gaussian sample with ``randn_like``, so
it is the isotropic baseline.)

Random baselines rescaled to a size (the first four) never give NaN: where the drawn direction is zero (two equal
activations, a token equal to a sample) a random unit direction stands in, drawn in every call so the random stream
does not depend on the data; where the size is 0, x' = x exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from klgap_perturbations.covariance import Covariance, error_offset
from klgap_perturbations.geometry import epsilon_anisotropic, random_unit, row_norm, safe_ratio, unit
from klgap_perturbations.sparse import omp, random_unit_dictionary

#: ridge of the covariance factors drawn from (relative to the mean variance; as epsilon_anisotropic)
DRAW_RIDGE = 1e-6
#: epsilon_mahalanobis's default ridge: Σ + λI with λ = MAHALANOBIS_RIDGE · tr Σ / d
MAHALANOBIS_RIDGE = 1e-2
#: random_dictionary's explained variance on the fit tokens is measured on at most this many of them (OMP is costly)
EV_ROWS = 1024

Summary = dict[str, float | int | str | bool]


def explained_variance(x: Tensor, x_hat: Tensor) -> float:
    """1 − Σ‖x − x̂‖² / Σ‖x − x̄‖² over the rows of ``x, x_hat: [n d]`` (float64): the definition of
    klgap.report.aggregate.explained_variance, on one set of rows."""
    x, x_hat = x.double(), x_hat.double()
    total = float((x - x.mean(0)).pow(2).sum())
    return 1.0 - float((x - x_hat).pow(2).sum()) / total if total > 0 else 0.0


def along(x: Tensor, size: Tensor, direction: Tensor, generator: torch.Generator) -> Tensor:
    """x + size · direction/‖direction‖ per token (``size: [n 1]``); a random unit direction where it is zero."""
    stand_in = random_unit(x.shape[0], x.shape[1], generator, x.device).to(x.dtype)
    step = torch.where(row_norm(direction) > 0, unit(direction), stand_in)
    return (x + size * step).float()


# --------------------------------------------------------------------------- cov_random_mixture


@dataclass(frozen=True)
class GaussianFit:
    """N(mean, L Lᵀ) fitted on the site's activations: ``mean [d]``, ``factor [d d]`` (float32, on the fit device)."""

    mean: Tensor
    factor: Tensor


def fit_gaussian(acts: Tensor) -> tuple[GaussianFit, Summary]:
    cov = Covariance.of(acts)
    return GaussianFit(cov.mean.float(), cov.factor(DRAW_RIDGE)), {"d": cov.d, "ridge": DRAW_RIDGE, **cov.summary()}


def cov_random_mixture(state: GaussianFit, x: Tensor, x_hat: Tensor, generator: torch.Generator,
                       origin: str = "sample") -> Tensor:
    """x' = x + ε·(v1 − s)/‖v1 − s‖, v1 ~ N(μ, Σ) per token; s = v2 ~ N(μ, Σ) another draw (``origin="sample"``) or
    s = x, the token itself (``origin="x"``: Lee & Heimersheim's code, a step from x towards a sampled point)."""
    n, d = x.shape
    mean, factor = state.mean.to(x), state.factor.to(x)
    z1 = torch.randn(n, d, generator=generator, device=x.device, dtype=torch.float32).to(x.dtype)
    z2 = torch.randn(n, d, generator=generator, device=x.device, dtype=torch.float32).to(x.dtype)
    v1, v2 = mean + z1 @ factor.T, mean + z2 @ factor.T
    return along(x, row_norm(x - x_hat), v1 - (v2 if origin == "sample" else x), generator)


# --------------------------------------------------------------------------- real_direction


@dataclass(frozen=True)
class ActivationBank:
    """The fit tokens' activations ``rows [m d]`` (float32, m ≥ 2), which real_direction draws from."""

    rows: Tensor


def fit_bank(acts: Tensor) -> tuple[ActivationBank, Summary]:
    cov = Covariance.of(acts)
    return ActivationBank(acts.float().clone()), {"d": cov.d, "bank_rows": int(acts.shape[0]), **cov.summary()}


def real_direction(state: ActivationBank, x: Tensor, x_hat: Tensor, generator: torch.Generator,
                   origin: str = "other") -> Tensor:
    """x' = x + ε·(a_j − s)/‖a_j − s‖, a_j a fit token's activation drawn uniformly per token; s = a_k, another fit
    token (k ≠ j, ``origin="other"``), or s = x (``origin="x"``: Lee & Heimersheim's code)."""
    n, m = x.shape[0], state.rows.shape[0]
    j = torch.randint(0, m, (n,), generator=generator, device=x.device)
    k = (j + 1 + torch.randint(0, m - 1, (n,), generator=generator, device=x.device)) % m  # uniform over k ≠ j
    rows = state.rows
    a_j, a_k = rows[j.to(rows.device)].to(x), rows[k.to(rows.device)].to(x)
    return along(x, row_norm(x - x_hat), a_j - (a_k if origin == "other" else x), generator)


# --------------------------------------------------------------------------- epsilon_error_cov, sae_minus_offset


def fit_error_gaussian(x: Tensor, x_hat: Tensor) -> tuple[Tensor, Summary]:
    """L ``[d d]`` with L Lᵀ = the centred covariance of e = x − x̂ (+ DRAW_RIDGE · mean variance · I); the summary
    holds its top eigenvalue share and the error's constant part (:func:`~klgap_perturbations.covariance.error_offset`)."""
    cov = Covariance.of(x.double() - x_hat.double())
    return cov.factor(DRAW_RIDGE), {"d": cov.d, "ridge": DRAW_RIDGE, **cov.summary(), **error_offset(x, x_hat).summary()}


def epsilon_error_cov(state: Tensor, x: Tensor, x_hat: Tensor, generator: torch.Generator) -> Tensor:
    """x' = x + ε·L z/‖L z‖, z ~ N(0, I), L Lᵀ = Σ_e: a Gaussian direction shaped like the SAE's error at its size
    (the formula of epsilon_anisotropic with the error's covariance in place of the activations')."""
    return epsilon_anisotropic(x, x_hat, generator, state)


def fit_offset(x: Tensor, x_hat: Tensor) -> tuple[Tensor, Summary]:
    """ē ``[d]`` (float32), the mean of e = x − x̂ over the fit tokens, and the sizes of ē and e."""
    offset = error_offset(x, x_hat)
    return offset.mean.float(), offset.summary()


def sae_minus_offset(state: Tensor, x: Tensor, x_hat: Tensor, generator: torch.Generator) -> Tensor:
    """x' = x̂ + ē: the SAE with its constant error removed (x − x' = e − ē, the token-specific error)."""
    return (x_hat + state.to(x_hat)).float()


# --------------------------------------------------------------------------- epsilon_mahalanobis


def fit_whitener(acts: Tensor, ridge: float) -> tuple[Tensor, Summary]:
    """W = (Σ + λI)^(-1/2) ``[d d]`` (float32), Σ the activations' centred covariance, λ = ridge · tr Σ / d."""
    cov = Covariance.of(acts)
    lam = cov.ridge_abs(ridge)
    values = cov.eigen[0]
    return cov.inverse_sqrt(ridge), {"d": cov.d, "ridge": ridge, "ridge_abs": lam,
                                     "condition_number": float((values[0] + lam) / (values[-1] + lam)), **cov.summary()}


def epsilon_mahalanobis(state: Tensor, x: Tensor, x_hat: Tensor, generator: torch.Generator) -> Tensor:
    """x' = x + δ, δ = u · ‖e‖_M / ‖u‖_M with u uniform on the unit sphere and
    ‖v‖_M = ‖W v‖ = sqrt(vᵀ(Σ + λI)⁻¹v):
    an isotropic direction whose Mahalanobis length equals the SAE error's (x' = x where e = 0)."""
    whitener = state.to(x)
    u = random_unit(x.shape[0], x.shape[1], generator, x.device).to(x.dtype)
    size = safe_ratio(row_norm((x - x_hat) @ whitener), row_norm(u @ whitener))
    return (x + size * u).float()


# --------------------------------------------------------------------------- pca_matched


@dataclass(frozen=True)
class Projection:
    """x' = mean + (x − mean) B Bᵀ: ``mean [d]``, ``basis [d k]`` (orthonormal columns; k may be 0)."""

    mean: Tensor
    basis: Tensor


def fit_pca(x: Tensor, x_hat: Tensor) -> tuple[Projection, Summary]:
    """The top-k principal components of the fit tokens' x, k the smallest with explained variance ≥ the SAE's there
    (k = 0, x' = the fit mean, when the SAE's is ≤ 0)."""
    cov = Covariance.of(x)
    ev_sae = explained_variance(x, x_hat)
    curve = cov.explained()  # [d]: EV of the top 1..d components
    k = 0 if ev_sae <= 0 else min(cov.d, int((curve < ev_sae).sum()) + 1)
    basis = cov.eigen[1][:, :k].float().contiguous()
    return Projection(cov.mean.float(), basis), {"d": cov.d, "k": k, "ev_sae": ev_sae,
                                                 "ev_pca": float(curve[k - 1]) if k else 0.0, **cov.summary()}


def pca_matched(state: Projection, x: Tensor, x_hat: Tensor, generator: torch.Generator) -> Tensor:
    mean, basis = state.mean.to(x), state.basis.to(x)
    return (mean + ((x - mean) @ basis) @ basis.T).float()


# --------------------------------------------------------------------------- random_dictionary


@dataclass(frozen=True)
class RandomCoder:
    """A random unit-norm dictionary ``[d_sae d]`` coding x − mean with ``n_atoms`` atoms by OMP."""

    mean: Tensor
    dictionary: Tensor
    n_atoms: int

    def reconstruct(self, x: Tensor) -> Tensor:
        if self.n_atoms >= x.shape[1]:  # OMP's residual is 0 after d atoms of a spanning (random: a.s.) dictionary
            return x.float().clone()
        mean = self.mean.to(x)
        return (mean + omp(x - mean, self.dictionary, self.n_atoms).to(x)).float()


def fit_random_coder(x: Tensor, x_hat: Tensor, l0: Tensor, d_sae: int, seed: int) -> tuple[RandomCoder, Summary]:
    """A dictionary of the SAE's width d_sae (rows uniform on the sphere, from `seed`), n_atoms = the SAE's mean L0 on
    the fit tokens rounded (at least 1, at most d); the mean of the fit tokens' x stands in for the SAE's b_dec. The
    summary compares both coders' explained variance on the first EV_ROWS fit tokens."""
    d = x.shape[1]
    l0_mean = float(l0.double().mean())
    coder = RandomCoder(x.double().mean(0).float(), random_unit_dictionary(d_sae, d, seed, x.device),
                        int(min(max(1, round(l0_mean)), d, d_sae)))
    rows, rows_hat = x[:EV_ROWS], x_hat[:EV_ROWS]
    return coder, {"d": d, "d_sae": d_sae, "l0_mean": l0_mean, "n_atoms": coder.n_atoms, "seed": seed,
                   "ev_rows": int(rows.shape[0]), "ev_sae": explained_variance(rows, rows_hat),
                   "ev_random_dictionary": explained_variance(rows, coder.reconstruct(rows))}


def random_dictionary(state: RandomCoder, x: Tensor, x_hat: Tensor, generator: torch.Generator) -> Tensor:
    return state.reconstruct(x)


__all__ = ["ActivationBank", "GaussianFit", "Projection", "RandomCoder", "along", "cov_random_mixture",
           "epsilon_error_cov", "epsilon_mahalanobis", "explained_variance", "fit_bank", "fit_error_gaussian",
           "fit_gaussian", "fit_offset", "fit_pca", "fit_random_coder", "fit_whitener", "pca_matched",
           "random_dictionary", "real_direction", "sae_minus_offset"]
