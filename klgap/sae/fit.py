"""Train one SAE with sae_lens's own trainer on activations already gathered (klgap/sae/gather.py), save it as
a sae_lens folder (cfg.json + sae_weights.safetensors) with training.json (what was measured on held-out tokens).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from klgap.errors import KlgapError, unknown
from klgap.plan.sites import hook_name
from klgap.protocols import LoadedModel
from klgap.sae import checkpoints as ckpt
from klgap.sae.gather import gather
from klgap.sae.heldout import evaluate
from klgap.sae.saving import staged
from klgap.sae.tokens import TrainingTokens

B_DEC_INITS = ("zeros", "mean")
#: sae_lens training SAEs klgap trains: "standard" (ReLU + L1 penalty) or "topk" (the k largest latents, no L1:
#: no shrinkage, for sites where a few dimensions carry most of the variance)
ARCHITECTURES = ("standard", "topk")
#: sae_lens modules that draw progress bars while an SAE trains (the training loop, the norm estimate)
SAE_LENS_BARS = ("sae_lens.training.sae_trainer", "sae_lens.training.activation_scaler")


def check_architecture(architecture: str, k: int | None, d_sae: int | None = None) -> None:
    """An SAE architecture klgap trains, and `k` exactly when it is "topk" (1 ≤ k ≤ d_sae)."""
    if architecture not in ARCHITECTURES:
        raise unknown("--architecture", architecture, ARCHITECTURES)
    if architecture == "topk":
        if not isinstance(k, int) or isinstance(k, bool) or k < 1 or (d_sae is not None and k > d_sae):
            limit = f" ≤ d_sae ({d_sae})" if d_sae is not None else ""
            raise KlgapError(f"--architecture topk needs --top-k, an integer ≥ 1{limit}; got {k!r}")
    elif k is not None:
        raise KlgapError(f"--top-k {k} is the latents per token of --architecture topk; the {architecture} SAE "
                         "sets its sparsity with --l1")


def _batches(acts: Tensor, batch: int, seed: int, device: torch.device) -> Iterator[Tensor]:
    """Endless shuffled mini-batches ``[batch d]`` (reshuffled every epoch, seeded)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(acts), generator=gen)
        for start in range(0, len(order) - batch + 1, batch):
            yield acts[order[start : start + batch]].to(device)


@contextmanager
def sae_lens_bars(progress: bool) -> Iterator[None]:
    """sae_lens's own progress bars shown, or (``--quiet``) not: its modules' ``tqdm`` disabled for the block."""
    import importlib

    if progress:
        yield
        return
    modules = [importlib.import_module(name) for name in SAE_LENS_BARS]
    saved = [module.tqdm for module in modules]
    try:
        for module, bar in zip(modules, saved, strict=True):
            module.tqdm = partial(bar, disable=True)
        yield
    finally:
        for module, bar in zip(modules, saved, strict=True):
            module.tqdm = bar


def train_sae(model: LoadedModel, site: str, layer: int, contexts: Tensor, out_dir: Path, *, batch_size: int = 16,
              skip_first_position: bool = True, progress: bool = True, **kwargs: Any) -> dict[str, Any]:
    """Gather activations at (site, layer) over `contexts` ``[n_ctx ctx]``, train, save, and report.

    `steps` mini-batches of `train_batch_size` are drawn from the gathered tokens (cycling over them
    when there are fewer). 5% of the tokens (at least 256) are held out for the numbers in training.json.
    """
    started = time.time()
    acts = gather(model, site, layer, contexts, batch_size, skip_first_position, progress)
    return fit_sae(model, site, layer, acts, out_dir, skip_first_position=skip_first_position, progress=progress,
                   started=started, **kwargs)


