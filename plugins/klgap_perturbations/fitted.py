"""The baselines of issue 31 as perturbation objects, each declaring the fit it needs (klgap.protocols):

- ``fit(acts)`` (FittablePerturbation): ``cov_random_mixture``, ``real_direction``, ``epsilon_mahalanobis``;
- ``fit_error(x, x_hat)`` (ErrorFittablePerturbation): ``epsilon_error_cov``, ``pca_matched``, ``sae_minus_offset``;
- ``fit_sae(x, x_hat, l0, d_sae)`` (SaeFittablePerturbation): ``random_dictionary``;

and ``fit_summary()`` (FitSummary): what the fit found (k, eigenvalue shares, ‖ē‖/‖e‖, ...), which the engine writes
to ``execution["fitted"][name]`` of run.json and report.json. The formulas: :mod:`klgap_perturbations.baselines`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from klgap_perturbations import baselines
from klgap_perturbations.geometry import as_float32
from klgap_perturbations.params import check_names, parse_choice, parse_float, parse_int
from klgap_perturbations.perturbations import FormulaPerturbation

Fitted = tuple[Any, baselines.Summary]


@dataclass
class FittedBaseline(FormulaPerturbation):
    """A formula ``apply(state, x, x̂, generator)`` whose state comes from a fit; :meth:`fit_summary` says what the
    fit found. Subclasses add the one fit method the engine calls."""

    apply: Callable[[Any, Tensor, Tensor, torch.Generator], Tensor] | None = None
    state: Any = None
    summary: baselines.Summary = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.fn = self._apply

    def _apply(self, x: Tensor, x_hat: Tensor, generator: torch.Generator) -> Tensor:
        if self.state is None:
            raise RuntimeError(f"{self.name} was not fitted: the engine fits it on the fit tokens before any batch")
        return self.apply(self.state, as_float32(x), as_float32(x_hat), generator)

    def fit_summary(self) -> baselines.Summary:
        return dict(self.summary)

    def _check(self, x: Tensor, x_hat: Tensor | None = None) -> None:
        if x.dim() != 2 or x.shape[0] < 2 or (x_hat is not None and x_hat.shape != x.shape):
            raise ValueError(f"{self.name}: the fit needs [n >= 2, d] rows (x and x_hat alike), got {tuple(x.shape)}"
                             + ("" if x_hat is None else f" and {tuple(x_hat.shape)}"))


@dataclass
class ActivationFitted(FittedBaseline):
    """Fitted on the fit tokens' clean activations (klgap.protocols.FittablePerturbation)."""

    fitter: Callable[[Tensor], Fitted] | None = None

    def fit(self, acts: Tensor) -> None:
        self._check(acts)
        self.state, self.summary = self.fitter(acts)


@dataclass
class ErrorFitted(FittedBaseline):
    """Fitted on the fit tokens' x and the SAE's x̂ (klgap.protocols.ErrorFittablePerturbation)."""

    fitter: Callable[[Tensor, Tensor], Fitted] | None = None

    def fit_error(self, x: Tensor, x_hat: Tensor) -> None:
        self._check(x, x_hat)
        self.state, self.summary = self.fitter(x, x_hat)


@dataclass
class SaeFitted(FittedBaseline):
    """Fitted on x, x̂, the SAE's L0 per token and its width (klgap.protocols.SaeFittablePerturbation)."""

    fitter: Callable[[Tensor, Tensor, Tensor, int], Fitted] | None = None

    def fit_sae(self, x: Tensor, x_hat: Tensor, l0: Tensor, d_sae: int) -> None:
        self._check(x, x_hat)
        if l0.shape != (x.shape[0],) or d_sae < 1:
            raise ValueError(f"{self.name}: fit_sae needs l0 [n={x.shape[0]}] and d_sae >= 1, got "
                             f"{tuple(l0.shape)} and {d_sae}")
        self.state, self.summary = self.fitter(x, x_hat, l0, d_sae)


def _named(name: str, given: dict[str, Any], values: dict[str, Any]) -> str:
    """`name` alone without parameters; else ``name(key=value,...)`` with the parsed values (keys sorted)."""
    if not given:
        return name
    shown = ",".join(f"{k}={values[k]:g}" if isinstance(values[k], float) else f"{k}={values[k]}" for k in sorted(given))
    return f"{name}({shown})"


def cov_random_mixture(**params: Any) -> ActivationFitted:
    """x + ε·(v1 − v2)/‖v1 − v2‖, v1, v2 ~ N(μ, Σ) of the site's activations (origin=x: v1 − x, the authors' code)."""
    check_names("cov_random_mixture", params, ("origin",))
    origin = parse_choice("cov_random_mixture", "origin", params.get("origin", "sample"), ("sample", "x"))
    return ActivationFitted(
        _named("cov_random_mixture", params, {"origin": origin}), fn=None, stochastic=True, geometry={"distance": "eps"},
        description=cov_random_mixture.__doc__ or "", fitter=baselines.fit_gaussian,
        baseline_label="a covariance-shaped error" if origin == "sample" else "a step towards a covariance-shaped sample",
        apply=lambda state, x, x_hat, g: baselines.cov_random_mixture(state, x, x_hat, g, origin))


