"""Tiny random models of every mapped family, built from configs (no downloads), and their TransformerLens twins.

``tiny_config(model_type)`` gives a 2-layer, d_model-64 config with the byte tokenizer's vocabulary (257);
``tiny_folder(model_type, root)`` saves the model (seeded) and the byte tokenizer with ``save_pretrained``, as a
user's folder would be; ``hooked_transformer(hf_model)`` converts the same weights into a TransformerLens
``HookedTransformer`` with TransformerLens's own config and weight converters (``TL_UNSUPPORTED`` lists the
families it cannot convert, with the reason).
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
from pathlib import Path
from typing import Any

import torch

from klgap_hf.tokenizer import BOS_ID, VOCAB_SIZE, byte_tokenizer

D, LAYERS, HEADS, KV_HEADS, CONTEXT = 64, 2, 4, 2, 128

#: families TransformerLens (3.9, HookedTransformer) cannot build, and why
TL_UNSUPPORTED: dict[str, str] = {
    "qwen2_moe": "TransformerLens 3.9 has no Qwen2MoeForCausalLM config branch or weight converter",
    "qwen3_moe": "TransformerLens 3.9 has no Qwen3MoeForCausalLM config branch or weight converter",
}


def tiny_config(model_type: str) -> Any:
    """The config of a tiny random `model_type` model: 2 layers, d_model 64, 4 heads (2 KV heads), vocab 257."""
    import transformers as T

    common = {"vocab_size": VOCAB_SIZE, "bos_token_id": BOS_ID, "eos_token_id": BOS_ID, "pad_token_id": BOS_ID}
    llama_like = {"num_hidden_layers": LAYERS, "hidden_size": D, "num_attention_heads": HEADS,
                  "num_key_value_heads": KV_HEADS, "intermediate_size": 2 * D, "max_position_embeddings": CONTEXT,
                  **common}
    moe = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": D // 2}
    if model_type == "gpt2":
        return T.GPT2Config(n_layer=LAYERS, n_embd=D, n_head=HEADS, n_positions=CONTEXT, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, **common)
    if model_type == "gpt_neox":
        return T.GPTNeoXConfig(num_hidden_layers=LAYERS, hidden_size=D, num_attention_heads=HEADS,
                               intermediate_size=4 * D, max_position_embeddings=CONTEXT, rotary_pct=0.25,
                               attention_dropout=0.0, hidden_dropout=0.0, **common)
    if model_type == "gptj":
        return T.GPTJConfig(n_layer=LAYERS, n_embd=D, n_head=HEADS, n_positions=CONTEXT, rotary_dim=8,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    if model_type == "llama":
        return T.LlamaConfig(**llama_like)
    if model_type == "mistral":
        return T.MistralConfig(**llama_like, sliding_window=None)
    if model_type == "mixtral":
        return T.MixtralConfig(**llama_like, num_local_experts=4, num_experts_per_tok=2)
    if model_type == "qwen2":
        return T.Qwen2Config(**llama_like)
    if model_type == "qwen2_moe":
        return T.Qwen2MoeConfig(**llama_like, **moe, shared_expert_intermediate_size=D)
    if model_type == "qwen3":
        return T.Qwen3Config(**llama_like, head_dim=D // HEADS)
    if model_type == "qwen3_moe":
        return T.Qwen3MoeConfig(**llama_like, **moe, head_dim=D // HEADS)
    if model_type == "gemma":
        return T.GemmaConfig(**llama_like, head_dim=D // HEADS)
    if model_type == "gemma2":
        return T.Gemma2Config(**llama_like, head_dim=32, sliding_window=8, query_pre_attn_scalar=32)
    if model_type == "gemma3_text":
        return T.Gemma3TextConfig(**llama_like, head_dim=32, sliding_window=8, query_pre_attn_scalar=32)
    if model_type == "gemma3":  # the multimodal checkpoint; its image tokens 257-259 lie outside the byte tokenizer's
        text = T.Gemma3TextConfig(**{**llama_like, "vocab_size": VOCAB_SIZE + 3}, head_dim=32, sliding_window=8,
                                  query_pre_attn_scalar=32)
        vision = T.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, image_size=28, patch_size=14)
        return T.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                              boi_token_index=VOCAB_SIZE, eoi_token_index=VOCAB_SIZE + 1,
                              image_token_index=VOCAB_SIZE + 2, **{**common, "vocab_size": VOCAB_SIZE + 3})
    if model_type == "phi3":
        return T.Phi3Config(**llama_like, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)
    if model_type == "olmo":  # OLMo checkpoints have no grouped-query attention (nor do TransformerLens's converters)
        return T.OlmoConfig(**{**llama_like, "num_key_value_heads": HEADS})
    if model_type == "olmo2":
        return T.Olmo2Config(**{**llama_like, "num_key_value_heads": HEADS})
    if model_type == "gpt_oss":
        return T.GptOssConfig(**llama_like, head_dim=D // HEADS, num_local_experts=4, num_experts_per_tok=2,
                              sliding_window=8, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    # architectures with no hand-written map (klgap_hf.generic)
    if model_type == "gpt_neo":
        return T.GPTNeoConfig(num_layers=LAYERS, hidden_size=D, num_heads=HEADS, max_position_embeddings=CONTEXT,
                              attention_types=[[["global", "local"], 1]], window_size=8, resid_dropout=0.0,
                              embed_dropout=0.0, attention_dropout=0.0, **common)
    if model_type == "phi":
        return T.PhiConfig(num_hidden_layers=LAYERS, hidden_size=D, num_attention_heads=HEADS, intermediate_size=2 * D,
                           max_position_embeddings=CONTEXT, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0,
                           **common)
    if model_type == "opt":
        return T.OPTConfig(num_hidden_layers=LAYERS, hidden_size=D, ffn_dim=2 * D, num_attention_heads=HEADS,
                           word_embed_proj_dim=D, max_position_embeddings=CONTEXT, dropout=0.0, **common)
    if model_type == "bloom":
        return T.BloomConfig(n_layer=LAYERS, hidden_size=D, n_head=HEADS, **common)
    if model_type == "qwen3_5_text":  # hybrid: Gated DeltaNet (linear attention) layers 0-2, full attention layer 3
        return T.Qwen3_5TextConfig(**{**llama_like, "num_hidden_layers": 4}, head_dim=D // HEADS)
    raise KeyError(model_type)


def tiny_model(model_type: str, seed: int = 0) -> torch.nn.Module:
    """The tiny model of `model_type`, random init under `seed` (global RNG untouched), float32, eval mode."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config(model_type), dtype=torch.float32)
        # random init leaves some norms at exactly 1 / 0 (and Gemma's at 0 = scale 1): perturb every parameter so a
        # site placed before or after a norm cannot give the same numbers by accident
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


