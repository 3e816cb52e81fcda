"""Site maps of the supported architectures: where each site lives in the Hugging Face module tree.

Every family maps the five sites of :data:`klgap.sites.SITES` at block L to a :class:`SiteSpec`:

====================  =====================================================================
resid_pre             input of block L (hidden states ``[batch pos d_model]``)
resid_post            output of block L (a plain tensor in transformers 5)
attn_out              attention module output ``[0]`` (after its output projection)
mlp_out               MLP module output
attn_z                input of the attention output projection: the concatenated heads
                      ``[batch pos n_heads * head_dim]``
====================  =====================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from klgap.errors import KlgapError
from klgap.protocols import BlockLayout, SiteSpec
from klgap.sites import check_site


@dataclass(frozen=True)
class Family:
    """One architecture: the path of its blocks and, inside a block, its attention, MLP and output projection."""

    model_type: str  # transformers' config.model_type
    blocks: str  # e.g. "transformer.h"
    attn: str  # attention module inside a block (returns a tuple; [0] is the output)
    mlp: str  # MLP module inside a block (returns the tensor)
    attn_proj: str  # output projection inside the attention module; its input is the concatenated z
    final_norm: str  # applied to the last block's output
    unembed: str  # the LM head
    note: str = ""  # anything a reader of the report should know about the site choice

    def layout(self) -> BlockLayout:
        """What :mod:`klgap.suffix` needs to rerun only the layers above a site."""
        return BlockLayout(self.blocks, self.final_norm, self.unembed)

    def site_map(self, site: str, layer: int) -> SiteSpec:
        """The SiteSpec of `site` in block `layer` (the layer is not range-checked here; see :class:`SiteMap`)."""
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
        return SiteSpec(f"{block}.{self.attn}.{self.attn_proj}", "input")  # attn_z


@dataclass(frozen=True)
class SiteMap:
    """``LoadedModel.site_map``: a family's site map that also checks the layer against the model's depth."""

    family: Family
    n_layers: int
    model_name: str

    def __call__(self, site: str, layer: int) -> SiteSpec:
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < self.n_layers:
            raise KlgapError(
                f"layer {layer!r} is out of range for model {self.model_name!r}: it has {self.n_layers} "
                f"layers, 0..{self.n_layers - 1}"
            )
        return self.family.site_map(site, layer)


FAMILIES: dict[str, Family] = {
    "gpt2": Family("gpt2", "transformer.h", "attn", "mlp", "c_proj", "transformer.ln_f", "lm_head"),
    "gpt_neox": Family(
        "gpt_neox", "gpt_neox.layers", "attention", "mlp", "dense", "gpt_neox.final_layer_norm", "lm_head"
    ),
    "llama": Family("llama", "model.layers", "self_attn", "mlp", "o_proj", "model.norm", "lm_head"),
    "gemma3_text": Family(
        "gemma3_text", "model.layers", "self_attn", "mlp", "o_proj", "model.norm", "lm_head",
        note=(
            "Gemma 3 normalises each sublayer's output before adding it to the residual: attn_out is the "
            "self_attn output[0] (o_proj output, before post_attention_layernorm) and mlp_out the mlp output "
            "(before post_feedforward_layernorm), so neither is exactly what is added to the residual stream"
        ),
    ),
}


def family_for(model_type: str) -> Family:
    """The family of a transformers ``config.model_type``, or a KlgapError naming the supported ones."""
    if model_type not in FAMILIES:
        raise KlgapError(
            f"model type {model_type!r} is not supported; supported: {', '.join(sorted(FAMILIES))} "
            "(add one with a model-adapter plugin)"
        )
    return FAMILIES[model_type]


def _first(config: Any, *names: str) -> Any:
    """The first of `names` that `config` has and that is not None."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    raise KlgapError(f"{type(config).__name__} has none of {', '.join(names)}; cannot read the model's shape")


def dims(config: Any) -> dict[str, int]:
    """n_layers, d_model, n_heads, head_dim, max_context of a transformers config (any supported family)."""
    d_model = int(_first(config, "hidden_size", "n_embd"))
    n_heads = int(_first(config, "num_attention_heads", "n_head"))
    head_dim = getattr(config, "head_dim", None) or d_model // n_heads  # Llama / Gemma give it explicitly
    return {
        "n_layers": int(_first(config, "num_hidden_layers", "n_layer")),
        "d_model": d_model,
        "n_heads": n_heads,
        "head_dim": int(head_dim),
        "max_context": int(_first(config, "max_position_embeddings", "n_positions")),
    }


def site_widths(config: Any) -> dict[str, int]:
    """Width of every site's activation: d_model, except attn_z = n_heads * head_dim."""
    d = dims(config)
    return {
        "resid_pre": d["d_model"],
        "resid_post": d["d_model"],
        "attn_out": d["d_model"],
        "mlp_out": d["d_model"],
        "attn_z": d["n_heads"] * d["head_dim"],
    }
