"""``klgap train-sae`` as a function: every (site, layer) asked for checked, gathered in one pass over the tokens
(klgap/sae/gather.py), each SAE trained by sae_lens's trainer (klgap/sae/fit.py) and saved where ``--out`` says
(klgap/sae/saving.py). The result is a sae_lens folder (cfg.json + sae_weights.safetensors) plus training.json
with what was measured on held-out tokens.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any


from klgap.errors import KlgapError, unknown
from klgap.plugins.manager import ModelRef
from klgap.sae.fit import B_DEC_INITS, check_architecture, fit_sae
from klgap.sae.gather import gather_many
from klgap.sae.saving import check_sae_out
from klgap.sae.seeds import seed_folders, sweep_folders
from klgap.sae.tokens import TrainingTokens

#: tokens per training step (sae_lens's train_batch_size_samples): what --steps counts in
TRAIN_BATCH = 1024
#: passes over the training tokens above which train-sae warns that it reuses its data
MAX_PASSES = 4


def steps_for(tokens: int, batch: int = TRAIN_BATCH, epochs: float | None = None, steps: int | None = None) -> int:
    """Training steps of `batch` tokens: `steps` as given, else `epochs` passes over `tokens` (default one pass),
    rounded up. Giving both is an error."""
    if steps is not None and epochs is not None:
        raise KlgapError(f"give --steps ({steps}) or --epochs ({epochs}), not both: --steps counts training steps of "
                         f"{batch} tokens, --epochs passes over --tokens")
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise KlgapError(f"--steps must be an integer ≥ 1, got {steps!r}")
        return steps
    passes = 1.0 if epochs is None else epochs
    if isinstance(passes, bool) or not isinstance(passes, (int, float)) or not math.isfinite(passes) or passes <= 0:
        raise KlgapError(f"--epochs must be a number > 0 (passes over --tokens), got {epochs!r}")
    return max(1, math.ceil(passes * tokens / batch))


def reuse_warning(tokens: int, steps: int, batch: int = TRAIN_BATCH) -> str | None:
    """What train-sae says on stderr when `steps` reuse the `tokens` more than :data:`MAX_PASSES` times."""
    passes = steps * batch / tokens
    if passes <= MAX_PASSES:
        return None
    return (f"training {steps:,} steps of {batch} tokens reads {steps * batch:,} samples, {passes:.0f} passes over "
            f"--tokens {tokens:,}: the SAE may overfit them; give more --tokens, or fewer --steps / --epochs")


def _merged(recipe_of: dict[str, Any], architecture: str, k: int | None) -> dict[str, Any]:
    """One SAE's changes to the recipe, checked: a change of architecture brings its own k (or none)."""
    change = dict(recipe_of)
    if "architecture" in change and "k" not in change:
        change["k"] = k if change["architecture"] == architecture else None
    check_architecture(change.get("architecture", architecture), change.get("k", k))
    return change