def tiny_folder(model_type: str, root: Path, tokenizer: bool = True) -> Path:
    """`root/model_type`: the tiny model and the byte tokenizer (tokenizer.json only), saved as a user would;
    ``tokenizer=False``: the model alone (``save_pretrained`` of the model only: config and weights)."""
    folder = root / model_type
    tiny_model(model_type).save_pretrained(folder)
    if tokenizer:
        byte_tokenizer(CONTEXT).backend_tokenizer.save(str(folder / "tokenizer.json"))
    return folder


# ------------------------------------------------------------------------------------------- TransformerLens

#: model_type -> (TransformerLens official model name whose config template is used, when TransformerLens picks
#: the configuration by name rather than from the HF config)
TL_TEMPLATES = {
    "gemma": "google/gemma-2b",
    "gemma2": "google/gemma-2-2b",
    "gemma3_text": "google/gemma-3-270m",
    "gemma3": "google/gemma-3-4b-pt",
    "olmo": "allenai/OLMo-1B-hf",
    "olmo2": "allenai/OLMo-2-0425-1B",
}


def _redimension(cfg: dict[str, Any], hf_config: Any) -> dict[str, Any]:
    """A TransformerLens template picked by name, with the tiny model's shapes (the rest as TransformerLens has it)."""
    text = hf_config.get_text_config()
    n = text.num_hidden_layers
    cfg = dict(cfg)
    cfg.update(
        d_model=text.hidden_size,
        d_head=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
        n_heads=text.num_attention_heads, d_mlp=text.intermediate_size, n_layers=n, n_ctx=text.max_position_embeddings,
        d_vocab=text.vocab_size,
    )
    if "n_key_value_heads" in cfg or text.num_key_value_heads != text.num_attention_heads:
        cfg["n_key_value_heads"] = text.num_key_value_heads
    if "rotary_dim" in cfg:
        cfg["rotary_dim"] = cfg["d_head"]
    if "attn_types" in cfg:
        types = getattr(text, "layer_types", None)
        cfg["attn_types"] = (["local" if t == "sliding_attention" else "global" for t in types] if types
                             else ["global"] * n)
    if "window_size" in cfg and getattr(text, "sliding_window", None):
        cfg["window_size"] = text.sliding_window
    if "rotary_base" in cfg:
        rope = getattr(text, "rope_parameters", None) or {}
        full = rope.get("full_attention", rope) if isinstance(rope, dict) else {}
        local = rope.get("sliding_attention", {}) if isinstance(rope, dict) else {}
        if full.get("rope_theta"):
            cfg["rotary_base"] = full["rope_theta"]
        if local.get("rope_theta") and "rotary_base_local" in cfg:
            cfg["rotary_base_local"] = local["rope_theta"]
        if "rotary_scaling_factor" in cfg and full.get("rope_type") in (None, "default"):
            cfg.pop("rotary_scaling_factor")
    if getattr(text, "query_pre_attn_scalar", None) and "attn_scale" in cfg:
        cfg["attn_scale"] = text.query_pre_attn_scalar ** 0.5
    for key, attr in (("attn_scores_soft_cap", "attn_logit_softcapping"),
                      ("output_logits_soft_cap", "final_logit_softcapping")):
        if key in cfg:
            cfg[key] = getattr(text, attr, None) or -1.0
    act = getattr(text, "hidden_activation", None) or getattr(text, "hidden_act", None)
    if act and "act_fn" in cfg:
        cfg["act_fn"] = act  # the template's activation is its checkpoint's; the tiny model's config names its own
    eps = getattr(text, "rms_norm_eps", None)
    if eps is not None and "eps" in cfg:
        cfg["eps"] = eps
    return cfg


