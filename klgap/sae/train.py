"""Train an SAE on any model's activations with sae_lens's own trainer (offline, CPU or CUDA).

Activations are gathered through nnsight (klgap.forward.activations.collect), so any model a plugin can load
gets an SAE: no TransformerLens model and no hub needed. The result is a sae_lens folder
(cfg.json + sae_weights.safetensors) plus training.json with what was measured on held-out tokens.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from klgap.forward import activations
from klgap.errors import KlgapError
from klgap.plugins.manager import ModelRef
from klgap.protocols import LoadedModel
from klgap.plan.sites import hook_name


def gather(model: LoadedModel, site: str, layer: int, contexts: Tensor, batch_size: int = 16,
           skip_first_position: bool = True, progress: bool = False) -> Tensor:
    """Site activations for every context: ``[n_tokens d]`` float32 on CPU (position 0 left out by default)."""
    return gather_many(model, [(site, layer)], contexts, batch_size, skip_first_position, progress)[(site, layer)]


#: where each site is reached inside a block (nnsight reads sites in the order the forward pass meets them)
EXECUTION_ORDER = ("resid_pre", "attn_z", "attn_out", "mlp_out", "resid_post")


@torch.no_grad()
def gather_many(model: LoadedModel, sites: list[tuple[str, int]], contexts: Tensor, batch_size: int = 16,
                skip_first_position: bool = True, progress: bool = False) -> dict[tuple[str, int], Tensor]:
    """Activations at several (site, layer)s from one pass over `contexts`: each ``[n_tokens d]`` float32, CPU."""
    from tqdm.auto import tqdm

    order = sorted(range(len(sites)), key=lambda i: (sites[i][1], EXECUTION_ORDER.index(sites[i][0])))
    specs = [model.site_map(*sites[i]) for i in order]  # in the order the forward pass meets them
    first = 1 if skip_first_position else 0
    chunks: dict[tuple[str, int], list[Tensor]] = {key: [] for key in sites}
    for start in tqdm(range(0, len(contexts), batch_size), desc="activations", disable=not progress, unit="batch"):
        ids = contexts[start : start + batch_size].to(model.device)
        acts = activations.collect_many(model, specs, ids)
        for i, value in zip(order, acts, strict=True):
            value = value[:, first:]
            chunks[sites[i]].append(value.reshape(-1, value.shape[-1]).float().cpu())
    return {key: torch.cat(parts) for key, parts in chunks.items()}


def _batches(acts: Tensor, batch: int, seed: int, device: torch.device) -> Iterator[Tensor]:
    """Endless shuffled mini-batches ``[batch d]`` (reshuffled every epoch, seeded)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(acts), generator=gen)
        for start in range(0, len(order) - batch + 1, batch):
            yield acts[order[start : start + batch]].to(device)


@torch.no_grad()
def evaluate(sae: Any, acts: Tensor, device: torch.device) -> dict[str, float]:
    """Explained variance, mean L0 and mean cos(x, x̂) of `sae` on ``acts [n d]``."""
    x = acts.to(device)
    feats = sae.encode(x)
    x_hat = sae.decode(feats)
    total = ((x - x.mean(0)) ** 2).sum()
    return {
        "explained_variance": float(1 - ((x - x_hat) ** 2).sum() / total),
        "l0_mean": float((feats != 0).sum(-1).float().mean()),
        "cos_mean": float(torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).mean()),
        "mse": float(((x - x_hat) ** 2).sum(-1).mean()),
    }


B_DEC_INITS = ("zeros", "mean")
#: sae_lens training SAEs klgap trains: "standard" (ReLU + L1 penalty) or "topk" (the k largest latents, no L1:
#: no shrinkage, for sites where a few dimensions carry most of the variance)
ARCHITECTURES = ("standard", "topk")


def train_sae(
    model: LoadedModel,
    site: str,
    layer: int,
    contexts: Tensor,
    out_dir: Path,
    *,
    batch_size: int = 16,
    skip_first_position: bool = True,
    progress: bool = True,
    **kwargs: Any,
) -> dict[str, Any]:
    """Gather activations at (site, layer) over `contexts` ``[n_ctx ctx]``, train, save, and report.

    `steps` mini-batches of `train_batch_size` are drawn from the gathered tokens (cycling over them
    when there are fewer). 5% of the tokens (at least 256) are held out for the numbers in training.json.
    """
    started = time.time()
    acts = gather(model, site, layer, contexts, batch_size, skip_first_position, progress)
    return fit_sae(model, site, layer, acts, out_dir, skip_first_position=skip_first_position, progress=progress,
                   started=started, **kwargs)


