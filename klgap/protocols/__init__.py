"""What a plugin provides: model adapters, SAE loaders, perturbations, token sources and commands.

These are `typing.Protocol`s plus a few plain dataclasses. The core depends only on these, never
on a plugin; nnsight objects never appear here (the engine wraps models itself).

Optional capabilities are declared here too, each as a small ``@runtime_checkable`` protocol that a
plugin's object satisfies by having the method: :class:`SAEChecker` (``check``), :class:`DefaultSAEFinder`
(``default_sae``) on an SAE loader, :class:`FittablePerturbation` (``fit``),
:class:`ContextFittablePerturbation` (``fit_contexts``), :class:`ErrorFittablePerturbation`
(``fit_error``), :class:`SaeFittablePerturbation` (``fit_sae``), :class:`FitSummary` (``fit_summary``),
:class:`ErrorSplitter` (``error_parts``), :class:`ErrorNormPredictor` (``predict_error_sq``),
:class:`BaselineRole` (``baseline_label``), :class:`DescribedPerturbation` (``description``),
:class:`SkipFreePerturbation` (``without_skip``) and :class:`FrozenErrorPerturbation` (``frozen_error``) on a
perturbation,
:class:`SplitTokenSource` (``split_for``) on a token source. The core asks
for them through :mod:`klgap.plugins.capabilities` (``isinstance`` on these protocols), never with ``getattr``.

Shapes are written in names and annotations: `x: "n d"` is a float tensor of n tokens by d dims.
"""

from __future__ import annotations

from klgap.protocols.models import (  # noqa: F401
    SiteSpec, BlockLayout, LoadedModel, ModelAdapter, Placement, PlacingModelAdapter, ModelShape, ShapedModelAdapter, HubModelAdapter, PretrainedSAEAdapter, ModelSAENames,
)
from klgap.protocols.saes import (  # noqa: F401
    SparseAutoencoder, LoadedSAE, SAELoader, DefaultSAEFinder, SAECheck, SAEChecker,
)
from klgap.protocols.perturbations import (  # noqa: F401
    Perturbation, FittablePerturbation, ErrorFittablePerturbation, SaeFittablePerturbation, FitSummary, ErrorSplitter, BaselineRole, DescribedPerturbation, EveryPositionPerturbation, FrozenErrorPerturbation, PerturbationFactory, SkipFreePerturbation, ContextFittablePerturbation, ErrorNormPredictor,
)
from klgap.protocols.tokens import (  # noqa: F401
    TokenSource, TokenSplit, SplitTokenSource, TokenRole,
)
from klgap.protocols.commands import (  # noqa: F401
    Command,
)

__all__ = ['BaselineRole', 'BlockLayout', 'Command', 'ContextFittablePerturbation', 'DefaultSAEFinder', 'DescribedPerturbation', 'ErrorFittablePerturbation', 'ErrorNormPredictor', 'ErrorSplitter', 'EveryPositionPerturbation', 'FitSummary', 'FittablePerturbation', 'FrozenErrorPerturbation', 'HubModelAdapter', 'LoadedModel', 'LoadedSAE', 'ModelAdapter', 'ModelSAENames', 'ModelShape', 'Perturbation', 'PerturbationFactory', 'Placement', 'PlacingModelAdapter', 'PretrainedSAEAdapter', 'SAECheck', 'SAEChecker', 'SaeFittablePerturbation', 'SAELoader', 'ShapedModelAdapter', 'SiteSpec', 'SkipFreePerturbation', 'SparseAutoencoder', 'SplitTokenSource', 'TokenRole', 'TokenSource', 'TokenSplit']
