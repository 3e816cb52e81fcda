"""The hooks a klgap plugin may implement.

Each hook receives a ``register`` callback owned by klgap. Calling it adds one named thing; a
name that is already taken raises :class:`klgap.errors.PluginError` naming both plugins. An
implementation may accept fewer arguments than the spec lists (pluggy's rule), so arguments added
later never break an old plugin.

A plugin is any module or object with ``@klgap.hookimpl`` functions, announced to klgap through
the ``klgap`` entry-point group::

    [project.entry-points.klgap]
    my_plugin = "my_plugin"
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import pluggy

if TYPE_CHECKING:
    import torch

    from klgap.protocols import LoadedModel, LoadedSAE, ModelAdapter

PROJECT = "klgap"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class Register(Protocol):
    """``register(name, obj, description=None)``: add `obj` under `name`; duplicates raise."""

    def __call__(self, name: str, obj: Any, description: str | None = None) -> None: ...


@hookspec
def register_model_adapters(register: Register) -> None:
    """Register model adapters (:class:`klgap.protocols.ModelAdapter`) by model name.

    :param register: ``register(name, adapter, description=None)``.

    Example::

        @klgap.hookimpl
        def register_model_adapters(register):
            register("my-gpt", MyGPTAdapter(), "my GPT, wrapped from Hugging Face")
    """


@hookspec
def register_sae_loaders(register: Register) -> None:
    """Register SAE loaders (:class:`klgap.protocols.SAELoader`) by format name.

    :param register: ``register(name, loader, description=None)``. The name is the prefix a user
        writes before a spec: ``--sae NAME:ARG``.

    Example::

        @klgap.hookimpl
        def register_sae_loaders(register):
            register("sparsify", SparsifyLoader(), "EleutherAI sparsify folders")
    """


@hookspec
def register_perturbations(register: Register) -> None:
    """Register perturbation factories (:class:`klgap.protocols.PerturbationFactory`) by name.

    :param register: ``register(name, factory, description=None)``. The factory is called with the
        user's parameters (``--interventions my_noise:scale=2`` calls ``factory(scale="2")``) and
        returns a :class:`klgap.protocols.Perturbation`.

    Example::

        @klgap.hookimpl
        def register_perturbations(register):
            register("zero", lambda: ZeroPerturbation(), "x' = 0")
    """


@hookspec
def register_token_sources(register: Register) -> None:
    """Register token sources (:class:`klgap.protocols.TokenSource`) by name.

    :param register: ``register(name, source, description=None)``. Users pick one with
        ``--dataset NAME[:ARG]`` (ARG is passed to ``contexts`` as ``arg``, e.g. a file path).

    Example::

        @klgap.hookimpl
        def register_token_sources(register):
            register("my-corpus", MyCorpus(), "lines of my corpus")
    """


@hookspec
def register_commands(register: Register) -> None:
    """Register ``klgap`` subcommands (:class:`klgap.protocols.Command`) by command name.

    :param register: ``register(name, command, description=None)``. The name is the subcommand
        (``klgap NAME ...``); ``command.add_arguments(parser)`` declares its flags on an argparse
        parser and ``command.run(args) -> int`` runs it. Names the core uses are refused.

    Example::

        @klgap.hookimpl
        def register_commands(register):
            register("build-corpus", BuildCorpus(), "build a local English corpus")
    """


@hookspec(firstresult=True)
def resolve_model_adapter(spec: str) -> ModelAdapter | None:
    """A model adapter for a ``--model`` value that is not a registered name (first non-None wins).

    ``firstresult``: the first plugin that recognises `spec` answers; the others are not asked.
    Called only for names no plugin registered, e.g. a hub repo id (``EleutherAI/pythia-1b``) or a
    local folder saved with ``save_pretrained``. Must not load weights (``adapter.load`` does).

    :param spec: what the user passed to ``--model`` (or ``RunConfig(model=...)``).
    :return: an adapter (its ``name`` attribute, if any, names the model in reports), or None.

    Example::

        @klgap.hookimpl
        def resolve_model_adapter(spec):
            return MyAdapter(spec) if spec.startswith("my-org/") else None
    """


@hookspec
def register_report_sections(register: Register) -> None:
    """Register report sections (:class:`klgap.report.sections.ReportSection`) under their report.json key.

    :param register: ``register(key, section, description=None)``. The key is the field the section adds to the
        report (a site's section to each study row as well); the section says its level (``site``, ``run``,
        ``study``), how it is built from a folder's files alone (``build``, None where a report has none), its
        page blocks, figures, captions and console lines. Sections appear in registration order.

    Example::

        @klgap.hookimpl
        def register_report_sections(register):
            register("token_lengths", ReportSection(TokenLengths, "run", build=token_lengths,
                                                    blocks=token_length_blocks), "KL by token length")
    """


@hookspec(firstresult=True)
def wrap_model(model: Any, tokenizer: Any) -> LoadedModel | None:
    """A LoadedModel for a model object the user already holds (``klgap.measure(model=obj)``), or None.

    ``firstresult``: the first plugin that knows the object answers. The model stays where it is (device,
    dtype); nothing is copied or re-implemented.

    :param model: e.g. a ``transformers`` ``PreTrainedModel`` or an nnsight ``LanguageModel`` / ``NNsight``.
    :param tokenizer: the tokenizer the user passed (may be None: then the object's own, if it has one).

    Example::

        @klgap.hookimpl
        def wrap_model(model, tokenizer):
            if isinstance(model, MyModel):
                return my_loaded_model(model, tokenizer)
    """


@hookspec(firstresult=True)
def wrap_sae(sae: Any, device: torch.device) -> LoadedSAE | None:
    """A LoadedSAE for an SAE object the user already holds (``klgap.measure(sae=obj)``), or None.

    ``firstresult``: the first plugin that knows the object answers; an object no plugin knows but that has
    ``encode`` and ``decode`` is used as it is (klgap.api).

    :param sae: e.g. a sae_lens ``SAE``.
    :param device: the run's device (the SAE is moved there in float32).

    Example::

        @klgap.hookimpl
        def wrap_sae(sae, device):
            if isinstance(sae, MySAE):
                return LoadedSAE(module=sae.to(device), d_in=sae.d_in, d_sae=sae.d_sae, hook_name=sae.hook,
                                 source="my-sae (in memory)")
    """


#: hook name -> the registry kind it fills (used by the plugin manager and `klgap plugins`).
REGISTRY_HOOKS: dict[str, str] = {
    "register_model_adapters": "model",
    "register_sae_loaders": "sae_loader",
    "register_perturbations": "perturbation",
    "register_token_sources": "token_source",
    "register_commands": "command",
    "register_report_sections": "report_section",
}
