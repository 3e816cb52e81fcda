"""What a plugin provides: model adapters, SAE loaders, perturbations, token sources and commands.

These are `typing.Protocol`s plus a few plain dataclasses. The core depends only on these, never
on a plugin; nnsight objects never appear here (the engine wraps models itself).

Optional capabilities are declared here too, each as a small ``@runtime_checkable`` protocol that a
plugin's object satisfies by having the method: :class:`SAEChecker` (``check``), :class:`DefaultSAEFinder`
(``default_sae``) on an SAE loader, :class:`FittablePerturbation` (``fit``), :class:`ErrorFittablePerturbation`
(``fit_error``), :class:`SaeFittablePerturbation` (``fit_sae``), :class:`FitSummary` (``fit_summary``),
:class:`ErrorSplitter` (``error_parts``) and :class:`BaselineRole` (``baseline_label``) on a perturbation,
:class:`SplitTokenSource` (``split_for``) on a token source. The core asks
for them through :mod:`klgap.plugins.capabilities` (``isinstance`` on these protocols), never with ``getattr``.

Shapes are written in names and annotations: `x: "n d"` is a float tensor of n tokens by d dims.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class SiteSpec:
    """Where a site lives inside a Hugging Face model.

    module: dotted path from the HF model root, e.g. ``"transformer.h.3.mlp"``.
    io:     ``"output"`` (what the module returns) or ``"input"`` (its first positional argument).
    index:  for a tuple output, which element holds the activation (``0`` for HF attention modules);
            ``None`` when the output is the tensor itself.
    The tensor found there is ``[batch, pos, d]``.
    """

    module: str
    io: Literal["input", "output"] = "output"
    index: int | None = None


@dataclass(frozen=True)
class BlockLayout:
    """Where the decoder blocks, the final norm and the unembedding live (dotted paths from the HF model root).

    A model adapter that gives one lets klgap rerun only the layers above a site (klgap/forward/suffix.py)."""

    blocks: str  # e.g. "model.layers": a ModuleList of n_layers blocks
    final_norm: str  # e.g. "model.norm"
    unembed: str  # e.g. "lm_head"
    logit_softcap: float | None = None  # the head caps its logits: C * tanh(logits / C) (Gemma 2)


@dataclass
class LoadedModel:
    """A Hugging Face causal LM ready for measurement, plus what klgap needs to know about it.

    hf_model:        the ``transformers`` model, in eval mode, on ``device``; called as
                     ``hf_model(input_ids=ids, use_cache=False)`` and returning ``.logits [batch pos vocab]``.
    tokenizer:       a ``transformers`` tokenizer (may be None for token-id-only use).
    n_layers:        number of transformer blocks.
    d_model:         residual width.
    site_widths:     width of each site's activation, e.g. ``{"attn_z": n_heads * d_head, ...}``.
    site_map:        ``site_map(site, layer) -> SiteSpec``.
    max_context:     largest context length the model accepts.
    bos_token_id:    prepended to each context when the token source is asked to (None: no BOS).
    sae_lens_models: model names under which sae_lens's pretrained directory lists SAEs for this model,
                     best first (e.g. ``("pythia-70m-deduped",)`` for ``pythia-70m``).
    layout:          where blocks / final norm / unembedding live; None turns the all-token suffix replay off.
    kv_cache:        whether single-token runs may reuse the model's KV cache for positions < t.
    cache_arg:       the keyword through which ``hf_model``'s forward takes a KV cache (``past_key_values``, or
                     ``cache`` in newer transformers).
    n_heads:         attention heads per layer (sizes the memory of several interventions stacked in one suffix
                     replay); None: not known, and nothing is stacked.
    remote:          every forward runs on NDIF through nnsight (``trace(remote=True)``); fast paths are off.
    nnsight:         the nnsight wrapper to trace through (None: klgap wraps ``hf_model`` itself, once).
    site_note:       what a reader should know about the family's site choice (recorded in reports).
    sae_note:        shown with any pretrained SAE picked for this model (e.g. "trained on other weights").
    tokenizer_note:  what a reader should know about the tokenizer (e.g. none in the model's folder: token ids
                     only; text sources fail with it), recorded in the run's notes.
    info:            descriptive provenance only (source, repo, quantization, ...), recorded in reports.
    """

    name: str
    hf_model: torch.nn.Module
    tokenizer: Any
    n_layers: int
    d_model: int
    site_widths: dict[str, int]
    site_map: Any  # Callable[[str, int], SiteSpec]
    max_context: int
    bos_token_id: int | None
    vocab_size: int
    device: torch.device
    dtype: torch.dtype
    sae_lens_models: tuple[str, ...] = ()
    layout: BlockLayout | None = None
    kv_cache: bool = True
    cache_arg: str = "past_key_values"
    n_heads: int | None = None
    remote: bool = False
    nnsight: Any = None
    site_note: str | None = None
    sae_note: str | None = None
    tokenizer_note: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class ModelAdapter(Protocol):
    """Loads one named model. Registered under that name by ``register_model_adapters``."""

    description: str

    def load(self, device: torch.device, dtype: torch.dtype) -> LoadedModel:
        """Load the model onto `device` in `dtype` (weights; KL is always computed in float32)."""
        ...


@dataclass(frozen=True)
class Placement:
    """How a placing adapter puts a model: spread over devices (``device_map``) or on NDIF (``remote``)."""

    device_map: str | None = None
    remote: bool = False

    @property
    def local(self) -> bool:
        return self.device_map is None and not self.remote


@runtime_checkable
class PlacingModelAdapter(Protocol):
    """Optional: an adapter that can spread its model over devices or run it remotely (``--device-map``,
    ``--remote``). Adapters without it load onto one local device only."""

    def load_placed(self, device: torch.device, dtype: torch.dtype, placement: Placement) -> LoadedModel:
        """Load as `placement` says; `device` receives the inputs (the first device of a device map)."""
        ...


@dataclass(frozen=True)
class ModelShape:
    """What a model is, from its config alone (no weights read): a run is checked against it before the weights
    load. site_widths: the sites whose width the config says (a site missing here is checked once loaded)."""

    n_layers: int
    max_context: int
    site_widths: dict[str, int] = field(default_factory=dict)


@runtime_checkable
class ShapedModelAdapter(Protocol):
    """Optional: an adapter that reads its model's shape from its config before loading the weights, so a layer
    out of range, a context too long or an SAE of another width fails in a second instead of after the load."""

    def shape(self) -> ModelShape:
        """The model's layers, longest context and site widths, from its config (no weights read)."""
        ...