def fit_sae(
    model: LoadedModel,
    site: str,
    layer: int,
    acts: Tensor,
    out_dir: Path,
    *,
    expansion: int = 8,
    l1_coefficient: float = 5.0,
    lr: float = 1e-3,
    train_batch_size: int = 1024,
    steps: int = 2000,
    device: torch.device | None = None,
    seed: int = 0,
    skip_first_position: bool = True,
    progress: bool = True,
    started: float | None = None,
    b_dec_init: str = "zeros",
    architecture: str = "standard",
    k: int | None = None,
    checkpoints: int | None = None,
    checkpoint_every: int | None = None,
) -> dict[str, Any]:
    """Train an SAE on ``acts [n_tokens d]`` gathered at (site, layer); save it with training.json.

    architecture: "standard" (ReLU, L1 `l1_coefficient`) or "topk" (`k` latents per token, L1 unused).

    checkpoints / checkpoint_every: also save `checkpoints` evenly spaced SAEs (or one about every
    `checkpoint_every` steps) under ``out_dir/checkpoints/step-XXXXXX/`` (klgap/sae/checkpoints.py), the last the
    final SAE.

    b_dec_init: "zeros" (sae_lens's trainer as it is: inputs scaled to mean norm sqrt(d)) or "mean": inputs
    scaled so that their spread around the mean has norm sqrt(d), and the decoder bias starts at the mean.
    Sites whose activations share a large common offset (e.g. a late attn_out with ‖mean‖ ≫ spread)
    otherwise spend latents, and L1, on the offset."""
    from sae_lens import (LoggingConfig, SAETrainer, StandardTrainingSAE, StandardTrainingSAEConfig, TopKTrainingSAE,
                          TopKTrainingSAEConfig)
    from sae_lens.config import SAETrainerConfig

    from klgap.sae import checkpoints as ckpt

    n_checkpoints = ckpt.count(steps, checkpoints, checkpoint_every)
    if b_dec_init not in B_DEC_INITS:
        raise KlgapError(f"unknown b_dec_init {b_dec_init!r}; valid: {', '.join(B_DEC_INITS)}")
    check_architecture(architecture, k, expansion * acts.shape[-1])
    device = device or model.device
    started = started or time.time()
    if not torch.isfinite(acts).all():
        raise KlgapError(f"{model.name} {hook_name(site, layer)} has non-finite activations; cannot train an SAE on them")
    gen = torch.Generator().manual_seed(seed)
    acts = acts[torch.randperm(len(acts), generator=gen)]
    n_eval = max(256, len(acts) // 20)
    if len(acts) < n_eval + train_batch_size:
        raise KlgapError(
            f"only {len(acts)} tokens of activations: train-sae needs at least {n_eval + train_batch_size} "
            "(raise --tokens)"
        )
    held_out, train = acts[:n_eval], acts[n_eval:]
    d_in = acts.shape[-1]
    facts = {
        "model": model.name,
        "site": site,
        "layer": layer,
        "hook_name": hook_name(site, layer),
        "d_in": d_in,
        "d_sae": expansion * d_in,
        "n_training_tokens": int(len(train)),
        "n_training_samples": int(steps * train_batch_size),
        "n_eval_tokens": int(n_eval),
        "steps": steps,
        "train_batch_size": train_batch_size,
        "architecture": architecture,
        **({"k": int(k)} if architecture == "topk" else {"l1_coefficient": l1_coefficient}),
        "b_dec_init": b_dec_init,
        "lr": lr,
        "seed": seed,
        "first_position": "excluded" if skip_first_position else "included",
    }
    saver = ckpt.CheckpointSaver(Path(out_dir), held_out, device, facts) if n_checkpoints else None

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        common = {"d_in": d_in, "d_sae": expansion * d_in, "normalize_activations": "expected_average_only_in",
                  "device": str(device), "dtype": "float32"}
        if architecture == "topk":
            sae_cfg = TopKTrainingSAEConfig(k=int(k), **common)
        else:
            sae_cfg = StandardTrainingSAEConfig(l1_coefficient=l1_coefficient, l1_warm_up_steps=steps // 10, **common)
        sae_cfg.metadata.hook_name = hook_name(site, layer)
        sae_cfg.metadata.model_name = model.name
        sae = TopKTrainingSAE(sae_cfg) if architecture == "topk" else StandardTrainingSAE(sae_cfg)
        trainer_cfg = SAETrainerConfig(
            total_training_samples=steps * train_batch_size,
            train_batch_size_samples=train_batch_size,
            lr=lr,
            lr_end=lr / 10,
            lr_scheduler_name="cosineannealing",
            lr_warm_up_steps=steps // 20,
            lr_decay_steps=steps // 5,
            n_restart_cycles=1,
            adam_beta1=0.9,
            adam_beta2=0.999,
            device=str(device),
            autocast=False,
            dead_feature_window=1000,
            feature_sampling_window=2000,
            n_checkpoints=max(0, n_checkpoints - 1),  # sae_lens spaces them; the last is the final SAE
            checkpoint_path=None,  # sae_lens writes nothing itself: CheckpointSaver saves a loadable SAE
            save_final_checkpoint=False,
            logger=LoggingConfig(log_to_wandb=False),
            n_batches_for_norm_estimate=min(50, max(1, len(train) // train_batch_size)),
        )
        trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=_batches(train, train_batch_size, seed, device),
                             save_checkpoint_fn=saver)
        if saver is not None:
            saver.attach(trainer)
        if b_dec_init == "mean":
            # Scale so that the spread around the mean (not the offset) has norm sqrt(d) on average, and start
            # b_dec at the mean in those units; the factor is folded into the saved weights as usual.
            mean = train.float().mean(0)
            scale = d_in**0.5 / float((train - mean).norm(dim=-1).mean())
            trainer.activation_scaler.scaling_factor = scale
            with torch.no_grad():
                sae.b_dec.copy_((mean * scale).to(sae.b_dec.device))
        trained = trainer.fit()

    from sae_lens import SAE

    with _staged(Path(out_dir)) as staging:
        trained.save_inference_model(staging)
        inference = SAE.load_from_disk(str(staging), device=str(device)).eval()
        result = {**facts, **evaluate(inference, held_out, device), "wall_time_s": round(time.time() - started, 2)}
        if saver is not None:
            saver.finish(staging, result)
            result["checkpoints"] = n_checkpoints
        (staging / "training.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


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


def check_architecture(architecture: str, k: int | None, d_sae: int | None = None) -> None:
    """An SAE architecture klgap trains, and `k` exactly when it is "topk" (1 ≤ k ≤ d_sae)."""
    from klgap.errors import unknown

    if architecture not in ARCHITECTURES:
        raise unknown("--architecture", architecture, ARCHITECTURES)
    if architecture == "topk":
        if not isinstance(k, int) or isinstance(k, bool) or k < 1 or (d_sae is not None and k > d_sae):
            limit = f" ≤ d_sae ({d_sae})" if d_sae is not None else ""
            raise KlgapError(f"--architecture topk needs --k, an integer ≥ 1{limit}; got {k!r}")
    elif k is not None:
        raise KlgapError(f"--k {k} is the latents per token of --architecture topk; the {architecture} SAE "
                         "sets its sparsity with --l1")


@contextmanager
def _staged(out_dir: Path) -> Iterator[Path]:
    """A folder beside `out_dir` to save the SAE into, renamed onto `out_dir` once complete (training.json
    last): a train-sae killed while saving leaves no half SAE where replicate (or a config's [train_sae],
    which trains what is missing) would take it for a finished one. Leftovers of a killed run are removed."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.parent.glob(f".{out_dir.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.partial-"))
    staging.chmod(0o755)  # as mkdir would make it (mkdtemp's are private)
    try:
        yield staging
        if out_dir.exists():  # a previous SAE: moved aside, then removed once the new one is in place
            old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.partial-old-"))
            os.replace(out_dir, old / out_dir.name)
            os.replace(staging, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)



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
    k: int | None = None,
    seed: int = 0,
    device: str = "auto",
    dtype: str = "float32",
    batch_size: int = 16,
    progress: bool = True,
    only: list[tuple[str, int]] | None = None,
    overrides: dict[tuple[str, int], dict[str, Any]] | None = None,
    checkpoints: int | None = None,
    checkpoint_every: int | None = None,
) -> list[dict[str, Any]]:
    """``klgap train-sae`` as a function (argument names are the flags'): train an SAE at every (site, layer)
    in one pass over the tokens, each saved to `out` (``{site}`` / ``{layer}`` filled in). Everything that can
    be checked without weights is checked before the model loads.

    steps / epochs: training steps of 1024 tokens, or passes over `tokens` (not both); default one pass
    (:func:`steps_for`); more than :data:`MAX_PASSES` passes is a warning on stderr.
    only: train just these (site, layer)s of the grid; overrides: per-(site, layer) changes to the recipe
    (``l1_coefficient``, ``lr``, ``steps``, ``b_dec_init``, ``architecture``, ``k``), as a config's ``[train_sae.sites.*]`` tables give.
    checkpoints / checkpoint_every: save that many checkpoints of each SAE as it trains (klgap/sae/checkpoints.py)."""
    import math
    import os

    from klgap.plan.config import DTYPES
    from klgap.job.engine import load_model
    from klgap.errors import unknown
    from klgap.plugins.manager import get_host, model_adapter
    from klgap.plan.resolve import pick_device
    from klgap.plan.grid import parse_layers, parse_sites

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
    if not isinstance(tokens, int) or tokens < 1:
        raise KlgapError(f"--tokens must be an integer ≥ 1, got {tokens!r}")
    if dtype not in DTYPES:
        raise unknown("dtype", dtype, DTYPES)
    if b_dec_init not in B_DEC_INITS:
        raise unknown("--b-dec-init", b_dec_init, B_DEC_INITS)
    check_architecture(architecture, k)
    n_steps = steps_for(tokens, TRAIN_BATCH, epochs, steps)  # default: one pass over --tokens
    for warning in sorted({reuse_warning(tokens, n) for n in [n_steps, *(c["steps"] for c in (overrides or {}).values()
                                                                            if "steps" in c)]} - {None}):
        print(f"klgap: warning: {warning}", file=sys.stderr)
    from klgap.sae.checkpoints import count

    for value in {n_steps, *(int(c["steps"]) for c in (overrides or {}).values() if "steps" in c)}:
        count(value, checkpoints, checkpoint_every)  # checked before the model loads
    recipes = {pair: _merged(recipe_of=change, architecture=architecture, k=k) for pair, change in (overrides or {}).items()}
    from klgap.plan.dtypes import run_dtype
    from klgap.plan.specs import split_spec

    source_name, source_arg = split_spec(dataset)
    source = get_host().registry("token_source").get(source_name)
    ref = model if isinstance(model, ModelRef) else model_adapter(model)
    torch_device = pick_device(device)
    loaded = load_model(ref, torch_device, run_dtype(dtype, torch_device))
    for value in layers:
        if not 0 <= value < loaded.n_layers:
            raise KlgapError(f"--layer {value} is out of range for {loaded.name}: valid layers are 0..{loaded.n_layers - 1}")
    if context_len > loaded.max_context:
        raise KlgapError(f"--context-len {context_len} exceeds {loaded.name}'s maximum context of {loaded.max_context}")
    n_contexts = max(1, math.ceil(tokens / (context_len - 1)))
    contexts = source.contexts(loaded, n_contexts, context_len, seed, True, source_arg or None)
    recipe: dict[str, Any] = {"expansion": expansion, "device": torch_device, "seed": seed, "progress": progress,
                              "b_dec_init": b_dec_init, "architecture": architecture, "k": k,
                              "checkpoints": checkpoints, "checkpoint_every": checkpoint_every}
    recipe["steps"] = n_steps
    for key, value in (("l1_coefficient", l1), ("lr", lr)):
        if value is not None:
            recipe[key] = value
    started = time.time()
    gathered = gather_many(loaded, pairs, contexts, batch_size, progress=progress)
    results = []
    for s, v in pairs:
        folder = Path(template.replace("{site}", s).replace("{layer}", str(v)))
        results.append(fit_sae(loaded, s, v, gathered.pop((s, v)), folder, started=started,
                               **{**recipe, **recipes.get((s, v), {})}))
        results[-1]["out"] = str(folder)
        started = time.time()
    return results
