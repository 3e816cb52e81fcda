"""The SAE's error split into a part linear in x and the rest (Engels et al. 2024, arXiv 2410.14670).

A ridge least-squares fit ``e ≈ W x + b`` of the SAE's error ``e = x − x̂`` from the clean activation x, on fit
tokens the run does not measure (``--fit-tokens N``; klgap/job/loading.py: fit_perturbations). Then per token
``e_lin = W x + b`` and ``e_nl = e − e_lin``, and four interventions, each with its random twin at the same
per-token norm:

- ``sae_plus_linear_error``:    x' = x̂ + e_lin   (only the nonlinear error left);  twin ``epsilon_random_nonlinear``: x + ‖e_nl‖·u
- ``sae_plus_nonlinear_error``: x' = x̂ + e_nl    (only the linear error left);     twin ``epsilon_random_linear``:    x + ‖e_lin‖·u

u is uniform on the unit sphere per token, drawn as `epsilon_random` draws it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from klgap_perturbations.geometry import as_float32, random_unit, row_norm
from klgap_perturbations.perturbations import FormulaPerturbation

#: ridge strength relative to the mean diagonal of the centred xᵀx (keeps the normal equations well posed)
RIDGE = 1e-6
FIT_CHUNK = 4096  # rows of x accumulated into xᵀx at a time (float64 copies of this many rows only)


@dataclass(frozen=True)
class LinearErrorFit:
    """``e ≈ x @ weight.T + bias``: weight ``[d d]``, bias ``[d]`` (float32), fitted on `n_fit` tokens; and the
    regression of the error's squared norm on x, ``‖e‖² ≈ x @ norm_weight + norm_bias`` (Engels et al.'s "most of
    the norm" predictor, here with an intercept and the same ridge)."""

    weight: Tensor  # [d_out=d, d_in=d]
    bias: Tensor  # [d]
    n_fit: int
    ridge: float
    norm_weight: Tensor  # [d]
    norm_bias: float

    def predict_norm_sq(self, x: Tensor) -> Tensor:
        """``x: [n d]`` -> the predicted ‖e‖² ``[n]`` in x's float dtype (float32 at least)."""
        x = as_float32(x)
        return x @ self.norm_weight.to(device=x.device, dtype=x.dtype) + self.norm_bias

    def predict(self, x: Tensor) -> Tensor:
        """``x: [n d]`` -> e_lin ``[n d]`` in x's float dtype (float32 at least)."""
        x = as_float32(x)
        return x @ self.weight.to(device=x.device, dtype=x.dtype).T + self.bias.to(device=x.device, dtype=x.dtype)


@torch.no_grad()
def fit_linear_error(x: Tensor, x_hat: Tensor, ridge: float = RIDGE) -> LinearErrorFit:
    """Ridge least squares of ``e = x − x̂`` and of ``‖e‖²`` on ``[x, 1]`` (``x, x_hat: [n d]``) by the float64
    normal equations.

    Centred: ``W = (XcᵀXc + λI)⁻¹ XcᵀEc`` with ``λ = ridge · mean diag(XcᵀXc)``, ``b = ē − W x̄`` (the bias is not
    penalised); the same for the target ‖e‖². Memory O(d²) beyond the inputs: xᵀx and xᵀe are accumulated
    FIT_CHUNK rows at a time.
    """
    if x.shape != x_hat.shape or x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"the error fit needs x and x_hat of one shape [n >= 2, d], got {tuple(x.shape)} and "
                         f"{tuple(x_hat.shape)}")
    n, d = x.shape
    f64 = dict(dtype=torch.float64, device=x.device)
    sum_x, sum_e = torch.zeros(d, **f64), torch.zeros(d + 1, **f64)
    xtx, xte = torch.zeros(d, d, **f64), torch.zeros(d, d + 1, **f64)
    for start in range(0, n, FIT_CHUNK):
        xs = x[start : start + FIT_CHUNK].double()
        es = xs - x_hat[start : start + FIT_CHUNK].double()
        es = torch.cat([es, (es**2).sum(-1, keepdim=True)], dim=1)  # [chunk d+1]: e and ‖e‖²
        sum_x += xs.sum(0)
        sum_e += es.sum(0)
        xtx += xs.T @ xs
        xte += xs.T @ es
    mean_x, mean_e = sum_x / n, sum_e / n
    xtx_c = xtx - n * torch.outer(mean_x, mean_x)  # [d_in d_in]
    xte_c = xte - n * torch.outer(mean_x, mean_e)  # [d_in d_out+1]
    lam = ridge * float(xtx_c.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny))
    system = xtx_c + lam * torch.eye(d, **f64)
    coef = torch.linalg.solve(system, xte_c)  # [d_in d_out+1]
    bias = mean_e - mean_x @ coef
    return LinearErrorFit(weight=coef[:, :d].T.float().contiguous(), bias=bias[:d].float(), n_fit=n, ridge=ridge,
                          norm_weight=coef[:, d].float().contiguous(), norm_bias=float(bias[d]))


