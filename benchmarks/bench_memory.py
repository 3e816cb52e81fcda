"""Peak memory against the number of tokens: the same run at two sizes, each in a fresh process.

Measurement streams per-batch parts to disk (logits are reduced to per-token scalars inside each batch), so the
measuring loop's memory does not depend on the number of tokens; the report is then built from the per-token
table, which does. Prints the peak RSS of each size, the peak RSS just before the report is built, and their
ratios. The last line is machine-readable.

    .venv/bin/python benchmarks/bench_memory.py --model tiny-llama --small 20000 --large 200000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, tempfile
from pathlib import Path
import torch
from klgap import engine
from klgap.config import RunConfig
from klgap.sites import hook_name
from klgap_saes import save_safetensors_sae

model, site, layer, n_tokens, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
lm = engine.load_model(model, torch.device("cpu"), torch.float32)
d = lm.site_widths[site]
gen = torch.Generator().manual_seed(0)
W_dec = torch.randn(8 * d, d, generator=gen) / d ** 0.5
sae = save_safetensors_sae(out / "sae.safetensors", 2 * W_dec.T.contiguous(), W_dec, torch.zeros(8 * d), torch.zeros(d),
                           hook_name=hook_name(site, layer))
config = RunConfig(model=model, sae=str(sae), tokens=n_tokens, context_len=128, batch_size=8, device="cpu", dataset="random")
opened = engine.open_run(config, out / "run")
for index in opened.todo:
    opened.rundir.write_part(index, *engine.measure_batch(opened.prep, index))
measured = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
engine.finish_run(opened)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"measure_peak_mb": measured, "peak_mb": peak}))
"""


def measure(model: str, site: str, layer: int, n_tokens: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([sys.executable, "-c", CHILD, model, site, str(layer), str(n_tokens), tmp],
                              capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--site", default="mlp_out")
    parser.add_argument("--layer", type=int, default=1)
    parser.add_argument("--small", type=int, default=20_000)
    parser.add_argument("--large", type=int, default=200_000)
    args = parser.parse_args()
    small = measure(args.model, args.site, args.layer, args.small)
    large = measure(args.model, args.site, args.layer, args.large)
    for name, n, m in (("small", args.small, small), ("large", args.large, large)):
        print(f"{name:5} {n:>8} tokens: peak RSS while measuring {m['measure_peak_mb']:.0f} MB, with the report {m['peak_mb']:.0f} MB")
    ratio_measure = large["measure_peak_mb"] / small["measure_peak_mb"]
    ratio = large["peak_mb"] / small["peak_mb"]
    print(f"rss_ratio_measuring={ratio_measure:.3f} rss_ratio_with_report={ratio:.3f} "
          f"peak_rss_small_mb={small['peak_mb']:.0f} peak_rss_large_mb={large['peak_mb']:.0f}")


if __name__ == "__main__":
    main()
