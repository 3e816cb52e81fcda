"""Forward passes that touch several sites at once: one clean forward recording every site, and patched forwards
that replace several sites in the same pass (each from the tensor that pass gives it).

- :func:`clean_forward`: the clean run of a batch shared by several sites (a study's sites and layers, a joint
  run's sites): one forward of the model's own, each site recorded by a plain hook; a site measured by a suffix
  replay records the block calls its replay needs too (klgap/forward/suffix.py).
- :class:`JointForward`: every patched run the model's own full forward, a plain hook at each site.
- :class:`JointReplay`: the lowest site's suffix replay from that site up, the higher sites patched by hooks while
  their blocks rerun. Used only where it reproduces :class:`JointForward` (the caller checks it on the run's first
  contexts, as the single-site fast paths are checked: klgap/forward/executors.py).

A swap replaces positions ``at`` of a site's tensor ``[b n d]``: :class:`Swap` is what the patched runs call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import Tensor

from klgap.forward.executors import Executor, SuffixReplay
from klgap.forward.hooks import register_site_hook
from klgap.protocols import LoadedModel, SiteSpec

#: where a site sits inside its block, for the forward order (resid_post L comes before resid_pre L+1)
SITE_ORDER = {"resid_pre": 0, "attn_z": 1, "attn_out": 2, "mlp_out": 3, "resid_post": 4}


def forward_order(site: str, layer: int) -> tuple[int, int]:
    return layer, SITE_ORDER[site]


class Swap(Protocol):
    """A site's replacement inside a patched forward: positions `at` of the tensor it receives."""

    at: slice

    def substitute(self, tensor: Tensor) -> Tensor:
        """``tensor [b n d]`` -> the replacement of its positions `at` ``[b npos d]``."""
        ...

    def __call__(self, tensor: Tensor) -> Tensor:
        """``tensor [b n d]`` -> the tensor with positions `at` replaced."""
        ...


@torch.no_grad()
def clean_forward(model: LoadedModel, sites: Sequence[tuple[SiteSpec, Executor]],
                  ids: Tensor) -> tuple[list[Tensor], Tensor]:
    """One clean forward of ``ids [b n]`` for several sites: (each site's activation ``[b n d]``, in the order
    given, and the logits ``[b n vocab]``). A site measured by a suffix replay has its replay's state recorded
    (released by :func:`release`)."""
    acts: list[Tensor | None] = [None] * len(sites)

    def recorder(k: int) -> Callable[[Tensor], None]:
        def record(tensor: Tensor) -> None:
            acts[k] = tensor.clone()

        return record

    root = model.hf_model
    handles = []
    for k, (spec, executor) in enumerate(sites):
        if isinstance(executor, SuffixReplay):
            handles.extend(executor.runner.clean_hooks())
        else:
            handles.append(register_site_hook(root.get_submodule(spec.module), spec, recorder(k)))
    try:
        logits = root(input_ids=ids, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    for k, (_, executor) in enumerate(sites):
        if isinstance(executor, SuffixReplay):
            acts[k] = executor.runner.site_value
    return acts, logits  # type: ignore[return-value]


def release(executors: Sequence[Executor]) -> None:
    """Drop what a batch's clean forward recorded for the suffix replays."""
    for executor in executors:
        if isinstance(executor, SuffixReplay):
            executor.runner.site_value = None


class JointForward:
    """Every patched run the model's own full forward, a plain hook replacing each site."""

    path = "joint-full-forward"

    def __init__(self, model: LoadedModel, specs: Sequence[SiteSpec]) -> None:
        self.model, self.specs = model, list(specs)
        self.modules = [model.hf_model.get_submodule(spec.module) for spec in self.specs]

    @torch.no_grad()
    def patched(self, ids: Tensor, swaps: Sequence[Swap]) -> Tensor:
        """Logits ``[b n vocab]`` with every site replaced by its swap of the tensor it receives."""
        handles = [register_site_hook(module, spec, swap)
                   for module, spec, swap in zip(self.modules, self.specs, swaps, strict=True)]
        try:
            return self.model.hf_model(input_ids=ids, use_cache=False).logits
        finally:
            for handle in handles:
                handle.remove()


class JointReplay:
    """The lowest site's suffix replay, the higher sites patched by hooks as their blocks rerun. Needs the
    batch's :func:`clean_forward` first (it records the lowest site's replay state)."""

    path = "joint-suffix-replay"

    def __init__(self, full: JointForward, lowest: SuffixReplay) -> None:
        self.full, self.lowest = full, lowest.runner

    @property
    def first_block(self) -> int:
        return self.lowest.first

    @torch.no_grad()
    def patched(self, ids: Tensor, swaps: Sequence[Swap]) -> Tensor:
        at = swaps[0].at
        x_prime = swaps[0].substitute(self.lowest.site_value)  # nothing below the lowest site is patched
        handles = [register_site_hook(module, spec, swap)
                   for module, spec, swap in zip(self.full.modules[1:], self.full.specs[1:], swaps[1:], strict=True)]
        try:
            return self.lowest.patched(x_prime, at)
        finally:
            for handle in handles:
                handle.remove()


JointExecutor = JointForward | JointReplay


def same_path(executor: JointExecutor, model: LoadedModel, specs: Sequence[SiteSpec],
              lowest: Executor) -> JointExecutor:
    """A fresh joint executor of `executor`'s kind on another copy of its model (the precision check's float32 and
    low-precision runs, klgap/job/precision.py), over `specs`, `lowest` the lowest site's fresh executor (a
    suffix replay where `executor` replays): the path `executor` was checked on, not checked again."""
    full = JointForward(model, specs)
    return JointReplay(full, lowest) if isinstance(executor, JointReplay) else full  # type: ignore[arg-type]


__all__ = ["SITE_ORDER", "JointExecutor", "JointForward", "JointReplay", "Swap", "clean_forward", "forward_order",
           "release", "same_path"]
