"""A joint run's batch in each mode (klgap/joint.py says what a joint run is): the joint rows, every site patched
in the same forward, and each site's own single-site rows of the same batch.

- all_tokens: every measured position patched at every site; the single-site runs share the batch's clean forward.
- single_token: position t patched at every site, t..t+k measured.
- many_samples: position t patched at every site by each intervention, then `n_samples` draws of the sample
  intervention at every site per context.
The joint rows carry the lowest site's clean geometry (eps, cos, ...) and side sums.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch
from torch import Tensor

from klgap import metrics, modes
from klgap.joint import JointRun, SiteSwap, site_generator

Frames = tuple[pd.DataFrame, dict[str, Any]]  # one batch's rows and side sums


def measure_batch(joint: JointRun, index: int) -> tuple[Frames, list[Frames]]:
    """One batch: the joint rows (every site patched) and each site's own single-site rows. The joint rows carry
    the lowest site's clean geometry (eps, cos, ...) and side sums."""
    measure = {"all_tokens": _all_tokens, "single_token": _single_token, "many_samples": _many_samples}
    joint_frames, singles = measure[joint.runs[0].config.mode](joint, index)
    joint_frames[1]["token_text"] = singles[0][1].get("token_text", {})
    return joint_frames, singles


def _rows(joint: JointRun, index: int, ids: Tensor, at: slice, clean_ref: metrics.CleanReference, tail: slice,
          next_ids: Tensor, base: dict[str, Any], keep: slice = slice(None)) -> pd.DataFrame:
    """Per intervention, every site patched at positions `at`; KL and ΔCE of the logits' positions `tail` (against
    `clean_ref`, as the single-site modes measure them), rows kept at `keep` of those."""
    lowest = joint.runs[0]
    cfg, device = lowest.config, lowest.model.device
    frames = []
    for j, intervention in enumerate(lowest.interventions):
        # each site's own perturbation object: a fitted one (epsilon_anisotropic) was fitted on that site
        swaps = [SiteSwap(run, run.interventions[j].perturbation, site_generator(device, cfg.seed, index, j, k), at)
                 for k, run in enumerate(joint.runs)]
        kl, ce = clean_ref.measure(joint.executor.patched(ids, swaps)[:, tail], next_ids)
        frames.append(modes.table({**base, "intervention": intervention.name, "draw": -1,
                                   "kl": kl[:, keep].reshape(-1), "ce_delta": ce[:, keep].reshape(-1)}))
    return pd.concat(frames, ignore_index=True)


@torch.no_grad()
def _all_tokens(joint: JointRun, index: int) -> tuple[Frames, list[Frames]]:
    """Every measured position patched at every site; the single-site runs share the batch's clean forward."""
    runs, ex = joint.runs, joint.executor
    lowest = runs[0]
    cfg, model = lowest.config, lowest.model
    ids_cpu, context_ids = modes.batch_ids(lowest, index)
    ids = ids_cpu.to(model.device)
    n_ctx, ctx_len = ids.shape
    first = 1 if cfg.skip_first_position else 0
    n_pos = ctx_len - first

    acts, clean_logits = ex.clean(ids)
    clean_ref = metrics.CleanReference.of(clean_logits)
    del clean_logits
    singles = [modes.measure_batch(run, index, clean=(a, clean_ref)) for run, a in zip(runs, acts, strict=True)]
    view = modes.SaeView.of(acts[0][:, first:].reshape(n_ctx * n_pos, -1), lowest.sae, lowest.center)
    base = {
        "context": context_ids.repeat_interleave(n_pos),
        "position": torch.arange(first, ctx_len).repeat(n_ctx),
        "token_id": ids_cpu[:, first:].reshape(-1),
        **view.stats,
    }
    base["offset"] = base["position"]
    frame = _rows(joint, index, ids, slice(first, None), clean_ref, slice(None), metrics.next_token_ids(ids), base,
                  keep=slice(first, None))
    ex.done()
    return (frame, view.side_stats()), singles


