"""SAE loaders and what they hand the core: a loaded SAE, its checks, a model's default SAE."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor

if TYPE_CHECKING:
    from klgap.protocols.models import LoadedModel, ModelSAENames

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
    reads:       the site it reads when that is not the site it writes: a transcoder reads ``mlp_in`` (the
                 MLP's input) and writes ``mlp_out`` (its hook_name), so it substitutes the whole MLP; None for an
                 SAE, which reads and writes one site.
    d_out:       the width it writes when that is not d_in (a transcoder's); None: d_in.
    skip:        a skip transcoder's ``W_skip [d_out d_in]``: its output is decode(encode(x_in)) + x_in @ W_skipᵀ
                 (:meth:`reconstruct`); None without one.
    """

    module: Any
    d_in: int
    d_sae: int
    hook_name: str | None
    source: str
    architecture: str = "standard"
    center_resid: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    reads: str | None = None
    d_out: int | None = None
    skip: Tensor | None = None

    @property
    def width_out(self) -> int:
        """The width of what it writes: d_out for a transcoder, d_in for an SAE."""
        return self.d_in if self.d_out is None else self.d_out

    @property
    def transcoder(self) -> bool:
        """Whether it reads another site than the one it writes (a transcoder: mlp_in -> mlp_out)."""
        return self.reads is not None

    def reconstruct(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """``x [n d_in]`` float32 (what it reads) -> (x̂ ``[n width_out]`` float32, its skip term included;
        feature activations ``[n d_sae]``; the skip term ``x @ skipᵀ [n width_out]``, None without a skip)."""
        feats = self.encode(x)
        x_hat = self.decode(feats).float()
        if self.skip is None:
            return x_hat, feats, None
        skip = x @ self.skip.to(x.device, torch.float32).T
        return x_hat + skip, feats, skip

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


__all__ = ['DefaultSAEFinder', 'LoadedSAE', 'SAECheck', 'SAEChecker', 'SAELoader', 'SparseAutoencoder']
