"""Executors: how a batch's clean and patched runs are computed, each owning its check against a full forward.

Three executors share one interface, so the three modes (klgap/job/modes.py) never ask which one they hold:

- :class:`FullForward`: every run is a full forward pass through nnsight (always correct; the reference).
- :class:`SuffixReplay`: all-token mode; the clean run records the blocks above the site, patched runs rerun
  only those (klgap/forward/suffix.py), several interventions stacked along the batch when memory allows.
- :class:`PrefixCache`: single-token and many-samples modes; patched runs reuse the keys/values of the
  positions before t and compute only t..t+k (klgap/forward/kvcache.py).

Every executor returns *tails*: activations and logits from position `start` on (``start = 0`` in all-token
mode, ``t`` in the others). A fast executor is used only when :meth:`open` reproduces full forward passes on
the run's first contexts (relative error ≤ 1e-5); otherwise the run falls back to :class:`FullForward` and the
report's ``execution`` says why. The suffix replay's check runs the first batch's clean forward and keeps it for
that batch, so the check itself costs only a full forward and a replay of its first :data:`CHECK_ROWS` contexts.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import torch
from torch import Tensor

from klgap.forward import activations
from klgap.plan.config import RunConfig
from klgap.protocols import LoadedModel, SiteSpec

log = logging.getLogger("klgap")
TOLERANCE = 1e-5  # relative error a fast path may show against full forwards on the check batch
CHECK_ROWS = 2  # contexts of the first batch a fast path is checked on


class Executor(Protocol):
    """Clean and patched runs of one batch, as tails from position `start`."""

    path: str  # what the report's execution.path says: full-forward | suffix-replay | kv-cache
    stack: int  # interventions one patched call may carry stacked along the batch

    def clean(self, ids: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """``ids [b n]`` -> (site activation ``[b n-start d]``, logits ``[b n-start vocab]``)."""
        ...

    def patched(self, ids: Tensor, x_prime: Tensor, at: slice | int, copies: int = 1,
                rows: Tensor | None = None) -> Tensor:
        """Logits ``[copies*b' n-start vocab]`` with the site replaced by `x_prime` at positions `at`.

        x_prime: ``[copies*b' npos d]`` for a slice, ``[b' d]`` for one position; ``rows`` (many-samples) says
        which context of the batch each row is (repeats allowed), None means row i is context i. Must follow a
        :meth:`clean` of the same batch."""
        ...

    def positions_computed(self, n: int, start: int) -> int:
        """Positions one patched run computes per row when the contexts hold `n` and tails begin at `start`."""
        ...

    def prefix_bytes_per_row(self) -> int:
        """Memory a patched row holds besides its activations (a cached prefix), for sizing chunks of draws."""
        ...


class _Uncached:
    """Executors that compute every position and hold no prefix."""

    def positions_computed(self, n: int, start: int) -> int:
        return n

    def prefix_bytes_per_row(self) -> int:
        return 0


class FullForward(_Uncached):
    """Every run a full forward pass through nnsight."""

    path = "full-forward"
    stack = 1

    def __init__(self, model: LoadedModel, spec: SiteSpec) -> None:
        self.model, self.spec, self.start = model, spec, 0

    def clean(self, ids: Tensor, start: int) -> tuple[Tensor, Tensor]:
        self.start = start
        acts, logits = activations.run_clean(self.model, self.spec, ids)
        return acts[:, start:], logits[:, start:]

    def patched(self, ids: Tensor, x_prime: Tensor, at: slice | int, copies: int = 1,
                rows: Tensor | None = None) -> Tensor:
        ids = ids if rows is None else ids[rows]
        if copies == 1:
            return activations.run_patched(self.model, self.spec, ids, x_prime, positions=at)[:, self.start :]
        return torch.cat([activations.run_patched(self.model, self.spec, ids, x, positions=at)[:, self.start :]
                          for x in x_prime.chunk(copies)])


class SuffixReplay(_Uncached):
    """All-token mode: rerun only the layers above the site (klgap/forward/suffix.py)."""

    path = "suffix-replay"

    def __init__(self, runner: Any, stack: int) -> None:
        self.runner, self.stack = runner, stack
        self.primed: tuple[Tensor, Tensor, Tensor] | None = None  # (ids, acts, logits) of the check's clean forward

    def clean(self, ids: Tensor, start: int) -> tuple[Tensor, Tensor]:
        primed, self.primed = self.primed, None
        if primed is not None and primed[0].shape == ids.shape and torch.equal(primed[0], ids):
            acts, logits = primed[1], primed[2]  # the check ran this very forward (and recorded its calls)
        else:
            acts, logits = self.runner.clean(ids)
        return acts[:, start:], logits[:, start:]

    def patched(self, ids: Tensor, x_prime: Tensor, at: slice | int, copies: int = 1,
                rows: Tensor | None = None) -> Tensor:
        return self.runner.patched(x_prime, at, copies=copies)

    @classmethod
    def open(cls, config: RunConfig, model: LoadedModel, spec: SiteSpec, layer: int,
             contexts: Tensor) -> tuple[SuffixReplay | None, dict[str, Any]]:
        """The replay if it reproduces full forwards on the first contexts (and its stacked form, if stacking)."""
        from klgap.forward.suffix import SuffixRunner

        if not SuffixRunner.supported(model):
            return None, {"path": "full-forward", "reason": f"the {model.name} adapter gives no layout"}
        runner = SuffixRunner(model, spec, layer)
        ids = contexts[: config.batch_size].to(model.device)  # the first batch: its clean forward is kept for it
        n = min(CHECK_ROWS, len(ids))  # its first contexts are checked
        first = 1 if config.skip_first_position else 0
        acts, logits = runner.clean(ids)
        ref_acts, ref_logits = activations.run_clean(model, spec, ids[:n])
        replay = runner.patched(acts[:n, first:], slice(first, None), rows=n)
        error = relative_error([(logits[:n], ref_logits), (replay, ref_logits), (acts[:n], ref_acts)], ref_logits)
        if not error <= TOLERANCE:
            log.warning("suffix replay of %s differs from the model's forward (%.2g); using full forward passes",
                        model.name, error)
            return None, {"path": "full-forward", "reason": f"replay check failed (relative error {error:.2g})"}
        execution: dict[str, Any] = {"path": cls.path, "first_block": runner.first, "replay_check_relative_error": error}
        stack = min(len(config.interventions), stack_size(config, model))
        if stack > 1:  # the stacked replay (two copies: the clean run and a halved site) must match too
            half = acts[:n, first:] * 0.5
            stacked = runner.patched(torch.cat([acts[:n, first:], half]), slice(first, None), copies=2, rows=n)
            ref_half = activations.run_patched(model, spec, ids[:n], half, positions=slice(first, None))
            stack_error = relative_error([(stacked[:n], ref_logits), (stacked[n:], ref_half)], ref_logits)
            if stack_error <= TOLERANCE:
                execution.update(stack=stack, stack_check_relative_error=stack_error)
            else:
                log.warning("stacked suffix replay of %s differs (%.2g); one intervention per pass", model.name, stack_error)
                execution.update(stack=1, stack_note=f"stack check failed (relative error {stack_error:.2g})")
        replay_executor = cls(runner, int(execution.get("stack", 1)))
        replay_executor.prime(ids, acts, logits)
        return replay_executor, execution

    def prime(self, ids: Tensor, acts: Tensor, logits: Tensor) -> None:
        """Keep a clean forward of `ids` for the next :meth:`clean` of the same ids (one executor at a time holds
        one: a study opens a replay per site before measuring any)."""
        for other in _PRIMED:
            other.primed = None
        _PRIMED[:] = [self]
        self.primed = (ids, acts, logits)


_PRIMED: list[SuffixReplay] = []  # the replay holding a primed clean forward (at most one in the process)


class PrefixCache:
    """Single-token / many-samples: reuse the KV cache of positions < t (klgap/forward/kvcache.py)."""

    path = "kv-cache"
    stack = 1

    def __init__(self, runner: Any) -> None:
        self.runner = runner

    def clean(self, ids: Tensor, start: int) -> tuple[Tensor, Tensor]:
        self.start = start
        return self.runner.clean(ids, start)

    def patched(self, ids: Tensor, x_prime: Tensor, at: slice | int, copies: int = 1,
                rows: Tensor | None = None) -> Tensor:
        tail = ids[:, self.start :]
        return self.runner.patched(tail if rows is None else tail[rows], x_prime, rows)

    def positions_computed(self, n: int, start: int) -> int:
        return n - start

    def prefix_bytes_per_row(self) -> int:
        """Bytes of the cached prefix per context (many-samples sizes its chunks of draws with it)."""
        prefix = self.runner.prefix
        if prefix is None:
            return 0
        rows = max(1, int(prefix.layers[0].keys.shape[0]))
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in prefix.layers
                   if getattr(layer, "keys", None) is not None) // rows

    @classmethod
    def open(cls, config: RunConfig, model: LoadedModel, spec: SiteSpec,
             contexts: Tensor) -> tuple[PrefixCache | None, dict[str, Any]]:
        """The cache path if, on the first contexts, clean logits, a replay of x and a halved x at t match full forwards."""
        from klgap.forward.kvcache import PrefixCacheRunner

        t = config.position
        if t < 1 or not PrefixCacheRunner.supported(model):
            return None, {"path": "full-forward", "reason": "position 0 has no prefix" if t < 1 else f"{model.name} has no KV cache"}
        n_tail = config.k + 1 if config.mode == "single_token" else 1
        ids = contexts[: min(2, len(contexts)), : t + n_tail].to(model.device)
        runner = PrefixCacheRunner(model, spec)
        try:
            acts, logits = runner.clean(ids, t)
            ref_acts, ref_logits = activations.run_clean(model, spec, ids)
            x_half = ref_acts[:, t] * 0.5  # a real patch, not only x' = x
            replay = runner.patched(ids[:, t:], ref_acts[:, t])
            halved = runner.patched(ids[:, t:], x_half)
            ref_halved = activations.run_patched(model, spec, ids, x_half, positions=t)
        except Exception as exc:  # noqa: BLE001 - an architecture whose cache cannot be reused this way
            log.warning("KV-cache reuse failed on %s (%s); using full forward passes", model.name, exc)
            return None, {"path": "full-forward", "reason": f"KV cache unusable: {type(exc).__name__}: {exc}"}
        error = relative_error(
            [(logits, ref_logits[:, t:]), (replay, ref_logits[:, t:]), (halved, ref_halved[:, t:]), (acts, ref_acts[:, t:])],
            ref_logits,
        )
        if not error <= TOLERANCE:
            log.warning("KV-cache replay of %s differs from the model's forward (%.2g); using full forward passes",
                        model.name, error)
            return None, {"path": "full-forward", "reason": f"KV-cache check failed (relative error {error:.2g})"}
        return cls(runner), {"path": cls.path, "positions_recomputed": n_tail, "replay_check_relative_error": error}


def choose(config: RunConfig, model: LoadedModel, spec: SiteSpec, layer: int,
           contexts: Tensor) -> tuple[Executor, dict[str, Any]]:
    """The fastest executor that passes its check on the first contexts, and the record of that choice."""
    if not config.fast:
        return FullForward(model, spec), {"path": "full-forward", "reason": "--no-fast"}
    fast: Executor | None
    if config.mode == "all_tokens":
        fast, execution = SuffixReplay.open(config, model, spec, layer, contexts)
    else:
        fast, execution = PrefixCache.open(config, model, spec, contexts)
    return (fast if fast is not None else FullForward(model, spec)), execution


def same_path(executor: Executor, model: LoadedModel, spec: SiteSpec, layer: int) -> Executor:
    """A fresh executor of `executor`'s kind on another copy of its model (the precision check's float32 and
    low-precision runs, klgap/job/precision.py): the path `executor` was checked on, unstacked, not checked again."""
    if isinstance(executor, SuffixReplay):
        from klgap.forward.suffix import SuffixRunner

        return SuffixReplay(SuffixRunner(model, spec, layer), 1)
    if isinstance(executor, PrefixCache):
        from klgap.forward.kvcache import PrefixCacheRunner

        return PrefixCache(PrefixCacheRunner(model, spec))
    return FullForward(model, spec)


def relative_error(pairs: list[tuple[Tensor, Tensor]], scale: Tensor) -> float:
    return float(max((a.float() - b.float()).abs().max() for a, b in pairs) / scale.abs().max().clamp(min=1.0))


STACK_BYTES_CPU = 0  # all-token mode on CPU: no stacking (benchmarks/README.md: x0.94 on a 2-core CPU)
STACK_FRACTION_CUDA = 0.25  # on CUDA: this share of the free memory at start


def stack_size(config: RunConfig, model: LoadedModel) -> int:
    """How many interventions one suffix pass can carry along the batch: each copy needs its logits (model dtype
    and a float32 view), its hidden states and its attention scores (the model's declared ``n_heads``; none
    declared: no stacking); the budget is STACK_BYTES_CPU on CPU and STACK_FRACTION_CUDA of the free memory on
    CUDA."""
    device = model.device
    if device.type == "cuda":
        budget = int(torch.cuda.mem_get_info(device)[0] * STACK_FRACTION_CUDA)
    elif device.type == "cpu":
        budget = STACK_BYTES_CPU
    else:
        return 1
    if model.n_heads is None:  # the attention's memory is not known: one intervention per pass
        return 1
    element = torch.finfo(model.dtype).bits // 8
    tokens = config.batch_size * config.context_len
    heads = model.n_heads
    per_copy = tokens * (model.vocab_size * (element + 4) + model.d_model * 4 * 16) + config.batch_size * heads * config.context_len**2 * 4
    return max(1, budget // per_copy)


__all__ = ["Executor", "FullForward", "PrefixCache", "SuffixReplay", "choose", "same_path", "stack_size"]
