"""`--dry-run`: what a command or replication file would run and need, offline.

Every (site, layer) of the command is resolved by the job's planning (klgap.job.plan.plan_job), the same
resolution a real run uses (names, parameters, SAE routing and the loader's ``check``: hook name against site and
layer, hub repo), and nothing is loaded. Without ``--sae`` the default SAE is named as a run would pick it, from
what the model's adapter declares before loading (:class:`klgap.protocols.PretrainedSAEAdapter`). What would need
the network is listed (model, SAE weights, dataset), and an SAE trained on another model than the one asked for is
a warning, so a user knows before a long job fails or measures the wrong thing.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from klgap.plan.config import RunConfig
from klgap.protocols import LoadedSAE, ModelSAENames
from klgap.plan.resolve import RunPlan, SAERoute, default_sae


@dataclass(frozen=True)
class DefaultSAE:
    """The pretrained SAE a run without ``--sae`` would use (``route``) and the note a run shows with it."""

    route: SAERoute
    note: str


@dataclass(frozen=True)
class DryRun:
    """The runs a command would make (resolved plans) and what they need beyond this machine's files.

    saes:     the SAE spec of each plan as the command names it (None: the default SAE).
    defaults: per plan, the default SAE it would use when the command names none and the model's adapter says
              which models sae_lens lists SAEs under; else None (named once the model loads).
    warnings: what a user should know before running (an SAE trained on another model)."""

    config: RunConfig
    plans: list[RunPlan]
    saes: list[str | None]
    needs: list[str] = field(default_factory=list)
    defaults: list[DefaultSAE | None] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    names: ModelSAENames | None = None  # what the model's adapter says of its SAEs before loading
    checkpoints: list[str] | None = None  # a study over checkpoints: per (site, layer), what was checked of them


def _status(route: SAERoute) -> str:
    if route.checked is not None:
        detail = route.checked.detail
        return f"checked by {route.loader}" + (f" ({detail})" if detail else "")
    return f"{route.loader} (its loader checks it when loading)"


def _own_names(config: RunConfig, plan: RunPlan, names: ModelSAENames | None) -> set[str]:
    """Names the requested model goes by: --model, its adapter's name and hub repo, its own sae_lens name."""
    from klgap.plugins.capabilities import hub_repo

    own = {config.model, plan.model.name}
    repo = hub_repo(plan.model.adapter)
    if repo:
        own |= {repo, repo.rsplit("/", 1)[-1]}
    if names is not None and names.sae_lens_models:
        own.add(names.sae_lens_models[0])  # e.g. pythia-70m's own name; pythia-70m-deduped is a stand-in
    return {name.lower() for name in own}


def _model_warning(config: RunConfig, plan: RunPlan, route: SAERoute, names: ModelSAENames | None) -> str | None:
    """An SAE whose directory entry (or cfg) names another model than the one asked for."""
    trained_on = route.checked.model if route.checked is not None else None
    if not trained_on or trained_on.lower() in _own_names(config, plan, names):
        return None
    note = f" ({names.sae_note})" if names is not None and names.sae_note else ""
    return f"{plan.site} L{plan.layer}: the SAE {route.spec} was trained on {trained_on}, not on {config.model}{note}"