@torch.no_grad()
def _single_token(joint: JointRun, index: int) -> tuple[Frames, list[Frames]]:
    """Position t patched at every site, positions t..t+k measured; each site alone is its own single-token run.
    (Joint patched runs compute every position: the singles' KV-cache fast path has no joint form yet.)"""
    runs, ex = joint.runs, joint.executor
    lowest = runs[0]
    cfg, model = lowest.config, lowest.model
    singles = [modes.measure_batch(run, index) for run in runs]
    full_cpu, context_ids = modes.batch_ids(lowest, index)
    t, k = cfg.position, cfg.k
    ids = full_cpu[:, : t + k + 1].to(model.device)  # causal: nothing after t+k is needed
    next_tail = metrics.next_token_ids(full_cpu.to(model.device))[:, t : t + k + 1]
    n_ctx = ids.shape[0]
    acts, clean_logits = ex.clean(ids)
    ex.done()
    clean_ref = metrics.CleanReference.of(clean_logits[:, t:])
    del clean_logits
    view = modes.SaeView.of(acts[0][:, t], lowest.sae, lowest.center)  # [b d]
    base = modes.single_token_rows(context_ids, full_cpu, view, t, k)
    frame = _rows(joint, index, ids, slice(t, t + 1), clean_ref, slice(t, None), next_tail, base)
    return (frame, view.side_stats()), singles


@torch.no_grad()
def _many_samples(joint: JointRun, index: int) -> tuple[Frames, list[Frames]]:
    """Position t patched at every site by each intervention, then `n_samples` draws of the sample intervention
    at every site per context (independent per site: context c's draws at site k come from
    ``generator_for(seed, b, n_interventions, c)`` for k = 0, as a single-site run's, and ``(..., c, k)`` above)."""
    runs, ex = joint.runs, joint.executor
    lowest = runs[0]
    cfg, model = lowest.config, lowest.model
    singles = [modes.measure_batch(run, index) for run in runs]
    full_cpu, context_ids = modes.batch_ids(lowest, index)
    t, n_draws = cfg.position, cfg.n_samples
    ids = full_cpu[:, : t + 1].to(model.device)  # causal: logits at t need only tokens <= t
    next_t = metrics.next_token_ids(full_cpu.to(model.device))[:, t : t + 1]
    n_ctx = ids.shape[0]
    acts, clean_logits = ex.clean(ids)
    ex.done()
    clean_ref = metrics.CleanReference.of(clean_logits[:, t : t + 1])
    del clean_logits
    view = modes.SaeView.of(acts[0][:, t], lowest.sae, lowest.center)
    base = {"context": context_ids, "position": t, "offset": 0, "token_id": full_cpu[:, t], **view.stats}
    frames = [_rows(joint, index, ids, slice(t, t + 1), clean_ref, slice(t, None), next_t, base)]

    sample, n_interventions = lowest.sample.perturbation, len(lowest.interventions)
    chunk = modes.draw_chunk(lowest, ids.shape[1])
    kl_all, ce_all = [], []
    for c in range(n_ctx):  # one context's draws per patched forward (in chunks), each site drawing from its stream
        generators = [modes.generator_for(model.device, cfg.seed, index, n_interventions, c, *([k] if k else []))
                      for k in range(len(runs))]
        for start in range(0, n_draws, chunk):
            rows = min(chunk, n_draws - start)
            swaps = [SiteSwap(run, run.sample.perturbation, generators[k], slice(t, t + 1))
                     for k, run in enumerate(runs)]
            logits = ex.patched(ids[c : c + 1].repeat(rows, 1), swaps)[:, t:]
            owner = torch.full((rows,), c, device=model.device)
            kl, ce = clean_ref.select(owner).measure(logits, next_t[owner])
            kl_all.append(kl[:, 0])
            ce_all.append(ce[:, 0])
    owner = torch.arange(n_ctx, device=model.device).repeat_interleave(n_draws)
    owner_cpu = owner.cpu()
    frames.append(modes.table({
        "context": context_ids[owner_cpu], "position": t, "offset": 0, "token_id": full_cpu[owner_cpu, t],
        **{name: value[owner] for name, value in view.stats.items()},
        "intervention": sample.name, "draw": torch.arange(n_draws).repeat(n_ctx),
        "kl": torch.cat(kl_all), "ce_delta": torch.cat(ce_all),
    }))
    return (pd.concat(frames, ignore_index=True), view.side_stats()), singles


__all__ = ["measure_batch"]
