"""The three measurement modes (METHOD.md §3) on one batch skeleton: clean run -> SAE view -> substitutes ->
patched runs -> per-token KL / ΔCE rows.

- all_tokens:   patch every measured position of each context; KL and ΔCE at every position.
- single_token: patch only `position` t; measure positions t..t+k.
- many_samples: at position t, draw `n_samples` substitutes of a random perturbation; the SAE's KL
                gets a z-score against them.
Every mode asks its executor (klgap/forward/executors.py) for tails from the first position it measures, so the same
code runs on full forwards, suffix replays and KV-cache reuse. Logits never outlive their batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from klgap.forward import metrics
from klgap.protocols import ErrorSplitter, LoadedSAE, Perturbation

if TYPE_CHECKING:
    from klgap.job.loading import Loaded


def generator_for(device: torch.device, *keys: int) -> torch.Generator:
    """A generator seeded from (seed, batch, intervention, ...): the same numbers on resume."""
    state = int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(state)


@dataclass
class SaeView:
    """The SAE's view of a set of tokens: x (possibly centred), x̂ and per-token geometry."""

    x: Tensor  # [n d] float32
    x_hat: Tensor  # [n d] float32
    offset: Tensor  # [n 1] float32: added back before patching (the mean when centring, else 0)
    stats: dict[str, Tensor]  # eps, cos, x_norm, x_hat_norm, l0: [n] each

    parts: tuple[Tensor, Tensor] | None = None  # (e_lin, e_nl) [n d] each, when the run splits the SAE's error

    @classmethod
    def of(cls, acts: Tensor, sae: LoadedSAE, center: bool, split: ErrorSplitter | None = None) -> SaeView:
        """The view of ``acts: [n d]``; with `split` (klgap.protocols.ErrorSplitter) the stats also hold eps_lin and
        eps_nl, the norms of the linear and nonlinear parts of the error."""
        x = acts.float()
        offset = x.mean(-1, keepdim=True) if center else torch.zeros_like(x[:, :1])
        x = x - offset
        feats = sae.encode(x)
        x_hat = sae.decode(feats).float()
        x_norm, x_hat_norm = x.norm(dim=-1), x_hat.norm(dim=-1)
        cos = torch.nn.functional.cosine_similarity(x, x_hat, dim=-1, eps=1e-12)
        stats = {
            "eps": (x - x_hat).norm(dim=-1),
            "cos": cos,
            "x_norm": x_norm,
            "x_hat_norm": x_hat_norm,
            "l0": (feats != 0).sum(-1).float(),
        }
        parts = None
        if split is not None:
            parts = split.error_parts(x, x_hat)
            stats["eps_lin"], stats["eps_nl"] = parts[0].norm(dim=-1), parts[1].norm(dim=-1)
        return cls(x, x_hat, offset, stats, parts)

    def substitute(self, perturbation: Perturbation, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
        x_prime = perturbation(self.x, self.x_hat, generator)
        return (x_prime.float() + self.offset).to(dtype)

    def side_stats(self, measured: Tensor | None = None) -> dict[str, Any]:
        """Sums for explained variance over the whole run: n, Σx, Σ‖x‖², Σ‖x − x̂‖² (over the `measured` rows
        ``[n] bool`` only, when given)."""
        finite = torch.isfinite(self.x).all(-1) & torch.isfinite(self.x_hat).all(-1)
        if measured is not None:
            finite &= measured.to(finite.device)
        x, err = self.x[finite].double(), (self.x - self.x_hat)[finite].double()
        sides = {
            "n": int(finite.sum()),
            "n_nonfinite_acts": int((~finite).sum()),
            "sum_x": x.sum(0).cpu().tolist(),
            "sum_sq_x": float((x**2).sum()),
            "sum_sq_err": float((err**2).sum()),
        }
        if self.parts is not None:  # the centred R² of the error's linear part (klgap/report/decomposition.py)
            e_nl = self.parts[1][finite].double()
            sides |= {"sum_err": err.sum(0).cpu().tolist(), "sum_err_nl": e_nl.sum(0).cpu().tolist(),
                      "sum_sq_err_nl": float((e_nl**2).sum())}
        return sides


def table(columns: dict[str, Any]) -> pd.DataFrame:
    return pd.DataFrame({k: (v.detach().cpu().numpy() if isinstance(v, Tensor) else v) for k, v in columns.items()})


def batch_ids(run: Loaded, index: int) -> tuple[Tensor, Tensor]:
    """The contexts of batch `index` ``[b n]`` (CPU) and their indices ``[b]``."""
    size = run.config.batch_size
    context_ids = torch.arange(index * size, min((index + 1) * size, len(run.contexts)))
    return run.contexts[context_ids], context_ids



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
def all_tokens(run: Loaded, index: int, clean: tuple[Tensor, Any] | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    cfg, model, ex = run.config, run.model, run.executor
    ids_cpu, context_ids = batch_ids(run, index)
    ids = ids_cpu.to(model.device)
    n_ctx, ctx_len = ids.shape
    first = 1 if cfg.skip_first_position else 0
    n_pos = ctx_len - first  # patched positions; with drop_last_position the last of them is not measured

    acts, clean_logits = clean if clean is not None else ex.clean(ids, 0)  # [b pos d], [b pos vocab]
    # once per batch, shared by every intervention (and, in a study, by every site: run_shared builds it)
    clean_ref = clean_logits if isinstance(clean_logits, metrics.CleanReference) else metrics.CleanReference.of(clean_logits)
    del clean_logits
    view = SaeView.of(acts[:, first:].reshape(n_ctx * n_pos, -1), run.sae, run.center, run.error_split)
    next_ids = metrics.next_token_ids(ids)

    base = {
        "context": context_ids.repeat_interleave(n_pos),
        "position": torch.arange(first, ctx_len).repeat(n_ctx),
        "token_id": ids_cpu[:, first:].reshape(-1),
        **view.stats,
    }
    base["offset"] = base["position"]
    frames = []
    indexed = list(enumerate(run.interventions))  # j keys each substitute's generator
    for start in range(0, len(indexed), ex.stack):
        group = indexed[start : start + ex.stack]  # one patched call, its substitutes stacked along the batch
        x_primes = [
            view.substitute(i.perturbation, generator_for(model.device, cfg.seed, index, j), model.dtype).reshape(n_ctx, n_pos, -1)
            for j, i in group
        ]
        logits_of = ex.patched(ids, torch.cat(x_primes), slice(first, None), copies=len(group)).split(n_ctx)
        del x_primes
        for (_, intervention), logits in zip(group, logits_of, strict=True):
            kl, ce = clean_ref.measure(logits, next_ids)
            frames.append(table({**base, "intervention": intervention.name, "draw": -1,
                                 "kl": kl[:, first:].reshape(-1), "ce_delta": ce[:, first:].reshape(-1)}))
        del logits_of, logits
    frame = pd.concat(frames, ignore_index=True)
    if not cfg.drop_last_position:
        return frame, view.side_stats()
    # the study's protocol: every position patched (the last too), KL and ΔCE kept for positions < ctx_len - 1
    measured = base["position"] < ctx_len - 1  # [n_ctx * n_pos] bool
    return frame[frame["position"] < ctx_len - 1].reset_index(drop=True), view.side_stats(measured)


@torch.no_grad()
def single_token(run: Loaded, index: int) -> tuple[pd.DataFrame, dict[str, Any]]:
    cfg, model, ex = run.config, run.model, run.executor
    full_cpu, context_ids = batch_ids(run, index)
    t, k = cfg.position, cfg.k
    # A causal model's logits at positions <= t+k do not depend on later tokens: run only what is measured.
    ids = full_cpu[:, : t + k + 1].to(model.device)
    next_tail = metrics.next_token_ids(full_cpu.to(model.device))[:, t : t + k + 1]
    n_ctx = ids.shape[0]

    acts, clean_logits = ex.clean(ids, t)  # positions t..t+k
    clean_ref = metrics.CleanReference.of(clean_logits)
    del clean_logits
    view = SaeView.of(acts[:, 0], run.sae, run.center, run.error_split)  # [b d]
    base = single_token_rows(context_ids, full_cpu, view, t, k)
    frames = []
    for j, intervention in enumerate(run.interventions):
        x_prime = view.substitute(intervention.perturbation, generator_for(model.device, cfg.seed, index, j), model.dtype)
        kl, ce = clean_ref.measure(ex.patched(ids, x_prime, t), next_tail)
        frames.append(table({**base, "intervention": intervention.name, "draw": -1,
                             "kl": kl.reshape(-1), "ce_delta": ce.reshape(-1)}))
    return pd.concat(frames, ignore_index=True), view.side_stats()


DRAW_CHUNK_BYTES = 256 * 2**20  # many-samples: memory for one chunk of draws (its cache copy and its logits)


def draw_chunk(run: Loaded, n_positions: int) -> int:
    """Draws per patched forward: as many as fit DRAW_CHUNK_BYTES of activations, cache copy and logits."""
    model = run.model
    per_row = n_positions * (model.d_model * model.n_layers * 4 + model.vocab_size) * 4  # rough, float32
    per_row += run.executor.prefix_bytes_per_row()
    return int(max(1, min(4096, DRAW_CHUNK_BYTES // per_row)))


@torch.no_grad()
def many_samples(run: Loaded, index: int) -> tuple[pd.DataFrame, dict[str, Any]]:
    cfg, model, ex = run.config, run.model, run.executor
    full_cpu, context_ids = batch_ids(run, index)
    t, n_draws = cfg.position, cfg.n_samples
    ids = full_cpu[:, : t + 1].to(model.device)  # causal: logits at t need only tokens <= t
    next_t = metrics.next_token_ids(full_cpu.to(model.device))[:, t : t + 1]
    n_ctx = ids.shape[0]

    acts, clean_logits = ex.clean(ids, t)  # position t only
    clean_ref = metrics.CleanReference.of(clean_logits[:, :1])  # [b 1 vocab]
    del clean_logits
    view = SaeView.of(acts[:, 0], run.sae, run.center, run.error_split)
    base = {"context": context_ids, "position": t, "offset": 0, "token_id": full_cpu[:, t], **view.stats}

    frames = []
    for j, intervention in enumerate(run.interventions):
        x_prime = view.substitute(intervention.perturbation, generator_for(model.device, cfg.seed, index, j), model.dtype)
        kl, ce = clean_ref.measure(ex.patched(ids, x_prime, t)[:, -1:], next_t)
        frames.append(table({**base, "intervention": intervention.name, "draw": -1, "kl": kl[:, 0], "ce_delta": ce[:, 0]}))

    # N draws per context, batched across contexts: rows are (context, draw) pairs.
    sample = run.sample.perturbation
    rows_per_chunk = draw_chunk(run, ex.positions_computed(ids.shape[1], t))
    owner = torch.arange(n_ctx, device=model.device).repeat_interleave(n_draws)  # [b*N]
    x_rep, x_hat_rep, off_rep = view.x[owner], view.x_hat[owner], view.offset[owner]
    draws = []
    for j in range(n_ctx):
        gen = generator_for(model.device, cfg.seed, index, len(run.interventions), j)
        sl = slice(j * n_draws, (j + 1) * n_draws)
        draws.append(sample(x_rep[sl], x_hat_rep[sl], gen).float() + off_rep[sl])
    x_prime_all = torch.cat(draws).to(model.dtype)
    kl_all, ce_all = [], []
    for start in range(0, len(owner), rows_per_chunk):
        rows = owner[start : start + rows_per_chunk]
        logits = ex.patched(ids, x_prime_all[start : start + rows_per_chunk], t, rows=rows)[:, -1:]
        kl, ce = clean_ref.select(rows).measure(logits, next_t[rows])
        kl_all.append(kl[:, 0])
        ce_all.append(ce[:, 0])
        del logits
    owner_cpu = owner.cpu()
    frames.append(table({
        "context": context_ids[owner_cpu],
        "position": t,
        "offset": 0,
        "token_id": full_cpu[owner_cpu, t],
        **{name: value[owner] for name, value in view.stats.items()},
        "intervention": sample.name,
        "draw": torch.arange(n_draws).repeat(n_ctx),
        "kl": torch.cat(kl_all),
        "ce_delta": torch.cat(ce_all),
    }))
    return pd.concat(frames, ignore_index=True), view.side_stats()


MODES = {"all_tokens": all_tokens, "single_token": single_token, "many_samples": many_samples}


def measure_batch(run: Loaded, index: int, clean: tuple[Tensor, Any] | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Reduce one batch of contexts to per-token records and side sums (plus the text of each token id seen, so
    a report can be built later without a tokenizer).

    clean: all-token mode, the batch's clean (site activation, logits or metrics.CleanReference) when a shared
    forward already ran it."""
    frame, side = all_tokens(run, index, clean) if clean is not None else MODES[run.config.mode](run, index)
    tokenizer = run.model.tokenizer
    if tokenizer is not None:
        side["token_text"] = {str(int(i)): tokenizer.decode([int(i)]) for i in np.unique(frame["token_id"].to_numpy())}
    return frame, side
