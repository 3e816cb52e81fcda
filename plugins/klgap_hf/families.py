"""Site maps of the supported architectures: where each site lives in the Hugging Face module tree.

Every family maps the six sites of :data:`klgap.plan.sites.SITES` at block L to a :class:`SiteSpec`, and each site
means what the TransformerLens hook of the same name means (``transformer_lens/components/transformer_block.py``):

====================  =====================================================================================
resid_pre             input of block L (``hook_resid_pre``)
resid_post            output of block L (``hook_resid_post``; a plain tensor in transformers 5)
attn_out              what the attention sublayer adds to the residual stream (``hook_attn_out``): the
                      attention module's output ``[0]``, or, in families that normalise a sublayer's output
                      before the residual add (Gemma 2/3, OLMo 2), the output of that post-norm
mlp_in                the input of the MLP / mixture-of-experts module, after the pre-MLP norm where the family has
                      one (``ln2.hook_normalized``): what a transcoder reads
mlp_out               what the MLP / mixture-of-experts sublayer adds to the residual stream (``hook_mlp_out``),
                      after the post-feed-forward norm where the family has one
attn_z                input of the attention output projection: the concatenated heads
                      ``[batch pos n_heads * head_dim]`` (``attn.hook_z``, flattened)
====================  =====================================================================================

A :class:`Family` describes one ``config.model_type``; :data:`FAMILIES` holds the hand-written maps (checked
against TransformerLens's ``run_with_cache`` in ``tests/plugins/test_hf_families.py``); architectures without one
go through :mod:`klgap_hf.generic`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from klgap.errors import KlgapError
from klgap.protocols import BlockLayout, ModelShape, SiteSpec
from klgap.plan.sites import check_site


@dataclass(frozen=True)
class Point:
    """Where a site lives relative to block L: a submodule path inside the block ('' = the block itself),
    its input or output, and for a tuple output the element that holds the ``[batch pos d]`` tensor."""

    module: str
    io: Literal["input", "output"] = "output"
    index: int | None = None

    def describe(self) -> str:
        where = self.module or "(block)"
        part = "input" if self.io == "input" else ("output" if self.index is None else f"output[{self.index}]")
        return f"{where} {part}"


RESID_PRE = Point("", "input")
RESID_POST = Point("", "output")


@dataclass(frozen=True)
class Family:
    """One architecture: where its blocks are, where each site lives inside a block, and what the fast paths need.

    A site whose point is None is not mapped (`unmapped` says why); :class:`SiteMap` refuses it by name.
    """

    model_type: str  # transformers' config.model_type
    blocks: str  # the ModuleList of decoder blocks, e.g. "transformer.h"
    final_norm: str  # applied to the last block's output
    unembed: str  # the LM head
    attn_out: Point | None
    mlp_out: Point | None
    attn_z: Point | None
    mlp_in: Point | None = None  # the MLP module's input (what a transcoder reads)
    examples: tuple[str, ...] = ()  # hub repo ids of checkpoints of this family
    transformer_lens: str = ""  # the TransformerLens architecture whose hooks the sites reproduce ("" = none)
    note: str = ""  # anything a reader of the report should know about the site choice
    unmapped: str = ""  # why a site with no point is not mapped
    softcap: str | None = None  # config attribute of a final-logit soft cap the LM head applies (Gemma 2)
    kv_cache: bool = True  # the single-token / many-samples fast path may be tried
    kv_cache_note: str = ""  # why it is off
    inferred: bool = False  # found by klgap_hf.generic, not written here
    block_output_index: int | None = None  # a block that returns a tuple: where its hidden states are
    attn_z_width: int | None = None  # attn_z's width when not n_heads * head_dim (found by klgap_hf.generic)

    def points(self) -> dict[str, Point | None]:
        """Every site's point inside a block, in the order of :data:`klgap.plan.sites.SITES`."""
        resid_post = RESID_POST if self.block_output_index is None else Point("", "output", self.block_output_index)
        return {"resid_pre": RESID_PRE, "resid_post": resid_post, "attn_out": self.attn_out,
                "mlp_in": self.mlp_in, "mlp_out": self.mlp_out, "attn_z": self.attn_z}

    def sites(self) -> tuple[str, ...]:
        """The sites this family maps."""
        return tuple(site for site, point in self.points().items() if point is not None)

    def layout(self, softcap: float | None = None) -> BlockLayout | None:
        """What :mod:`klgap.forward.suffix` needs to rerun only the layers above a site (None: final norm or head unknown);
        `softcap`: the value of the config's final-logit soft cap (:attr:`softcap` names it)."""
        if not (self.final_norm and self.unembed):
            return None
        return BlockLayout(self.blocks, self.final_norm, self.unembed, softcap)

    def site_map(self, site: str, layer: int) -> SiteSpec:
        """The SiteSpec of `site` in block `layer` (the layer is not range-checked here; see :class:`SiteMap`)."""
        check_site(site)
        point = self.points()[site]
        if point is None:
            raise KlgapError(
                f"site {site!r} is not mapped for model type {self.model_type!r}: {self.unmapped or 'unknown'}; "
                f"mapped sites: {', '.join(self.sites())}"
            )
        module = f"{self.blocks}.{layer}" + (f".{point.module}" if point.module else "")
        return SiteSpec(module, point.io, point.index)


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