def _training_sae(model: LoadedModel, site: str, layer: int, d_in: int, expansion: int, architecture: str,
                  k: int | None, l1_coefficient: float, steps: int, device: torch.device) -> Any:
    """A fresh sae_lens training SAE of the architecture, its hook and model named in its metadata."""
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig

    common = {"d_in": d_in, "d_sae": expansion * d_in, "normalize_activations": "expected_average_only_in",
              "device": str(device), "dtype": "float32"}
    if architecture == "topk":
        cfg = TopKTrainingSAEConfig(k=int(k), **common)
    else:
        cfg = StandardTrainingSAEConfig(l1_coefficient=l1_coefficient, l1_warm_up_steps=steps // 10, **common)
    cfg.metadata.hook_name = hook_name(site, layer)
    cfg.metadata.model_name = model.name
    return TopKTrainingSAE(cfg) if architecture == "topk" else StandardTrainingSAE(cfg)


def _trainer_config(steps: int, train_batch_size: int, lr: float, device: torch.device, n_checkpoints: int,
                    n_train: int) -> Any:
    """sae_lens's trainer settings: cosine-annealed lr with warm-up, no wandb, checkpoints saved by klgap."""
    from sae_lens import LoggingConfig
    from sae_lens.config import SAETrainerConfig

    return SAETrainerConfig(
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
        n_batches_for_norm_estimate=min(50, max(1, n_train // train_batch_size)),
    )


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
    trained_on: TrainingTokens | None = None,
) -> dict[str, Any]:
    """Train an SAE on ``acts [n_tokens d]`` gathered at (site, layer); save it with training.json (with
    `trained_on`: the tokens the activations were gathered from, klgap.sae.tokens.TrainingTokens).

    architecture: "standard" (ReLU, L1 `l1_coefficient`) or "topk" (`k` latents per token, L1 unused).

    checkpoints / checkpoint_every: also save `checkpoints` evenly spaced SAEs (or one about every
    `checkpoint_every` steps) under ``out_dir/checkpoints/step-XXXXXX/`` (klgap/sae/checkpoints.py), the last the
    final SAE.

    b_dec_init: "zeros" (sae_lens's trainer as it is: inputs scaled to mean norm sqrt(d)) or "mean": inputs
    scaled so that their spread around the mean has norm sqrt(d), and the decoder bias starts at the mean.
    Sites whose activations share a large common offset (e.g. a late attn_out with ‖mean‖ ≫ spread)
    otherwise spend latents, and L1, on the offset."""
    from sae_lens import SAE, SAETrainer

    n_checkpoints = ckpt.count(steps, checkpoints, checkpoint_every)
    if b_dec_init not in B_DEC_INITS:
        raise KlgapError(f"unknown b_dec_init {b_dec_init!r}; valid: {', '.join(B_DEC_INITS)}")
    check_architecture(architecture, k, expansion * acts.shape[-1])
    device = device or model.device
    started = started or time.time()
    if not torch.isfinite(acts).all():
        raise KlgapError(f"{model.name} {hook_name(site, layer)} has non-finite activations; cannot train an SAE on them")
    # held-out tokens drawn with the token seed: SAEs of one recipe and several seeds (train-sae --seeds) are scored
    # on the same held-out tokens; `seed` sets the initialisation and the order training reads the rest
    token_seed = trained_on.seed if trained_on is not None else seed
    gen = torch.Generator().manual_seed(token_seed)
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
        **({"token_seed": token_seed} if token_seed != seed else {}),  # train-sae --seeds: seed-1 on
        "first_position": "excluded" if skip_first_position else "included",
        **(trained_on.facts() if trained_on is not None else {}),
    }
    saver = ckpt.CheckpointSaver(Path(out_dir), held_out, device, facts) if n_checkpoints else None
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), sae_lens_bars(progress):
            torch.manual_seed(seed)
            sae = _training_sae(model, site, layer, d_in, expansion, architecture, k, l1_coefficient, steps, device)
            trainer = SAETrainer(cfg=_trainer_config(steps, train_batch_size, lr, device, n_checkpoints, len(train)),
                                 sae=sae, data_provider=_batches(train, train_batch_size, seed, device),
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

        with staged(Path(out_dir)) as staging:
            trained.save_inference_model(staging)
            inference = SAE.load_from_disk(str(staging), device=str(device)).eval()
            result = {**facts, **evaluate(inference, held_out, device), "wall_time_s": round(time.time() - started, 2)}
            if saver is not None:
                saver.finish(staging, result)
                result["checkpoints"] = n_checkpoints
            (staging / "training.json").write_text(json.dumps(result, indent=2) + "\n")
    finally:
        if saver is not None:
            saver.discard()  # a run stopped before the end (Ctrl-C, an error) leaves no checkpoint folder behind
    return result


__all__ = ["ARCHITECTURES", "B_DEC_INITS", "check_architecture", "fit_sae", "sae_lens_bars", "train_sae"]
