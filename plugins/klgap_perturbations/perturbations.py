"""Perturbation objects (klgap.protocols.Perturbation) and the factories that build them.

Each factory takes the user's parameters as keyword strings (``cosine_matched:cos=0.8`` calls
``cosine_matched(cos="0.8")``), checks them and returns a :class:`FormulaPerturbation`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from klgap_perturbations import geometry
from klgap_perturbations.covariance import Covariance
from klgap_perturbations.params import check_names, parse_choice, parse_float

#: cosine_matched's defaults (both may be overridden: ``cosine_matched:cos=0.8,norm_frac=0.9``).
COSINE_MATCHED_DEFAULTS = {"cos": 0.9, "norm_frac": 1.0}


@dataclass
class FormulaPerturbation:
    """A named formula ``fn(x, x_hat, generator) -> x_prime`` (``x, x_hat: [n, d]``; x' float32 [n, d]).

    baseline_label: how a sentence names it when the SAE is judged against it ("isotropic noise";
    klgap.protocols.BaselineRole); None: not a baseline."""

    name: str
    fn: Callable[[Tensor, Tensor, torch.Generator], Tensor]
    stochastic: bool
    geometry: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    baseline_label: str | None = None
    every_position: bool = False  # all-token mode: replaces every position (klgap.protocols.EveryPositionPerturbation)
    frozen_error: bool = False  # joint runs: x̂ = x − the clean error (klgap.protocols.FrozenErrorPerturbation)
    without_skip: bool = False  # handed a skip transcoder's x̂ without its skip term (klgap.protocols.SkipFreePerturbation)

    def __call__(self, x: Tensor, x_hat: Tensor, generator: torch.Generator) -> Tensor:
        if x.shape != x_hat.shape or x.dim() != 2:
            raise ValueError(f"{self.name}: x and x_hat must both be [n, d], got {tuple(x.shape)} and {tuple(x_hat.shape)}")
        return self.fn(x, x_hat, generator)


def _deterministic(name: str, fn: Callable[[Tensor, Tensor], Tensor], geom: dict[str, Any], doc: str):
    """A factory for a parameter-free, non-random formula ``fn(x, x_hat)``."""

    def factory(**params: Any) -> FormulaPerturbation:
        check_names(name, params, ())
        return FormulaPerturbation(name, lambda x, x_hat, generator: fn(x, x_hat), False, dict(geom), doc)

    factory.__doc__ = doc
    return factory


def epsilon_random(**params: Any) -> FormulaPerturbation:
    """x + ε·u: a random substitute at the SAE's L2 error ε = ‖x − x̂‖ (u uniform on the sphere)."""
    check_names("epsilon_random", params, ())
    return FormulaPerturbation(
        "epsilon_random", geometry.epsilon_random, True, {"distance": "eps"}, epsilon_random.__doc__ or "",
        baseline_label="isotropic noise",
    )


def theta_random(**params: Any) -> FormulaPerturbation:
    """Random x' at the SAE's cosine with x, norm ‖x̂‖ (``norm=x_hat``, default) or ‖x‖ (``norm=x``)."""
    check_names("theta_random", params, ("norm",))
    norm = parse_choice("theta_random", "norm", params.get("norm", "x_hat"), ("x_hat", "x"))
    name = "theta_random" if norm == "x_hat" else "theta_random(norm=x)"
    return _theta(name, norm)


def theta_random_xnorm(**params: Any) -> FormulaPerturbation:
    """Random x' at the SAE's cosine with x and norm ‖x‖ (theta_random with norm=x)."""
    check_names("theta_random_xnorm", params, ())
    return _theta("theta_random_xnorm", "x")


def _theta(name: str, norm: str) -> FormulaPerturbation:
    return FormulaPerturbation(
        name,
        lambda x, x_hat, generator: geometry.theta_random(x, x_hat, generator, norm=norm),
        True,
        {"norm": norm, "cos": "sae"},
        f"random x' with cos(x, x') = cos(x, x̂) and norm ‖{'x̂' if norm == 'x_hat' else 'x'}‖",
        baseline_label=f"a random substitute at the SAE's cosine and {'its norm' if norm == 'x_hat' else '‖x‖'}",
    )


def error_add(**params: Any) -> FormulaPerturbation:
    """x' = x − e_clean: in a joint run each site's SAE error on its clean activation added to the activation the
    patched forward gives it (no re-encoding); alone, x' = x̂ (the SAE)."""
    check_names("error_add", params, ())
    return FormulaPerturbation(
        "error_add", lambda x, x_hat, generator: geometry.sae(x, x_hat), False, {"distance": "eps"},
        "x' = x + (x̂ − x) with the SAE's error of the clean activation (joint runs: not re-encoded)",
        frozen_error=True)


def cosine_matched(**params: Any) -> FormulaPerturbation:
    """Random x' with cos(x, x') = cos and ‖x'‖ = norm_frac·‖x‖ (defaults cos=0.9, norm_frac=1)."""
    check_names("cosine_matched", params, COSINE_MATCHED_DEFAULTS)
    cos = parse_float("cosine_matched", "cos", params.get("cos", COSINE_MATCHED_DEFAULTS["cos"]), -1.0, 1.0)
    frac = parse_float(
        "cosine_matched", "norm_frac", params.get("norm_frac", COSINE_MATCHED_DEFAULTS["norm_frac"]), 0.0, None
    )
    return FormulaPerturbation(
        f"cosine_matched(cos={cos:g},norm_frac={frac:g})",
        lambda x, x_hat, generator: geometry.cosine_matched(x, x_hat, generator, cos=cos, norm_frac=frac),
        True,
        {"cos": cos, "norm": frac, "norm_of": "x"},
        f"random x' with cos(x, x') = {cos:g} and norm {frac:g}·‖x‖",
    )


@dataclass
class FittedPerturbation(FormulaPerturbation):
    """A formula that needs statistics of the site's clean activations first: ``fit(acts [n, d])``.

    The engine calls :meth:`fit` once per run, before any batch, with the clean activations of the run's
    first contexts (the same tokens on every resume, so results stay reproducible).
    """

    fit_fn: Callable[[Tensor], Any] | None = None
    state: Any = None
    fit_info: dict[str, Any] = field(default_factory=dict)
    summary_fn: Callable[[Tensor], dict[str, float | int | str | bool]] | None = None

    def fit(self, acts: Tensor) -> None:
        if acts.dim() != 2 or acts.shape[0] < 2:
            raise ValueError(f"{self.name}: fit needs [n >= 2, d] activations, got {tuple(acts.shape)}")
        self.state = self.fit_fn(acts)
        self.fit_info = {"n_activations": int(acts.shape[0]), "d": int(acts.shape[1])}
        if self.summary_fn is not None:
            self.fit_info |= self.summary_fn(acts)

    def fit_summary(self) -> dict[str, float | int | str | bool]:
        """What the fit found (klgap.protocols.FitSummary), e.g. the covariance's top eigenvalue share."""
        return {k: v for k, v in self.fit_info.items() if k != "n_activations"}

    def __call__(self, x: Tensor, x_hat: Tensor, generator: torch.Generator) -> Tensor:
        if self.state is None:
            raise RuntimeError(f"{self.name} was not fitted: call .fit(clean activations [n, d]) first")
        return super().__call__(x, x_hat, generator)


def epsilon_anisotropic(**params: Any) -> FittedPerturbation:
    """x + ε·u with u drawn from the activations' covariance at the site (the SAE's ε; fitted per run)."""
    check_names("epsilon_anisotropic", params, ())
    perturbation = FittedPerturbation(
        "epsilon_anisotropic", lambda x, x_hat, generator: geometry.epsilon_anisotropic(x, x_hat, generator, perturbation.state),
        True, {"distance": "eps"}, epsilon_anisotropic.__doc__ or "", fit_fn=geometry.covariance_factor,
        summary_fn=lambda acts: Covariance.of(acts).summary(), baseline_label="noise drawn from the activations' covariance",
    )
    return perturbation


def sae_error_shuffled(**params: Any) -> FormulaPerturbation:
    """x + ε·e_j/‖e_j‖: another token's SAE error direction, rescaled to this token's ε."""
    check_names("sae_error_shuffled", params, ())
    return FormulaPerturbation(
        "sae_error_shuffled", geometry.sae_error_shuffled, True, {"distance": "eps"}, sae_error_shuffled.__doc__ or "",
        baseline_label="another token's error",
    )


def zero(**params: Any) -> FormulaPerturbation:
    """x' = 0, in all-token mode at every position of each context (position 0 and the tokens --mask-special masks
    included, measured where the run measures): the zero ablation sae_lens's get_recons_loss scores SAEs against."""
    check_names("zero", params, ())
    return FormulaPerturbation("zero", lambda x, x_hat, generator: geometry.zero(x, x_hat), False, {"norm": 0.0},
                               zero.__doc__ or "", every_position=True)


#: what x' = mean means for each ``mean_ablation:over=...`` (the description run.json and the page record)
MEAN_ABLATION_DEFINITIONS = {
    "batch": ("x' = the mean of x over the batch's patched tokens, one mean per batch: it depends on --batch-size, "
              "and the tokens --mask-special masks (position 0 unless --mask-special none) are left out; the study's "
              "mean_ablation_hook (activation.mean((0, 1)) over a batch of 64 contexts, BOS included) is this with "
              "--batch-size 64 --mask-special none"),
    "run": ("x' = the mean of x over the run's fit tokens (the tokens the run patches among its first contexts, or "
            "--fit-tokens held-out ones), one mean for the whole run: it does not depend on --batch-size"),
    "batch64": ("x' = the study's mean: the mean of x over a batch of 64 contexts at every position, BOS and the "
                "tokens --mask-special masks included (mean_ablation_hook's activation.mean((0, 1))), taken once "
                "from the run's first 64 contexts (--fit-tokens: the first 64 held-out ones; fewer when there are "
                "fewer) and patched at every token the run patches: it does not depend on --batch-size (the study "
                "takes a new mean for each batch of 64)"),
}


@dataclass
class ContextMeanPerturbation(FormulaPerturbation):
    """x' = one mean activation fitted on whole contexts, every position included (klgap.protocols.
    ContextFittablePerturbation): ``mean_ablation:over=batch64``."""

    n_fit_contexts: int = 64
    state: Tensor | None = None
    fit_info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.fn = lambda x, x_hat, generator: geometry.fixed_mean(x, self._fitted())

    def _fitted(self) -> Tensor:
        if self.state is None:
            raise RuntimeError(f"{self.name} was not fitted: call .fit_contexts(clean activations [c, n, d]) first")
        return self.state

    def fit_contexts(self, acts: Tensor) -> None:
        if acts.dim() != 3 or acts.shape[0] * acts.shape[1] < 2:
            raise ValueError(f"{self.name}: fit_contexts needs [c, n, d] activations, got {tuple(acts.shape)}")
        finite = torch.isfinite(acts).all(-1)  # [c n]
        self.state = acts[finite].double().mean(0)  # [d]: mean over (context, position), as activation.mean((0, 1))
        self.fit_info = {"over": "batch64", "mean_norm": float(self.state.norm()), "n_contexts_in_mean": acts.shape[0],
                         "definition": MEAN_ABLATION_DEFINITIONS["batch64"]}

    def fit_summary(self) -> dict[str, float | int | str | bool]:
        """What the fit found (klgap.protocols.FitSummary): the mean's norm and how many contexts it averages."""
        return dict(self.fit_info)


def mean_ablation(**params: Any) -> FormulaPerturbation:
    """x' = a mean activation, the same row for every token: ``over=batch`` (default) the batch's mean over its
    patched tokens, ``over=run`` the mean over the run's fit tokens (fitted once, like epsilon_anisotropic),
    ``over=batch64`` the study's: the mean over 64 contexts at every position, BOS included (fitted once)."""
    check_names("mean_ablation", params, ("over",))
    over = parse_choice("mean_ablation", "over", params.get("over", "batch"), tuple(MEAN_ABLATION_DEFINITIONS))
    if over == "batch64":
        return ContextMeanPerturbation("mean_ablation(over=batch64)", None, False, {"over": "batch64"},
                                       MEAN_ABLATION_DEFINITIONS["batch64"])
    if over == "batch":
        name = "mean_ablation" if not params else "mean_ablation(over=batch)"
        return FormulaPerturbation(name, lambda x, x_hat, generator: geometry.mean_ablation(x, x_hat), False,
                                   {"over": "batch"}, MEAN_ABLATION_DEFINITIONS["batch"])
    perturbation = FittedPerturbation(
        "mean_ablation(over=run)", lambda x, x_hat, generator: geometry.fixed_mean(x, perturbation.state), False,
        {"over": "run"}, MEAN_ABLATION_DEFINITIONS["run"], fit_fn=lambda acts: acts.double().mean(0),
        summary_fn=lambda acts: {"over": "run", "mean_norm": float(acts.double().mean(0).norm()),
                                 "definition": MEAN_ABLATION_DEFINITIONS["run"]},
    )
    return perturbation


#: name -> (factory, one-line description), in the order `klgap plugins` lists them.
FACTORIES: dict[str, tuple[Callable[..., FormulaPerturbation], str]] = {
    "sae": (
        _deterministic("sae", geometry.sae, {"norm": "x_hat", "cos": "sae", "distance": "eps"}, "x' = x̂"),
        "x' = x̂: the SAE reconstruction, the thing under test",
    ),
    "sae_norm_corrected": (
        _deterministic("sae_norm_corrected", geometry.sae_norm_corrected, {"norm": "x", "cos": "sae"}, "x̂·‖x‖/‖x̂‖"),
        "x̂·‖x‖/‖x̂‖: the SAE's direction at the true norm",
    ),
    "sae_norm": (
        _deterministic("sae_norm", geometry.sae_norm, {"norm": "x_hat", "cos": 1.0}, "x·‖x̂‖/‖x‖"),
        "x·‖x̂‖/‖x‖: only the SAE's norm shrinkage",
    ),
    "error_add": (error_add, "x' = x − e_clean: in a joint run each site's clean SAE error added, not re-encoded "
                             "(alone: x̂)"),
    "epsilon_random": (epsilon_random, "x + ε·u, u uniform on the sphere: the SAE's L2 error in a random direction"),
    "theta_random": (theta_random, "random x' at the SAE's cosine with x, norm ‖x̂‖ (norm=x_hat|x)"),
    "theta_random_xnorm": (theta_random_xnorm, "random x' at the SAE's cosine with x, norm ‖x‖"),
    "cosine_matched": (cosine_matched, "random x' at cos=C (default 0.9), norm norm_frac·‖x‖ (default 1)"),
    "identity": (
        _deterministic("identity", geometry.identity, {"norm": "x", "cos": 1.0, "distance": 0.0}, "x' = x"),
        "x' = x: a control, KL must be 0",
    ),
    "zero": (zero, "x' = 0 at every position of the context (BOS and masked tokens too): sae_lens's zero ablation"),
    "mean_ablation": (
        mean_ablation,
        "x' = a mean activation: over=batch (default) the batch's mean over its patched tokens, over=run the mean "
        "over the run's fit tokens, over=batch64 the study's mean over 64 contexts, BOS included",
    ),
    "epsilon_anisotropic": (
        epsilon_anisotropic,
        "x + ε·u, u drawn from the site's activation covariance (fitted on the run's clean activations)",
    ),
    "sae_error_shuffled": (
        sae_error_shuffled, "x + ε·(another token's SAE error direction): the SAE's error, shuffled across tokens"
    ),
}