@dataclass
class ErrorPartPerturbation(FormulaPerturbation):
    """A formula of (x, x̂, e_lin, e_nl) that needs the linear error fit first: ``fit_error(x [n, d], x̂ [n, d])``
    (klgap.protocols.ErrorFittablePerturbation), called by the engine on the run's fit tokens."""

    part_fn: Callable[[Tensor, Tensor, Tensor, Tensor, torch.Generator], Tensor] | None = None
    state: LinearErrorFit | None = None
    fit_info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.fn = self._apply

    def fit_error(self, x: Tensor, x_hat: Tensor) -> None:
        self.state = fit_linear_error(x, x_hat)
        self.fit_info = {"n_activations": int(x.shape[0]), "d": int(x.shape[1]), "ridge": self.state.ridge}

    def error_parts(self, x: Tensor, x_hat: Tensor) -> tuple[Tensor, Tensor]:
        """``x, x_hat: [n d]`` -> (e_lin, e_nl), each ``[n d]`` float32 (klgap.protocols.ErrorSplitter)."""
        if self.state is None:
            raise RuntimeError(f"{self.name} was not fitted: call .fit_error(x [n, d], x_hat [n, d]) first")
        x, x_hat = as_float32(x), as_float32(x_hat)
        if self.state.weight.shape[0] != x.shape[1]:
            raise ValueError(f"{self.name} was fitted on {self.state.weight.shape[0]}-wide activations, not {x.shape[1]}")
        e_lin = self.state.predict(x)
        return e_lin, (x - x_hat) - e_lin

    def predict_error_sq(self, x: Tensor) -> Tensor:
        """``x: [n d]`` -> the linear prediction of ‖x − x̂‖² from x, ``[n]`` float32
        (klgap.protocols.ErrorNormPredictor)."""
        if self.state is None:
            raise RuntimeError(f"{self.name} was not fitted: call .fit_error(x [n, d], x_hat [n, d]) first")
        return self.state.predict_norm_sq(x)

    def _apply(self, x: Tensor, x_hat: Tensor, generator: torch.Generator) -> Tensor:
        e_lin, e_nl = self.error_parts(x, x_hat)
        return self.part_fn(as_float32(x), as_float32(x_hat), e_lin, e_nl, generator).float()


def _random_at(norm: Tensor, x: Tensor, generator: torch.Generator) -> Tensor:
    """x + norm·u, u uniform on the unit sphere per token (drawn as geometry.epsilon_random draws it)."""
    u = random_unit(x.shape[0], x.shape[1], generator, x.device).to(x.dtype)
    return x + norm * u


FORMULAS: dict[str, tuple[Callable[[Tensor, Tensor, Tensor, Tensor, torch.Generator], Tensor], bool, str]] = {
    "sae_plus_linear_error": (
        lambda x, x_hat, e_lin, e_nl, g: x_hat + e_lin, False,
        "x' = x̂ + e_lin: the SAE with its linearly predictable error added back (only the nonlinear error left)"),
    "sae_plus_nonlinear_error": (
        lambda x, x_hat, e_lin, e_nl, g: x_hat + e_nl, False,
        "x' = x̂ + e_nl: the SAE with its nonlinear error added back (only the linear error left)"),
    "epsilon_random_nonlinear": (
        lambda x, x_hat, e_lin, e_nl, g: _random_at(row_norm(e_nl), x, g), True,
        "x + ‖e_nl‖·u: a random error the size of the SAE's nonlinear error (twin of sae_plus_linear_error)"),
    "epsilon_random_linear": (
        lambda x, x_hat, e_lin, e_nl, g: _random_at(row_norm(e_lin), x, g), True,
        "x + ‖e_lin‖·u: a random error the size of the SAE's linear error (twin of sae_plus_nonlinear_error)"),
}


def _factory(name: str) -> Callable[..., ErrorPartPerturbation]:
    fn, stochastic, doc = FORMULAS[name]

    def factory(**params: Any) -> ErrorPartPerturbation:
        from klgap_perturbations.params import check_names

        check_names(name, params, ())
        return ErrorPartPerturbation(name, fn=None, stochastic=stochastic, geometry={}, description=doc, part_fn=fn)

    factory.__doc__ = doc
    return factory


#: name -> (factory, one-line description), registered with the other built-in perturbations
DECOMPOSITION_FACTORIES = {name: (_factory(name), FORMULAS[name][2]) for name in FORMULAS}
