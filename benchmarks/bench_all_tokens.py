"""All-token mode: klgap's engine against a naive runner, on the same tokens, in one process.

naive:     for every intervention, a clean forward and a patched forward (nnsight), KL from the two.
optimized: klgap's engine (one clean forward per batch, then only the layers above the site per
           intervention; klgap.suffix).
floor:     the measured time of one clean forward + n_interventions × (the layers above the site +
           final norm + unembedding), timed piece by piece.

Prints tokens/s of each, the speed-up, optimized / floor, the largest |ΔKL| per token between the two,
and peak RSS. Last line is machine-readable. Example (SmolLM2-135M, CPU, middle layer):

    .venv/bin/python benchmarks/bench_all_tokens.py --model smollm2-135m --layer 15 --tokens 2048
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import pandas as pd
import torch

from klgap import activations, engine, metrics
from klgap.config import DEFAULT_INTERVENTIONS, RunConfig
from klgap.train import train_sae


@torch.no_grad()
def naive(prep: engine.Prepared) -> np.ndarray:
    """KL per (intervention, context, position) with a clean + a patched full forward per intervention."""
    cfg, model = prep.config, prep.model
    first = 1 if cfg.skip_first_position else 0
    out = []
    for index in range(-(-len(prep.contexts) // cfg.batch_size)):
        ids = prep.contexts[index * cfg.batch_size : (index + 1) * cfg.batch_size].to(model.device)
        for j, (_, perturbation) in enumerate(prep.perturbations):
            acts, clean = activations.run_clean(model, prep.spec, ids)  # the clean forward, repeated
            n_ctx, n_pos = ids.shape[0], ids.shape[1] - first
            view = engine.SaeView.of(acts[:, first:].reshape(n_ctx * n_pos, -1), prep.sae, prep.center)
            gen = engine.generator_for(model.device, cfg.seed, index, j)
            x_prime = view.substitute(perturbation, gen, model.dtype).reshape(n_ctx, n_pos, -1)
            patched = activations.run_patched(model, prep.spec, ids, x_prime, positions=slice(first, None))
            kl = metrics.kl_per_token(metrics.log_probs(clean), patched)[:, first:]
            out.append(kl.reshape(-1).cpu().numpy())
    return np.concatenate(out)


def floor_seconds(prep: engine.Prepared, repeats: int = 3) -> float:
    """One clean forward + n × suffix for one batch, best of `repeats`, times the number of batches."""
    runner = prep.suffix
    ids = prep.contexts[: prep.config.batch_size].to(prep.model.device)
    first = 1 if prep.config.skip_first_position else 0
    clean_t, suffix_t = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        acts, _ = runner.clean(ids)
        clean_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        runner.patched(acts[:, first:], slice(first, None))
        suffix_t.append(time.perf_counter() - t)
    n_batches = -(-len(prep.contexts) // prep.config.batch_size)
    return n_batches * (min(clean_t) + len(prep.perturbations) * min(suffix_t))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--site", default="mlp_out")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--context-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    with TemporaryDirectory() as tmp:
        model = engine.load_model(args.model, engine.pick_device(args.device), torch.float32)
        contexts = engine.get_host().registry("token_source").get("random").contexts(model, 64, 64, 1, True, None)
        sae_dir = Path(tmp) / "sae"
        train_sae(model, args.site, args.layer, contexts, sae_dir, steps=20, train_batch_size=256, progress=False)
        interventions = [*DEFAULT_INTERVENTIONS, "zero"]  # 7, as in the study
        config = RunConfig(model=args.model, sae=str(sae_dir), n_tokens=args.tokens, context_len=args.context_len,
                           batch_size=args.batch_size, device=args.device, dataset="random", interventions=interventions)
        prep = engine.prepare(config)

        t = time.perf_counter()
        naive_kl = naive(prep)
        naive_s = time.perf_counter() - t

        t = time.perf_counter()
        engine.run(config, Path(tmp) / "run", progress=False)
        fast_s = time.perf_counter() - t
        tokens = pd.read_parquet(Path(tmp) / "run" / "tokens.parquet")
        order = {name: i for i, (name, _) in enumerate(prep.perturbations)}
        tokens = tokens.assign(order=tokens.intervention.map(order)).sort_values(["context", "order", "position"])
        # naive_kl is ordered batch, intervention, context, position; rebuild the same order
        batch = tokens.context // config.batch_size
        fast_kl = tokens.assign(batch=batch).sort_values(["batch", "order", "context", "position"]).kl.to_numpy()
        max_diff = float(np.abs(fast_kl - naive_kl).max())
        floor_s = floor_seconds(prep)

    n_tokens = len(prep.contexts) * (args.context_len - 1)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"model {args.model} {args.site} L{args.layer} on {prep.model.device}: {n_tokens} tokens, {len(interventions)} interventions")
    print(f"naive      {naive_s:8.2f} s  {n_tokens / naive_s:9.1f} tokens/s")
    print(f"optimized  {fast_s:8.2f} s  {n_tokens / fast_s:9.1f} tokens/s  ({prep.execution['path']})")
    print(f"floor      {floor_s:8.2f} s  (one clean forward + {len(interventions)} × suffix per batch)")
    print(f"speedup_all_token={naive_s / fast_s:.2f} floor_ratio={fast_s / floor_s:.2f} max_abs_kl_diff={max_diff:.2e} peak_rss_mb={peak_mb:.0f}")


if __name__ == "__main__":
    main()
