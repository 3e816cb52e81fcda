"""Per-token metrics from logits: KL(P_clean || P_patched) and the CE-loss change, in float32."""

from __future__ import annotations

import torch
from torch import Tensor


def log_probs(logits: Tensor) -> Tensor:
    """``[batch pos vocab]`` logits -> log-probabilities in float32 (float64 stays float64: reference runs)."""
    return torch.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)


def kl_per_token(clean_logp: Tensor, patched_logits: Tensor) -> Tensor:
    """KL(P || P') summed over the vocabulary: ``[batch pos vocab]`` x2 -> ``[batch pos]`` float32."""
    patched_logp = log_probs(patched_logits)
    return (clean_logp.exp() * (clean_logp - patched_logp)).sum(-1)


def ce_delta_per_token(clean_logp: Tensor, patched_logits: Tensor, next_ids: Tensor) -> Tensor:
    """CE(P') − CE(P) on the true next token: ``next_ids [batch pos]`` -> ``[batch pos]`` float32.

    Positions whose next token is unknown (``next_ids < 0``) give NaN.
    """
    patched_logp = log_probs(patched_logits)
    safe = next_ids.clamp(min=0).unsqueeze(-1)
    delta = clean_logp.gather(-1, safe).squeeze(-1) - patched_logp.gather(-1, safe).squeeze(-1)
    return torch.where(next_ids >= 0, delta, torch.full_like(delta, float("nan")))


def token_metrics(clean_logp: Tensor, patched_logits: Tensor, next_ids: Tensor,
                  clean_p: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """KL and ΔCE together (one log-softmax of the patched logits): each ``[batch pos]`` float32.

    clean_p: ``clean_logp.exp()``, when the caller measures several interventions against the same clean run."""
    patched_logp = log_probs(patched_logits)
    kl = ((clean_logp.exp() if clean_p is None else clean_p) * (clean_logp - patched_logp)).sum(-1)
    safe = next_ids.clamp(min=0).unsqueeze(-1)
    delta = clean_logp.gather(-1, safe).squeeze(-1) - patched_logp.gather(-1, safe).squeeze(-1)
    return kl, torch.where(next_ids >= 0, delta, torch.full_like(delta, float("nan")))


def next_token_ids(ids: Tensor) -> Tensor:
    """``ids [batch pos]`` -> the token after each position, −1 at the last position."""
    nxt = torch.full_like(ids, -1)
    nxt[:, :-1] = ids[:, 1:]
    return nxt
