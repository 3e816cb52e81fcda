"""A replication file's ``[train_sae]`` table: train, in one pass, the SAEs a command needs that are not there yet
(``[train_sae.sites.SITE_L<layer>]`` tables change one SAE's recipe)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from klgap.errors import KlgapError, unknown
from klgap.sae.seeds import is_seed_glob


#: keys of a [train_sae] table: train-sae's flags (model, site, layer, out, device and dtype come from the run),
#: `sites` (one SAE's changes, :func:`recipe_overrides`), and the old names of renamed keys (LEGACY_KEYS)
RECIPE_KEYS = ("tokens", "context_len", "dataset", "expansion", "l1", "lr", "steps", "epochs", "b_dec_init",
               "architecture", "top_k", "seed", "seeds", "batch_size", "checkpoints", "checkpoint_every",
               "exclude_special", "sites", "k")


def check_recipe(recipe: Any) -> None:
    """A [train_sae] table with keys train-sae knows (a typo'd key is refused, not trained with the default)."""
    if not isinstance(recipe, dict):
        raise KlgapError(f"[train_sae] must be a table of train-sae's settings (tokens, steps, l1, ...), got "
                         f"{type(recipe).__name__} {recipe!r}")
    bad = [key for key in recipe if key not in RECIPE_KEYS]
    if bad:
        raise unknown("[train_sae] key", bad[0], RECIPE_KEYS[:-1])
    recipe_overrides(recipe)


def train_missing_sae(config: Any, recipe: dict[str, Any], progress: bool, pairs: list[tuple[str, int]],
                      source: str | None = None) -> None:
    """A replication file may carry the recipe of its SAEs: train, in one pass over the tokens, every SAE of
    the command at `pairs` (`sae` with {site}/{layer} for several) that is not there yet. A recipe without a
    ``dataset`` trains on `source` (the measured source with no split named, so train-sae reads its train split;
    default the config's dataset)."""
    from klgap.plan.grid import sae_for, templated
    from klgap.sae.train import train_saes

    check_recipe(recipe)
    if not config.sae:
        return
    recipe = renamed(recipe, "[train_sae]")
    template = os.path.expanduser(str(config.sae))
    # seeds = N with sae = "DIR/seed-*": the seeds are trained into DIR
    if isinstance(recipe.get("seeds"), int) and recipe["seeds"] > 1:
        if not is_seed_glob(template):
            raise KlgapError(f"[train_sae] seeds = {recipe['seeds']} trains DIR/seed-0, DIR/seed-1, ...: name them "
                             f"as sae = \"DIR/seed-*\", not {config.sae!r}")
        template = template[: -len("/seed-*")]
    missing = [(site, layer) for site, layer in pairs  # a template is filled in for one SAE too
               if not Path(sae_for(template, site, layer) if len(pairs) > 1 or templated(template) else template).exists()]
    if not missing:
        return
    names = ", ".join(f"{site} L{layer}" for site, layer in missing)
    print(f"{len(missing)} SAE(s) not found ({names}): training them from the config's [train_sae] recipe", file=sys.stderr)
    results = train_saes(
        config.model, list(dict.fromkeys(s for s, _ in missing)), [v for v in dict.fromkeys(layer for _, layer in missing)],
        template, tokens=int(recipe.get("tokens", 200_000)), context_len=int(recipe.get("context_len", config.context_len)),
        dataset=recipe.get("dataset", source or config.dataset), expansion=int(recipe.get("expansion", 8)), l1=recipe.get("l1"),
        lr=recipe.get("lr"), steps=recipe.get("steps"), epochs=recipe.get("epochs"), b_dec_init=recipe.get("b_dec_init", "zeros"),
        architecture=recipe.get("architecture", "standard"), k=recipe.get("top_k"),
        seed=int(recipe.get("seed", config.seed)), device=config.device, dtype=config.dtype,
        batch_size=int(recipe.get("batch_size", 16)), progress=progress, only=missing,
        overrides=recipe_overrides(recipe), checkpoints=recipe.get("checkpoints"),
        checkpoint_every=recipe.get("checkpoint_every"), seeds=recipe.get("seeds", 1),
        exclude_special=str(recipe.get("exclude_special", "all")),
    )
    print_trained(results)


def print_trained(results: list[dict[str, Any]]) -> None:
    for result in results:
        print(json.dumps({k: v for k, v in result.items() if not isinstance(v, (list, dict))}, indent=2, default=str))
        print(f"wrote SAE to {result['out']} (use --sae {result['out']})")


OVERRIDABLE = {"l1": "l1_coefficient", "lr": "lr", "steps": "steps", "b_dec_init": "b_dec_init",
               "architecture": "architecture", "top_k": "k"}
#: recipe keys since renamed: old -> new (``k`` was also replicate's single-token --k)
LEGACY_KEYS = {"k": "top_k"}


def renamed(table: dict[str, Any], where: str) -> dict[str, Any]:
    """A recipe table with its old keys under their new names (each said once on stderr)."""
    out = {}
    for key, value in table.items():
        if key in LEGACY_KEYS:
            print(f"klgap: warning: {where} key {key!r} is deprecated: write {LEGACY_KEYS[key]} = {value!r}",
                  file=sys.stderr)
            key = LEGACY_KEYS[key]
        out[key] = value
    return out


def recipe_overrides(recipe: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    """``[train_sae.sites.attn_out_L24]`` tables: per-SAE changes to the recipe (l1, lr, steps, b_dec_init,
    architecture, top_k)."""
    from klgap.plan.sites import SITES

    out: dict[tuple[str, int], dict[str, Any]] = {}
    for key, table in (recipe.get("sites") or {}).items():
        site, sep, layer = str(key).rpartition("_L")
        if not sep or site not in SITES or not layer.isdigit():
            raise KlgapError(f"[train_sae.sites.{key}]: name the SAE as SITE_L<layer>, e.g. attn_out_L24 "
                             f"(sites: {', '.join(SITES)})")
        table = renamed(table, f"[train_sae.sites.{key}]")
        bad = [k for k in table if k not in OVERRIDABLE]
        if bad:
            raise unknown(f"[train_sae.sites.{key}] key", bad[0], list(OVERRIDABLE))
        out[(site, int(layer))] = {OVERRIDABLE[k]: v for k, v in table.items()}
    return out
