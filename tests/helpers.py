"""Test helpers: SAEs with known behaviour, written in the plain safetensors format."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from klgap.plan.sites import hook_name as hook_of


def write_sae(path: Path, W_enc, W_dec, b_enc, b_dec, hook_name: str | None) -> Path:
    """A plain safetensors SAE file with the hook name in its metadata."""
    tensors = {"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec}
    save_file({k: v.contiguous().float() for k, v in tensors.items()}, str(path), metadata={"hook_name": hook_name} if hook_name else None)
    return path


def shrink_sae(path: Path, d: int, scale: float, hook_name: str | None) -> Path:
    """An SAE whose reconstruction is exactly `scale * x`: features relu(x), relu(-x); decoder ±scale."""
    eye = torch.eye(d)
    W_enc = torch.cat([eye, -eye], dim=1)  # [d, 2d]
    W_dec = torch.cat([eye, -eye], dim=0) * scale  # [2d, d]
    return write_sae(path, W_enc, W_dec, torch.zeros(2 * d), torch.zeros(d), hook_name)


def random_sae(path: Path, d: int, d_sae: int, hook_name: str | None, seed: int = 0) -> Path:
    """A random ReLU SAE (tied-ish init) whose reconstruction is imperfect but sensible."""
    gen = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d, generator=gen) / d**0.5
    W_enc = W_dec.T.clone() * 2.0
    return write_sae(path, W_enc, W_dec, torch.zeros(d_sae), torch.zeros(d), hook_name)


class FakeModel:
    """Just enough of a LoadedModel for SAE lookup tests."""

    def __init__(self, name: str = "fake", sae_lens_models: tuple[str, ...] = (), sae_note: str | None = None) -> None:
        self.name = name
        self.sae_lens_models = sae_lens_models
        self.sae_note = sae_note


def pca_sae(path: Path, acts, m: int, d_sae: int, hook_name: str | None) -> Path:
    """An SAE that reconstructs ``acts: [n d]`` from their top-m principal components: b_dec = their mean, features
    ±(x − mean)·v_i for the top m axes v_i (so its L0 is m), and d_sae − 2m features that never fire."""
    acts = acts.double()
    mean = acts.mean(0)
    _, vectors = torch.linalg.eigh((acts - mean).T @ (acts - mean))
    top = vectors[:, -m:].T.float()  # [m d]
    d = acts.shape[1]
    dead = torch.randn(d_sae - 2 * m, d, generator=torch.Generator().manual_seed(0)) / d**0.5
    W_dec = torch.cat([top, -top, dead])  # [d_sae d]
    b_enc = torch.cat([torch.zeros(2 * m), torch.full((d_sae - 2 * m,), -1e4)])
    return write_sae(path, W_dec.T.clone(), W_dec, b_enc, mean.float(), hook_name)


def run_config(config, out, **options):
    """Plan a RunConfig into its job (its shape from its site/layer lists, ``joint``, a glob of checkpoints) and run
    it into `out`, as the CLI does without its pages: the report on top (a run's, a joint run's or a study's)."""
    from klgap.job.execute import run_job
    from klgap.job.plan import checkpoint_spec, plan_job

    options.setdefault("progress", False)
    checkpoints = None if config.joint else checkpoint_spec(config.sae, None)
    return run_job(plan_job(config, checkpoints=checkpoints), out, **options)


def checkpointed_sae(model, folder: Path, checkpoints: int = 3, steps: int = 30, n_contexts: int = 60) -> Path:
    """An SAE trained at `model`'s mlp_out L1 on random tokens into `folder` (name it blocks.1.hook_mlp_out), saving
    `checkpoints` checkpoints (the last the final SAE)."""
    from klgap.sae.fit import fit_sae
    from klgap.sae.gather import gather

    contexts = torch.randint(0, 200, (n_contexts, 32), generator=torch.Generator().manual_seed(1))
    fit_sae(model, "mlp_out", 1, gather(model, "mlp_out", 1, contexts), folder, steps=steps, train_batch_size=256,
            checkpoints=checkpoints, progress=False)
    return folder
def checkpoint(folder: Path, step: int, site: str = "mlp_out", layer: int = 0, model: str = "tiny-gpt2",
                nan: bool = False) -> None:
    """One checkpoint as train-sae --checkpoints writes it: a sae_lens folder + training.json."""
    from sae_lens import StandardSAE, StandardSAEConfig

    cfg = StandardSAEConfig(d_in=64, d_sae=128)
    cfg.metadata.hook_name = hook_of(site, layer)
    cfg.metadata.model_name = model
    sae = StandardSAE(cfg)
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(128, 64, generator=torch.Generator().manual_seed(step)) / 8)
        sae.W_enc.copy_(sae.W_dec.T * 2)
        if nan:
            sae.W_dec[0, 0] = float("nan")
    sae.save_model(folder)
    (folder / "training.json").write_text(json.dumps({
        "model": model, "site": site, "layer": layer, "hook_name": hook_of(site, layer), "d_sae": 128,
        "step": step, "tokens_seen": step * 1024, "explained_variance": 0.5, "l0_mean": 10.0}))


def checkpoints(root: Path, spoil: str | None = None) -> Path:
    """DIR/checkpoints/step-0000{10,20,30}/; `spoil` breaks step 20 the way a user's file would be broken."""
    base = root / "sae" / "checkpoints"
    for step in (10, 20, 30):
        folder = base / f"step-{step:06d}"
        bad = spoil if step == 20 else None
        checkpoint(folder, step, layer=1 if bad == "wrong-hook" else 0, model="gpt2" if bad == "other-model" else
                    "tiny-gpt2", nan=bad == "nan")
        if bad == "truncated":
            weights = folder / "sae_weights.safetensors"
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return base
