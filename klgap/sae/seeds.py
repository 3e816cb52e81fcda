"""SAEs of one recipe: what tells several trained SAEs apart, read from their training.json files.

``klgap train-sae --seeds N`` saves N SAEs of one recipe as ``OUT/seed-0`` ... (:func:`seed_folders`); a
study over them (``--sae 'OUT/seed-*'``, or ``klgap.measure(..., sae=[...])``) is recognised as *one recipe, several
seeds* when their training.json files are equal once the held-out numbers (what training produced, not what it was
asked) are set aside, except for ``seed`` (and ``token_seed``: SAEs trained by separate ``--seed`` runs read
another sample of the same source): no flag is needed, and SAEs that differ in anything else (steps, L1,
tokens, site) are never pooled as seeds. SAEs that differ only in their architecture (and its sparsity knob, ``k`` or
``l1_coefficient``) are an architecture control (issue 32): a study page says so.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Any

from klgap.errors import KlgapError

#: training.json keys that are what training produced (held-out numbers, time, checkpoints), not the recipe
OUTCOMES = ("explained_variance", "l0_mean", "cos_mean", "mse", "wall_time_s", "checkpoints", "step", "tokens_seen")
#: recipe keys that name an SAE's architecture and its sparsity setting
ARCHITECTURE_KEYS = ("architecture", "k", "l1_coefficient")


#: the folder of one of ``train-sae --seeds N``'s SAEs under --out (``seed-0`` has seed --seed, ``seed-1`` the next)
SEED_NAME = "seed-{i}"


def is_seed_glob(spec: str) -> bool:
    """``DIR/seed-*``: the glob that names the SAEs ``train-sae --seeds N --out DIR`` saves (a [train_sae] table with
    ``seeds = N`` trains them when DIR is missing)."""
    return os.path.expanduser(spec).endswith(f"/{SEED_NAME.format(i='*')}")


def seed_folders(out: Path, seeds: int) -> list[Path]:
    """Where ``--seeds`` saves its SAEs: `out` itself for one, ``out/seed-0`` ... ``out/seed-{seeds-1}`` for more."""
    return [out] if seeds == 1 else [out / SEED_NAME.format(i=i) for i in range(seeds)]


def sweep_folders(out: Path, ks: list[int | None]) -> list[tuple[int | None, Path]]:
    """Where ``--top-k 16,32,...`` saves its SAEs: (k, folder); `out` itself for one k, ``out/k-16``, ... for
    more."""
    return [(ks[0], out)] if len(ks) == 1 else [(k, out / f"k-{k}") for k in ks]


def recipe_of(training: dict[str, Any]) -> dict[str, Any]:
    """A training.json's recipe: every key but :data:`OUTCOMES`, the token seed stated (``token_seed`` is written
    only where it differs from ``seed``)."""
    recipe = {key: value for key, value in training.items() if key not in OUTCOMES}
    if "seed" in recipe:
        recipe.setdefault("token_seed", recipe["seed"])
    return recipe


def differences(trainings: list[dict[str, Any]]) -> list[str]:
    """The recipe keys on which `trainings` (training.json files as read) do not all agree, sorted (a key some lack
    counts)."""
    recipes = [recipe_of(t) for t in trainings]
    keys = sorted({key for recipe in recipes for key in recipe})
    return [key for key in keys if len({json.dumps(r.get(key), sort_keys=True) for r in recipes}) > 1]


#: recipe keys in which seeds of one recipe differ: the SAE's seed, and the token seed where they were trained by
#: separate ``--seed`` runs (another sample of the same source) rather than by one ``--seeds N``
SEED_KEYS = ("seed", "token_seed")


def same_recipe(trainings: list[Any]) -> bool:
    """Two or more training.json files of one recipe and distinct seeds (what a seed study pools)."""
    if len(trainings) < 2 or not all(isinstance(t, dict) for t in trainings):
        return False
    found = differences(trainings)
    return "seed" in found and set(found) <= set(SEED_KEYS)


def architecture_only(trainings: list[Any]) -> bool:
    """Two or more training.json files that differ in their architecture (and its sparsity setting, and perhaps
    their seed) and in nothing else: same site, tokens, steps, width and learning rate."""
    if len(trainings) < 2 or not all(isinstance(t, dict) for t in trainings):
        return False
    found = set(differences(trainings))
    return "architecture" in found and found <= {*ARCHITECTURE_KEYS, "seed"}


def glob_members(spec: str) -> list[Path] | None:
    """The SAE folders a glob ``--sae`` names when they are SAEs to measure side by side (``OUT/seed-*``: their
    training.json records no training step), sorted by name; None when the glob names an SAE's checkpoints
    (klgap.sae.checkpoints.expand lists those) or matches nothing."""
    folders = sorted((Path(p) for p in glob.glob(os.path.expanduser(spec)) if Path(p).is_dir()),
                     key=lambda p: (len(p.name), p.name))  # seed-2 before seed-10
    if not folders:
        return None
    steps = []
    for folder in folders:
        try:
            steps.append("step" in json.loads((folder / "training.json").read_text()))
        except (OSError, ValueError):
            steps.append(False)  # an SAE from elsewhere (no training.json): measured as given
    if all(steps):
        return None
    if any(steps):
        raise KlgapError(f"--sae {spec!r} matches SAE checkpoints and other SAEs: give one SAE's checkpoints "
                         "(DIR/checkpoints/*) or SAEs to compare (DIR/seed-*)")
    return folders


__all__ = ["ARCHITECTURE_KEYS", "OUTCOMES", "SEED_KEYS", "SEED_NAME", "architecture_only", "differences",
           "glob_members", "is_seed_glob", "recipe_of", "same_recipe", "seed_folders", "sweep_folders"]
