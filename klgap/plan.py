"""`--dry-run`: check a command or replication file offline, before anything is loaded or downloaded.

Every name is resolved against the installed plugins (model, token source, interventions, SAE loader), the
config is validated, the (site, layer) grid is expanded, and each SAE spec is checked as far as its loader
can without loading it: a loader that declares ``SAEChecker`` (``check(spec) -> SAECheck``; sae_lens releases:
the bundled pretrained-SAE directory; folders: their config) says what the spec names, including its hook
name, which must match the run's site and layer. What would need the network is listed, so a user knows
before a long job fails.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from klgap.capabilities import check_sae_spec
from klgap.config import RunConfig, parse_intervention
from klgap.errors import KlgapError
from klgap.plugins import get_host
from klgap.sites import parse_hook_name


def check_sae(spec: str, site: str | None, layer: int | None) -> dict[str, Any]:
    """What can be known of one SAE spec without loading it; KlgapError when it cannot be right."""
    loaders = get_host().registry("sae_loader")
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in loaders:
        loader, arg = loaders.get(prefix), rest
    else:
        path = Path(spec).expanduser()
        return {"sae": spec, "status": "found" if path.exists() else "not there yet (trained or copied before the run?)"}
    checked = check_sae_spec(loader, arg)
    if checked is None:
        return {"sae": spec, "status": f"{prefix} (not checked: its loader has no check())"}
    info = {"sae": spec, **dataclasses.asdict(checked)}
    hook = checked.hook_name
    if hook and site is not None and layer is not None:
        sae_site, sae_layer = parse_hook_name(hook)
        if (sae_site, sae_layer) != (site, layer):
            raise KlgapError(f"SAE {spec!r} has hook name {hook} (site {sae_site}, layer {sae_layer}), "
                             f"but the run is site {site}, layer {layer}")
    info["status"] = "checked"
    return info


def dry_run(config: RunConfig, sites: list[str | None], layers: list[int | None]) -> dict[str, Any]:
    """The runs a command would make and what each needs; raises KlgapError on the first problem."""
    from klgap.engine import build_perturbations
    from klgap.study import sae_for

    host = get_host()
    dataclasses.replace(config, site=sites[0], layer=layers[0]).validate()
    from klgap.plugins import model_adapter as find_model

    model_adapter = find_model(config.model).adapter
    source_name = config.dataset.partition(":")[0]
    host.registry("token_source").get(source_name)
    build_perturbations(list(config.interventions))
    if config.mode == "many_samples":
        build_perturbations([config.sample_intervention])
    several = len(sites) * len(layers) > 1
    runs = []
    for site in sites:
        for layer in layers:
            spec = sae_for(config.sae, site, layer) if several else config.sae
            sae = check_sae(spec, site, layer) if spec else {"sae": None, "status": "default for the site"}
            runs.append({"site": site, "layer": layer, **sae})
    needs = []
    repo = getattr(model_adapter, "repo_id", None)
    if repo:
        needs.append(f"model {config.model}: the Hugging Face hub or its cache (repo {repo})")
    if source_name == "hf" and not Path(config.dataset.partition(":")[2].partition(":")[0]).expanduser().exists():
        needs.append(f"dataset {config.dataset}: the Hugging Face hub")
    for repo_id in sorted({r["repo_id"] for r in runs if r.get("repo_id")}):
        needs.append(f"SAE weights: the Hugging Face hub (repo {repo_id})")
    return {"model": config.model, "mode": config.mode, "dataset": config.dataset, "n_tokens": config.n_tokens,
            "interventions": list(config.interventions), "runs": runs, "needs": needs}


def print_plan(plan: dict[str, Any]) -> None:
    print(f"dry run: {plan['model']}, mode {plan['mode']}, {plan['n_tokens']:,} tokens of {plan['dataset']}, "
          f"interventions {', '.join(plan['interventions'])}")
    for run in plan["runs"]:
        hook = f" ({run['hook_name']})" if run.get("hook_name") else ""
        print(f"  {run['site']} L{run['layer']}: SAE {run['sae']}{hook}: {run['status']}")
    if plan["needs"]:
        print("needs, beyond this machine's files:")
        for need in plan["needs"]:
            print(f"  - {need}")
    print(f"ok: {len(plan['runs'])} run(s) check out")


__all__ = ["check_sae", "dry_run", "parse_intervention", "print_plan"]
