"""The three measurement modes (METHOD.md §3) on one batch skeleton, for any cell: clean run -> SAE view ->
substitutes -> patched runs -> per-token KL / ΔCE rows (and the clean CE, once per token).

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

from klgap.job import second_order
from klgap.job.batch import Batch, Clean
from klgap.job.loaded import LoadedCell
from klgap.job.patch import Patch, Positions
from klgap.job.view import SaeView

Frames = tuple[pd.DataFrame, dict[str, Any]]  # one batch's rows and side sums


def table(columns: dict[str, Any]) -> pd.DataFrame:
    return pd.DataFrame({k: (v.detach().cpu().numpy() if isinstance(v, Tensor) else v) for k, v in columns.items()})


def intervention_rows(patch: Patch, clean: Clean, next_ids: Tensor, base: dict[str, Any],
                      keep: Tensor | None = None) -> list[pd.DataFrame]:
    """Per intervention (``patch.stack`` per patched call): its patched logits, KL and ΔCE against the clean run
    at each tail position, the rows at `keep` (``[b npos]`` bool, row-major; all of them when None) of those, with a
    joint cell's per-site patch sizes (klgap/job/swap.py).

    The clean CE of each token (``ce_clean``, :meth:`CleanReference.ce`) is stored once per token: on the first
    intervention's rows; every other row holds NaN there (written as a run of nulls, a few bytes per part)."""
    frames = []
    indexed = list(enumerate(patch.interventions))  # j keys each substitute's generator
    ce_clean = clean.ref.ce(next_ids)  # [b npos]
    ce_clean = ce_clean.reshape(-1) if keep is None else ce_clean[keep]
    for start in range(0, len(indexed), patch.stack):
        group = indexed[start : start + patch.stack]
        for (j, intervention), logits in zip(group, patch.logits(group), strict=True):
            kl, ce = clean.ref.measure(logits, next_ids)
            sizes = patch.sizes.pop(j, {})  # [b n_measured] each
            if keep is None:
                kl, ce, sizes = kl.reshape(-1), ce.reshape(-1), {k: v.reshape(-1) for k, v in sizes.items()}
            else:
                kl, ce, sizes = kl[keep], ce[keep], {k: v[keep.to(v.device)] for k, v in sizes.items()}
            carried = ce_clean if not frames else torch.full_like(ce_clean, float("nan"))
            frames.append(table({**base, "intervention": intervention.name, "draw": -1, "kl": kl, "ce_delta": ce,
                                 "ce_clean": carried, **sizes}))
            del logits
    return frames


@torch.no_grad()
def all_tokens(cell: LoadedCell, batch: Batch, clean: Clean, skip_first: bool, drop_last: bool) -> Frames:
    """Every kept token (``batch.keep``: --mask-special) patched and measured; the masked ones keep their clean
    activation (but for an every-position perturbation: klgap/job/patch.py) and give no row."""
    n_ctx, ctx_len = batch.ids.shape
    first = 1 if skip_first else 0
    fill = clean.acts[0]  # [b n d]
    keep = batch.keep.to(fill.device)  # [b n] bool: False at position 0 (with first) and at masked tokens
    reads = clean.read()  # [b n d_in]: a transcoder's mlp_in, else None
    view = SaeView.of(fill[keep], cell.lowest.sae, cell.lowest.center, cell.split,
                      None if reads is None else reads[keep])  # [m d], row-major
    keep_cpu = batch.keep
    position = torch.arange(ctx_len).expand(n_ctx, ctx_len)[keep_cpu]
    base = {"context": batch.context_ids[:, None].expand(n_ctx, ctx_len)[keep_cpu], "position": position,
            "token_id": batch.contexts[keep_cpu], **view.stats, "offset": position}
    patch = cell.patch(batch, clean, view, slice(first, None), Positions(keep, fill, first, reads))
    frames = intervention_rows(patch, clean, batch.next_ids, base, keep=keep.to(batch.next_ids.device))
    fisher: dict[str, Any] = {}
    if cell.config.second_order:  # the predicted KL beside the measured, and the site's sensitivity
        weight = keep.to(fill.dtype if fill.dtype == torch.float64 else torch.float32).clone()  # [b n]
        if drop_last:
            weight[:, -1] = 0
        runner = second_order.runner_for(cell, batch)
        for frame_j, predicted in zip(frames, second_order.predicted_columns(patch, runner, clean, 0, weight, keep),
                                      strict=True):
            frame_j["kl_second_order"] = predicted
        rows = keep[:, first:]
        fisher = second_order.sensitivity_sums(runner, second_order.sae_error(view, rows), rows, slice(first, None), 0,
                                               clean, weight, batch.context_ids, cell.config.seed, batch.index)
    frame = pd.concat(frames, ignore_index=True)
    if not drop_last:
        return frame, view.side_stats() | fisher
    # the study's protocol: every position patched (the last too), KL and ΔCE kept for positions < ctx_len - 1
    measured = position < ctx_len - 1  # [n_ctx * n_pos] bool
    return frame[frame["position"] < ctx_len - 1].reset_index(drop=True), view.side_stats(measured) | fisher