def train_saes(
    model: str | ModelRef,
    site: str | list[str],
    layer: int | str | list[int],
    out: str | Path,
    *,
    tokens: int = 200_000,
    context_len: int = 128,
    dataset: str = "sample",
    expansion: int = 8,
    l1: float | None = None,
    lr: float | None = None,
    steps: int | None = None,
    epochs: float | None = None,
    b_dec_init: str = "zeros",
    architecture: str = "standard",
    k: int | list[int] | None = None,
    seed: int = 0,
    device: str = "auto",
    dtype: str = "float32",
    batch_size: int = 16,
    progress: bool = True,
    only: list[tuple[str, int]] | None = None,
    overrides: dict[tuple[str, int], dict[str, Any]] | None = None,
    checkpoints: int | None = None,
    checkpoint_every: int | None = None,
    seeds: int = 1,
    exclude_special: str = "all",
) -> list[dict[str, Any]]:
    """``klgap train-sae`` as a function (argument names are the flags'): train an SAE at every (site, layer)
    in one pass over the tokens, each saved to `out` (``{site}`` / ``{layer}`` filled in). Everything that can
    be checked without weights is checked before the model loads.

    steps / epochs: training steps of 1024 tokens, or passes over `tokens` (not both); default one pass
    (:func:`steps_for`); more than :data:`MAX_PASSES` passes is a warning on stderr.
    only: train just these (site, layer)s of the grid; overrides: per-(site, layer) changes to the recipe
    (``l1_coefficient``, ``lr``, ``steps``, ``b_dec_init``, ``architecture``, ``k``), as a config's ``[train_sae.sites.*]`` tables give.
    checkpoints / checkpoint_every: save that many checkpoints of each SAE as it trains (klgap/sae/checkpoints.py).
    dataset: a source with splits is read at its train split when none is named (``sample`` -> ``sample:train``;
    klgap.protocols.SplitTokenSource); training.json records the tokens read (klgap.sae.tokens.TrainingTokens).
    seeds: N > 1 trains N SAEs of each (site, layer) with the same recipe and tokens and seeds `seed`, `seed` + 1,
    ...  (initialisation and the order training reads the tokens), saved side by side as ``out/seed-0``,
    ``out/seed-1``, ... (:func:`seed_folder`); measure them together with ``--sae 'OUT/seed-*'``
    (klgap/report/between_saes.py). 1 (default): one SAE at `out` itself.
    k: a list (``--top-k 16,32,64``) trains a TopK SAE per k on the same tokens, saved as ``out/k-16``, ... (each
    with its seeds inside when `seeds` > 1), every one equal to a run with that k alone; measure them with
    ``--sae 'OUT/k-*'``.

    exclude_special: the tokens whose activations training leaves out, by --mask-special's rule (klgap/job/masks.py):
    ``all`` (default: what a run measures by default; sae_lens's trainer with ``exclude_special_tokens=True``, whose
    own default, False, is ``none``), ``first`` (position 0 only: klgap before this flag), ``none``."""
    from klgap.job.loading import check_fits, load_model
    from klgap.job.masks import special_token_ids
    from klgap.plan.config import MASK_SPECIAL, RunConfig
    from klgap.plan.grid import parse_layers, parse_sites
    from klgap.plan.resolve import resolve
    from klgap.plugins.capabilities import model_shape

    sites = parse_sites(site if isinstance(site, str) else ",".join(site))
    layers = parse_layers(layer)
    if layers == "all":
        raise KlgapError("train-sae --layer needs the layers listed (e.g. 3,10,17,24 or 0-5), not all")
    pairs = [(s, v) for s in sites for v in layers if only is None or (s, v) in only]
    template = os.path.expanduser(str(out))
    if len(pairs) > 1 and ("{layer}" not in template or ("{site}" not in template and len(sites) > 1)):
        raise KlgapError(
            f"--out {str(out)!r} names one folder but {len(pairs)} SAEs were asked for; put {{layer}} and {{site}} "
            "in it, e.g. ~/.cache/klgap/saes/MODEL/blocks.{layer}.hook_{site}"
        )
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise KlgapError(f"--seeds must be an integer ≥ 1 (SAEs trained per site/layer, seeds --seed, --seed + 1, "
                         f"...), got {seeds!r}")
    ks = k if isinstance(k, list) else [k]
    changes_k = any({"k", "architecture"} & set(change) for change in (overrides or {}).values())
    if len(ks) > 1 and (architecture != "topk" or changes_k):
        raise KlgapError(f"--top-k {','.join(map(str, ks))} trains one TopK SAE per k: it needs --architecture topk, "
                         "and no [train_sae.sites.*] table changing k or the architecture")
    if not ks or len(set(ks)) < len(ks):
        raise KlgapError(f"--top-k lists each k once, got {ks!r}")
    for each in ks:
        check_architecture(architecture, each)
    folders = {(s, v): Path(template.replace("{site}", s).replace("{layer}", str(v))) for s, v in pairs}
    for base in folders.values() if seeds > 1 or len(ks) > 1 else []:
        if base.exists() and not base.is_dir():
            raise KlgapError(f"--out {str(base)!r} is a file: several SAEs (--seeds {seeds}, --top-k "
                             f"{','.join(map(str, ks))}) are saved in a folder, one subfolder each")
    members = {pair: [(each, folder) for each, root in sweep_folders(base, ks) for folder in seed_folders(root, seeds)]
               for pair, base in folders.items()}  # (k, folder) of every SAE of each (site, layer)
    for found in members.values():  # a file, a user's folder or a run there is refused before anything loads
        for _, folder in found:
            check_sae_out(folder)
    # the model, token source, device, dtype and numbers resolved as a run's are (klgap.plan.resolve), before
    # anything loads
    plan = resolve(RunConfig(model=model.name if isinstance(model, ModelRef) else str(model), site=pairs[0][0],
                             layer=pairs[0][1], tokens=tokens, context_len=context_len, dataset=dataset, seed=seed,
                             device=device, dtype=dtype, interventions=["sae"]),
                   model=model if isinstance(model, ModelRef) else None, role="train")  # a train split by default
    if b_dec_init not in B_DEC_INITS:
        raise unknown("--b-dec-init", b_dec_init, B_DEC_INITS)
    if exclude_special not in MASK_SPECIAL:
        raise unknown("--exclude-special", exclude_special, MASK_SPECIAL)
    n_steps = steps_for(tokens, TRAIN_BATCH, epochs, steps)  # default: one pass over --tokens
    for warning in sorted({reuse_warning(tokens, n) for n in [n_steps, *(c["steps"] for c in (overrides or {}).values()
                                                                            if "steps" in c)]} - {None}):
        print(f"klgap: warning: {warning}", file=sys.stderr)
    from klgap.sae.checkpoints import count

    for value in {n_steps, *(int(c["steps"]) for c in (overrides or {}).values() if "steps" in c)}:
        count(value, checkpoints, checkpoint_every)  # checked before the model loads
    recipes = {pair: _merged(recipe_of=change, architecture=architecture, k=ks[0])
               for pair, change in (overrides or {}).items()}
    ref, torch_device = plan.model, plan.device
    shape = model_shape(ref.adapter)  # from the config: a bad layer or context fails before the weights load
    for s, v in pairs if shape is not None else []:
        check_fits(shape, ref.name, s, v, context_len, None)
    loaded = load_model(ref, torch_device, plan.dtype)
    for s, v in pairs:
        check_fits(loaded, loaded.name, s, v, context_len, None)
    n_contexts = max(1, math.ceil(tokens / (context_len - 1)))
    source = plan.tokens
    contexts = source.obj.contexts(loaded, n_contexts, context_len, seed, True, source.arg)
    excluded_ids = special_token_ids(loaded.tokenizer) if exclude_special == "all" else ()
    trained_on = TrainingTokens(dataset=source.spec, source=source.name, split=source.split, split_of=source.whole,
                                seed=seed, context_len=context_len, tokens=tokens, n_contexts=n_contexts,
                                exclude_special=exclude_special, excluded_ids=excluded_ids)
    if source.chosen:
        print(f"training on {source.spec} (the {source.split} split of --dataset {dataset}; a run measures its "
              "eval split when --dataset names none)", file=sys.stderr)
    recipe: dict[str, Any] = {"expansion": expansion, "device": torch_device, "seed": seed, "progress": progress,
                              "b_dec_init": b_dec_init, "architecture": architecture, "k": k,
                              "checkpoints": checkpoints, "checkpoint_every": checkpoint_every,
                              "trained_on": trained_on, "skip_first_position": exclude_special != "none"}
    recipe["steps"] = n_steps
    for key, value in (("l1_coefficient", l1), ("lr", lr)):
        if value is not None:
            recipe[key] = value
    started = time.time()
    gathered = gather_many(loaded, pairs, contexts, batch_size, exclude_special, progress=progress)
    results = []
    for s, v in pairs:
        acts = gathered.pop((s, v))
        for i, (each, folder) in enumerate(members[(s, v)]):  # the same tokens; another k or seed each
            results.append(fit_sae(loaded, s, v, acts, folder, started=started,
                                   **{**recipe, "k": each, **recipes.get((s, v), {}), "seed": seed + i % seeds}))
            results[-1]["out"] = str(folder)
            started = time.time()
    return results


__all__ = ["MAX_PASSES", "TRAIN_BATCH", "reuse_warning", "steps_for", "train_saes"]
