"""Which tokens a run leaves alone (``--mask-special``): neither patched nor measured.

The rule is sae_lens's evaluation (``sae_lens.evals.get_recons_loss(ignore_tokens=...)`` with the ids of
``sae_lens.util.get_special_token_ids``, as ``run_evals(exclude_special_tokens=True)`` passes them): a masked token
keeps its clean activation in every patched run (the SAE's reconstruction and every other substitute skip it) and
its row — KL, ΔCE, the SAE's geometry, explained variance — is not measured. Its ΔCE row is the prediction made *at*
the token (of the token after it), as sae_lens drops ``mask[:, :-1]``; the prediction *of* a separator, made at the
token before it, is measured. Zero ablation (perturbations that declare
:class:`klgap.protocols.EveryPositionPerturbation`) still replaces every position, masked ones included, as
sae_lens's zero-ablation hook does; only the measured tokens are measured.

- ``none``: every token patched and measured.
- ``first``: position 0 masked (the prepended BOS, or with ``--no-bos`` the first text token: an attention sink
  either way); klgap's behaviour before --mask-special (``--include-first-position`` was ``none``).
- ``all`` (the default): position 0 and every token whose id is one of the tokenizer's structural special ids
  (BOS, EOS, PAD, SEP, decoder start: :data:`SPECIAL_TOKEN_ATTRS`, the attributes sae_lens reads), wherever it
  stands: the separators that pack several documents into one context (``<|endoftext|>``, SmolLM2's ``<|im_end|>``
  as its EOS). Chat-template tokens registered only as *additional* special tokens are not masked (sae_lens leaves
  them too). With the default BOS prepended, ``all`` masks exactly what sae_lens masks. SAEBench's core eval
  (sae_bench/evals/core/main.py, ``exclude_special_tokens_from_reconstruction=True`` in all its runners) applies the
  same rule to {BOS, EOS, PAD}: the same set for a decoder-only tokenizer, which has no SEP / decoder-start id.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

#: the tokenizer attributes whose ids are special tokens (sae_lens.util._SPECIAL_TOKEN_ATTRS, sae-lens 6.x)
SPECIAL_TOKEN_ATTRS = ("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id")


def special_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """The structural special ids of `tokenizer`, sorted (none without a tokenizer)."""
    if tokenizer is None:
        return ()
    found = {getattr(tokenizer, attr, None) for attr in SPECIAL_TOKEN_ATTRS}
    return tuple(sorted(int(i) for i in found if isinstance(i, int)))


def kept(contexts: Tensor, rule: str, special: tuple[int, ...]) -> Tensor:
    """``contexts [b n]`` -> ``[b n]`` bool on their device: True where a token is patched and measured under
    `rule` (none, first, all) with the `special` ids."""
    keep = torch.ones_like(contexts, dtype=torch.bool)
    if rule == "none":
        return keep
    keep[:, 0] = False
    if rule == "all" and special:
        keep &= ~torch.isin(contexts, torch.tensor(special, dtype=contexts.dtype, device=contexts.device))
    return keep


def describe(rule: str, special: tuple[int, ...]) -> str:
    """What run.json says the rule masked (its ``masked_tokens``)."""
    if rule == "none":
        return "none: every token patched and measured"
    if rule == "first":
        return "first: position 0 not patched, not measured"
    ids = ", ".join(map(str, special)) or "none known: no tokenizer"
    return f"all: position 0 and the special token ids [{ids}] not patched, not measured"


__all__ = ["SPECIAL_TOKEN_ATTRS", "describe", "kept", "special_token_ids"]