# ----------------------------------------------------------------------------------------------- the maps

POST_NORM_NOTE = (
    "{name} normalises each sublayer's output before adding it to the residual stream: attn_out is the output "
    "of {attn_norm} and mlp_out the output of {mlp_norm} (what is added to the residual, as TransformerLens's "
    "hook_attn_out / hook_mlp_out{tl}); attn_z is the input of o_proj"
)
MOE_NOTE = (
    "mlp_out is the output of the sparse mixture-of-experts block (the routed experts' weighted sum{shared}): "
    "what is added to the residual stream"
)


def _pre_norm(model_type: str, *, blocks: str = "model.layers", attn: str = "self_attn", proj: str = "o_proj",
              mlp: str = "mlp", mlp_index: int | None = None, final_norm: str = "model.norm",
              unembed: str = "lm_head", **extra: Any) -> Family:
    """A family whose sublayers add their module's output to the residual stream as it is (pre-norm or no norm)."""
    return Family(
        model_type, blocks, final_norm, unembed,
        attn_out=Point(attn, "output", 0), mlp_out=Point(mlp, "output", mlp_index),
        attn_z=Point(f"{attn}.{proj}", "input"), mlp_in=Point(mlp, "input"), **extra,
    )


def _post_norm(model_type: str, name: str, *, blocks: str = "model.layers", tl: str = "",
               final_norm: str = "model.norm", note: str = "", **extra: Any) -> Family:
    """A family that normalises the attention / MLP output before the residual add (Gemma 2/3, OLMo 2)."""
    attn_norm, mlp_norm = "post_attention_layernorm", "post_feedforward_layernorm"
    tl_text = f" for {tl}" if tl else ""
    return Family(
        model_type, blocks, final_norm, "lm_head",
        attn_out=Point(attn_norm), mlp_out=Point(mlp_norm), attn_z=Point("self_attn.o_proj", "input"),
        mlp_in=Point("mlp", "input"),
        note=POST_NORM_NOTE.format(name=name, attn_norm=attn_norm, mlp_norm=mlp_norm, tl=tl_text) + note,
        transformer_lens=tl, **extra,
    )


_TL_LACKS = ("TransformerLens has no HookedTransformer for {what}; the sites follow its rule all the same "
             "(attn_out / mlp_out are what is added to the residual stream)")

FAMILIES: dict[str, Family] = {
    family.model_type: family
    for family in (
        _pre_norm("gpt2", blocks="transformer.h", attn="attn", proj="c_proj", final_norm="transformer.ln_f",
                  examples=("openai-community/gpt2", "openai-community/gpt2-xl"), transformer_lens="GPT2LMHeadModel"),
        _pre_norm("gpt_neox", blocks="gpt_neox.layers", attn="attention", proj="dense",
                  final_norm="gpt_neox.final_layer_norm",
                  examples=("EleutherAI/pythia-70m-deduped", "EleutherAI/pythia-1b"),
                  transformer_lens="GPTNeoXForCausalLM",
                  note="parallel attention and MLP (use_parallel_residual): both read resid_pre"),
        _pre_norm("gptj", blocks="transformer.h", attn="attn", proj="out_proj", final_norm="transformer.ln_f",
                  examples=("EleutherAI/gpt-j-6b",), transformer_lens="GPTJForCausalLM",
                  note="parallel attention and MLP: both read resid_pre"),
        _pre_norm("llama", examples=("meta-llama/Llama-3.1-8B", "HuggingFaceTB/SmolLM2-135M"),
                  transformer_lens="LlamaForCausalLM"),
        _pre_norm("mistral", examples=("mistralai/Mistral-7B-v0.1",), transformer_lens="MistralForCausalLM"),
        _pre_norm("mixtral", examples=("mistralai/Mixtral-8x7B-v0.1",), transformer_lens="MixtralForCausalLM",
                  note=MOE_NOTE.format(shared="")),
        _pre_norm("qwen2", examples=("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-0.5B"),
                  transformer_lens="Qwen2ForCausalLM"),
        _pre_norm("qwen2_moe", examples=("Qwen/Qwen1.5-MoE-A2.7B", "Qwen/Qwen2-57B-A14B"),
                  note=MOE_NOTE.format(shared=" plus the sigmoid-gated shared expert") + "; "
                  + _TL_LACKS.format(what="Qwen2-MoE")),
        _pre_norm("qwen3", examples=("Qwen/Qwen3-1.7B-Base", "Qwen/Qwen3-8B-Base"),
                  transformer_lens="Qwen3ForCausalLM"),
        _pre_norm("qwen3_moe", examples=("Qwen/Qwen3-30B-A3B-Base",),
                  note=MOE_NOTE.format(shared="") + "; " + _TL_LACKS.format(what="Qwen3-MoE")),
        _pre_norm("gemma", examples=("google/gemma-2b", "google/gemma-2b-it"), transformer_lens="GemmaForCausalLM",
                  note="the embeddings are scaled by sqrt(d_model) before block 0, so resid_pre of layer 0 is scaled"),
        _post_norm("gemma2", "Gemma 2", tl="Gemma2ForCausalLM", softcap="final_logit_softcapping",
                   examples=("google/gemma-2-2b", "google/gemma-2-9b")),
        _post_norm("gemma3_text", "Gemma 3", tl="Gemma3ForCausalLM", softcap="final_logit_softcapping",
                   examples=("google/gemma-3-270m", "google/gemma-3-1b-pt")),
        _post_norm("gemma3", "Gemma 3", tl="Gemma3ForConditionalGeneration",
                   blocks="model.language_model.layers", final_norm="model.language_model.norm",
                   examples=("google/gemma-3-4b-pt", "google/gemma-3-12b-it", "google/gemma-3-27b-pt"),
                   note="; the multimodal checkpoint: the sites are its language model's (text input only)"),
        _pre_norm("phi3", examples=("microsoft/Phi-3-mini-4k-instruct",), transformer_lens="Phi3ForCausalLM"),
        _pre_norm("olmo", examples=("allenai/OLMo-1B-hf",), transformer_lens="OlmoForCausalLM"),
        _post_norm("olmo2", "OLMo 2", tl="Olmo2ForCausalLM", examples=("allenai/OLMo-2-0425-1B",),
                   note="; OLMo 2 has no norm before its sublayers"),
        _pre_norm("gpt_oss", mlp_index=0, examples=("openai/gpt-oss-20b",), transformer_lens="GptOssForCausalLM",
                  note=MOE_NOTE.format(shared="") + "; the MLP returns (output, router scores): mlp_out is [0]"),
    )
}


