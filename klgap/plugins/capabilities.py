"""Ask a plugin's object for an optional capability through the protocol that declares it, never ``getattr``.

The capabilities live in :mod:`klgap.protocols`: :class:`~klgap.protocols.SAEChecker` (``check(spec)``,
used by ``--dry-run``), :class:`~klgap.protocols.DefaultSAEFinder` (``default_sae(model, site, layer)``, used
when no ``--sae`` is given) and :class:`~klgap.protocols.FittablePerturbation` (``fit(acts)``, called before
the first batch), :class:`~klgap.protocols.ErrorFittablePerturbation` (``fit_error(x, x_hat)``, called with
it), :class:`~klgap.protocols.SaeFittablePerturbation` (``fit_sae(x, x_hat, l0, d_sae)``, likewise),
:class:`~klgap.protocols.FitSummary` (``fit_summary()``, read after the fit) and
:class:`~klgap.protocols.ErrorSplitter` (``error_parts(x, x_hat)``, per batch) and
:class:`~klgap.protocols.BaselineRole` (``baseline_label``, recorded when a run opens),
:class:`~klgap.protocols.DescribedPerturbation` (``description``, recorded likewise),
:class:`~klgap.protocols.EveryPositionPerturbation` (``every_position``, all-token patching),
:class:`~klgap.protocols.FrozenErrorPerturbation` (``frozen_error``, a joint run's patches),
:class:`~klgap.protocols.SkipFreePerturbation` (``without_skip``, a skip transcoder's x̂ without its skip) and
:class:`~klgap.protocols.SplitTokenSource` (``split_for(arg, role)``, when a run's tokens are resolved). Each function here is the one place the core asks for one of them; a plugin's answer of
the wrong type is a :class:`~klgap.errors.PluginError` naming the object.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from klgap.errors import PluginError
from klgap.protocols import (BaselineRole, ContextFittablePerturbation, DefaultSAEFinder, DescribedPerturbation,
                             ErrorFittablePerturbation, ErrorNormPredictor, ErrorSplitter, EveryPositionPerturbation,
                             FitSummary, FittablePerturbation, FrozenErrorPerturbation, HubModelAdapter,
                             ModelSAENames, ModelShape, Perturbation, PretrainedSAEAdapter, SAECheck, SAEChecker,
                             SaeFittablePerturbation, ShapedModelAdapter, SkipFreePerturbation, SplitTokenSource,
                             TokenRole, TokenSplit)

if TYPE_CHECKING:
    from klgap.plugins.manager import Registry
    from klgap.protocols import LoadedModel

#: What every perturbation declares (klgap.protocols.Perturbation), for the error that names what is missing.
PERTURBATION_MEMBERS = ("name", "stochastic", "geometry", "__call__")


def hub_repo(adapter: object) -> str | None:
    """The hub repo a model adapter loads from, when it declares :class:`HubModelAdapter`; else None."""
    if not isinstance(adapter, HubModelAdapter):
        return None
    if not isinstance(adapter.repo_id, str):
        raise PluginError(f"model adapter {type(adapter).__name__}.repo_id is {adapter.repo_id!r}; it must be a str")
    return adapter.repo_id


def model_shape(adapter: object) -> ModelShape | None:
    """A model's shape from its config, before its weights load, when its adapter declares
    :class:`ShapedModelAdapter`; None when it does not (then only the loaded model tells)."""
    if not isinstance(adapter, ShapedModelAdapter):
        return None
    shape = adapter.shape()
    if not isinstance(shape, ModelShape):
        raise PluginError(f"model adapter {type(adapter).__name__}.shape() returned {type(shape).__name__}; it must "
                          "return a klgap.ModelShape")
    return shape


def model_sae_names(name: str, adapter: object) -> ModelSAENames | None:
    """The sae_lens model names (and note) of a model before it loads, when its adapter declares
    :class:`PretrainedSAEAdapter`; None when the adapter does not say (then only the loaded model tells)."""
    if not isinstance(adapter, PretrainedSAEAdapter):
        return None
    models = adapter.sae_lens_models
    if not (isinstance(models, tuple) and all(isinstance(m, str) for m in models)):
        raise PluginError(f"model adapter {type(adapter).__name__}.sae_lens_models is {models!r}; it must be a tuple "
                          "of str")
    return ModelSAENames(name, models, adapter.sae_note)


def check_sae_spec(loader: object, spec: str) -> SAECheck | None:
    """What `spec` names, from a loader that declares :class:`SAEChecker`; None when the loader cannot tell.

    `spec` is the loader's argument (no ``NAME:`` prefix). KlgapError from the loader (a spec that cannot be
    right) passes through.
    """
    if not isinstance(loader, SAEChecker):
        return None
    result = loader.check(spec)
    if not isinstance(result, SAECheck):
        raise PluginError(
            f"SAE loader {type(loader).__name__}.check({spec!r}) returned a {type(result).__name__}; "
            "it must return klgap.protocols.SAECheck"
        )
    return result


def find_default_sae(loaders: Registry, model: LoadedModel | ModelSAENames, site: str, layer: int) -> tuple[str, str] | None:
    """``("NAME:SPEC", note)`` from the first registered loader that declares :class:`DefaultSAEFinder` and
    knows a pretrained SAE for `model` at `site`, `layer`; None when none does."""
    for name, entry in loaders.entries.items():
        if not isinstance(entry.obj, DefaultSAEFinder):
            continue
        found = entry.obj.default_sae(model, site, layer)
        if found is None:
            continue
        if not (isinstance(found, tuple) and len(found) == 2 and all(isinstance(s, str) for s in found)):
            raise PluginError(
                f"SAE loader {name!r}: default_sae returned {found!r}; it must return (spec, note) strings or None"
            )
        spec, note = found
        return f"{name}:{spec}", note
    return None


def fittable(perturbations: Iterable[object | None]) -> list[FittablePerturbation]:
    """The perturbations that declare :class:`FittablePerturbation` (``fit(acts)``), in order; None skipped."""
    return [p for p in perturbations if p is not None and isinstance(p, FittablePerturbation)]


def context_fittable(perturbations: Iterable[object | None]) -> list[ContextFittablePerturbation]:
    """The perturbations that declare :class:`ContextFittablePerturbation` (``fit_contexts(acts)``), in order."""
    return [p for p in perturbations if p is not None and isinstance(p, ContextFittablePerturbation)]


def error_fittable(perturbations: Iterable[object | None]) -> list[ErrorFittablePerturbation]:
    """The perturbations that declare :class:`ErrorFittablePerturbation` (``fit_error(x, x_hat)``), in order."""
    return [p for p in perturbations if p is not None and isinstance(p, ErrorFittablePerturbation)]


def sae_fittable(perturbations: Iterable[object | None]) -> list[SaeFittablePerturbation]:
    """The perturbations that declare :class:`SaeFittablePerturbation` (``fit_sae(x, x_hat, l0, d_sae)``), in order."""
    return [p for p in perturbations if p is not None and isinstance(p, SaeFittablePerturbation)]


def fit_summary(perturbation: object) -> dict[str, float | int | str | bool]:
    """What a fitted perturbation that declares :class:`FitSummary` says of its fit (a flat dict of scalars); {}
    when it does not declare it."""
    if not isinstance(perturbation, FitSummary):
        return {}
    found = perturbation.fit_summary()
    if not (isinstance(found, dict) and all(isinstance(k, str) and isinstance(v, (bool, int, float, str))
                                            for k, v in found.items())):
        raise PluginError(f"perturbation {type(perturbation).__name__}.fit_summary() returned {found!r}; it must "
                          "return a dict of str to numbers, strings or bools")
    return found


def error_splitter(perturbations: Iterable[object | None]) -> ErrorSplitter | None:
    """The first perturbation that declares :class:`ErrorSplitter` (``error_parts``); None when none does."""
    return next((p for p in perturbations if p is not None and isinstance(p, ErrorSplitter)), None)


def error_norm_predictor(splitter: ErrorSplitter | None) -> ErrorNormPredictor | None:
    """`splitter` when it also predicts the error's squared norm from x (:class:`ErrorNormPredictor`); else None."""
    return splitter if isinstance(splitter, ErrorNormPredictor) else None


