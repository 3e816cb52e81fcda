"""A joint run's batch in each mode (klgap/job/joint.py says what a joint run is): the joint rows, every site patched
in the same forward, each site's own single-site rows of the same batch and, with ``joint_subsets``, the rows of
every subset of the sites patched together (sharing the batch's clean forward).

- all_tokens: every measured position patched at every site; the single-site runs share the batch's clean forward.
- single_token: position t patched at every site, t..t+k measured.
- many_samples: position t patched at every site by each intervention, then `n_samples` draws of the sample
  intervention at every site per context.
The rows of a joint run (or subset) carry its lowest site's clean geometry (eps, cos, ...) and side sums.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from klgap.forward import metrics

from klgap.job import modes
from klgap.job.joint import JointRun, SiteSwap, site_generator

Frames = tuple[pd.DataFrame, dict[str, Any]]  # one batch's rows and side sums


@dataclass
class BatchFrames:
    """One batch of a joint run: its own rows, each site's alone (forward order), each subset's (joint.subsets)."""

    joint: Frames
    singles: list[Frames]
    subsets: list[Frames]


def measure_batch(joint: JointRun, index: int) -> BatchFrames:
    """One batch: the joint rows (every site patched), each site's own single-site rows and each subset's rows."""
    measure = {"all_tokens": _all_tokens, "single_token": _single_token, "many_samples": _many_samples}
    found = measure[joint.runs[0].config.mode](joint, index)
    token_text = found.singles[0][1].get("token_text", {})
    for _, side in (found.joint, *found.subsets):
        side["token_text"] = token_text
    return found


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


def _lowest(joint: JointRun, sub: JointRun) -> int:
    """Which of `joint`'s sites is `sub`'s lowest (its rows carry that site's geometry)."""
    return next(k for k, run in enumerate(joint.runs) if run is sub.runs[0])


@torch.no_grad()
def _all_tokens(joint: JointRun, index: int) -> BatchFrames:
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
    position = torch.arange(first, ctx_len).repeat(n_ctx)
    common = {"context": context_ids.repeat_interleave(n_pos), "position": position,
              "token_id": ids_cpu[:, first:].reshape(-1)}

    def measure(sub: JointRun) -> Frames:
        k = _lowest(joint, sub)
        view = modes.SaeView.of(acts[k][:, first:].reshape(n_ctx * n_pos, -1), runs[k].sae, runs[k].center)
        frame = _rows(sub, index, ids, slice(first, None), clean_ref, slice(None), metrics.next_token_ids(ids),
                      {**common, **view.stats, "offset": position}, keep=slice(first, None))
        return frame, view.side_stats()

    found = BatchFrames(measure(joint), singles, [measure(sub) for sub in joint.subsets])
    ex.done()
    return found


@dataclass
class _CleanAt:
    """A single-token or many-samples batch's clean run, truncated after the last position it measures."""

    singles: list[Frames]
    full_cpu: Tensor  # [b n] the contexts (CPU)
    context_ids: Tensor  # [b]
    ids: Tensor  # [b t+span+1] on the model's device
    next_ids: Tensor  # [b span+1] the next tokens of positions t..t+span
    acts: list[Tensor]  # per site [b t+span+1 d]
    clean_ref: metrics.CleanReference  # of positions t..t+span

    def view(self, joint: JointRun, sub: JointRun, t: int) -> modes.SaeView:
        """`sub`'s lowest site's SAE view of position t ``[b d]``."""
        k = _lowest(joint, sub)
        return modes.SaeView.of(self.acts[k][:, t], joint.runs[k].sae, joint.runs[k].center)


def _clean_at(joint: JointRun, index: int, span: int) -> _CleanAt:
    """Each site alone (its own single-token / many-samples run), then the clean run of positions ≤ t + span
    (causal: nothing after them is needed)."""
    lowest = joint.runs[0]
    cfg, model = lowest.config, lowest.model
    singles = [modes.measure_batch(run, index) for run in joint.runs]
    full_cpu, context_ids = modes.batch_ids(lowest, index)
    t = cfg.position
    ids = full_cpu[:, : t + span + 1].to(model.device)
    next_ids = metrics.next_token_ids(full_cpu.to(model.device))[:, t : t + span + 1]
    acts, clean_logits = joint.executor.clean(ids)
    joint.executor.done()
    return _CleanAt(singles, full_cpu, context_ids, ids, next_ids, acts, metrics.CleanReference.of(clean_logits[:, t:]))


@torch.no_grad()
def _single_token(joint: JointRun, index: int) -> BatchFrames:
    """Position t patched at every site, positions t..t+k measured; each site alone is its own single-token run.
    (Joint patched runs compute every position: the singles' KV-cache fast path has no joint form yet.)"""
    t, k = joint.runs[0].config.position, joint.runs[0].config.k
    clean = _clean_at(joint, index, k)

    def measure(sub: JointRun) -> Frames:
        view = clean.view(joint, sub, t)
        base = modes.single_token_rows(clean.context_ids, clean.full_cpu, view, t, k)
        return _rows(sub, index, clean.ids, slice(t, t + 1), clean.clean_ref, slice(t, None), clean.next_ids,
                     base), view.side_stats()

    return BatchFrames(measure(joint), clean.singles, [measure(sub) for sub in joint.subsets])


@torch.no_grad()
def _many_samples(joint: JointRun, index: int) -> BatchFrames:
    """Position t patched at every site by each intervention, then `n_samples` draws of the sample intervention
    at every site per context (independent per site: context c's draws at site k come from
    ``generator_for(seed, b, n_interventions, c)`` for k = 0, as a single-site run's, and ``(..., c, k)`` above)."""
    t = joint.runs[0].config.position
    clean = _clean_at(joint, index, 0)

    def measure(sub: JointRun) -> Frames:
        view = clean.view(joint, sub, t)
        base = {"context": clean.context_ids, "position": t, "offset": 0, "token_id": clean.full_cpu[:, t],
                **view.stats}
        rows = _rows(sub, index, clean.ids, slice(t, t + 1), clean.clean_ref, slice(t, None), clean.next_ids, base)
        return pd.concat([rows, _draws(sub, index, clean, view)], ignore_index=True), view.side_stats()

    return BatchFrames(measure(joint), clean.singles, [measure(sub) for sub in joint.subsets])


def _draws(joint: JointRun, index: int, clean: _CleanAt, view: modes.SaeView) -> pd.DataFrame:
    """`n_samples` draws of the sample intervention at every site of `joint`, per context."""
    runs, ex = joint.runs, joint.executor
    lowest = runs[0]
    cfg, model = lowest.config, lowest.model
    t, n_draws, ids = cfg.position, cfg.n_samples, clean.ids
    n_ctx = ids.shape[0]
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
            kl, ce = clean.clean_ref.select(owner).measure(logits, clean.next_ids[owner])
            kl_all.append(kl[:, 0])
            ce_all.append(ce[:, 0])
    owner = torch.arange(n_ctx, device=model.device).repeat_interleave(n_draws)
    owner_cpu = owner.cpu()
    return modes.table({
        "context": clean.context_ids[owner_cpu], "position": t, "offset": 0, "token_id": clean.full_cpu[owner_cpu, t],
        **{name: value[owner] for name, value in view.stats.items()},
        "intervention": sample.name, "draw": torch.arange(n_draws).repeat(n_ctx),
        "kl": torch.cat(kl_all), "ce_delta": torch.cat(ce_all),
    })


__all__ = ["BatchFrames", "measure_batch"]
