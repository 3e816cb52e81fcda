"""Turn any transformers causal LM into a :class:`klgap.protocols.LoadedModel`."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from klgap.errors import KlgapError
from klgap.protocols import LoadedModel
from klgap_hf.families import FAMILIES, Family, SiteMap, dims, site_widths, text_config
from klgap_hf.generic import identify_sublayers, infer_family


def family_of(hf_model: torch.nn.Module) -> Family:
    """The hand-written family of the model's ``config.model_type``, else the generic map's structure
    (attention / MLP sites are identified later, by :func:`klgap_hf.generic.identify_sublayers`)."""
    config = hf_model.config
    family = FAMILIES.get(config.model_type)
    return family if family is not None else infer_family(hf_model, config)


def meta_model(config: Any) -> torch.nn.Module:
    """The causal LM of `config` built on the meta device: its module tree, no weights, no memory."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except ValueError as exc:  # "Unrecognized configuration class ..."
        import transformers

        raise KlgapError(
            f"model type {getattr(config, 'model_type', '?')!r} has no causal-LM class in transformers "
            f"{transformers.__version__} (AutoModelForCausalLM); klgap measures causal LMs"
        ) from exc


def check_structure(config: Any) -> Family:
    """The family a model of `config` gets, found on the meta device: a model whose blocks cannot be found fails
    here, before any weights are read or downloaded."""
    return family_of(meta_model(config))


def _float64_experts(hf_model: torch.nn.Module, dtype: torch.dtype) -> str:
    """Mixture-of-experts blocks run through ``torch._grouped_mm`` by default, which has no float64 kernel: in
    float64 switch them to transformers' eager loop (same math). Returns a note when it did."""
    get = getattr(hf_model, "get_experts_implementation", None)  # transformers >= 5
    if dtype != torch.float64 or get is None or "grouped_mm" not in get().values():
        return ""
    hf_model.set_experts_implementation("eager")
    return "eager (grouped_mm has no float64 kernel)"


def cache_arg(hf_model: torch.nn.Module) -> str:
    """The keyword the model's forward takes its KV cache by: ``cache`` in transformers >= 5.2x, before that
    ``past_key_values`` (now deprecated)."""
    return "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"


def _on_meta(hf_model: torch.nn.Module) -> bool:
    return any(p.device.type == "meta" for p in hf_model.parameters())


def _moved(hf_model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """`hf_model` on `device` with its parameters in `dtype`. Into bfloat16 / float16 its float32 buffers stay
    float32, as ``from_pretrained(dtype=...)`` leaves them (rotary ``inv_freq``: rounded, it would move every
    attention score); into float32 / float64 every floating-point tensor is cast, as ``Module.to`` does."""
    low = dtype in (torch.bfloat16, torch.float16)
    kept = [(name, b) for name, b in hf_model.named_buffers() if low and b.dtype == torch.float32]
    hf_model = hf_model.to(device=device, dtype=dtype)
    for name, buffer in kept:
        owner, _, attr = name.rpartition(".")
        hf_model.get_submodule(owner)._buffers[attr] = buffer.to(device)
    return hf_model


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
    tokenizer_note: str | None = None,
) -> LoadedModel:
    """Move `hf_model` to `device`/`dtype`, put it in eval mode and describe it for klgap.

    ``move=False`` leaves the weights where they are: a model spread over devices by ``device_map`` (its
    inputs go to `device`, the first one) or a meta-device model that runs remotely (``remote=True``, traced
    through the given `nnsight` wrapper; the fast paths are off).
    An architecture without a hand-written site map gets the generic one (klgap_hf.generic); KlgapError when
    its blocks cannot be found. `tokenizer_note` (e.g. the folder has no tokenizer) goes into every run's notes.
    """
    config = hf_model.config
    family = family_of(hf_model)
    d = dims(config)
    device = torch.device(device)
    hf_model = (_moved(hf_model, device, dtype) if move else hf_model).eval()
    experts = _float64_experts(hf_model, dtype)
    if family.inferred and not _on_meta(hf_model):
        family = identify_sublayers(hf_model, family, config)
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    if bos is None:
        bos = getattr(text_config(config), "bos_token_id", None)
    if bos is None:
        bos = getattr(config, "bos_token_id", None)
    cap = getattr(text_config(config), family.softcap, None) if family.softcap else None
    layout = family.layout(float(cap) if cap is not None else None)
    described: dict[str, Any] = {
        "architecture": config.model_type,
        "hf_class": type(hf_model).__name__,
        "n_heads": d["n_heads"],
        "head_dim": d["head_dim"],
        "site_map": "generic (klgap_hf.generic)" if family.inferred else f"klgap_hf.families[{family.model_type!r}]",
        **({"unmapped_sites": family.unmapped} if family.unmapped and len(family.sites()) < 5 else {}),
        **({} if family.kv_cache else {"kv_cache_note": family.kv_cache_note}),
        **({"experts_implementation": experts} if experts else {}),
        **(info or {}),
    }
    return LoadedModel(
        name=name,
        hf_model=hf_model,
        tokenizer=tokenizer,
        n_layers=d["n_layers"],
        d_model=d["d_model"],
        site_widths=site_widths(config, family.attn_z_width),
        site_map=SiteMap(family, d["n_layers"], name),
        max_context=d["max_context"],
        bos_token_id=bos,
        vocab_size=d["vocab_size"],
        device=device,
        dtype=dtype,
        sae_lens_models=tuple(sae_lens_models),
        layout=None if remote else layout,
        kv_cache=family.kv_cache and not remote,
        cache_arg=cache_arg(hf_model),
        n_heads=d["n_heads"],
        remote=remote,
        nnsight=nnsight,
        site_note=family.note or None,
        sae_note=sae_note,
        tokenizer_note=tokenizer_note,
        info=described,
    )
