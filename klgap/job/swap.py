"""One site's replacement inside a joint cell's patched forward (klgap/forward/joint.py calls it): the SAE's view
of the activation that forward gives the site, the perturbation applied to it, and the size of the patch.

A :class:`SiteSwap` sees x̂ from its own SAE re-encoding the activation it receives, unless it is given the error
to use instead (``error``: x̂ = x − error, nothing re-encoded): a joint run's baselines are sized so by
``--joint-baseline`` (clean: the SAE's error on the clean activation; matched: the joint SAE run's error at the
site) and ``error_add`` always takes the clean error (klgap/job/patch.py chooses). Each call records, per patched
token, the size of the patch it made (klgap.job.record.SIZE_COLUMNS): ε = ‖x − x'‖, ‖x‖ and cos(x, x') of the
activation x it received, and the L0 of the SAE code whose x̂ the perturbation saw (NaN where x̂ came from a
given error).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from klgap.forward.executors import Executor
from klgap.job.view import SaeView
from klgap.protocols import LoadedModel, LoadedSAE, Perturbation

class Site(Protocol):
    """What patching a site needs of its loaded run (klgap.job.loading.Loaded has it)."""

    model: LoadedModel
    sae: LoadedSAE
    center: bool
    executor: Executor

    @property
    def interventions(self) -> tuple[Any, ...]: ...

    @property
    def sample(self) -> Any: ...


class SiteSwap:
    """Replace positions `at` of a site's tensor by `perturbation` applied to that tensor's own SAE view (x, x̂
    computed from the activation this forward gives the site): ``slice(first, None)`` in all-token mode,
    ``slice(t, t + 1)`` in the others; with `keep` (``[b n]`` bool, all-token mode with masked tokens) only the
    tokens it marks. `error` (``[b npos d]`` float32, aligned with the positions `at`): the SAE error the
    perturbation sees instead of the re-encoded one (x̂ = x − error). `record_error`: keep the re-encoded error
    ``[b npos d]`` (:attr:`error_seen`; a matched baseline's reference). After a call, :attr:`sizes` holds the
    patch's size per position ``[b npos]`` (NaN at the tokens `keep` leaves)."""

    def __init__(self, site: Site, perturbation: Perturbation, generator: torch.Generator, at: slice,
                 keep: Tensor | None = None, error: Tensor | None = None, record_error: bool = False) -> None:
        self.site, self.perturbation, self.generator, self.at, self.keep = site, perturbation, generator, at, keep
        self.error, self.record_error = error, record_error
        self.sizes: dict[str, Tensor] = {}
        self.error_seen: Tensor | None = None

    def rows(self, x: Tensor, error: Tensor | None = None) -> tuple[Tensor, SaeView]:
        """``x [m d]`` (this forward's activations) -> (x' ``[m d]`` in the model's dtype, the SAE's view of x, its
        x̂ replaced by x − `error` ``[m d]`` when given)."""
        model = self.site.model
        view = SaeView.of(x.to(model.device), self.site.sae, self.site.center)  # device_map: a site anywhere
        if error is not None:
            view = dataclasses.replace(view, x_hat=view.x - error.to(view.x.device))
        return view.substitute(self.perturbation, self.generator, model.dtype), view

    def substitute(self, tensor: Tensor) -> Tensor:
        """``tensor [b n d]`` -> x' ``[b npos d]`` (the positions `at`) in the model's dtype; with `keep`, the
        tokens it does not mark keep their value."""
        x = tensor[:, self.at]
        b, n_pos, _ = x.shape
        keep = (self.keep[:, self.at].to(x.device) if self.keep is not None
                else torch.ones(b, n_pos, dtype=torch.bool, device=x.device))
        out = x.to(self.site.model.dtype).clone()
        new, view = self.rows(x[keep], self.error[keep.to(self.error.device)] if self.error is not None else None)
        out[keep] = new.to(x.device)
        self._record(x, out, keep, view)
        return out

    def _record(self, x: Tensor, out: Tensor, keep: Tensor, view: SaeView) -> None:
        """The patch's size at each position ``[b npos]`` float32 (NaN where nothing was patched)."""
        xf, of = x.float(), out.float()
        nan = torch.full(keep.shape, float("nan"), device=x.device)
        l0 = nan.clone()
        if self.error is None:
            l0[keep] = view.stats["l0"].to(x.device)
        self.sizes = {"eps": torch.where(keep, (xf - of).norm(dim=-1), nan),
                      "x_norm": torch.where(keep, xf.norm(dim=-1), nan),
                      "cos": torch.where(keep, torch.nn.functional.cosine_similarity(xf, of, dim=-1, eps=1e-12), nan),
                      "l0": l0}
        if self.record_error:
            seen = torch.zeros(*keep.shape, x.shape[-1], device=view.x.device)
            seen[keep.to(view.x.device)] = view.x - view.x_hat
            self.error_seen = seen

    def __call__(self, tensor: Tensor) -> Tensor:
        out = tensor.clone()
        out[:, self.at] = self.substitute(tensor).to(tensor.device)
        return out


class Reconstruct:
    """x' = x̂ (the joint executors' check patch at every site, and a matched baseline's reference run)."""

    name, stochastic, geometry = "sae", False, {}

    def __call__(self, x: Tensor, x_hat: Tensor, generator: torch.Generator) -> Tensor:
        return x_hat


def reconstruct_swaps(sites: Sequence[Site], at: slice, keep: Tensor | None = None,
                      record_error: bool = False) -> list[SiteSwap]:
    return [SiteSwap(site, Reconstruct(), torch.Generator(device=site.model.device), at, keep,
                     record_error=record_error) for site in sites]


__all__ = ["Reconstruct", "Site", "SiteSwap", "reconstruct_swaps"]