@runtime_checkable
class HubModelAdapter(Protocol):
    """Optional: an adapter whose weights come from the Hugging Face hub (or its cache); ``--dry-run`` lists the
    repo among what a run needs beyond this machine's files."""

    repo_id: str


@runtime_checkable
class PretrainedSAEAdapter(Protocol):
    """Optional: an adapter that names, before loading, the models under which sae_lens's pretrained directory
    lists SAEs for its model (what ``LoadedModel.sae_lens_models`` / ``sae_note`` will say). ``--dry-run`` and
    ``klgap saes`` read it to name the default SAE without loading the model."""

    sae_lens_models: tuple[str, ...]
    sae_note: str | None


@dataclass(frozen=True)
class ModelSAENames:
    """What a :class:`DefaultSAEFinder` reads of a model, known before it loads: its name, the sae_lens model
    names of its SAEs (best first) and the note shown with any SAE picked for it. ``LoadedModel`` has the
    same three fields, so ``default_sae`` receives either."""

    name: str
    sae_lens_models: tuple[str, ...] = ()
    sae_note: str | None = None


# --------------------------------------------------------------------------- SAEs


@runtime_checkable
class SparseAutoencoder(Protocol):
    """Anything with encode/decode. sae_lens SAEs satisfy this as they are."""

    def encode(self, x: Tensor) -> Tensor:
        """x: [n, d_in] -> feature activations [n, d_sae]."""
        ...

    def decode(self, feature_acts: Tensor) -> Tensor:
        """feature activations [n, d_sae] -> reconstruction [n, d_in]."""
        ...


