"""Turn any supported transformers causal LM into a :class:`klgap.protocols.LoadedModel`."""

from __future__ import annotations

from typing import Any

import torch

from klgap.protocols import LoadedModel
from klgap_hf.families import SiteMap, dims, family_for, site_widths


def wrap_loaded(
    name: str,
    hf_model: torch.nn.Module,
    tokenizer: Any,
    device: torch.device,
    dtype: torch.dtype,
    sae_lens_models: tuple[str, ...] = (),
    info: dict[str, Any] | None = None,
    move: bool = True,
    remote: bool = False,
    nnsight: Any = None,
    sae_note: str | None = None,
) -> LoadedModel:
    """Move `hf_model` to `device`/`dtype`, put it in eval mode and describe it for klgap.

    ``move=False`` leaves the weights where they are: a model spread over devices by ``device_map`` (its
    inputs go to `device`, the first one) or a meta-device model that runs remotely (``remote=True``, traced
    through the given `nnsight` wrapper; the fast paths are off).
    Raises KlgapError (naming the supported types) if ``config.model_type`` has no site map.
    """
    config = hf_model.config
    family = family_for(config.model_type)
    d = dims(config)
    device = torch.device(device)
    hf_model = (hf_model.to(device=device, dtype=dtype) if move else hf_model).eval()
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    if bos is None:
        bos = getattr(config, "bos_token_id", None)
    described = {
        "architecture": config.model_type,
        "hf_class": type(hf_model).__name__,
        "n_heads": d["n_heads"],
        "head_dim": d["head_dim"],
        **(info or {}),
    }
    return LoadedModel(
        name=name,
        hf_model=hf_model,
        tokenizer=tokenizer,
        n_layers=d["n_layers"],
        d_model=d["d_model"],
        site_widths=site_widths(config),
        site_map=SiteMap(family, d["n_layers"], name),
        max_context=d["max_context"],
        bos_token_id=bos,
        vocab_size=int(config.vocab_size),
        device=device,
        dtype=dtype,
        sae_lens_models=tuple(sae_lens_models),
        layout=None if remote else family.layout(),
        kv_cache=not remote,
        remote=remote,
        nnsight=nnsight,
        site_note=family.note or None,
        sae_note=sae_note,
        info=described,
    )
