"""One run over several ranks: the same `klgap replicate` command as one process (`python -m klgap`) and under
`torchrun --standalone --nproc_per_node=N -m klgap`, each in a fresh folder: the wall time of the whole command
(start, import, load, measure, report) and of its measuring alone (first to last part written, scaled by
n/(n-1) for the first batch), and the two reports' numbers compared.

- CPU (always): 1 vs 2 ranks at one thread each (OMP_NUM_THREADS=1, --device cpu): `speedup_2_ranks`. On a
  2-core machine shared with other work this is informative only.
- GPUs (when more than one CUDA device is visible): 1 vs N ranks with --device cuda, one GPU per rank:
  `speedup_N_gpus`.

    .venv/bin/python benchmarks/bench_distributed.py                       # tiny-gpt2, 262,144 tokens
    .venv/bin/python benchmarks/bench_distributed.py --model gpt2 --layer 6 --tokens 262144   # hub model, GPUs

The model is any --model klgap knows; the SAE is random (written here, d_sae = 8 d_in), since only time is
measured. The last line is machine-readable:
speedup_2_ranks=X measure_speedup_2_ranks=Y same_numbers=True [speedup_N_gpus=Z measure_speedup_N_gpus=W]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from klgap.sae.file import save_safetensors_sae
from klgap.plan.sites import hook_name


def random_sae(path: Path, model: str, site: str, layer: int) -> Path:
    from klgap.plugins.manager import registry

    d = registry("model").get(model).load(torch.device("cpu"), torch.float32).site_widths[site]
    gen = torch.Generator().manual_seed(0)
    w_dec = torch.randn(8 * d, d, generator=gen) / d**0.5
    return save_safetensors_sae(path, w_dec.T * 2.0, w_dec, torch.zeros(8 * d), torch.zeros(d),
                                hook_name=hook_name(site, layer))


def measuring_seconds(out: Path) -> float:
    """First to last part written, scaled for the first batch (whose end is the first time seen)."""
    times = sorted(path.stat().st_mtime for path in (out / "parts").glob("batch_*.json"))
    return (times[-1] - times[0]) * len(times) / max(len(times) - 1, 1)


def timed_run(ranks: int, args: list[str], out: Path, device: str) -> tuple[float, float, dict]:
    """Wall seconds of the command with `ranks` processes, of its measuring, and its report's interventions."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    launcher = ([sys.executable, "-m", "klgap"] if ranks == 1 else
                [str(Path(sys.executable).with_name("torchrun")), "--standalone", f"--nproc_per_node={ranks}", "-m", "klgap"])
    start = time.perf_counter()
    done = subprocess.run([*launcher, *args, "--device", device, "--out", str(out)], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{ranks} rank(s) failed:\n{done.stderr[-3000:]}")
    return wall, measuring_seconds(out), json.loads((out / "report.json").read_text())["interventions"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-gpt2")
    parser.add_argument("--site", default="mlp_out")
    parser.add_argument("--layer", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=262_144)
    parser.add_argument("--context-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--gpus", type=int, default=torch.cuda.device_count(), help="N for the GPU comparison (default: all visible)")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sae = random_sae(root / "sae.safetensors", opts.model, opts.site, opts.layer)
        args = ["replicate", "--model", opts.model, "--site", opts.site, "--layer", str(opts.layer), "--sae", str(sae),
                "--dataset", "random", "--tokens", str(opts.tokens), "--context-len", str(opts.context_len),
                "--batch-size", str(opts.batch_size), "--quiet"]
        print(f"{opts.model} {opts.site} L{opts.layer}, {opts.tokens:,} tokens, context {opts.context_len}, "
              f"batch {opts.batch_size}, default interventions")
        one, m_one, numbers_one = timed_run(1, args, root / "cpu1", "cpu")
        two, m_two, numbers_two = timed_run(2, args, root / "cpu2", "cpu")
        same = numbers_one == numbers_two
        print(f"cpu, 1 thread per rank: 1 rank {one:.1f} s (measuring {m_one:.1f} s), 2 ranks {two:.1f} s "
              f"(measuring {m_two:.1f} s)")
        line = f"speedup_2_ranks={one / two:.2f} measure_speedup_2_ranks={m_one / m_two:.2f} same_numbers={same}"
        if opts.gpus > 1:
            g1, mg1, gpu_one = timed_run(1, args, root / "gpu1", "cuda")
            gn, mgn, gpu_n = timed_run(opts.gpus, args, root / "gpun", "cuda")
            print(f"cuda: 1 GPU {g1:.1f} s (measuring {mg1:.1f} s), {opts.gpus} GPUs {gn:.1f} s (measuring {mgn:.1f} s); "
                  f"same numbers: {gpu_one == gpu_n}")
            line += f" speedup_{opts.gpus}_gpus={g1 / gn:.2f} measure_speedup_{opts.gpus}_gpus={mg1 / mgn:.2f}"
        print(line)


if __name__ == "__main__":
    main()