@dataclass
class LoadedSAE:
    """An SAE plus the metadata klgap needs.

    module:      the SAE (encode/decode), on the run's device, float32.
    hook_name:   the SAE's own hook name (``blocks.L.hook_mlp_out``), selects site/layer when not given.
    source:      the spec it was loaded from (``sae_lens:RELEASE/ID``, a path, ...).
    architecture: what computes its features (``standard``, ``topk``, ``jumprelu``, ``gated``, ...).
    center_resid: the SAE was trained on mean-centred residual activations (TransformerLens's
                 ``center_writing_weights``, e.g. sae_lens's gpt2-small-res-jb): at a resid site the engine
                 subtracts each token's mean over d_model before the SAE and every perturbation.
    info:        descriptive provenance for the report (release, format, training stats, ...); the engine
                 never reads it.
    """

    module: Any
    d_in: int
    d_sae: int
    hook_name: str | None
    source: str
    architecture: str = "standard"
    center_resid: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    def encode(self, x: Tensor) -> Tensor:
        """x: [n, d_in] float32 -> feature activations [n, d_sae]."""
        return self.module.encode(x)

    def decode(self, feature_acts: Tensor) -> Tensor:
        """feature activations [n, d_sae] -> reconstruction [n, d_in] float32."""
        return self.module.decode(feature_acts)


@runtime_checkable
class SAELoader(Protocol):
    """Turns an SAE spec string into a LoadedSAE.

    A spec ``NAME:ARG`` goes to the loader registered as NAME; a bare spec (a path) goes to the
    first loader whose ``can_load`` says yes.
    """

    description: str

    def can_load(self, spec: str) -> bool:
        """True if this loader recognises a bare `spec` (e.g. a directory holding cfg.json)."""
        ...

    def load(self, spec: str, device: torch.device) -> LoadedSAE:
        """Load the SAE named by `spec` (with any ``NAME:`` prefix removed) onto `device`."""
        ...


@runtime_checkable
class DefaultSAEFinder(Protocol):
    """Optional capability of an SAE loader: name a pretrained SAE for a model/site/layer.

    Asked (in registration order) when a run gives no ``--sae``; must not download anything. `model` is the
    :class:`LoadedModel`, or, before anything loads (``--dry-run``, ``klgap saes``), a :class:`ModelSAENames`:
    read only ``name``, ``sae_lens_models`` and ``sae_note``, which both have.
    """

    def default_sae(self, model: LoadedModel | ModelSAENames, site: str, layer: int) -> tuple[str, str] | None:
        """Return ``(spec, note)`` for the default SAE, or None. `spec` is this loader's argument (no
        ``NAME:`` prefix); `note` is shown to the user and recorded in the report."""
        ...


@dataclass(frozen=True)
class SAECheck:
    """What an SAE spec names, known without loading its weights (``--dry-run``).

    hook_name: the SAE's hook name (``blocks.L.hook_mlp_out``); None when the spec does not say (then
               the run's ``--site``/``--layer`` decide).
    repo_id:   the Hugging Face hub repo its weights download from; None for local files.
    release:   the pretrained release it belongs to (sae_lens), if any.
    sae_id:    its id within that release, if any.
    model:     the model it was trained on, when the spec says.
    detail:    one short line shown beside the check (format, architecture, size).
    """

    hook_name: str | None
    repo_id: str | None = None
    release: str | None = None
    sae_id: str | None = None
    model: str | None = None
    detail: str | None = None