def tl_config(hf_model: torch.nn.Module) -> dict[str, Any]:
    """TransformerLens's config dict for `hf_model` (``convert_hf_model_config`` on its saved config; for families
    TransformerLens configures by name, that name's template with the tiny model's shapes)."""
    from transformer_lens import loading_from_pretrained as lfp

    hf_config = copy.deepcopy(hf_model.config)
    hf_config.architectures = [type(hf_model).__name__]
    if hf_config.model_type == "gpt2":
        hf_config.n_ctx = hf_config.n_positions  # transformers 5 dropped n_ctx; TransformerLens still reads it
    if hf_config.model_type == "phi":  # transformers 5 moved it into rope_parameters; TransformerLens reads it here
        hf_config.partial_rotary_factor = hf_config.rope_parameters["partial_rotary_factor"]
    template = TL_TEMPLATES.get(hf_config.model_type)
    if template is None:
        with tempfile.TemporaryDirectory() as tmp, _auto_config_returns(hf_config):
            hf_config.save_pretrained(tmp)  # TransformerLens reads the config of a folder; it gets this object
            return lfp.convert_hf_model_config(tmp)
    with _auto_config_returns(hf_config):  # OLMo's templates read a field (clip_qkv) from the HF config
        cfg = lfp.convert_hf_model_config(template)
    return _redimension(cfg, hf_config)


@contextlib.contextmanager
def _auto_config_returns(hf_config: Any):
    from transformer_lens import loading_from_pretrained as lfp

    original = lfp.AutoConfig.from_pretrained
    lfp.AutoConfig.from_pretrained = lambda *a, **k: hf_config
    try:
        yield
    finally:
        lfp.AutoConfig.from_pretrained = original


def hooked_transformer(hf_model: torch.nn.Module, dtype: torch.dtype = torch.float64) -> Any:
    """A TransformerLens HookedTransformer holding exactly the weights of `hf_model` (TransformerLens's own weight
    converter for the architecture; no folding, no centring)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.loading_from_pretrained import get_pretrained_state_dict

    cfg_dict = tl_config(hf_model)
    cfg_dict.pop("dtype", None)
    cfg = HookedTransformerConfig(**{**cfg_dict, "tokenizer_name": None, "device": "cpu", "dtype": dtype})
    model = HookedTransformer(cfg)
    source = copy.deepcopy(hf_model).to(dtype)
    # an existing path as the "official name": TransformerLens then converts `source` as it is, fetching nothing
    state = get_pretrained_state_dict(tempfile.gettempdir(), cfg, hf_model=source, dtype=dtype)
    model.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False, center_unembed=False,
                                      fold_value_biases=False, refactor_factored_attn_matrices=False)
    return model.to(dtype).eval()
