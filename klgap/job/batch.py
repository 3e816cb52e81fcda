"""One batch of a job's contexts, cut after the last position its mode measures, and a cell's clean run of it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from klgap.forward import metrics
from klgap.job.masks import kept


@dataclass(frozen=True)
class Batch:
    """One batch of contexts, cut after the last position its mode measures.

    ids: ``[b stop]`` on the model's device (stop: the context length in all-token mode, t+k+1 single-token,
    t+1 many-samples); start: where the tails begin (0 all-token, t otherwise); next_ids: ``[b stop-start]``
    the token after each tail position (−1 past the context); keep: ``[b n]`` bool (CPU), the tokens patched and
    measured under --mask-special (klgap/job/masks.py)."""

    index: int
    context_ids: Tensor  # [b] (CPU)
    contexts: Tensor  # [b n] the full contexts (CPU)
    ids: Tensor
    start: int
    next_ids: Tensor
    keep: Tensor

    @classmethod
    def of(cls, contexts: Tensor, index: int, batch_size: int, mode: str, position: int, k: int,
           device: torch.device, mask: str = "first", special: tuple[int, ...] = ()) -> Batch:
        """Batch `index`; `mask` (--mask-special) and the tokenizer's `special` ids say which tokens it keeps."""
        context_ids = torch.arange(index * batch_size, min((index + 1) * batch_size, len(contexts)))
        full_cpu = contexts[context_ids]
        keep = kept(full_cpu, mask, special)
        if mode == "all_tokens":
            ids = full_cpu.to(device)
            return cls(index, context_ids, full_cpu, ids, 0, metrics.next_token_ids(ids), keep)
        stop = position + (k if mode == "single_token" else 0) + 1  # causal: nothing after it is needed
        next_ids = metrics.next_token_ids(full_cpu.to(device))[:, position:stop]
        return cls(index, context_ids, full_cpu, full_cpu[:, :stop].to(device), position, next_ids, keep)


@dataclass(frozen=True)
class Clean:
    """A cell's clean run of a batch, from the tail start on: each of its sites' activation ``[b n-start d]``
    (forward order), the clean logits' reference ``[b n-start vocab]`` and, per site, the activation of the site
    its substitute reads when that is another one (a transcoder's mlp_in ``[b n-start d_in]``; else None)."""

    acts: list[Tensor]
    ref: metrics.CleanReference
    reads: list[Tensor | None] | None = None

    def read(self, k: int = 0) -> Tensor | None:
        """What site `k`'s substitute reads ``[b n-start d_in]``, None when it reads its own site."""
        return None if self.reads is None else self.reads[k]


__all__ = ["Batch", "Clean"]