def real_direction(**params: Any) -> ActivationFitted:
    """x + ε·(a_j − a_k)/‖a_j − a_k‖, a_j, a_k two fit tokens' activations (origin=x: a_j − x, the authors' code)."""
    check_names("real_direction", params, ("origin",))
    origin = parse_choice("real_direction", "origin", params.get("origin", "other"), ("other", "x"))
    return ActivationFitted(
        _named("real_direction", params, {"origin": origin}), fn=None, stochastic=True, geometry={"distance": "eps"},
        description=real_direction.__doc__ or "", fitter=baselines.fit_bank,
        baseline_label="the difference of two real activations" if origin == "other"
        else "a step towards another token's activation",
        apply=lambda state, x, x_hat, g: baselines.real_direction(state, x, x_hat, g, origin))


def epsilon_error_cov(**params: Any) -> ErrorFitted:
    """x + ε·u, u drawn from N(0, Σ_e), Σ_e the covariance of the SAE's error on the fit tokens."""
    check_names("epsilon_error_cov", params, ())
    return ErrorFitted("epsilon_error_cov", fn=None, stochastic=True, geometry={"distance": "eps"},
                       description=epsilon_error_cov.__doc__ or "", fitter=baselines.fit_error_gaussian,
                       baseline_label="noise shaped like the SAE error's covariance",
                       apply=baselines.epsilon_error_cov)


def epsilon_mahalanobis(**params: Any) -> ActivationFitted:
    """x + δ, δ a uniform random direction with ‖δ‖_M = ‖e‖_M in the metric (Σ + λI)⁻¹, λ = ridge·tr Σ/d."""
    check_names("epsilon_mahalanobis", params, ("ridge",))
    ridge = parse_float("epsilon_mahalanobis", "ridge", params.get("ridge", baselines.MAHALANOBIS_RIDGE), 1e-12, None)
    return ActivationFitted(
        _named("epsilon_mahalanobis", params, {"ridge": ridge}), fn=None, stochastic=True,
        geometry={"mahalanobis_distance": "eps"}, description=epsilon_mahalanobis.__doc__ or "",
        baseline_label="noise of the SAE error's Mahalanobis size",
        fitter=lambda acts: baselines.fit_whitener(acts, ridge), apply=baselines.epsilon_mahalanobis)


def pca_matched(**params: Any) -> ErrorFitted:
    """x projected on the top-k principal components of the fit tokens, k so that its EV matches the SAE's there."""
    check_names("pca_matched", params, ())
    return ErrorFitted("pca_matched", fn=None, stochastic=False, geometry={}, description=pca_matched.__doc__ or "",
                       baseline_label="PCA at the SAE's explained variance",
                       fitter=baselines.fit_pca, apply=baselines.pca_matched)


def random_dictionary(**params: Any) -> SaeFitted:
    """OMP on a random unit-norm dictionary of the SAE's width, with the SAE's mean L0 atoms per token (seed=S)."""
    check_names("random_dictionary", params, ("seed",))
    seed = parse_int("random_dictionary", "seed", params.get("seed", 0), 0, 2**63 - 1)
    return SaeFitted(_named("random_dictionary", params, {"seed": seed}), fn=None, stochastic=False, geometry={},
                     description=random_dictionary.__doc__ or "",
                     baseline_label="a random dictionary of the SAE's width and L0",
                     fitter=lambda x, x_hat, l0, d_sae: baselines.fit_random_coder(x, x_hat, l0, d_sae, seed),
                     apply=baselines.random_dictionary)


def sae_minus_offset(**params: Any) -> ErrorFitted:
    """x̂ + ē: the SAE with its constant error (the mean of e over the fit tokens) added back."""
    check_names("sae_minus_offset", params, ())
    return ErrorFitted("sae_minus_offset", fn=None, stochastic=False, geometry={},
                       description=sae_minus_offset.__doc__ or "", fitter=baselines.fit_offset,
                       apply=baselines.sae_minus_offset)


#: name -> (factory, one-line description), registered with the other built-in perturbations
BASELINE_FACTORIES: dict[str, tuple[Callable[..., FittedBaseline], str]] = {
    "cov_random_mixture": (cov_random_mixture, "x + ε·(v1 − v2)/‖v1 − v2‖, v1, v2 ~ N(μ, Σ) of the site "
                           "(Lee & Heimersheim 2024; origin=sample|x)"),
    "real_direction": (real_direction, "x + ε·(a_j − a_k)/‖a_j − a_k‖: two other (fit) tokens' activations "
                       "(origin=other|x)"),
    "epsilon_error_cov": (epsilon_error_cov, "x + ε·u, u ~ N(0, Σ_e): shaped like the SAE error's covariance"),
    "epsilon_mahalanobis": (epsilon_mahalanobis, "x + δ, δ uniform in direction, ‖δ‖ = ‖e‖ in the Σ⁻¹ metric "
                            "(ridge=R, default 0.01)"),
    "pca_matched": (pca_matched, "x projected on the top-k PCs of the fit tokens, k matching the SAE's EV"),
    "random_dictionary": (random_dictionary, "OMP on a random dictionary of the SAE's width and mean L0 (seed=S)"),
    "sae_minus_offset": (sae_minus_offset, "x̂ + ē: the SAE with its constant error ē removed"),
}
