"""Joint runs: several (site, layer)s patched in the same forward pass, each with its own SAE (issue 21).

In a joint patched forward every site, lowest first, takes the activation it receives there, already changed
by the patches below it, through its own SAE and applies the intervention with that site's own x, x̂ and
ε = x − x̂ (what splicing SAEs in at several layers does). Random interventions draw independently per site and
token: site k (in forward order) of intervention j in batch b draws from ``generator_for(seed, b, j)`` for
k = 0, as a single-site run does, and from ``generator_for(seed, b, j, k)`` above it.

Two executors, one interface (``clean(ids)`` / ``patched(ids, swaps)``):

- :class:`JointForward`: every patched run is the model's own full forward, a plain hook at each site.
- :class:`JointReplay`: the lowest site's suffix replay (klgap/forward/suffix.py) from that site up, the higher sites
  patched by hooks while their blocks rerun. Used only when it reproduces :class:`JointForward` on the run's first
  contexts (relative error ≤ klgap.forward.executors.TOLERANCE), as the other fast paths are checked.

The same command measures every site alone on the same batches (the single-site runs of the plan; klgap/job/joint_modes.py
measures a batch), klgap/job/joint_folder.py writes them and klgap/report/compounding.py compares.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from klgap.job import modes
from klgap.errors import KlgapError
from klgap.forward.executors import TOLERANCE, SuffixReplay, relative_error
from klgap.forward.hooks import register_site_hook
from klgap.protocols import LoadedModel, Perturbation
from klgap.plan.resolve import JointPlan

if TYPE_CHECKING:
    from klgap.job.engine import Loaded

log = logging.getLogger("klgap")

#: where a site sits inside its block, for the forward order (resid_post L comes before resid_pre L+1)
SITE_ORDER = {"resid_pre": 0, "attn_z": 1, "attn_out": 2, "mlp_out": 3, "resid_post": 4}

Swap = Callable[[Tensor], Tensor]  # a site's tensor [b n d] -> its replacement


def forward_order(site: str, layer: int) -> tuple[int, int]:
    return layer, SITE_ORDER[site]


def site_generator(device: torch.device, seed: int, batch: int, intervention: int, site: int) -> torch.Generator:
    """The draws of one intervention at one site of a joint run: the lowest site draws as a single-site run."""
    keys = (seed, batch, intervention) if site == 0 else (seed, batch, intervention, site)
    return modes.generator_for(device, *keys)


class SiteSwap:
    """Replace positions `at` of a site's tensor by `perturbation` applied to that tensor's own SAE view (x, x̂
    computed from the activation this forward gives the site): ``slice(first, None)`` in all-token mode,
    ``slice(t, t + 1)`` in single-token mode."""

    def __init__(self, run: Loaded, perturbation: Perturbation, generator: torch.Generator, at: slice) -> None:
        self.run, self.perturbation, self.generator, self.at = run, perturbation, generator, at

    def substitute(self, tensor: Tensor) -> Tensor:
        """``tensor [b n d]`` -> x' ``[b npos d]`` (the positions `at`) in the model's dtype."""
        x = tensor[:, self.at].to(self.run.model.device)  # a site of a model spread over devices (device_map)
        b, n_pos, d = x.shape
        view = modes.SaeView.of(x.reshape(b * n_pos, d), self.run.sae, self.run.center)
        return view.substitute(self.perturbation, self.generator, self.run.model.dtype).reshape(b, n_pos, d)

    def __call__(self, tensor: Tensor) -> Tensor:
        out = tensor.clone()
        out[:, self.at] = self.substitute(tensor).to(tensor.device)
        return out


class _Reconstruct:
    """x' = x̂ (the check's patch at every site: deterministic, and a real change)."""

    name, stochastic, geometry = "sae", False, {}

    def __call__(self, x: Tensor, x_hat: Tensor, generator: torch.Generator) -> Tensor:
        return x_hat


class JointForward:
    """Every run the model's own full forward; plain hooks record (clean) or patch (patched) every site."""

    path = "joint-full-forward"

    def __init__(self, model: LoadedModel, runs: Sequence[Loaded]) -> None:
        self.model, self.runs = model, list(runs)
        root = model.hf_model
        self.modules = [root.get_submodule(run.spec.module) for run in self.runs]

    def _forward(self, ids: Tensor, swaps: Sequence[Callable[[Tensor], Tensor | None]]) -> Tensor:
        handles = [register_site_hook(module, run.spec, swap)
                   for module, run, swap in zip(self.modules, self.runs, swaps, strict=True)]
        try:
            return self.model.hf_model(input_ids=ids, use_cache=False).logits
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def clean(self, ids: Tensor) -> tuple[list[Tensor], Tensor]:
        """(site activations ``[b n d]`` in site order, logits ``[b n vocab]``) from one clean forward, which also
        records what each site's suffix replay needs (as klgap.forward.suffix.shared_clean does for a study)."""
        acts: list[Tensor | None] = [None] * len(self.runs)

        def recorder(k: int) -> Callable[[Tensor], None]:
            def record(tensor: Tensor) -> None:
                acts[k] = tensor.clone()

            return record

        handles = []
        for k, (module, run) in enumerate(zip(self.modules, self.runs, strict=True)):
            if isinstance(run.executor, SuffixReplay):
                handles.extend(run.executor.runner._clean_hooks())
            else:
                handles.append(register_site_hook(module, run.spec, recorder(k)))
        try:
            logits = self.model.hf_model(input_ids=ids, use_cache=False).logits
        finally:
            for handle in handles:
                handle.remove()
        for k, run in enumerate(self.runs):
            if isinstance(run.executor, SuffixReplay):
                acts[k] = run.executor.runner.site_value
        return acts, logits  # type: ignore[return-value]

    def done(self) -> None:
        """Drop what the batch's clean run recorded for the suffix replays."""
        for run in self.runs:
            if isinstance(run.executor, SuffixReplay):
                run.executor.runner.site_value = None

    @torch.no_grad()
    def patched(self, ids: Tensor, swaps: Sequence[Swap]) -> Tensor:
        """Logits ``[b n vocab]`` with every site replaced by its swap of the tensor it receives."""
        return self._forward(ids, swaps)


