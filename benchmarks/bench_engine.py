"""klgap's engine against a naive runner, on the same tokens and the same random draws, in one process.

naive: every patched run is a full forward of the whole context through nnsight, and the clean forward is
       repeated with it (per intervention; in many-samples mode per draw).
engine: klgap's measure_batch, timed over every batch after loading (the naive runner is timed the same way):
  - all_tokens:   one clean forward per batch, then only the layers above the site per intervention (klgap.forward.suffix);
  - single_token: positions < t from the KV cache, only t..t+k computed per intervention (klgap.forward.kvcache);
  - many_samples: the same, only position t per draw, draws batched.
floor (all-token): one clean forward + n_interventions × (layers above the site + final norm + unembedding) per
       batch, timed piece by piece.

Many-samples: the naive runner's cost is exactly linear in the draws, so it is timed on the first
--naive-draws draws of each context (whose KL is compared) and scaled to --draws; the scale is printed.

    .venv/bin/python benchmarks/bench_engine.py --model smollm2-135m --layer 15

The last line is machine-readable:
speedup_all_token=X speedup_single_token=Y speedup_many_samples=Z floor_ratio=W max_abs_kl_diff=V peak_rss_mb=M
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import pandas as pd
import torch

from klgap.forward import activations, executors, metrics
from klgap.job import cells, loading
from klgap.job.batches import measure_batch
from klgap.job.loaded import LoadedJob
from klgap.job.view import SaeView, generator_for
from klgap.plan.resolve import pick_device
from klgap.plan.config import DEFAULT_INTERVENTIONS, RunConfig
from klgap.plugins.manager import registry
from klgap.sae.fit import train_sae

KEY = ["intervention", "context", "position", "draw"]


UNTIMED = [0.0]  # seconds the naive runners spent on the float64 reference KL (not part of their time)


def reference_kl(clean: torch.Tensor, patched: torch.Tensor) -> torch.Tensor:
    """The naive runner's KL: it computes the float32 textbook KL (timed), and the float64 KL of the same logits
    that the engine is compared against (untimed): float32 log-softmaxes are off by up to ~1e-4 at KL ~ 5."""
    metrics.kl_per_token(metrics.log_probs(clean), patched)
    start = time.perf_counter()
    kl = metrics.kl_per_token(metrics.log_probs(clean.double()), patched.double()).float()
    UNTIMED[0] += time.perf_counter() - start
    return kl


def timed_naive(fn, *args) -> tuple[float, pd.DataFrame]:
    UNTIMED[0] = 0.0
    start = time.perf_counter()
    frame = fn(*args)
    return time.perf_counter() - start - UNTIMED[0], frame


def timed_engine(prep: loading.Loaded) -> tuple[float, pd.DataFrame]:
    """Seconds of measure_batch over every batch, and the per-token records."""
    frames = []
    job = LoadedJob.of_run(prep)
    start = time.perf_counter()
    for index in range(job.n_batches):
        frames.extend(frame for frame, _ in measure_batch(job, index, job.cells))
    return time.perf_counter() - start, pd.concat(frames, ignore_index=True)


def _batches(prep: loading.Loaded):
    size = prep.config.batch_size
    for index in range(-(-len(prep.contexts) // size)):
        yield index, torch.arange(index * size, min((index + 1) * size, len(prep.contexts)))


@torch.no_grad()
def naive_all_tokens(prep: loading.Loaded) -> pd.DataFrame:
    cfg, model = prep.config, prep.model
    first = 1 if cfg.skip_first_position else 0
    rows = []
    for index, context_ids in _batches(prep):
        ids = prep.contexts[context_ids].to(model.device)
        n_ctx, n_pos = ids.shape[0], ids.shape[1] - first
        for j, (name, perturbation) in enumerate((i.name, i.perturbation) for i in prep.interventions):
            acts, clean = activations.run_clean(model, prep.spec, ids)  # the clean forward, repeated
            view = SaeView.of(acts[:, first:].reshape(n_ctx * n_pos, -1), prep.sae, prep.center)
            x_prime = view.substitute(perturbation, generator_for(model.device, cfg.seed, index, j), model.dtype)
            patched = activations.run_patched(model, prep.spec, ids, x_prime.reshape(n_ctx, n_pos, -1), positions=slice(first, None))
            kl = reference_kl(clean, patched)[:, first:].cpu()
            rows.append(pd.DataFrame({"intervention": name, "context": context_ids.repeat_interleave(n_pos).numpy(),
                                      "position": torch.arange(first, ids.shape[1]).repeat(n_ctx).numpy(), "draw": -1,
                                      "kl": kl.reshape(-1).numpy()}))
    return pd.concat(rows, ignore_index=True)


@torch.no_grad()
def naive_single_token(prep: loading.Loaded) -> pd.DataFrame:
    cfg, model = prep.config, prep.model
    t, k = cfg.position, cfg.k
    rows = []
    for index, context_ids in _batches(prep):
        ids = prep.contexts[context_ids].to(model.device)  # the whole context
        for j, (name, perturbation) in enumerate((i.name, i.perturbation) for i in prep.interventions):
            acts, clean = activations.run_clean(model, prep.spec, ids)
            view = SaeView.of(acts[:, t], prep.sae, prep.center)
            x_prime = view.substitute(perturbation, generator_for(model.device, cfg.seed, index, j), model.dtype)
            patched = activations.run_patched(model, prep.spec, ids, x_prime, positions=t)
            kl = reference_kl(clean, patched)[:, t : t + k + 1].cpu()
            rows.append(pd.DataFrame({"intervention": name, "context": context_ids.repeat_interleave(k + 1).numpy(),
                                      "position": torch.arange(t, t + k + 1).repeat(len(ids)).numpy(), "draw": -1,
                                      "kl": kl.reshape(-1).numpy()}))
    return pd.concat(rows, ignore_index=True)


@torch.no_grad()
def naive_many_samples(prep: loading.Loaded, n_naive: int) -> pd.DataFrame:
    """The first `n_naive` draws of each context (the engine's own draws), a clean + a patched forward each."""
    cfg, model = prep.config, prep.model
    t, n_draws = cfg.position, cfg.n_samples
    rows = []
    for index, context_ids in _batches(prep):
        ids = prep.contexts[context_ids].to(model.device)
        acts, _ = activations.run_clean(model, prep.spec, ids)
        view = SaeView.of(acts[:, t], prep.sae, prep.center)
        draws = []
        for j in range(len(ids)):  # the engine's draws: same generator keys, same order
            gen = generator_for(model.device, cfg.seed, index, len(prep.interventions), j)
            x = view.x[j : j + 1].expand(n_draws, -1)
            x_hat = view.x_hat[j : j + 1].expand(n_draws, -1)
            draws.append(prep.sample.perturbation(x, x_hat, gen).float() + view.offset[j])
        draws = torch.stack(draws).to(model.dtype)  # [b N d]
        for d in range(n_naive):
            _, clean = activations.run_clean(model, prep.spec, ids)
            patched = activations.run_patched(model, prep.spec, ids, draws[:, d], positions=t)
            kl = reference_kl(clean, patched)[:, t].cpu()
            rows.append(pd.DataFrame({"intervention": prep.sample.perturbation.name, "context": context_ids.numpy(),
                                      "position": t, "draw": d, "kl": kl.numpy()}))
    return pd.concat(rows, ignore_index=True)


def max_diff(fast: pd.DataFrame, naive: pd.DataFrame) -> float:
    joined = naive.merge(fast[KEY + ["kl"]], on=KEY, suffixes=("_naive", "_fast"), how="left", validate="one_to_one")
    if joined.kl_fast.isna().any():
        raise SystemExit(f"{int(joined.kl_fast.isna().sum())} naive rows have no engine row")
    return float((joined.kl_fast - joined.kl_naive).abs().max())


def floor_seconds(prep: loading.Loaded, repeats: int = 3) -> float:
    """One clean forward + n × suffix for one batch, best of `repeats`, times the number of batches."""
    runner = prep.executor.runner  # the suffix replay's SuffixRunner
    ids = prep.contexts[: prep.config.batch_size].to(prep.model.device)
    first = 1 if prep.config.skip_first_position else 0
    clean_t, suffix_t = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        acts, _ = runner.clean(ids)
        clean_t.append(time.perf_counter() - start)
        start = time.perf_counter()
        runner.patched(acts[:, first:], slice(first, None))
        suffix_t.append(time.perf_counter() - start)
    n_batches = -(-len(prep.contexts) // prep.config.batch_size)
    return n_batches * (min(clean_t) + len(prep.interventions) * min(suffix_t))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--site", default="mlp_out")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=2048, help="all-token and single-token modes")
    parser.add_argument("--context-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--position", type=int, default=32)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--draws", type=int, default=500, help="many-samples draws per context")
    parser.add_argument("--draw-contexts", type=int, default=2, help="many-samples contexts")
    parser.add_argument("--naive-draws", type=int, default=25, help="draws per context the naive runner times")
    parser.add_argument("--modes", default="all_tokens,single_token,many_samples")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cpu-stack-bytes", type=int, default=1 << 30,
                        help="on CPU, also time the engine stacking interventions within this memory budget")
    args = parser.parse_args()
    chosen = args.modes.split(",")

    results: dict[str, float] = {}
    diffs = []
    with TemporaryDirectory() as tmp:
        device = pick_device(args.device)
        model = loading.load_model(args.model, device, torch.float32)
        contexts = registry("token_source").get("random").contexts(model, 64, 64, 1, True, None)
        sae_dir = Path(tmp) / "sae"
        train_sae(model, args.site, args.layer, contexts, sae_dir, steps=20, train_batch_size=256, progress=False)
        interventions = [*DEFAULT_INTERVENTIONS, "zero"]  # 7, as in the study
        base = dict(model=args.model, sae=str(sae_dir), context_len=args.context_len, batch_size=args.batch_size,
                    device=args.device, dataset="random", interventions=interventions)
        print(f"model {args.model} {args.site} L{args.layer} on {device}, {len(interventions)} interventions")

        if "all_tokens" in chosen:
            prep = cells.prepare(RunConfig(**base, tokens=args.tokens))
            naive_s, naive = timed_naive(naive_all_tokens, prep)
            fast_s, fast = timed_engine(prep)
            floor_s = floor_seconds(prep)
            n = len(naive) // len(interventions)
            diffs.append(max_diff(fast, naive))
            results |= {"speedup_all_token": naive_s / fast_s, "floor_ratio": fast_s / floor_s}
            print(f"all_tokens   ({n} tokens, {prep.execution['path']}, {prep.executor.stack} interventions per suffix pass): "
                  f"naive {naive_s:.2f} s ({n / naive_s:.1f} tok/s), "
                  f"engine {fast_s:.2f} s ({n / fast_s:.1f} tok/s), floor {floor_s:.2f} s; "
                  f"speed-up {naive_s / fast_s:.2f}x, engine/floor {fast_s / floor_s:.2f}, max |dKL| {diffs[-1]:.1e}")
            # What stacking buys on this device: the same engine with the other choice (on CPU, where the
            # engine does not stack by default, with --cpu-stack-bytes of budget).
            default_stack = prep.executor.stack
            if default_stack == 1 and device.type == "cpu":
                executors.STACK_BYTES_CPU, budget = args.cpu_stack_bytes, executors.STACK_BYTES_CPU
                prep.executor.stack = min(len(interventions), executors.stack_size(prep.config, model))
                executors.STACK_BYTES_CPU = budget
            else:
                prep.executor.stack = 1
            if prep.executor.stack != default_stack:
                other_s, other = timed_engine(prep)
                diffs.append(max_diff(other, naive))
                stacked_s, unstacked_s = (other_s, fast_s) if prep.executor.stack > default_stack else (fast_s, other_s)
                print(f"             {max(prep.executor.stack, default_stack)} interventions per pass {stacked_s:.2f} s, one per pass "
                      f"{unstacked_s:.2f} s: stacking x{unstacked_s / stacked_s:.2f}")
            prep.executor.stack = default_stack

        if "single_token" in chosen:
            prep = cells.prepare(RunConfig(**base, tokens=args.tokens, mode="single_token", position=args.position, k=args.k))
            naive_s, naive = timed_naive(naive_single_token, prep)
            fast_s, fast = timed_engine(prep)
            diffs.append(max_diff(fast, naive))
            n = len(prep.contexts)
            results["speedup_single_token"] = naive_s / fast_s
            print(f"single_token ({n} contexts, t={args.position}, k={args.k}, {prep.execution['path']}): naive {naive_s:.2f} s, "
                  f"engine {fast_s:.2f} s; speed-up {naive_s / fast_s:.2f}x, max |dKL| {diffs[-1]:.1e}")

        if "many_samples" in chosen:
            cfg = RunConfig(**{**base, "interventions": ["sae"], "batch_size": args.draw_contexts},
                            tokens=args.draw_contexts * args.context_len, mode="many_samples",
                            position=args.position, n_samples=args.draws)
            prep = cells.prepare(cfg)
            n_naive = min(args.naive_draws, args.draws)
            naive_s, naive = timed_naive(naive_many_samples, prep, n_naive)
            naive_s *= args.draws / n_naive
            fast_s, fast = timed_engine(prep)
            diffs.append(max_diff(fast, naive))
            results["speedup_many_samples"] = naive_s / fast_s
            print(f"many_samples ({args.draw_contexts} contexts x {args.draws} draws, t={args.position}, {prep.execution['path']}): "
                  f"naive {naive_s:.2f} s (timed on {n_naive} draws, x{args.draws / n_naive:g}), engine {fast_s:.2f} s; "
                  f"speed-up {naive_s / fast_s:.2f}x, max |dKL| {diffs[-1]:.1e}")

    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    fields = ["speedup_all_token", "speedup_single_token", "speedup_many_samples", "floor_ratio"]
    line = " ".join(f"{f}={results[f]:.2f}" if f in results else f"{f}=nan" for f in fields)
    print(f"{line} max_abs_kl_diff={max(diffs):.2e} peak_rss_mb={peak_mb:.0f}")


if __name__ == "__main__":
    main()
