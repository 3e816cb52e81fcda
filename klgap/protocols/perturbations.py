"""Perturbations (x -> x') and the optional capabilities a perturbation may declare."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

# --------------------------------------------------------------------------- perturbations


@runtime_checkable
class Perturbation(Protocol):
    """Builds the substitute x' from the clean activation x and the SAE's reconstruction x̂.

    Called per batch with every token at once: ``x, x_hat: [n, d]`` float32, same device.
    Returns ``x_prime: [n, d]`` float32. Random perturbations draw only from `generator`
    (on x's device) so that a run is reproducible.

    stochastic: True if it draws random numbers (the many-samples mode draws it N times).
    geometry:   what it matches, for tests and readers: a dict with any of
                ``{"norm": "x"|"x_hat"|float, "distance": "eps", "cos": "sae"|float}``.
    """

    name: str
    stochastic: bool
    geometry: dict[str, Any]

    def __call__(self, x: Tensor, x_hat: Tensor, generator: torch.Generator) -> Tensor: ...


@runtime_checkable
class FittablePerturbation(Protocol):
    """Optional capability of a perturbation: statistics of the site's clean activations, fitted first.

    The engine calls ``fit(acts)`` once per run, before any batch, with ``acts: [n, d]`` float32 clean
    activations of the run's first contexts (centred like the SAE's input; the same tokens on every resume),
    on the run's device. ``epsilon_anisotropic`` fits the activations' covariance this way.
    """

    def fit(self, acts: Tensor) -> None: ...


@runtime_checkable
class ErrorFittablePerturbation(Protocol):
    """Optional capability of a perturbation: a fit of the SAE's error on the site's clean activations, first.

    The engine calls ``fit_error(x, x_hat)`` once per run, before any batch, on the same fit tokens as
    :class:`FittablePerturbation` (``--fit-tokens N``: N tokens drawn after the measured ones; else the run's first
    contexts): ``x, x_hat: [n, d]`` float32, x centred like the SAE's input and x̂ the SAE's reconstruction of it.
    The error decomposition (klgap_perturbations.decomposition) fits e = x − x̂ ≈ W x + b this way.
    """

    def fit_error(self, x: Tensor, x_hat: Tensor) -> None: ...


@runtime_checkable
class SaeFittablePerturbation(Protocol):
    """Optional capability of a perturbation: a fit that needs the SAE's size as well as x and x̂.

    The engine calls ``fit_sae(x, x_hat, l0, d_sae)`` once per run, before any batch, on the same fit tokens as
    :class:`ErrorFittablePerturbation`: ``x, x_hat: [n, d]`` float32 as there, ``l0: [n]`` float32 the SAE's
    active features per token, ``d_sae`` its width. ``random_dictionary`` draws a dictionary of the SAE's width
    and codes each token with the SAE's mean L0 atoms this way.
    """

    def fit_sae(self, x: Tensor, x_hat: Tensor, l0: Tensor, d_sae: int) -> None: ...


@runtime_checkable
class ContextFittablePerturbation(Protocol):
    """Optional capability of a perturbation: a fit on whole contexts, every position included.

    The engine calls ``fit_contexts(acts)`` once per run, before any batch, with ``acts: [c, n, d]`` float32: the
    clean site activations (centred like the SAE's input) at *every* position of the first ``n_fit_contexts``
    contexts of the fit source (``--fit-tokens``' contexts, else the run's first; fewer when the source holds
    fewer), position 0 and the tokens ``--mask-special`` masks included. ``mean_ablation:over=batch64`` takes the
    study's mean this way (a batch of 64 contexts, BOS included).
    """

    n_fit_contexts: int

    def fit_contexts(self, acts: Tensor) -> None: ...


@runtime_checkable
class FitSummary(Protocol):
    """Optional capability of a fitted perturbation: what its fit found, for the report.

    ``fit_summary()`` is read once after the fit and returns a flat dict of numbers, strings and bools (e.g.
    ``{"k": 37, "top_eigenvalue_share": 0.78}``); the engine merges it into run.json's
    ``execution["fitted"][name]``, which report.json carries as it is.
    """

    def fit_summary(self) -> dict[str, float | int | str | bool]: ...


@runtime_checkable
class ErrorSplitter(Protocol):
    """Optional capability of a perturbation: the SAE's error split into two parts, ``e = e_lin + e_nl``.

    ``error_parts(x, x_hat)`` with ``x, x_hat: [n, d]`` returns ``(e_lin, e_nl)``, each ``[n, d]`` float32. When a
    run holds one, every measured row gets the columns ``eps_lin = ‖e_lin‖`` and ``eps_nl = ‖e_nl‖`` and the
    report an error-decomposition section (klgap/report/decomposition.py).
    """

    def error_parts(self, x: Tensor, x_hat: Tensor) -> tuple[Tensor, Tensor]: ...


@runtime_checkable
class ErrorNormPredictor(Protocol):
    """Optional capability of an :class:`ErrorSplitter`: a prediction of the error's squared norm from x alone.

    ``predict_error_sq(x)`` with ``x: [n, d]`` returns ``[n]`` float32, a linear function of x fitted on the fit
    tokens (Engels et al. 2024's regression of ‖e‖² on x, "most of the norm"). When the run's splitter declares it,
    the run's side sums hold the residual of that prediction and the report its held-out R².
    """

    def predict_error_sq(self, x: Tensor) -> Tensor: ...


@runtime_checkable
class BaselineRole(Protocol):
    """Optional capability of a perturbation: whether the SAE is judged against it (the report's baseline panel).

    ``baseline_label`` is how a sentence names the baseline ("isotropic noise", "another token's error"), a
    non-empty string; None says the perturbation is not a baseline (the SAE itself, its variants, controls such as
    ``zero``, curve points). The engine records it per intervention in run.json (``interventions[].baseline``) and
    the report lists the baselines it measured (``baselines``); the panel (klgap/report/panel.py) compares the SAE
    with each of them and the page opens with all of them, never one alone when several were measured.
    """

    baseline_label: str | None


@runtime_checkable
class DescribedPerturbation(Protocol):
    """Optional capability of a perturbation: what its x' is, in one sentence (``description``, a str).

    The engine records a non-empty description per intervention in run.json (``interventions[].definition``) and
    the report lists them (``definitions``) under its interventions table, so a reader sees e.g. over which tokens
    ``mean_ablation`` took its mean.
    """

    description: str


@runtime_checkable
class EveryPositionPerturbation(Protocol):
    """Optional capability of a perturbation: in all-token mode it replaces the site at *every* position of each
    context when ``every_position`` is True — position 0 and the tokens ``--mask-special`` masks included — while
    only the run's measured tokens are measured. ``zero`` declares it: sae_lens's ``get_recons_loss`` zero-ablates
    every position (its ignored tokens are left unpatched for the SAE only), and kl_div_score / ce_loss_score are
    defined against that ablation. At the masked positions the perturbation gets the SAE's view of those tokens.
    """

    every_position: bool


@runtime_checkable
class FrozenErrorPerturbation(Protocol):
    """Optional capability of a perturbation: in a joint run (several sites patched in one forward) it sees, at
    each site, x̂ = x − e_clean when ``frozen_error`` is True: e_clean the SAE's error on that site's *clean*
    activation, x the activation the patched forward gives the site (nothing re-encoded). ``error_add`` declares
    it (x' = x − e_clean: each site's clean SAE error added to what reaches it). A site alone sees x̂ as always.
    """

    frozen_error: bool


@runtime_checkable
class SkipFreePerturbation(Protocol):
    """Optional capability of a perturbation: with ``without_skip`` True it is handed a skip transcoder's output
    without its skip term as x̂ (``x̂ − x_in @ W_skipᵀ``), so a run shows what the skip contributes
    (``transcoder_no_skip``). A run whose substitute has no skip term refuses it."""

    without_skip: bool


class PerturbationFactory(Protocol):
    """Registered under a name; called with the user's parameters (``cosine_matched:cos=0.8``)."""

    def __call__(self, **params: Any) -> Perturbation: ...


__all__ = ['BaselineRole', 'ContextFittablePerturbation', 'DescribedPerturbation', 'ErrorFittablePerturbation', 'ErrorNormPredictor', 'ErrorSplitter', 'EveryPositionPerturbation', 'FitSummary', 'FittablePerturbation', 'FrozenErrorPerturbation', 'Perturbation', 'PerturbationFactory', 'SaeFittablePerturbation', 'SkipFreePerturbation']
