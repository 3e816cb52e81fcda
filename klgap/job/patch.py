"""How a cell's patched runs are made: its substitutes and the executor that runs them.

Two kinds of cell, one interface (:class:`Patch`), so the modes (klgap/job/modes.py) write their rows once:

- :class:`SitePatch`: one site. Each intervention's substitute x' is computed from the clean view of the batch
  (the SAE's x, x̂ at that site) and patched in by the site's executor (full forward, suffix replay, KV cache;
  klgap/forward/executors.py), several interventions stacked along the batch where the executor allows.
- :class:`JointPatch`: several sites in one forward (klgap/forward/joint.py). Each site, lowest first, takes the
  activation it receives in that forward, already changed by the patches below it, through its own SAE and
  applies the intervention with its own x, x̂ and ε = x − x̂ (:class:`klgap.job.swap.SiteSwap`). A baseline
  (a perturbation with a baseline label) is sized instead by the error ``--joint-baseline`` names: ``matched``
  (the joint SAE run's error at each site: one more patched forward per batch), ``clean`` (the SAE's error on the
  site's clean activation) or ``reencoded`` (its own SAE view); ``error_add`` always takes the clean error. Its
  rows carry every site's patch size (``site{k}_eps``, ``site{k}_x_norm``, ``site{k}_cos``, ``site{k}_l0``).

Both draw their randomness from :func:`klgap.job.view.draw_generator`, keyed by the intervention's name (never its
place in ``--interventions``) and, in a joint cell, the site's index k (0 for the lowest site, which so draws as the
same site measured alone).

In all-token mode a patch knows its :class:`Positions`: the tokens it patches (--mask-special, klgap/job/masks.py)
and the clean activations the others keep. While only position 0 is masked a patch replaces ``slice(first, None)``
as it always did; with a masked token further on, or for a perturbation that replaces every position (``zero``:
:func:`klgap.plugins.capabilities.every_position`), it replaces the whole context, the masked tokens with their
clean activation (or, for ``zero``, with the perturbation of the SAE's view of them).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from klgap.forward.joint import JointExecutor
from klgap.job.record import SIZE_COLUMNS, size_column
from klgap.job.swap import Reconstruct, Site, SiteSwap, reconstruct_swaps
from klgap.job.view import SaeView, draw_generator
from klgap.plugins.capabilities import baseline_label, every_position, frozen_error
from klgap.protocols import LoadedModel, Perturbation

DRAW_CHUNK_BYTES = 256 * 2**20  # many-samples: memory for one chunk of draws (its cache copy and its logits)

Group = Sequence[tuple[int, Any]]  # (intervention index, Intervention) pairs measured by one patched call


def draw_chunk(model: LoadedModel, n_positions: int, prefix_bytes: int) -> int:
    """Draws per patched forward: as many as fit DRAW_CHUNK_BYTES of activations, cache copy and logits."""
    per_row = n_positions * (model.d_model * model.n_layers * 4 + model.vocab_size) * 4  # rough, float32
    per_row += prefix_bytes
    return int(max(1, min(4096, DRAW_CHUNK_BYTES // per_row)))


@dataclass(frozen=True)
class Positions:
    """All-token mode: the tokens a batch's patches replace. keep ``[b n]`` bool: patched and measured (False at
    position 0 when `first` is 1 and at the tokens --mask-special masks); fill ``[b n d]``: the clean activation
    at every position, which the masked tokens keep."""

    keep: Tensor
    fill: Tensor
    first: int
    reads: Tensor | None = None  # [b n d_in]: what a transcoder reads at every position (None for an SAE)

    @property
    def holes(self) -> bool:
        """A token after position `first` is masked: ``slice(first, None)`` no longer says what is patched."""
        return not bool(self.keep[:, self.first :].all())

    def whole(self, perturbation: Perturbation) -> bool:
        """Whether `perturbation`'s patch replaces the whole context (else ``slice(first, None)``)."""
        return self.holes or every_position(perturbation)


