"""Activations to train SAEs on: every (site, layer) asked for, gathered in one pass over the contexts through
nnsight (klgap.forward.activations), so any model a plugin can load gets an SAE (no TransformerLens model, no hub).
"""

from __future__ import annotations

import torch
from torch import Tensor

from klgap.forward import activations
from klgap.job.masks import kept, special_token_ids
from klgap.protocols import LoadedModel


def gather(model: LoadedModel, site: str, layer: int, contexts: Tensor, batch_size: int = 16,
           skip_first_position: bool = True, progress: bool = False) -> Tensor:
    """Site activations for every context: ``[n_tokens d]`` float32 on CPU (position 0 left out by default)."""
    rule = "first" if skip_first_position else "none"
    return gather_many(model, [(site, layer)], contexts, batch_size, rule, progress)[(site, layer)]


#: where each site is reached inside a block (nnsight reads sites in the order the forward pass meets them)
EXECUTION_ORDER = ("resid_pre", "attn_z", "attn_out", "mlp_out", "resid_post")


@torch.no_grad()
def gather_many(model: LoadedModel, sites: list[tuple[str, int]], contexts: Tensor, batch_size: int = 16,
                exclude: str = "first", progress: bool = False) -> dict[tuple[str, int], Tensor]:
    """Activations at several (site, layer)s from one pass over `contexts`: each ``[n_tokens d]`` float32, CPU, the
    tokens `exclude` names left out (none, first, all: the rule of --mask-special, klgap/job/masks.py; ``all``
    leaves out position 0 and the tokenizer's structural special ids wherever they stand, as sae_lens's trainer
    does with ``exclude_special_tokens=True``)."""
    from tqdm.auto import tqdm

    order = sorted(range(len(sites)), key=lambda i: (sites[i][1], EXECUTION_ORDER.index(sites[i][0])))
    specs = [model.site_map(*sites[i]) for i in order]  # in the order the forward pass meets them
    special = special_token_ids(model.tokenizer) if exclude == "all" else ()
    chunks: dict[tuple[str, int], list[Tensor]] = {key: [] for key in sites}
    for start in tqdm(range(0, len(contexts), batch_size), desc="activations", disable=not progress, unit="batch"):
        ids = contexts[start : start + batch_size].to(model.device)
        keep = kept(ids, exclude, special)  # [b n] bool
        acts = activations.collect_many(model, specs, ids)
        for i, value in zip(order, acts, strict=True):
            chunks[sites[i]].append(value[keep.to(value.device)].float().cpu())  # [m d], row-major
    return {key: torch.cat(parts) for key, parts in chunks.items()}

__all__ = ["EXECUTION_ORDER", "gather", "gather_many"]
