"""Objects a Python caller holds, as the kinds the plugins register: a model (:class:`HeldModel`, an adapter that
hands it back where it is), an SAE (:func:`sae_object`) and token ids or texts (:class:`GivenTokens`,
:func:`token_ids`). klgap.measure resolves them as the command line resolves names (klgap/job/plan.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from klgap.errors import KlgapError
from klgap.plugins.manager import ModelRef, get_host
from klgap.protocols import LoadedModel, LoadedSAE

if TYPE_CHECKING:
    from torch import Tensor


def model_ref(model: Any, tokenizer: Any, name: str | None = None) -> tuple[str, ModelRef | None]:
    """A model name for the config, and for an object the ModelRef that carries it: named `name`, else what its
    adapter calls it (a transformers model: its ``config.name_or_path``, else its ``model_type``)."""
    if isinstance(model, (str, Path)):
        if name is not None:
            raise KlgapError(f"name={name!r} names a model object you hold; model={str(model)!r} is already a name")
        return str(model), None
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise KlgapError(f"name= must be a non-empty string (the model's name in reports and compare), got {name!r}")
    loaded = get_host().pm.hook.wrap_model(model=model, tokenizer=tokenizer)
    if loaded is None:
        config = getattr(model, "config", None)
        kind = getattr(config, "model_type", None) or type(model).__name__
        raise KlgapError(f"no model adapter knows model {kind!r}: pass a transformers causal LM, an nnsight "
                         "LanguageModel wrapping one, or a model name / hub repo id / folder (see `klgap plugins`)")
    if name is not None:
        loaded = replace(loaded, name=name.strip())
    return loaded.name, ModelRef(loaded.name, HeldModel(loaded), "python")


@dataclass
class HeldModel:
    """A model the caller holds, as an adapter: ``load`` hands it back where it is (no copy)."""

    loaded: LoadedModel
    description: str = "a model object held by the caller (klgap.measure)"

    def placement(self) -> dict[str, str]:
        """The device and dtype flags of where the model is (a held model runs, and gathers, where it is)."""
        return {"device": str(self.loaded.device), "dtype": str(self.loaded.dtype).removeprefix("torch.")}

    def load(self, device: Any, dtype: Any) -> LoadedModel:
        if (str(device), dtype) != (str(self.loaded.device), self.loaded.dtype):
            raise KlgapError(f"the model is on {self.loaded.device} in {self.loaded.dtype}, but device={device} "
                             f"dtype={dtype} was asked for; move it first (model.to(...)) or leave device/dtype out")
        return self.loaded


def sae_object(sae: Any, device: Any) -> LoadedSAE:
    """An SAE object as a LoadedSAE: through a plugin (sae_lens SAEs), else any module with encode/decode."""
    import torch

    loaded = get_host().pm.hook.wrap_sae(sae=sae, device=device)
    if loaded is not None:
        return loaded
    if not (callable(getattr(sae, "encode", None)) and callable(getattr(sae, "decode", None))):
        raise KlgapError(f"sae={type(sae).__name__} is neither an SAE spec (str), a sae_lens SAE, nor an object "
                         "with encode(x) and decode(features)")
    if isinstance(sae, torch.nn.Module):
        sae = sae.to(device=device, dtype=torch.float32).eval()
    cfg = getattr(sae, "cfg", None)
    hook = getattr(cfg, "hook_name", None) or getattr(getattr(cfg, "metadata", None), "hook_name", None)
    d_in = getattr(cfg, "d_in", None)
    if d_in is None:
        w_dec = getattr(sae, "W_dec", None)
        d_in = w_dec.shape[-1] if w_dec is not None else None
    if d_in is None:
        raise KlgapError(f"cannot tell the width of SAE {type(sae).__name__}: give it cfg.d_in or a W_dec [d_sae d_in]")
    with torch.no_grad():
        d_sae = int(sae.encode(torch.zeros(1, int(d_in), device=device)).shape[-1])
    return LoadedSAE(module=sae, d_in=int(d_in), d_sae=d_sae, hook_name=hook,
                     source=f"in memory: {type(sae).__name__}", architecture=type(sae).__name__,
                     info={"in_memory": True})


@dataclass
class GivenTokens:
    """Token ids the caller handed over, ``[n_contexts context_len]``: used as they are."""

    ids: Tensor
    description: str = "token ids given to klgap.measure"

    def contexts(self, model: Any, n_contexts: int, context_len: int, seed: int, prepend_bos: bool,
                 arg: str | None) -> Tensor:
        return self.ids


def given_name(ids: Tensor) -> str:
    """``given:NxCTX:HASH``: token ids ``[n ctx]`` (int64, CPU) handed to measure, named by their shape and a hash
    of their values."""
    import hashlib

    digest = hashlib.sha256(ids.contiguous().numpy().tobytes()).hexdigest()
    return f"given:{ids.shape[0]}x{ids.shape[1]}:{digest[:16]}"


def token_ids(tokens: Any, model: str | LoadedModel | ModelRef, context_len: int, prepend_bos: bool,
               plan_device: str, dtype: str) -> Tensor:
    """Texts (a list of strings, or a datasets.Dataset with a text column) -> contexts packed with the model's
    tokenizer (BOS first), in order; every full context is kept."""
    import torch

    from klgap.job.packing import pack, tokenize_documents

    texts = tokens
    if hasattr(tokens, "column_names"):  # a datasets.Dataset
        columns = [c for c in tokens.column_names if c == "text"] or [
            c for c in tokens.column_names if isinstance(tokens[0][c], str)]
        if not columns:
            raise KlgapError(f"the dataset has no text column (columns: {', '.join(tokens.column_names)})")
        texts = tokens[columns[0]]
    if not texts or not all(isinstance(t, str) for t in texts):
        raise KlgapError("tokens= as texts must be a non-empty list of strings (or a datasets.Dataset with a text column)")
    if isinstance(model, ModelRef):
        loaded = model.adapter.loaded
    else:
        from klgap.job.loading import load_model
        from klgap.plan.resolve import pick_device

        loaded = load_model(model, pick_device(plan_device), getattr(torch, dtype))
    if loaded.tokenizer is None:
        raise KlgapError("tokens= as texts needs the model's tokenizer: pass tokenizer=..., or token ids")
    ids = tokenize_documents(loaded.tokenizer, list(texts))
    bos = loaded.bos_token_id if prepend_bos else None
    n = ids.numel() // (context_len - (bos is not None))
    return pack(ids, max(n, 1), context_len, bos, None, "the texts given to klgap.measure")


__all__ = ["GivenTokens", "HeldModel", "given_name", "model_ref", "sae_object", "token_ids"]