class Patch(Protocol):
    """A cell's patched runs of one batch, as logits of the measured tail ``[b n-start vocab]``."""

    interventions: tuple[Any, ...]
    stack: int  # interventions one patched call carries
    sample_name: str  # many-samples: the name of the sample intervention's rows
    sizes: dict[int, dict[str, Tensor]]  # a joint cell's per-site patch sizes of intervention j, ``[b n_measured]``

    def logits(self, group: Group) -> list[Tensor]:
        """One patched run per intervention of `group`."""
        ...

    def draws(self, n_draws: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Many-samples: (rows ``[r]``: the context of each row, logits ``[r 1 vocab]``) per chunk of the
        sample intervention's `n_draws` draws per context."""
        ...


@dataclass
class SitePatch:
    """One site: substitutes from the clean view, patched by the site's executor at positions `at` (a slice of
    positions in all-token mode, the position t otherwise)."""

    site: Site
    view: SaeView
    ids: Tensor  # [b n] on the model's device
    at: slice | int
    seed: int
    index: int
    positions: Positions | None = None  # all-token mode: the tokens patched (the view's rows) and the clean fill
    sizes: dict[int, dict[str, Tensor]] = field(default_factory=dict)  # none: the rows' eps, cos, ... say it
    _rest: SaeView | None = None  # the SAE's view of the masked tokens (for every-position perturbations)

    @property
    def interventions(self) -> tuple[Any, ...]:
        return self.site.interventions

    @property
    def stack(self) -> int:
        return self.site.executor.stack

    @property
    def sample_name(self) -> str:
        return str(self.site.sample.perturbation.name)

    def logits(self, group: Group) -> list[Tensor]:
        x_primes, at = self.substitutes(group)
        return list(self.site.executor.patched(self.ids, torch.cat(x_primes), at, copies=len(group))
                    .split(self.ids.shape[0]))

    def substitutes(self, group: Group) -> tuple[list[Tensor], slice | int]:
        """Each intervention's x' of `group` (the draws :meth:`logits` patches in) and the positions they replace."""
        model = self.site.model
        whole = self.positions is not None and any(self.positions.whole(i.perturbation) for _, i in group)
        x_primes = [self._substitute(i.perturbation, draw_generator(model.device, self.seed, self.index, i.name),
                                     whole) for _, i in group]
        return x_primes, (slice(0, None) if whole else self.at)

    def _substitute(self, perturbation: Perturbation, generator: torch.Generator, whole: bool = False) -> Tensor:
        """x' at the patched positions: ``[b npos d]`` for ``slice(first, None)``, ``[b n d]`` for the whole context
        (`whole`: the masked tokens keep their clean activation, or take an every-position perturbation's), ``[b d]``
        at one position."""
        dtype = self.site.model.dtype
        x_prime = self.view.substitute(perturbation, generator, dtype)
        if whole and self.positions is not None:
            keep, out = self.positions.keep, self.positions.fill.to(dtype).clone()  # [b n], [b n d]
            out[keep] = x_prime
            if every_position(perturbation) and not bool(keep.all()):
                out[~keep] = self._masked_view().substitute(perturbation, generator, dtype)
            return out
        return x_prime.reshape(self.ids.shape[0], -1, x_prime.shape[-1]) if isinstance(self.at, slice) else x_prime

    def _masked_view(self) -> SaeView:
        """The SAE's view of the masked tokens (computed once per batch)."""
        if self._rest is None:
            assert self.positions is not None
            positions = self.positions
            reads = None if positions.reads is None else positions.reads[~positions.keep]
            self._rest = SaeView.of(positions.fill[~positions.keep], self.site.sae, self.site.center, reads=reads)
        return self._rest

    def draws(self, n_draws: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Every context's draws computed first (context c from its own stream), then patched in chunks of rows
        across contexts."""
        site, view = self.site, self.view
        model, executor, t = site.model, site.executor, int(self.at)  # type: ignore[arg-type]
        n_ctx = self.ids.shape[0]
        sample = site.sample.perturbation
        chunk = draw_chunk(model, executor.positions_computed(self.ids.shape[1], t), executor.prefix_bytes_per_row())
        owner = torch.arange(n_ctx, device=model.device).repeat_interleave(n_draws)  # [b*N]
        x_rep, x_hat_rep, off_rep = view.x[owner], view.x_hat[owner], view.offset[owner]
        drawn = []
        for c in range(n_ctx):
            generator = draw_generator(model.device, self.seed, self.index, site.sample.name, context=c)
            rows = slice(c * n_draws, (c + 1) * n_draws)
            drawn.append(sample(x_rep[rows], x_hat_rep[rows], generator).float() + off_rep[rows])
        x_prime_all = torch.cat(drawn).to(model.dtype)
        for start in range(0, len(owner), chunk):
            rows = owner[start : start + chunk]
            yield rows, executor.patched(self.ids, x_prime_all[start : start + chunk], t, rows=rows)


@dataclass
class JointPatch:
    """Several sites in one forward (lowest first), each replaced by its own :class:`SiteSwap` at positions `at`;
    the logits cut to the measured tail from `start`. `clean`: each site's clean activation from `start` on
    ``[b n-start d]`` (the batch's shared clean forward); `baseline`: ``--joint-baseline``."""

    sites: Sequence[Site]
    executor: JointExecutor
    ids: Tensor  # [b n] on the model's device
    at: slice
    start: int
    seed: int
    index: int
    stack: int = 1
    positions: Positions | None = None  # all-token mode: the tokens patched at every site
    clean: Sequence[Tensor] = ()
    baseline: str = "reencoded"
    sizes: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    _references: dict[tuple[str, int | None, int | None], list[Tensor]] = field(default_factory=dict)

    @property
    def interventions(self) -> tuple[Any, ...]:
        return self.sites[0].interventions

    @property
    def sample_name(self) -> str:
        return str(self.sites[0].sample.perturbation.name)

    def logits(self, group: Group) -> list[Tensor]:
        device = self.sites[0].model.device
        out = []
        for j, _ in group:
            # each site's own perturbation object: a fitted one (epsilon_anisotropic) was fitted on that site
            swaps = []
            for k, site in enumerate(self.sites):
                perturbation = site.interventions[j].perturbation
                at, keep = self._where(site, j)
                swaps.append(SiteSwap(site, perturbation,
                                      draw_generator(device, self.seed, self.index, site.interventions[j].name, site=k),
                                      at, keep, error=self._error(perturbation, k, at, keep)))
            logits = self.executor.patched(self.ids, swaps)[:, self.start :]
            self.sizes[j] = self._measured(swaps, logits.shape[1])
            out.append(logits)
        return out

    def _where(self, site: Site, j: int) -> tuple[slice, Tensor | None]:
        """Where intervention `j` replaces `site`: ``at``; the whole context for an every-position perturbation;
        the kept tokens when --mask-special masks some after position `first`."""
        if self.positions is None:
            return self.at, None
        if every_position(site.interventions[j].perturbation):
            return slice(0, None), None
        return (slice(0, None), self.positions.keep) if self.positions.holes else (self.at, None)

    def _error(self, perturbation: Perturbation, k: int, at: slice, keep: Tensor | None) -> Tensor | None:
        """The SAE error `perturbation` sees at site k (``[b npos d]``), or None: its own re-encoding."""
        if every_position(perturbation):
            return None  # zero & co: no error sizes them
        if frozen_error(perturbation):
            source = "clean"
        elif baseline_label(perturbation) is not None:
            source = self.baseline
        else:
            return None
        return None if source == "reencoded" else self.reference(source, at, keep)[k]

    def reference(self, source: str, at: slice, keep: Tensor | None) -> list[Tensor]:
        """Each site's SAE error at positions `at` ``[b npos d]`` float32 (computed once per batch): ``clean``, its
        SAE's error on the site's clean activation; ``matched``, the error of the joint SAE run (x' = x̂ at every
        site, each re-encoding what it receives) at the site."""
        key = (source, at.start, at.stop)
        if key not in self._references:
            if source == "clean":
                self._references[key] = [self._clean_error(site, acts, at) for site, acts in
                                         zip(self.sites, self.clean, strict=True)]
            else:
                swaps = reconstruct_swaps(self.sites, at, keep, record_error=True)
                self.executor.patched(self.ids, swaps)
                self._references[key] = [swap.error_seen for swap in swaps]  # type: ignore[misc]
        return self._references[key]

    def _clean_error(self, site: Site, acts: Tensor, at: slice) -> Tensor:
        """x − x̂ of `site`'s clean activation ``acts [b n-start d]`` at positions `at` ``[b npos d]``."""
        tail = slice(at.start - self.start if at.start is not None else None,
                     at.stop - self.start if at.stop is not None else None)
        x = acts[:, tail]
        b, n_pos, d = x.shape
        view = SaeView.of(x.reshape(b * n_pos, d).to(site.model.device), site.sae, site.center)
        return (view.x - view.x_hat).reshape(b, n_pos, d)

    def _measured(self, swaps: Sequence[SiteSwap], n_measured: int) -> dict[str, Tensor]:
        """Each site's patch sizes laid out as the measured logits ``[b n_measured]``: by position in all-token mode
        (NaN where the site was not patched), the patched position's on every measured row otherwise."""
        out = {}
        for k, swap in enumerate(swaps):
            for name in SIZE_COLUMNS:
                values = swap.sizes[name]  # [b npos]
                if self.positions is None:
                    grid = values[:, :1].expand(-1, n_measured)
                else:
                    grid = torch.full((values.shape[0], n_measured), float("nan"), device=values.device)
                    grid[:, swap.at] = values
                out[size_column(k, name)] = grid
        return out

    def draws(self, n_draws: int) -> Iterator[tuple[Tensor, Tensor]]:
        """One context's draws per patched forward (in chunks), each site drawing from its own stream, sized as the
        other baselines (``--joint-baseline``)."""
        model = self.sites[0].model
        n_ctx, n_positions = self.ids.shape
        chunk = draw_chunk(model, n_positions, 0)  # joint patched runs compute every position, hold no prefix
        errors = [self._error(site.sample.perturbation, k, self.at, None) for k, site in enumerate(self.sites)]
        for c in range(n_ctx):
            generators = [draw_generator(model.device, self.seed, self.index, site.sample.name, context=c, site=k)
                          for k, site in enumerate(self.sites)]
            for start in range(0, n_draws, chunk):
                rows = min(chunk, n_draws - start)
                swaps = [SiteSwap(site, site.sample.perturbation, generators[k], self.at,
                                  error=None if errors[k] is None else errors[k][c : c + 1].expand(rows, -1, -1))
                         for k, site in enumerate(self.sites)]
                logits = self.executor.patched(self.ids[c : c + 1].repeat(rows, 1), swaps)[:, self.start :]
                yield torch.full((rows,), c, device=model.device), logits


__all__ = ["DRAW_CHUNK_BYTES", "JointPatch", "Patch", "Positions", "Reconstruct", "Site", "SitePatch", "SiteSwap",
           "draw_chunk", "reconstruct_swaps"]