def baseline_label(perturbation: object) -> str | None:
    """How a sentence names `perturbation` as a baseline, when it declares :class:`BaselineRole` with a label; None
    when it is not a baseline (it declares None, or does not declare the capability)."""
    if not isinstance(perturbation, BaselineRole):
        return None
    label = perturbation.baseline_label
    if label is not None and not (isinstance(label, str) and label.strip()):
        raise PluginError(f"perturbation {type(perturbation).__name__}.baseline_label is {label!r}; it must be a "
                          "non-empty str (how a sentence names the baseline) or None (not a baseline)")
    return label


def definition(perturbation: object) -> str | None:
    """What `perturbation`'s x' is, when it declares :class:`DescribedPerturbation` with a non-empty description;
    None otherwise."""
    if not isinstance(perturbation, DescribedPerturbation):
        return None
    text = perturbation.description
    if not isinstance(text, str):
        raise PluginError(f"perturbation {type(perturbation).__name__}.description is {text!r}; it must be a str")
    return text.strip() or None


def _declared_flag(perturbation: object, protocol: type, attribute: str) -> bool:
    """A bool capability: False when `perturbation` does not declare `protocol`, else its `attribute`, which must be
    a bool (a PluginError names the object otherwise)."""
    if not isinstance(perturbation, protocol):
        return False
    value = getattr(perturbation, attribute)  # declared by `protocol`, which isinstance has just checked
    if not isinstance(value, bool):
        raise PluginError(f"perturbation {type(perturbation).__name__}.{attribute} is {value!r}; it must be a bool")
    return value


