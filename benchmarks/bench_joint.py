"""A joint run's fast path (klgap/forward/joint.py: the lowest site's suffix replay, higher sites patched by hooks) against
its full forwards, on the same tokens and draws: seconds per batch of the joint rows and of each site alone.

Random ReLU SAEs (d_sae = 4 × d_in) stand in for trained ones: the timing does not depend on what they learned.

    .venv/bin/python benchmarks/bench_joint.py --model smollm2-135m --site resid_post --layer 3,10,17,24

The last line is machine-readable: speedup_joint=X max_abs_kl_diff=Y
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import pandas as pd
import torch

from klgap.job.batches import measure_batch
from klgap.job.cells import load_job
from klgap.job.plan import plan_job
from klgap.plan.config import RunConfig
from klgap.plan.sites import hook_name
from klgap.plugins.manager import registry
from klgap.sae.file import save_safetensors_sae


def random_saes(folder: Path, model: str, cells: list[tuple[str, int]]) -> str:
    widths = registry("model").get(model).load(torch.device("cpu"), torch.float32).site_widths
    for k, (site, layer) in enumerate(cells):
        gen = torch.Generator().manual_seed(k)
        d = widths[site]
        W_dec = torch.randn(4 * d, d, generator=gen) / d**0.5
        save_safetensors_sae(folder / f"{site}-L{layer}.safetensors", W_dec.T * 2.0, W_dec, torch.zeros(4 * d),
                             torch.zeros(d), hook_name=hook_name(site, layer))
    return str(folder / "{site}-L{layer}.safetensors")


def timed(config: RunConfig) -> tuple[float, pd.DataFrame, str]:
    job = load_job(plan_job(config))
    joint = job.cells[-1]  # the job's own cell, every site patched (after each site alone)
    start, frames = time.perf_counter(), []
    for index in range(job.n_batches):
        frames.append(list(measure_batch(job, index, job.cells))[-1][0])
    return time.perf_counter() - start, pd.concat(frames, ignore_index=True), joint.execution["path"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--site", default="resid_post")
    parser.add_argument("--layer", default="3,10,17,24")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--context-len", type=int, default=128)
    parser.add_argument("--interventions", default="sae,epsilon_random")
    args = parser.parse_args()
    base = RunConfig(model=args.model, site=args.site, layer=args.layer, joint=True, tokens=args.tokens,
                     context_len=args.context_len, device="cpu", interventions=args.interventions.split(","))
    with TemporaryDirectory() as tmp:
        base.sae = random_saes(Path(tmp), args.model, base.validate().joint_cells())
        fast_s, fast, fast_path = timed(base)
        full_s, full, full_path = timed(RunConfig(**{**base.to_dict(), "no_fast": True}))
    diff = float(np.nanmax(np.abs(fast.kl.to_numpy() - full.kl.to_numpy())))
    n_sites = len(base.joint_cells())
    print(f"{args.model} {n_sites} sites, {args.tokens} tokens: {fast_path} {fast_s:.1f} s, {full_path} {full_s:.1f} s "
          "(each including every site alone)")
    print(f"speedup_joint={full_s / fast_s:.2f} max_abs_kl_diff={diff:.2g}")


if __name__ == "__main__":
    main()
