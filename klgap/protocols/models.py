"""Model adapters and what they hand the core: a loaded model, its sites and shape, where it runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import torch

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


__all__ = ['BlockLayout', 'HubModelAdapter', 'LoadedModel', 'ModelAdapter', 'ModelSAENames', 'ModelShape', 'Placement', 'PlacingModelAdapter', 'PretrainedSAEAdapter', 'ShapedModelAdapter', 'SiteSpec']
