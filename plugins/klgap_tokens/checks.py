"""Shared checks for token sources; each raises a one-line KlgapError naming the bad value."""

from __future__ import annotations

from typing import Any

from klgap.errors import KlgapError, NoTokenizer
from klgap.protocols import LoadedModel


def check_request(model: LoadedModel, n_contexts: int, context_len: int, prepend_bos: bool) -> None:
    """Reject a request no token source can satisfy: too few contexts, too short or too long."""
    if not isinstance(n_contexts, int) or n_contexts < 1:
        raise KlgapError(f"n_contexts must be an integer ≥ 1, got {n_contexts!r}")
    low = 2 if prepend_bos and model.bos_token_id is not None else 1
    if not isinstance(context_len, int) or context_len < low:
        raise KlgapError(f"context_len must be an integer ≥ {low}, got {context_len!r}")
    if context_len > model.max_context:
        raise KlgapError(
            f"context_len {context_len} is larger than {model.name}'s maximum context of {model.max_context}"
        )


def text_tokenizer(model: LoadedModel) -> Any:
    """The tokenizer a text source tokenizes with; KlgapError when the model has none (its tokenizer note says why,
    e.g. which files its folder lacks)."""
    if model.tokenizer is None:
        raise NoTokenizer(model.name, model.tokenizer_note)
    return model.tokenizer
