"""Site maps of the supported architectures: where each site lives in the Hugging Face module tree."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from klgap.errors import KlgapError
from klgap.protocols import SiteSpec
from klgap.sites import check_site


@dataclass(frozen=True)
class Family:
    """One architecture: the path of its blocks and, inside a block, its attention, MLP and output projection."""

    model_type: str
    blocks: str  # e.g. "transformer.h"
    attn: str  # attention module inside a block (output is a tuple, [0] the output)
    mlp: str
    attn_proj: str  # output projection inside the attention module; its input is the concatenated z
    final_norm: str  # applied to the last block's output
    unembed: str  # the LM head

    def layout(self) -> dict[str, str]:
        """What klgap.suffix needs to rerun only the layers above a site."""
        return {"blocks": self.blocks, "final_norm": self.final_norm, "unembed": self.unembed}

    def site_map(self, site: str, layer: int) -> SiteSpec:
        check_site(site)
        block = f"{self.blocks}.{layer}"
        if site == "resid_pre":
            return SiteSpec(block, "input")
        if site == "resid_post":
            return SiteSpec(block, "output")
        if site == "attn_out":
            return SiteSpec(f"{block}.{self.attn}", "output", 0)
        if site == "mlp_out":
            return SiteSpec(f"{block}.{self.mlp}", "output")
        return SiteSpec(f"{block}.{self.attn}.{self.attn_proj}", "input")

    def binder(self) -> Callable[[str, int], SiteSpec]:
        return self.site_map


FAMILIES: dict[str, Family] = {
    "gpt2": Family("gpt2", "transformer.h", "attn", "mlp", "c_proj", "transformer.ln_f", "lm_head"),
    "gpt_neox": Family("gpt_neox", "gpt_neox.layers", "attention", "mlp", "dense", "gpt_neox.final_layer_norm", "lm_head"),
    "llama": Family("llama", "model.layers", "self_attn", "mlp", "o_proj", "model.norm", "lm_head"),
    # Gemma 3: attn_out / mlp_out are the attention / MLP outputs before the post-norms.
    "gemma3_text": Family("gemma3_text", "model.layers", "self_attn", "mlp", "o_proj", "model.norm", "lm_head"),
}


def family_for(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise KlgapError(
            f"model type {model_type!r} is not supported; supported: {', '.join(sorted(FAMILIES))} "
            "(add one with a model-adapter plugin)"
        )
    return FAMILIES[model_type]


def dims(config) -> dict[str, int]:
    """n_layers, d_model, n_heads, head_dim, max_context from a transformers config."""
    n_layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    d_model = getattr(config, "hidden_size", None) or config.n_embd
    n_heads = getattr(config, "num_attention_heads", None) or config.n_head
    head_dim = getattr(config, "head_dim", None) or d_model // n_heads
    max_context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
    return {"n_layers": n_layers, "d_model": d_model, "n_heads": n_heads, "head_dim": head_dim, "max_context": max_context}
