"""Length sweeps (Lee & Heimersheim 2024's "error extrapolation"): ``along:dir=D,t=T`` patches

- ``dir=error`` (default): x' = x + t·(x̂ − x), computed as ``torch.lerp(x, x̂, t)``, so t = 0 is x and t = 1 is the
  SAE's own substitute x̂, bit for bit; ‖x' − x‖ = t·ε with ε = ‖x − x̂‖;
- ``dir=NAME`` (a registered perturbation without parameters, e.g. a baseline): x' = x + t·ε·u with
  u = (x'_NAME − x)/‖x'_NAME − x‖ the unit direction of that perturbation's displacement at the token (a random unit
  direction where it is zero), so every direction is swept over the same lengths t·ε. For the baselines whose
  length is ε (epsilon_random, cov_random_mixture, real_direction, ...) t = 1 is that baseline up to rounding.

`klgap curve --along error --scale 0:2:21 --baselines ...` lists one ``along`` intervention per (direction, t); the
report's ``sweep`` section (klgap/report/sweep.py) draws KL against t and gives each direction's plateau width.
Each t draws its own random directions (the engine seeds every intervention apart), so a point's mean KL is an
average over directions at that length.

A fitted direction is fitted as that perturbation is (its fit methods are passed on), once per run and direction:
the wrappers of one direction share the fitted object when their fit inputs are equal (``torch.equal``), so 21
lengths of ``real_direction`` hold one bank of activations, not 21.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from klgap.errors import KlgapError
from klgap.plugins.capabilities import error_fittable, fit_summary, fittable, sae_fittable
from klgap_perturbations.baselines import along as step_along
from klgap_perturbations.geometry import as_float32, row_norm
from klgap_perturbations.params import check_names, parse_float

NAME = "along"
ERROR = "error"


def along_error(x: Tensor, x_hat: Tensor, t: float) -> Tensor:
    """x' = x + t·(x̂ − x) (``[n d]``, float32): x at t = 0, exactly x̂ at t = 1 (torch.lerp computes the upper half
    from x̂'s end)."""
    x, x_hat = as_float32(x), as_float32(x_hat)
    return torch.lerp(x, x_hat.to(x.dtype), float(t)).float()


def along_direction(x: Tensor, x_hat: Tensor, x_other: Tensor, t: float, generator: torch.Generator) -> Tensor:
    """x' = x + t·ε·u, u the unit direction of ``x_other − x`` per token (a random one where it is zero), ε = ‖x − x̂‖."""
    x, x_hat = as_float32(x), as_float32(x_hat)
    return step_along(x, float(t) * row_norm(x - x_hat), as_float32(x_other).to(x.dtype) - x, generator)


# --------------------------------------------------------------------------- sharing one direction's fit


@dataclass
class _Shared:
    """The last fit of one direction: its method, the inputs it saw and the fitted perturbation."""

    method: str
    inputs: tuple[Any, ...]
    fitted: Any


_LAST_FIT: dict[str, _Shared] = {}  # direction -> its last fit (replaced when the inputs change: another run)


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return len(a) == len(b) and all(
        (isinstance(u, Tensor) and isinstance(v, Tensor) and u.shape == v.shape and u.dtype == v.dtype
         and u.device == v.device and torch.equal(u, v)) or (not isinstance(u, Tensor) and u == v)
        for u, v in zip(a, b, strict=True))


@dataclass
class Along:
    """x + t·(a direction of length ε): a length-sweep point (klgap.protocols.Perturbation)."""

    direction: str
    t: float
    inner: Any = None  # the perturbation whose displacement gives the direction (None: the SAE's error)
    name: str = ""
    stochastic: bool = False
    geometry: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    baseline_label: str | None = None  # a sweep point is no baseline of the panel (klgap.protocols.BaselineRole)

    def __call__(self, x: Tensor, x_hat: Tensor, generator: torch.Generator) -> Tensor:
        if x.shape != x_hat.shape or x.dim() != 2:
            raise ValueError(f"{self.name}: x and x_hat must both be [n, d], got {tuple(x.shape)} and {tuple(x_hat.shape)}")
        if self.inner is None:
            return along_error(x, x_hat, self.t)
        return along_direction(x, x_hat, self.inner(x, x_hat, generator), self.t, generator)

    def _fit(self, method: str, *inputs: Any) -> None:
        shared = _LAST_FIT.get(self.direction)
        if shared is not None and shared.method == method and _same(shared.inputs, inputs):
            self.inner = shared.fitted
            return
        getattr(self.inner, method)(*inputs)
        _LAST_FIT[self.direction] = _Shared(method, inputs, self.inner)


class _Fit:
    def fit(self, acts: Tensor) -> None:
        self._fit("fit", acts)


class _FitError:
    def fit_error(self, x: Tensor, x_hat: Tensor) -> None:
        self._fit("fit_error", x, x_hat)


class _FitSae:
    def fit_sae(self, x: Tensor, x_hat: Tensor, l0: Tensor, d_sae: int) -> None:
        self._fit("fit_sae", x, x_hat, l0, d_sae)


class _Summary:
    def fit_summary(self) -> dict[str, float | int | str | bool]:
        return fit_summary(self.inner)


_CLASSES: dict[tuple[bool, bool, bool], type] = {}


def _class_for(inner: Any) -> type:
    """An :class:`Along` subclass declaring exactly the fit capabilities `inner` declares (one fit method: the
    shared fit above holds one method per direction; an inner with several is fitted by each, unshared)."""
    key = (bool(fittable([inner])), bool(error_fittable([inner])), bool(sae_fittable([inner])))
    if key not in _CLASSES:
        mixins = [m for m, has in zip((_Fit, _FitError, _FitSae), key, strict=True) if has]
        _CLASSES[key] = type("AlongFitted", (*mixins, _Summary, Along), {}) if mixins else Along
    return _CLASSES[key]


def along(**params: Any) -> Along:
    """x + t·(x̂ − x) (dir=error, the default) or x + t·ε·u, u the unit direction of perturbation dir's displacement."""
    from klgap.plan.resolve import build_intervention  # the registry of perturbations (this plugin's among them)

    check_names(NAME, params, ("dir", "t"))
    t = parse_float(NAME, "t", params.get("t", 1.0), 0.0, None)
    direction = str(params.get("dir", ERROR)).strip()
    name = f"{NAME}(dir={direction},t={t:g})"
    geometry = {"distance": "eps"} if t == 1 else {"distance": 0.0} if t == 0 else {"eps_multiple": t}
    if direction == ERROR:
        return Along(direction, t, None, name, False, geometry, f"x + {t:g}·(x̂ − x): the SAE's error, {t:g} times its length")
    if direction == NAME or not direction or any(c in direction for c in ":=(),"):
        raise KlgapError(f"intervention {NAME!r}: dir={direction!r} is not valid; dir is 'error' or the name of "
                         "another perturbation without parameters (e.g. dir=epsilon_random)")
    inner = build_intervention(direction).perturbation
    cls: Callable[..., Along] = _class_for(inner)
    return cls(direction, t, inner, name, bool(inner.stochastic) and t > 0, geometry,
               f"x + {t:g}·ε·u, u the unit direction of {direction}'s displacement")


#: registered with the other built-in perturbations
SWEEP_FACTORIES = {NAME: (along, "x + t·(x̂ − x) (dir=error) or x + t·ε·u along perturbation dir's direction "
                                 "(t=T, default 1): a length sweep (klgap curve --along error)")}

__all__ = ["SWEEP_FACTORIES", "Along", "along", "along_direction", "along_error"]
