"""klgap against the tool a user would pick instead: sae_lens's own evaluation, same model, SAE, tokens and work.

sae_lens side: ``sae_lens.evals.get_recons_loss`` (KL and CE of the SAE splice and of zero ablation) on a
TransformerLens copy of the model, one call per batch; it runs three full forwards per batch (clean, SAE, zero).
klgap side: the Hugging Face model, interventions ``sae`` and ``zero``, every position patched and measured
(``include_first_position``), KL and ΔCE per token; timed from ``klgap.job.cells.prepare`` (SAE load, tokens, the
fast-path check, in low precision the precision check) through every batch's ``measure_batch`` (the job's batch
loop without its folder). Both sides are
timed with the model already in memory; neither writes files.

The model is a GPT-2-small-shaped GPT2LMHeadModel with random weights (12 layers, d_model 768, vocab 50,257;
benchmarks/random_models.py), the SAE a random ReLU SAE 768 -> 8x768 at ``blocks.6.hook_resid_pre``, the tokens
uniform random ids (klgap's ``random`` source), 2,048 of them in contexts of 128, batches of 8 contexts.

Each repeat runs klgap and sae_lens in float32 and in bfloat16 (sae_lens: the TransformerLens model in bfloat16,
its own KL code), in alternating order, so machine noise falls on both; times are medians over repeats. In float32
the two sides' per-context mean KL must agree to 1e-5 relative (asserted). Each side's bfloat16 per-context mean
KL is compared with klgap's float32 one (the reference).

    .venv/bin/python benchmarks/bench_vs_saelens.py                  # CPU
    .venv/bin/python benchmarks/bench_vs_saelens.py --device cuda    # a GPU

The last lines are machine-readable:
speedup_vs_saelens=X (float32 both) speedup_vs_saelens_bf16=Y (klgap bfloat16 against sae_lens float32)
speedup_bf16_both=Z (both bfloat16) and each side's tokens/s per intervention.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from random_models import gpt2_small_folder, hooked_transformer, random_sae_file  # noqa: E402

from klgap.job.batches import measure_batch  # noqa: E402
from klgap.job.cells import prepare  # noqa: E402
from klgap.job.loaded import LoadedJob  # noqa: E402
from klgap.job.loading import load_model  # noqa: E402
from klgap.plan.config import RunConfig  # noqa: E402
from klgap.plan.resolve import pick_device  # noqa: E402
from klgap.plan.sites import hook_name  # noqa: E402

INTERVENTIONS = ["sae", "zero"]
AGREE = 1e-5  # float32: per-context mean KL, relative


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def klgap_side(cfg: RunConfig, device: torch.device) -> tuple[float, pd.DataFrame, dict]:
    """Seconds from prepare (model in memory) through every batch; per-context mean KL ``[context x intervention]``."""
    sync(device)
    start = time.perf_counter()
    prep = prepare(cfg)
    job = LoadedJob.of_run(prep)
    frames = [frame for index in range(job.n_batches) for frame, _ in measure_batch(job, index, job.cells)]
    sync(device)
    seconds = time.perf_counter() - start
    frame = pd.concat(frames, ignore_index=True).astype({"kl": np.float64})
    per_context = frame.groupby(["context", "intervention"])["kl"].mean().unstack()[INTERVENTIONS]
    facts = {"execution": prep.execution.get("path"), "precision": prep.precision}
    return seconds, per_context, facts


def saelens_side(sae, tl_model, contexts: torch.Tensor, batch_size: int, hook: str,
                 device: torch.device) -> tuple[float, pd.DataFrame]:
    from sae_lens.evals import get_recons_loss
    from sae_lens.training.activation_scaler import ActivationScaler

    rows = []
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        for first in range(0, len(contexts), batch_size):
            batch = contexts[first : first + batch_size].to(device)
            out = get_recons_loss(sae, tl_model, ActivationScaler(), batch, compute_kl=True, compute_ce_loss=True,
                                  hook_name=hook)
            rows.append(torch.stack([out["kl_div_with_sae"].float().mean(-1), out["kl_div_with_ablation"].float().mean(-1)], -1).cpu())
    sync(device)
    seconds = time.perf_counter() - start
    per_context = pd.DataFrame(torch.cat(rows).double().numpy(), columns=INTERVENTIONS)
    per_context.index.name = "context"
    return seconds, per_context


def rel_dev(values: pd.DataFrame, reference: pd.DataFrame) -> tuple[float, dict[str, float]]:
    """(largest relative deviation of a per-context mean KL, relative deviation of each intervention's mean KL)."""
    per_context = float(((values.to_numpy() - reference.to_numpy()) / reference.to_numpy()).__abs__().max())
    means = {name: float(abs(values[name].mean() / reference[name].mean() - 1)) for name in INTERVENTIONS}
    return per_context, means


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--context-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--site", default="resid_pre")
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "klgap" / "bench"),
                        help="where the random model and SAE are saved (once)")
    args = parser.parse_args()
    device = pick_device(args.device)
    torch.manual_seed(0)

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    folder = gpt2_small_folder(cache / "gpt2-small-random")
    hook = hook_name(args.site, args.layer)
    sae_path = random_sae_file(cache / f"sae-{hook}-x{args.expansion}.safetensors", 768, 768 * args.expansion, hook)
    dtypes = args.dtypes.split(",")
    configs = {dtype: RunConfig(model=str(folder), sae=str(sae_path), tokens=args.tokens, context_len=args.context_len,
                                batch_size=args.batch_size, device=str(device), dtype=dtype, dataset="random",
                                interventions=INTERVENTIONS, mask_special="none") for dtype in dtypes}

    warm = {dtype: prepare(cfg) for dtype, cfg in configs.items()}  # loads the model (untimed), once per dtype
    first = warm[dtypes[0]]
    contexts, sae = first.contexts, first.sae.module
    hf32 = load_model(str(folder), device, torch.float32)
    tl_models = {dtype: hooked_transformer(hf32.hf_model, getattr(torch, dtype), device) for dtype in dtypes}
    del warm
    print(f"GPT-2-small-shaped random model, SAE 768->{768 * args.expansion} at {hook}, {len(contexts)} contexts x "
          f"{args.context_len} tokens, batches of {args.batch_size}, interventions {INTERVENTIONS}, on {device}; "
          f"{args.repeats} alternating repeats")

    times: dict[tuple[str, str], list[float]] = {}
    results: dict[tuple[str, str], pd.DataFrame] = {}
    facts: dict[str, dict] = {}
    jobs = [(side, dtype) for dtype in dtypes for side in ("klgap", "sae_lens")]
    for repeat in range(args.repeats):
        for side, dtype in (jobs if repeat % 2 == 0 else jobs[::-1]):
            if side == "klgap":
                seconds, per_context, facts[dtype] = klgap_side(configs[dtype], device)
            else:
                seconds, per_context = saelens_side(sae, tl_models[dtype], contexts, args.batch_size, hook, device)
            times.setdefault((side, dtype), []).append(seconds)
            results[(side, dtype)] = per_context
            print(f"  repeat {repeat + 1}: {side:8s} {dtype:8s} {seconds:7.2f} s")

    n_tokens = len(contexts) * args.context_len
    median = {key: statistics.median(value) for key, value in times.items()}
    reference = results[("klgap", "float32")]
    lines = []
    for (side, dtype), seconds in median.items():
        per_context_dev, mean_dev = rel_dev(results[(side, dtype)], reference)
        rate = n_tokens * len(INTERVENTIONS) / seconds
        lines.append(f"{side:8s} {dtype:8s} median {seconds:7.2f} s  ({rate:7.1f} tokens/s per intervention)  "
                     f"vs klgap float32: per-context mean KL max rel dev {per_context_dev:.1e}, mean KL rel dev "
                     + ", ".join(f"{k} {v:.1e}" for k, v in mean_dev.items()))
    print("\n".join(lines))
    for dtype in dtypes:
        if facts[dtype]["precision"] is not None:
            print(f"klgap {dtype} precision check: {facts[dtype]['precision'].model_dump(include={'passed', 'kl_mean_rel_change_max', 'kl_abs_diff_max'})}")

    fields = {}
    if "float32" in dtypes:
        agree, _ = rel_dev(results[("sae_lens", "float32")], reference)
        assert agree <= AGREE, f"klgap and sae_lens disagree in float32: per-context mean KL rel dev {agree:.2e} > {AGREE}"
        print(f"float32 agreement: per-context mean KL within {agree:.1e} relative (<= {AGREE})")
        fields["speedup_vs_saelens"] = median[("sae_lens", "float32")] / median[("klgap", "float32")]
        if "bfloat16" in dtypes:
            fields["speedup_vs_saelens_bf16"] = median[("sae_lens", "float32")] / median[("klgap", "bfloat16")]
    if "bfloat16" in dtypes:
        fields["speedup_bf16_both"] = median[("sae_lens", "bfloat16")] / median[("klgap", "bfloat16")]
    rates = {f"{side}_{dtype}_tok_s": n_tokens * len(INTERVENTIONS) / s for (side, dtype), s in median.items()}
    print(" ".join(f"{k}={v:.2f}" for k, v in fields.items()) + f" device={device.type}")
    print(" ".join(f"{k}={v:.1f}" for k, v in rates.items()))


if __name__ == "__main__":
    main()