def at_start(reads: Tensor | None) -> Tensor | None:
    """A transcoder's read activations at the tail's first position ``[b d_in]`` (None for an SAE)."""
    return None if reads is None else reads[:, 0]


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
    view = SaeView.of(clean.acts[0][:, 0], cell.lowest.sae, cell.lowest.center, cell.split,
                      at_start(clean.read()))  # [b d]: position t
    base = single_token_rows(batch.context_ids, batch.contexts, view, t, k)
    patch = cell.patch(batch, clean, view, t)
    frames = intervention_rows(patch, clean, batch.next_ids, base)
    fisher: dict[str, Any] = {}
    if cell.config.second_order:  # the predicted KL beside the measured, and the site's sensitivity
        keep = batch.keep.to(batch.ids.device)
        patched = keep[:, t : t + 1]  # [b 1]: a context whose token t is masked gives no row
        acts = clean.acts[0]
        weight = (keep[:, t : t + k + 1] & patched).to(acts.dtype if acts.dtype == torch.float64 else torch.float32)
        runner = second_order.runner_for(cell, batch)
        for frame_j, predicted in zip(frames, second_order.predicted_columns(patch, runner, clean, t, weight, None),
                                      strict=True):
            frame_j["kl_second_order"] = predicted
        error = (view.x_hat - view.x).unsqueeze(1) * patched.unsqueeze(-1).to(view.x.device)  # [b 1 d]
        fisher = second_order.sensitivity_sums(runner, error, patched, slice(t, t + 1), t, clean, weight,
                                               batch.context_ids, cell.config.seed, batch.index)
    return masked_rows(pd.concat(frames, ignore_index=True), batch), view.side_stats(batch.keep[:, t]) | fisher


def masked_rows(frame: pd.DataFrame, batch: Batch) -> pd.DataFrame:
    """Single-token / many-samples rows without the masked tokens (--mask-special): a context whose patched token
    t is masked gives none (as if left unpatched), a masked token after t gives none."""
    t, keep = batch.start, batch.keep
    if bool(keep[:, t : batch.ids.shape[1]].all()):
        return frame
    local = frame["context"].to_numpy() - int(batch.context_ids[0])
    position = frame["position"].to_numpy()
    keep_np = keep.numpy()
    measured = keep_np[local, position] & keep_np[local, t]
    return frame[measured].reset_index(drop=True)


@torch.no_grad()
def many_samples(cell: LoadedCell, batch: Batch, clean: Clean, n_draws: int) -> Frames:
    t, n_ctx = batch.start, batch.ids.shape[0]
    view = SaeView.of(clean.acts[0][:, 0], cell.lowest.sae, cell.lowest.center, cell.split, at_start(clean.read()))
    base = {"context": batch.context_ids, "position": t, "offset": 0, "token_id": batch.contexts[:, t], **view.stats}
    patch = cell.patch(batch, clean, view, t)
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
        # the clean CE at t, once per context: on draw 0's rows when no listed intervention carries it
        "ce_clean": draws_clean_ce(clean, batch.next_ids, owner, n_draws, carried=bool(frames)),
    }))
    return masked_rows(pd.concat(frames, ignore_index=True), batch), view.side_stats(batch.keep[:, t])


def draws_clean_ce(clean: Clean, next_ids: Tensor, owner: Tensor, n_draws: int, carried: bool) -> Tensor:
    """The many-samples draws' ``ce_clean`` column, ``[n_ctx * n_draws]``: NaN, but for the clean CE at t on each
    context's draw 0 when `carried` is False (no listed intervention's rows hold it)."""
    ce_t = clean.ref.ce(next_ids)[:, 0]  # [n_ctx]
    column = torch.full((owner.numel(),), float("nan"), dtype=ce_t.dtype, device=ce_t.device)
    if not carried:
        column[::n_draws] = ce_t
    return column


def token_texts(frame: pd.DataFrame, tokenizer: Any) -> dict[str, str]:
    """The text of each token id the rows hold (a report is then built without a tokenizer)."""
    return {str(int(i)): tokenizer.decode([int(i)]) for i in np.unique(frame["token_id"].to_numpy())}


__all__ = ["Batch", "Clean", "Frames", "all_tokens", "draws_clean_ce", "intervention_rows",
           "many_samples", "masked_rows", "single_token", "single_token_rows", "table", "token_texts"]
