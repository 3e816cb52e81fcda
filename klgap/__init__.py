"""klgap: is an SAE's reconstruction worse for the model than a random vector with the same error?

From Python (a notebook holding a model and an SAE)::

    import klgap
    result = klgap.measure(model, sae, tokens=4096)      # -> klgap.Result
    result.ratio, result.summary(), result.plot("kl_bars"), result.report, result.tokens

``run`` (``klgap replicate --config FILE`` from Python), ``measure``, ``curve``, ``compare``, ``train_sae``,
``load_run``, ``load_result``, ``Result``, ``StudyResult``, ``Report``, ``StudyReport`` and ``RunConfig`` are
imported on first use, so ``import klgap`` (which every plugin does) stays light. Plugins use
``klgap.hookimpl`` and raise ``klgap.KlgapError``; the protocol types they implement or return (``LoadedModel``,
``LoadedSAE``, ``SiteSpec``, ``SAECheck``, ``Perturbation``, ``TokenSource``, ...; :mod:`klgap.protocols`) are
importable from ``klgap`` too, on first use.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("klgap")
except PackageNotFoundError:  # running from an unbuilt tree
    __version__ = "0.0.0+local"

from klgap.errors import KlgapError  # noqa: E402  (plugins raise `klgap.KlgapError` for bad user input)
from klgap.hookspecs import hookimpl  # noqa: E402  (plugins write `@klgap.hookimpl`)

#: public name -> the module that defines it (imported when first asked for)
_LAZY = {
    "measure": "klgap.api", "curve": "klgap.api", "compare": "klgap.api", "train_sae": "klgap.api",
    "run": "klgap.api", "load_run": "klgap.result", "load_result": "klgap.result", "Result": "klgap.result",
    "StudyResult": "klgap.result",
    "Report": "klgap.report.schema", "StudyReport": "klgap.report.schema", "RunConfig": "klgap.plan.config",
    "ReportSection": "klgap.report.sections",
    # what a plugin implements or returns (klgap.protocols)
    **{name: "klgap.protocols" for name in (
        "LoadedModel", "LoadedSAE", "SiteSpec", "BlockLayout", "SAECheck", "ModelSAENames", "Placement",
        "ModelAdapter", "SAELoader", "Perturbation", "TokenSource", "Command", "SparseAutoencoder",
        "SAEChecker", "DefaultSAEFinder", "FittablePerturbation", "PlacingModelAdapter", "HubModelAdapter",
        "PretrainedSAEAdapter", "ModelShape", "ShapedModelAdapter", "ErrorFittablePerturbation",
        "SaeFittablePerturbation", "FitSummary", "BaselineRole", "DescribedPerturbation", "SplitTokenSource", "TokenSplit")},
}

__all__ = ["KlgapError", "__version__", "hookimpl", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'klgap' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