def describe(config: RunConfig, plans: Sequence[RunPlan], saes: Sequence[str | None],
             checkpoints: Sequence[str] = ()) -> DryRun:
    """What a command's plans (klgap.job.plan.plan_job: each resolved once, nothing loaded) would run and need:
    the default SAE where none is named, what needs the network, an SAE trained on another model. A plan whose SAE
    is a path not there yet (a [train_sae] table makes it before the run) has no SAE route."""
    from klgap.plugins.capabilities import hub_repo, model_sae_names

    defaults, warnings = [], []
    names: ModelSAENames | None = None
    for plan, spec in zip(plans, saes, strict=True):
        if spec and plan.sae is None:  # trained before the run ([train_sae]) or copied
            defaults.append(None)
            continue
        if names is None:
            names = model_sae_names(plan.model.name, plan.model.adapter)
        found = None
        if not spec and plan.sae is None and names is not None and plan.site is not None and plan.layer is not None:
            found = DefaultSAE(*default_sae(names, plan.site, plan.layer))  # none known: the run's own error
        defaults.append(found)
        route = found.route if found is not None else plan.sae
        if isinstance(route, SAERoute):
            warning = _model_warning(config, plan, route, names)
            if warning:
                warnings.append(warning)
    needs = []
    repo = hub_repo(plans[0].model.adapter)
    if repo:
        needs.append(f"model {config.model}: the Hugging Face hub or its cache (repo {repo})")
    source = plans[0].tokens
    if source.name == "hf" and not Path((source.arg or "").partition(":")[0]).expanduser().exists():
        needs.append(f"dataset {config.dataset}: the Hugging Face hub")
    routes = [d.route if d is not None else p.sae for p, d in zip(plans, defaults, strict=True)]
    for repo_id in sorted({r.repo_id for r in routes if isinstance(r, SAERoute) and r.repo_id}):
        needs.append(f"SAE weights: the Hugging Face hub or its cache (repo {repo_id})")
    return DryRun(config, list(plans), list(saes), needs, defaults, warnings, names, list(checkpoints) or None)


def _hook(route: SAERoute) -> str:
    return f" ({route.hook_name})" if route.hook_name and route.hook_name not in route.spec else ""


def _sae_line(run: RunPlan, spec: str | None, found: DefaultSAE | None, names: ModelSAENames | None) -> str:
    if found is not None:
        return f"SAE {found.route.spec}{_hook(found.route)}, the default (no --sae given): {_status(found.route)}"
    if isinstance(run.sae, LoadedSAE):  # an SAE object from Python
        return f"SAE {run.sae.source} ({run.sae.hook_name or 'no hook name'}), held in memory"
    if not spec:
        why = ("its adapter names no sae_lens models" if names is None else "")
        return f"SAE: the default for the site, named once {run.model.name} loads" + (f" ({why})" if why else "")
    if not isinstance(run.sae, SAERoute):
        return f"SAE {spec}: not there yet (trained or copied before the run?)"
    return f"SAE {spec}{_hook(run.sae)}: {_status(run.sae)}"


def _where(run: RunPlan, given: RunConfig) -> str:
    """``mlp_out L0``, saying when site and layer come from the SAE (or will, once it loads)."""
    if run.site is None or run.layer is None:
        return "site and layer from the SAE once it loads (its loader cannot tell before)"
    told = given.site is not None and given.layer is not None
    return f"{run.site} L{run.layer}" + ("" if told else " (site and layer from the SAE)")


def print_plan(plan: DryRun) -> None:
    """The plan on stdout (warnings on stderr). A study over SAE checkpoints: one line per (site, layer) saying
    what was checked of its checkpoints (klgap.sae.checkpoints.verify), in place of the SAE lines."""
    checkpoints = plan.checkpoints
    cfg = plan.config
    print(f"dry run: {cfg.model}, mode {cfg.mode}, {cfg.n_tokens:,} tokens of {cfg.dataset}, "
          f"interventions {', '.join(cfg.interventions)}")
    defaults = plan.defaults or [None] * len(plan.plans)
    for line in checkpoints or []:
        print(f"  {line}")
    for run, sae, found in zip(plan.plans, plan.saes, defaults, strict=True) if checkpoints is None else ():
        print(f"  {_where(run, cfg)}: {_sae_line(run, sae, found, plan.names)}")
        if found is not None:
            print(f"    {found.note}")
    if plan.needs:
        print("needs, beyond this machine's files:")
        for need in plan.needs:
            print(f"  - {need}")
    for warning in plan.warnings:
        print(f"klgap: warning: {warning}", file=sys.stderr)
    said = f", {len(plan.warnings)} warning(s) on stderr" if plan.warnings else ""
    print(f"ok: {len(plan.plans)} run(s) check out{said}")


__all__ = ["DefaultSAE", "DryRun", "describe", "print_plan"]