class JointReplay:
    """The lowest site's suffix replay, the higher sites patched by hooks as their blocks rerun (the clean run
    is :meth:`JointForward.clean`, which records every site's suffix calls)."""

    path = "joint-suffix-replay"

    def __init__(self, full: JointForward) -> None:
        self.full = full
        self.runners = [run.executor.runner for run in full.runs]

    def clean(self, ids: Tensor) -> tuple[list[Tensor], Tensor]:
        return self.full.clean(ids)

    @torch.no_grad()
    def patched(self, ids: Tensor, swaps: Sequence[Swap]) -> Tensor:
        lowest = self.runners[0]
        at = swaps[0].at  # type: ignore[attr-defined]
        x_prime = swaps[0].substitute(lowest.site_value)  # type: ignore[attr-defined]  # nothing below it is patched
        handles = [register_site_hook(module, run.spec, swap)
                   for module, run, swap in zip(self.full.modules[1:], self.full.runs[1:], swaps[1:], strict=True)]
        try:
            return lowest.patched(x_prime, at)
        finally:
            for handle in handles:
                handle.remove()

    def done(self) -> None:
        self.full.done()


JointExecutor = JointForward | JointReplay


def check_swaps(runs: Sequence[Loaded], at: slice) -> list[SiteSwap]:
    return [SiteSwap(run, _Reconstruct(), torch.Generator(device=run.model.device), at) for run in runs]