def family_for(model_type: str) -> Family:
    """The family of a transformers ``config.model_type``, or a KlgapError naming the supported ones."""
    if model_type not in FAMILIES:
        raise KlgapError(
            f"model type {model_type!r} has no site map; mapped: {', '.join(sorted(FAMILIES))} "
            "(klgap_hf.generic maps the residual stream of other decoder-only models)"
        )
    return FAMILIES[model_type]


# ----------------------------------------------------------------------------------------------- shapes


def text_config(config: Any) -> Any:
    """The language model's config (a multimodal checkpoint's ``text_config``; a text model's own config)."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


NO_LIMIT = 1 << 20  # max_context of a model whose config names no position limit (ALiBi: BLOOM)


def _first(config: Any, *names: str, default: Any = None) -> Any:
    """The first of `names` that `config` has and that is not None (else `default`, else a KlgapError)."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    if default is not None:
        return default
    raise KlgapError(f"{type(config).__name__} has none of {', '.join(names)}; cannot read the model's shape")


def dims(config: Any) -> dict[str, int]:
    """n_layers, d_model, n_heads, head_dim, max_context, vocab_size of a transformers config (its text part)."""
    config = text_config(config)
    d_model = int(_first(config, "hidden_size", "n_embd", "d_model"))
    n_heads = int(_first(config, "num_attention_heads", "n_head", "num_heads"))
    head_dim = getattr(config, "head_dim", None) or d_model // n_heads  # Llama / Gemma give it explicitly
    return {
        "n_layers": int(_first(config, "num_hidden_layers", "n_layer", "num_layers")),
        "d_model": d_model,
        "n_heads": n_heads,
        "head_dim": int(head_dim),
        "max_context": int(_first(config, "max_position_embeddings", "n_positions", "seq_length", default=NO_LIMIT)),
        "vocab_size": int(_first(config, "vocab_size")),
    }


def site_widths(config: Any, attn_z: int | None = None) -> dict[str, int]:
    """Width of every site's activation: d_model, except attn_z = n_heads * head_dim (or `attn_z` when known)."""
    d = dims(config)
    return {
        "resid_pre": d["d_model"],
        "resid_post": d["d_model"],
        "attn_out": d["d_model"],
        "mlp_in": d["d_model"],
        "mlp_out": d["d_model"],
        "attn_z": attn_z or d["n_heads"] * d["head_dim"],
    }


def shape_of(config: Any) -> ModelShape:
    """A transformers config's klgap.ModelShape: layers, longest context, and the width of the sites that are
    d_model wide (attn_z's is known once the model is built)."""
    d = dims(config)
    widths = {site: width for site, width in site_widths(config).items() if site != "attn_z"}
    return ModelShape(n_layers=d["n_layers"], max_context=d["max_context"], site_widths=widths)


__all__ = ["FAMILIES", "Family", "Point", "SiteMap", "dims", "family_for", "shape_of", "site_widths", "text_config"]
