"""A model object the user already holds (a transformers model, or nnsight's wrapper of one) as a LoadedModel.

``klgap.measure(model=obj)`` asks the ``wrap_model`` hook; this answers for Hugging Face causal LMs of every
family with a site map (klgap_hf.families), wherever the model is: its own device and dtype are kept.
"""

from __future__ import annotations

from typing import Any

import torch

from klgap.protocols import LoadedModel
from klgap_hf.loaded import wrap_loaded


def unwrap(model: Any, tokenizer: Any) -> tuple[Any, Any]:
    """(the transformers model, its tokenizer) from a transformers model or an nnsight wrapper of one."""
    if isinstance(model, torch.nn.Module):
        return model, tokenizer
    # nnsight's wrappers (LanguageModel, NNsight: Envoys) keep the wrapped module as `_module` (`_model` before 0.5)
    inner = getattr(model, "_module", None) or getattr(model, "_model", None)
    if isinstance(inner, torch.nn.Module):
        tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        model = inner
    return model, tokenizer


def wrap_in_memory(model: Any, tokenizer: Any) -> LoadedModel | None:
    """A LoadedModel around `model` (None when it is no transformers model): klgap traces it with its own nnsight
    wrapper; the weights stay where they are."""
    model, tokenizer = unwrap(model, tokenizer)
    config = getattr(model, "config", None)
    if not isinstance(model, torch.nn.Module) or getattr(config, "model_type", None) is None:
        return None
    first = next(model.parameters())
    name = str(getattr(config, "_name_or_path", "") or config.model_type)
    return wrap_loaded(name, model, tokenizer, first.device, first.dtype, move=False,
                       info={"source": f"in memory ({type(model).__name__})"})