@runtime_checkable
class SAEChecker(Protocol):
    """Optional capability of an SAE loader: say what a spec names without loading it (``--dry-run``).

    ``check(spec)`` reads at most a config or a file header, never the weights, and never the network.
    It raises KlgapError when the spec cannot be right (a missing folder, an unknown release or id).
    """

    def check(self, spec: str) -> SAECheck:
        """What `spec` (with any ``NAME:`` prefix removed) names; see :class:`SAECheck`."""
        ...


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
class EveryPositionPerturbation(Protocol):
    """Optional capability of a perturbation: in all-token mode it replaces the site at *every* position of each
    context when ``every_position`` is True — position 0 and the tokens ``--mask-special`` masks included — while
    only the run's measured tokens are measured. ``zero`` declares it: sae_lens's ``get_recons_loss`` zero-ablates
    every position (its ignored tokens are left unpatched for the SAE only), and kl_div_score / ce_loss_score are
    defined against that ablation. At the masked positions the perturbation gets the SAE's view of those tokens.
    """

    every_position: bool


class PerturbationFactory(Protocol):
    """Registered under a name; called with the user's parameters (``cosine_matched:cos=0.8``)."""

    def __call__(self, **params: Any) -> Perturbation: ...


# --------------------------------------------------------------------------- token sources


@runtime_checkable
class TokenSource(Protocol):
    """Where the text comes from: returns packed contexts of token ids."""

    description: str

    def contexts(
        self,
        model: LoadedModel,
        n_contexts: int,
        context_len: int,
        seed: int,
        prepend_bos: bool,
        arg: str | None,
    ) -> Tensor:
        """Return ``[n_contexts, context_len]`` int64 token ids (first column BOS when `prepend_bos`).

        `arg` is what followed ``NAME:`` in the user's spec (a path, say), or None.
        Raise ``KlgapError`` if fewer than `n_contexts` contexts can be made.
        """
        ...


#: what a run reads a token source for: training an SAE (``train-sae``) or measuring one (``replicate``, ...)
TokenRole = Literal["train", "measure"]


@dataclass(frozen=True)
class TokenSplit:
    """Which part of a token source a run reads (:class:`SplitTokenSource`).

    arg:    the argument ``contexts`` receives to read it (what follows ``NAME:``; None: no argument).
    split:  the split's name (``train``, ``eval``, ``validation``); None: the whole source, no split known.
    whole:  the argument that names the source with no split (its splits' common name: a corpus folder, a dataset
            id; None for a source that takes no argument): two reads with the same ``whole`` and different splits are
            disjoint, a read with no split overlaps every split of the same ``whole``.
    chosen: klgap chose the split for the run's role because the user named none.
    """

    arg: str | None
    split: str | None
    whole: str | None
    chosen: bool = False


@runtime_checkable
class SplitTokenSource(Protocol):
    """Optional capability of a token source: held-apart splits, so that an SAE is measured on text it never saw.

    ``split_for(arg, role)`` says which split a run reads: the one `arg` names, or, when it names none, the
    source's split for `role` (``train`` for train-sae, an eval split for measuring), with ``chosen`` set; a
    ``split`` of None when `arg` has no splits (then the tokens are not known to be disjoint). It reads at most a
    folder listing or a dataset's split names, never the text, and raises KlgapError for an `arg` that cannot be
    right. A source without it is read whole (``random``, token ids given from Python).
    """

    def split_for(self, arg: str | None, role: TokenRole) -> TokenSplit: ...


# --------------------------------------------------------------------------- commands


@runtime_checkable
class Command(Protocol):
    """A ``klgap`` subcommand added by a plugin (``register_commands``)."""

    description: str

    def add_arguments(self, parser: Any) -> None:
        """Declare the command's flags on `parser` (an ``argparse.ArgumentParser``)."""
        ...

    def run(self, args: Any) -> int:
        """Run with the parsed ``argparse.Namespace``; return the exit code. Raise KlgapError for bad input."""
        ...
