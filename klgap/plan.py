"""`--dry-run`: resolve a command or replication file offline and print what it would run and need.

Every (site, layer) of the command goes through :func:`klgap.resolve.resolve`, the same resolution a real run
uses (names, parameters, SAE routing and the loader's ``check``: hook name against site and layer, hub repo),
and nothing is loaded. What would need the network is listed, so a user knows before a long job fails.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from klgap.config import RunConfig
from klgap.resolve import RunPlan, resolve


@dataclass(frozen=True)
class DryRun:
    """The runs a command would make (resolved plans) and what they need beyond this machine's files."""

    config: RunConfig
    plans: list[RunPlan]
    saes: list[str | None]  # the SAE spec of each plan as the command names it
    needs: list[str] = field(default_factory=list)


def _status(plan: RunPlan) -> str:
    if plan.sae is None:
        return "default for the site"
    if plan.sae.checked is not None:
        detail = plan.sae.checked.detail
        return f"checked by {plan.sae.loader}" + (f" ({detail})" if detail else "")
    return f"{plan.sae.loader} (its loader checks it when loading)"


def dry_run(config: RunConfig, sites: list[str | None], layers: list[int | None], trains: bool = True) -> DryRun:
    """Resolve every (site, layer) of a command; raises KlgapError on the first problem.

    trains: an SAE path that does not exist yet is accepted (a config's [train_sae] makes it before the run);
    with False such a path is the resolver's error."""
    from klgap.capabilities import hub_repo
    from klgap.grid import sae_for

    several = len(sites) * len(layers) > 1
    plans, saes = [], []
    for site in sites:
        for layer in layers:
            spec = sae_for(config.sae, site, layer) if several else config.sae
            saes.append(spec)
            sae_path = Path(spec).expanduser() if spec and ":" not in spec else None
            if trains and sae_path is not None and not sae_path.exists():  # trained before the run ([train_sae]) or copied
                plans.append(resolve(dataclasses.replace(config, site=site, layer=layer, sae=None)))
                continue
            plans.append(resolve(dataclasses.replace(config, site=site, layer=layer, sae=spec)))
    needs = []
    repo = hub_repo(plans[0].model.adapter)
    if repo:
        needs.append(f"model {config.model}: the Hugging Face hub or its cache (repo {repo})")
    source = plans[0].tokens
    if source.name == "hf" and not Path((source.arg or "").partition(":")[0]).expanduser().exists():
        needs.append(f"dataset {config.dataset}: the Hugging Face hub")
    for repo_id in sorted({p.sae.repo_id for p in plans if p.sae is not None and p.sae.repo_id}):
        needs.append(f"SAE weights: the Hugging Face hub (repo {repo_id})")
    return DryRun(config, plans, saes, needs)


def print_plan(plan: DryRun) -> None:
    cfg = plan.config
    print(f"dry run: {cfg.model}, mode {cfg.mode}, {cfg.n_tokens:,} tokens of {cfg.dataset}, "
          f"interventions {', '.join(cfg.interventions)}")
    for run, sae in zip(plan.plans, plan.saes, strict=True):
        hook = f" ({run.sae.hook_name})" if run.sae is not None and run.sae.hook_name else ""
        status = _status(run) if run.sae is not None or not sae else "not there yet (trained or copied before the run?)"
        print(f"  {run.site} L{run.layer}: SAE {sae}{hook}: {status}")
    if plan.needs:
        print("needs, beyond this machine's files:")
        for need in plan.needs:
            print(f"  - {need}")
    print(f"ok: {len(plan.plans)} run(s) check out")


__all__ = ["DryRun", "dry_run", "print_plan"]