def every_position(perturbation: object) -> bool:
    """Whether `perturbation` replaces every position in all-token mode (it declares
    :class:`EveryPositionPerturbation` with True); False when it does not declare the capability."""
    return _declared_flag(perturbation, EveryPositionPerturbation, "every_position")


def frozen_error(perturbation: object) -> bool:
    """Whether `perturbation` sees each joint site's clean SAE error rather than a re-encoding (it declares
    :class:`FrozenErrorPerturbation` with True); False when it does not declare the capability."""
    return _declared_flag(perturbation, FrozenErrorPerturbation, "frozen_error")


def without_skip(perturbation: object) -> bool:
    """Whether `perturbation` is handed a skip transcoder's x̂ without its skip term (it declares
    :class:`SkipFreePerturbation` with True); False when it does not declare the capability."""
    return _declared_flag(perturbation, SkipFreePerturbation, "without_skip")


def token_split(source: object, arg: str | None, role: TokenRole) -> TokenSplit:
    """Which split of `source` a run in `role` reads with `arg`, when the source declares :class:`SplitTokenSource`;
    else the whole source (``split`` None: not known to be disjoint from anything)."""
    if not isinstance(source, SplitTokenSource):
        return TokenSplit(arg, None, arg)
    found = source.split_for(arg, role)
    if not isinstance(found, TokenSplit):
        raise PluginError(f"token source {type(source).__name__}.split_for({arg!r}, {role!r}) returned "
                          f"{type(found).__name__}; it must return klgap.protocols.TokenSplit")
    return found


def as_perturbation(obj: Any, spec: str) -> Perturbation:
    """`obj` (what a registered factory returned for `spec`) if it declares :class:`Perturbation`, else an
    error naming the members it lacks."""
    if isinstance(obj, Perturbation):
        return obj
    missing = [m for m in PERTURBATION_MEMBERS if not hasattr(obj, m)]
    raise PluginError(
        f"intervention {spec!r}: its factory returned a {type(obj).__name__} without {', '.join(missing)}; "
        f"a perturbation declares {', '.join(PERTURBATION_MEMBERS)} (klgap.protocols.Perturbation)"
    )


__all__ = ["as_perturbation", "baseline_label", "check_sae_spec", "context_fittable", "error_fittable", "error_norm_predictor", "error_splitter", "every_position", "find_default_sae", "fit_summary", "fittable", "frozen_error", "model_sae_names", "sae_fittable", "token_split", "without_skip"]
