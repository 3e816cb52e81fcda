"""The three measurement modes (METHOD.md §3) on one batch skeleton, for any cell: clean run -> SAE view ->
substitutes -> patched runs -> per-token KL / ΔCE rows.

- all_tokens:   patch every measured position of each context; KL and ΔCE at every position.
- single_token: patch only `position` t; measure positions t..t+k.
- many_samples: at position t, draw `n_samples` substitutes of a random perturbation; the SAE's KL
                gets a z-score against them.

A cell patches one site or several jointly (klgap/job/patch.py); its clean run is its own executor's or the
batch's shared clean forward (klgap/job/batches.py), cut to the tail it measures (from position 0 in all-token
mode, t in the others). :func:`intervention_rows` is the one loop from substitutes to rows. The rows of a joint
cell carry its lowest site's clean geometry (eps, cos, ...) and side sums. Logits never outlive their batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from klgap.job.batch import Batch, Clean
from klgap.job.loaded import LoadedCell
from klgap.job.patch import Patch
from klgap.job.view import SaeView

Frames = tuple[pd.DataFrame, dict[str, Any]]  # one batch's rows and side sums


def table(columns: dict[str, Any]) -> pd.DataFrame:
    return pd.DataFrame({k: (v.detach().cpu().numpy() if isinstance(v, Tensor) else v) for k, v in columns.items()})


def intervention_rows(patch: Patch, clean: Clean, next_ids: Tensor, base: dict[str, Any],
                      keep: slice = slice(None)) -> list[pd.DataFrame]:
    """Per intervention (``patch.stack`` per patched call): its patched logits, KL and ΔCE against the clean run
    at each tail position, the rows at `keep` of those."""
    frames = []
    indexed = list(enumerate(patch.interventions))  # j keys each substitute's generator
    for start in range(0, len(indexed), patch.stack):
        group = indexed[start : start + patch.stack]
        for (_, intervention), logits in zip(group, patch.logits(group), strict=True):
            kl, ce = clean.ref.measure(logits, next_ids)
            frames.append(table({**base, "intervention": intervention.name, "draw": -1,
                                 "kl": kl[:, keep].reshape(-1), "ce_delta": ce[:, keep].reshape(-1)}))
            del logits
    return frames


@torch.no_grad()
def all_tokens(cell: LoadedCell, batch: Batch, clean: Clean, skip_first: bool, drop_last: bool) -> Frames:
    n_ctx, ctx_len = batch.ids.shape
    first = 1 if skip_first else 0
    n_pos = ctx_len - first  # patched positions; with drop_last the last of them is not measured
    acts = clean.acts[0][:, first:].reshape(n_ctx * n_pos, -1)  # [b*npos d]
    view = SaeView.of(acts, cell.lowest.sae, cell.lowest.center, cell.split)
    position = torch.arange(first, ctx_len).repeat(n_ctx)
    base = {"context": batch.context_ids.repeat_interleave(n_pos), "position": position,
            "token_id": batch.contexts[:, first:].reshape(-1), **view.stats, "offset": position}
    frames = intervention_rows(cell.patch(batch, view, slice(first, None)), clean, batch.next_ids, base,
                               keep=slice(first, None))
    frame = pd.concat(frames, ignore_index=True)
    if not drop_last:
        return frame, view.side_stats()
    # the study's protocol: every position patched (the last too), KL and ΔCE kept for positions < ctx_len - 1
    measured = position < ctx_len - 1  # [n_ctx * n_pos] bool
    return frame[frame["position"] < ctx_len - 1].reset_index(drop=True), view.side_stats(measured)


def single_token_rows(context_ids: Tensor, full_cpu: Tensor, view: SaeView, t: int, k: int) -> dict[str, Tensor]:
    """The per-token columns of a single-token batch, ``n_ctx * (k + 1)`` rows: context, position t..t+k, offset,
    token id, and the SAE's stats at t repeated over the k + 1 measured positions."""
    positions = torch.arange(t, t + k + 1)
    return {
        "context": context_ids.repeat_interleave(k + 1),
        "position": positions.repeat(len(context_ids)),
        "offset": (positions - t).repeat(len(context_ids)),
        "token_id": full_cpu[:, positions].reshape(-1),
        **{name: value.repeat_interleave(k + 1) for name, value in view.stats.items()},
    }


@torch.no_grad()
def single_token(cell: LoadedCell, batch: Batch, clean: Clean, k: int) -> Frames:
    t = batch.start
    view = SaeView.of(clean.acts[0][:, 0], cell.lowest.sae, cell.lowest.center, cell.split)  # [b d]: position t
    base = single_token_rows(batch.context_ids, batch.contexts, view, t, k)
    frames = intervention_rows(cell.patch(batch, view, t), clean, batch.next_ids, base)
    return pd.concat(frames, ignore_index=True), view.side_stats()


@torch.no_grad()
def many_samples(cell: LoadedCell, batch: Batch, clean: Clean, n_draws: int) -> Frames:
    t, n_ctx = batch.start, batch.ids.shape[0]
    view = SaeView.of(clean.acts[0][:, 0], cell.lowest.sae, cell.lowest.center, cell.split)
    base = {"context": batch.context_ids, "position": t, "offset": 0, "token_id": batch.contexts[:, t], **view.stats}
    patch = cell.patch(batch, view, t)
    frames = intervention_rows(patch, clean, batch.next_ids, base)
    # N draws per context: rows are (context, draw) pairs, in chunks
    kl_all, ce_all = [], []
    for rows, logits in patch.draws(n_draws):
        kl, ce = clean.ref.select(rows).measure(logits, batch.next_ids[rows])
        kl_all.append(kl[:, 0])
        ce_all.append(ce[:, 0])
        del logits
    owner = torch.arange(n_ctx, device=batch.ids.device).repeat_interleave(n_draws)
    owner_cpu = owner.cpu()
    frames.append(table({
        "context": batch.context_ids[owner_cpu],
        "position": t,
        "offset": 0,
        "token_id": batch.contexts[owner_cpu, t],
        **{name: value[owner] for name, value in view.stats.items()},
        "intervention": patch.sample_name,
        "draw": torch.arange(n_draws).repeat(n_ctx),
        "kl": torch.cat(kl_all),
        "ce_delta": torch.cat(ce_all),
    }))
    return pd.concat(frames, ignore_index=True), view.side_stats()


def token_texts(frame: pd.DataFrame, tokenizer: Any) -> dict[str, str]:
    """The text of each token id the rows hold (a report is then built without a tokenizer)."""
    return {str(int(i)): tokenizer.decode([int(i)]) for i in np.unique(frame["token_id"].to_numpy())}


__all__ = ["Batch", "Clean", "Frames", "all_tokens", "intervention_rows",
           "many_samples", "single_token", "single_token_rows", "table", "token_texts"]