def choose(runs: Sequence[Loaded]) -> tuple[JointExecutor, dict[str, Any]]:
    """The joint replay if every site has a suffix replay and, on the first contexts, the replay with x̂ at every
    site matches the full forward; else full forwards. The record of the choice goes to run.json."""
    config, model = runs[0].config, runs[0].model
    full = JointForward(model, runs)
    if not config.fast:
        return full, {"path": full.path, "reason": "--no-fast"}
    if config.mode != "all_tokens":
        return full, {"path": full.path, "reason": f"{config.mode}: joint patched runs are full forwards (no joint "
                                                   "KV-cache path yet); each site alone uses its own fast path"}
    if not all(isinstance(run.executor, SuffixReplay) for run in runs):
        return full, {"path": full.path, "reason": "a site has no suffix replay (its single-site run uses "
                                                   "full forwards)"}
    replay = JointReplay(full)
    first = 1 if config.skip_first_position else 0
    ids = runs[0].contexts[: min(2, len(runs[0].contexts))].to(model.device)
    replay.clean(ids)  # each site's own replay was checked against full forwards when its run loaded
    patched = replay.patched(ids, check_swaps(runs, slice(first, None)))
    ref_patched = full.patched(ids, check_swaps(runs, slice(first, None)))
    replay.done()
    error = relative_error([(patched, ref_patched)], ref_patched)
    if not error <= TOLERANCE:
        log.warning("joint suffix replay of %s differs from the full forward (%.2g); using full forward passes",
                    model.name, error)
        return full, {"path": full.path, "reason": f"joint replay check failed (relative error {error:.2g})"}
    return replay, {"path": replay.path, "first_block": replay.runners[0].first,
                    "replay_check_relative_error": error}


@dataclass
class JointRun:
    """A joint plan loaded: its single-site runs in forward order (each an ordinary run, measured alone on the
    same batches), the executor that patches them together and, with ``joint_subsets``, every subset of two or
    more of them (not all) as a JointRun of its own that shares this one's clean forward (:func:`subsets_of`)."""

    plan: JointPlan
    runs: list[Loaded]
    executor: JointExecutor
    execution: dict[str, Any] = field(default_factory=dict)
    subsets: list[JointRun] = field(default_factory=list)

    @property
    def n_batches(self) -> int:
        return self.runs[0].n_batches

    @property
    def name(self) -> str:
        """``resid_post_L03+resid_post_L10``: the sites patched together, in forward order."""
        return "+".join(f"{run.site}_L{run.layer:02d}" for run in self.runs)


def subsets_of(joint: JointRun) -> list[JointRun]:
    """Every subset of two or more of `joint`'s sites, short of all of them (by size, then forward order), each
    with an executor of `joint`'s kind over its own sites. A subset's patched run reads what `joint`'s clean run
    recorded (the lowest site's suffix replay state), so it is measured between ``joint.executor.clean`` and
    ``done``; its site k draws from ``site_generator(..., k)`` as the same subset run alone would."""
    runs = joint.runs
    out = []
    for size in range(2, len(runs)):
        for chosen in itertools.combinations(runs, size):
            full = JointForward(runs[0].model, chosen)
            executor = JointReplay(full) if isinstance(joint.executor, JointReplay) else full
            config = dataclasses.replace(joint.plan.config, joint_subsets=False,
                                         site=",".join(dict.fromkeys(run.site for run in chosen)),
                                         layer=list(dict.fromkeys(run.layer for run in chosen)))
            plan = JointPlan(config, tuple(run.plan for run in chosen))
            out.append(JointRun(plan, list(chosen), executor, {**joint.execution, "path": executor.path,
                                                               "sites": [f"{r.site} L{r.layer}" for r in chosen]}))
    return out


def load_joint(plan: JointPlan) -> JointRun:
    """Load every site's SAE (one model, the same tokens) and choose the joint executor."""
    from klgap.job.engine import load_plan

    runs = [load_plan(p) for p in plan.plans]
    cells = [(run.site, run.layer) for run in runs]
    if len(set(cells)) != len(cells):
        raise KlgapError(f"--joint lists a site twice: {cells}; list each (site, layer) once")
    model = runs[0].model
    if model.remote or any(run.model is not model for run in runs):
        raise KlgapError("a joint run patches every site in one local forward; --remote is not supported")
    if any(not torch.equal(run.contexts, runs[0].contexts) for run in runs):
        raise KlgapError("the sites of a joint run read different tokens; give one --dataset and --seed")
    runs.sort(key=lambda run: forward_order(run.site, run.layer))
    executor, execution = choose(runs)
    joint = JointRun(plan, runs, executor, {**execution, "sites": [f"{run.site} L{run.layer}" for run in runs]})
    if plan.config.joint_subsets:
        joint.subsets = subsets_of(joint)
    return joint


__all__ = ["JointForward", "JointReplay", "JointRun", "SiteSwap", "choose", "forward_order", "load_joint",
           "site_generator", "subsets_of"]
