"""The seed study's layer-6 GPT-2 protocol, shape for shape, on random weights: one command to time it on a GPU.

The study (METHOD.md §5, §7; replications/gpt2-small-res-jb/all_tokens.toml) measures GPT-2 small at
``blocks.6.hook_resid_pre`` with a 32x SAE (768 -> 24,576) on 2,048,000 tokens: 16,000 contexts of BOS + 127
tokens, every position patched (BOS included), KL and ΔCE kept for positions 0..126, batches of 64, the six
interventions of klgap's default set. Here the model is a GPT-2-small-shaped GPT2LMHeadModel with random weights,
the SAE random and the tokens uniform random ids (benchmarks/random_models.py), so it needs no download; the work
per token is the study's.

It runs ``klgap.job.execute.run_job`` on the config's job (what ``klgap replicate`` runs: folder, parts, report;
without the pages) into --out and prints the
time of the whole run and of its measuring alone (first to last part written, scaled by n/(n−1)), with tokens/s
and tokens/s per intervention.

    .venv/bin/python benchmarks/bench_protocol_gpt2.py --device cuda                    # the full shape
    .venv/bin/python benchmarks/bench_protocol_gpt2.py --device cuda --dtype bfloat16   # checked against float32
    .venv/bin/python benchmarks/bench_protocol_gpt2.py --tokens 4096 --batch-size 8     # a CPU smoke run
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from random_models import gpt2_small_folder, random_sae_file  # noqa: E402

from klgap.job.execute import run_job  # noqa: E402
from klgap.job.loading import load_model  # noqa: E402
from klgap.job.plan import plan_job  # noqa: E402
from klgap.plan.config import DEFAULT_INTERVENTIONS, RunConfig  # noqa: E402
from klgap.plan.resolve import pick_device  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2_048_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--expansion", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", help="float32 (the study's), bfloat16, float16 or auto")
    parser.add_argument("--out", default=None, help="run folder (default: a temporary one, removed after)")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "klgap" / "bench"))
    args = parser.parse_args()

    device = pick_device(args.device)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    folder = gpt2_small_folder(cache / "gpt2-small-random")
    hook = f"blocks.{args.layer}.hook_resid_pre"
    sae = random_sae_file(cache / f"sae-{hook}-x{args.expansion}.safetensors", 768, 768 * args.expansion, hook)
    interventions = list(DEFAULT_INTERVENTIONS)
    cfg = RunConfig(model=str(folder), sae=str(sae), tokens=args.tokens, context_len=128, batch_size=args.batch_size,
                    device=str(device), dtype=args.dtype, dataset="random", interventions=interventions,
                    mask_special="none", drop_last_position=True)
    start = time.perf_counter()
    load_model(str(folder), device, torch.float32)  # the model's load is not the protocol's cost
    loaded_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "run"
        start = time.perf_counter()
        report = run_job(plan_job(cfg), out, overwrite=True, progress=True)
        total_s = time.perf_counter() - start
        parts = sorted(p.stat().st_mtime for p in (out / "parts").glob("batch_*.parquet"))
    n = len(parts)
    measure_s = (parts[-1] - parts[0]) * n / (n - 1) if n > 1 else float("nan")
    tokens = report.n_tokens
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{tokens} measured tokens ({report.n_contexts} contexts x 127), {len(interventions)} interventions, "
          f"{hook}, SAE 768->{768 * args.expansion}, batch {args.batch_size}, {report.dtype} on {device} ({name}); "
          f"model load {loaded_s:.1f} s (not counted)")
    if report.precision is not None:
        print(f"precision check: passed={report.precision.passed}, mean KL moved by at most "
              f"{report.precision.kl_mean_rel_change_max:.2%}")
    print(f"whole run {total_s:.1f} s ({tokens / total_s:.0f} tokens/s, {tokens * len(interventions) / total_s:.0f} "
          f"tokens/s per intervention); measuring {measure_s:.1f} s ({tokens / measure_s:.0f} tokens/s, "
          f"{tokens * len(interventions) / measure_s:.0f} tokens/s per intervention)")
    print(f"protocol_seconds={total_s:.1f} measure_seconds={measure_s:.1f} "
          f"tokens_per_s_per_intervention={tokens * len(interventions) / measure_s:.0f} device={device.type}")


if __name__ == "__main__":
    main()
