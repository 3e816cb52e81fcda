"""Turn documents into fixed-length contexts of token ids: tokenize, join, pack, shuffle.

Shared by the token sources (klgap_tokens) and by `klgap.measure(..., tokens=[texts])`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from klgap.errors import KlgapError


def separator_id(tokenizer: Any) -> int | None:
    """The id placed between documents: the tokenizer's EOS, else its BOS, else None."""
    for attr in ("eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return None


def tokenize_documents(tokenizer: Any, documents: Sequence[str], batch: int = 256) -> Tensor:
    """Tokenize `documents` (no special tokens) and join them with :func:`separator_id` -> ``[n_tokens]`` int64."""
    sep = separator_id(tokenizer)
    warned = getattr(tokenizer, "deprecation_warnings", None)
    if isinstance(warned, dict):  # whole documents may exceed the model's length: no warning for that
        warned["sequence-length-is-longer-than-the-specified-maximum"] = True
    ids: list[int] = []
    for start in range(0, len(documents), batch):
        chunk = list(documents[start : start + batch])
        for i, doc_ids in enumerate(tokenizer(chunk, add_special_tokens=False)["input_ids"]):
            if start + i > 0 and sep is not None:
                ids.append(sep)
            ids.extend(doc_ids)
    return torch.tensor(ids, dtype=torch.long)


def pack(
    tokens: Tensor,
    n_contexts: int,
    context_len: int,
    bos_token_id: int | None,
    seed: int | None,
    source: str,
) -> Tensor:
    """Cut ``tokens: [n_tokens]`` into consecutive chunks, optionally shuffle, keep `n_contexts`.

    With a `bos_token_id` each chunk is ``context_len - 1`` tokens and the context is BOS + chunk;
    otherwise chunks are ``context_len`` tokens. `seed` shuffles the order of all chunks before the
    first `n_contexts` are kept (None keeps source order). Returns ``[n_contexts, context_len]`` int64.
    `source` names the text in the error raised when there are too few tokens.
    """
    chunk_len = context_len - 1 if bos_token_id is not None else context_len
    n_chunks = tokens.numel() // chunk_len
    if n_chunks < n_contexts:
        raise KlgapError(
            f"not enough text in {source}: {tokens.numel():,} tokens make {n_chunks:,} contexts of "
            f"{context_len} tokens, but {n_contexts:,} were asked for; give more text or fewer tokens"
        )
    chunks = tokens[: n_chunks * chunk_len].reshape(n_chunks, chunk_len)
    if seed is not None:
        order = torch.randperm(n_chunks, generator=torch.Generator().manual_seed(seed))
        chunks = chunks[order]
    chunks = chunks[:n_contexts]
    if bos_token_id is not None:
        bos = torch.full((n_contexts, 1), bos_token_id, dtype=torch.long)
        chunks = torch.cat([bos, chunks], dim=1)
    return chunks.long().contiguous()
