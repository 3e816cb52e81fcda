"""bfloat16 against float32 as a user runs it: ``klgap replicate --dtype bfloat16`` vs ``--dtype float32``.

The same command (SmolLM2-135M, mlp_out of layer 15, klgap's default interventions and tokens) in both dtypes,
each a fresh process into a fresh folder, alternating, timed whole (start, imports, load, precision check,
measuring, report). Prints both headline ratios KL(sae)/KL(epsilon_random) and their relative difference (target:
within 1%), the bfloat16 run's precision check, and the speed-up of the whole command.

The SAE: --sae, else ~/.cache/klgap/saes/smollm2-135m/blocks.15.hook_mlp_out, trained there once if missing
(``klgap train-sae --model smollm2-135m --site mlp_out --layer 15 --tokens 20000``).

    .venv/bin/python benchmarks/bench_precision.py
    .venv/bin/python benchmarks/bench_precision.py --device cuda --repeats 2

The last line is machine-readable: ratio_rel_diff=R speedup_bf16=S precision_check_passed=P
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_SAE = Path.home() / ".cache" / "klgap" / "saes" / "smollm2-135m" / "blocks.15.hook_mlp_out"


def klgap(*args: str) -> list[str]:
    return [sys.executable, "-m", "klgap", *args]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--site", default="mlp_out")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--sae", default=None)
    parser.add_argument("--tokens", type=int, default=None, help="default: klgap replicate's own (8192)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    sae = Path(args.sae) if args.sae else DEFAULT_SAE
    if not sae.exists():
        print(f"training an SAE into {sae} (once)")
        subprocess.run(klgap("train-sae", "--model", args.model, "--site", args.site, "--layer", str(args.layer),
                             "--tokens", "20000", "--out", str(sae), "--quiet"), check=True)
    common = ["replicate", "--model", args.model, "--sae", str(sae), "--site", args.site, "--layer", str(args.layer),
              "--device", args.device] + (["--tokens", str(args.tokens)] if args.tokens else [])
    times: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    reports: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            order = ["float32", "bfloat16"] if repeat % 2 == 0 else ["bfloat16", "float32"]
            for dtype in order:
                out = Path(tmp) / f"{dtype}-{repeat}"
                start = time.perf_counter()
                done = subprocess.run(klgap(*common, "--dtype", dtype, "--out", str(out)), capture_output=True, text=True)
                seconds = time.perf_counter() - start
                if done.returncode != 0:
                    raise SystemExit(f"klgap replicate --dtype {dtype} failed:\n{done.stderr[-3000:]}")
                times[dtype].append(seconds)
                reports[dtype] = json.loads((out / "report.json").read_text())
                print(f"repeat {repeat + 1}: {dtype:8s} {seconds:7.1f} s")
    ratio32 = reports["float32"]["kl_ratio_sae_over_epsilon_random"]
    ratio16 = reports["bfloat16"]["kl_ratio_sae_over_epsilon_random"]
    diff = abs(ratio16 / ratio32 - 1)
    check = reports["bfloat16"]["precision"]
    t32, t16 = statistics.median(times["float32"]), statistics.median(times["bfloat16"])
    n = reports["float32"]["n_tokens"]
    print(f"{args.model} {args.site} L{args.layer}, {n} tokens, {len(reports['float32']['interventions'])} interventions: "
          f"float32 {t32:.1f} s, bfloat16 {t16:.1f} s (whole command, medians of {args.repeats})")
    print(f"headline ratio: float32 {ratio32:.5f}, bfloat16 {ratio16:.5f} (relative difference {diff:.2%}; target <= 1%)")
    for name in reports["float32"]["interventions"]:
        a, b = reports["float32"]["interventions"][name]["kl_mean"], reports["bfloat16"]["interventions"][name]["kl_mean"]
        print(f"  {name:22s} mean KL float32 {a:.6g} bfloat16 {b:.6g} ({abs(b / a - 1):.2%})")
    print(f"precision check (first {check['n_contexts']} contexts): passed={check['passed']}, per-token |dKL| max "
          f"{check['kl_abs_diff_max']:.2g}, p99 {check['kl_abs_diff_p99']:.2g}, mean KL moved by at most "
          f"{check['kl_mean_rel_change_max']:.2%}, ratio moved by {check['ratio_rel_change'] or float('nan'):.2%}")
    print(f"ratio_rel_diff={diff:.4f} speedup_bf16={t32 / t16:.2f} precision_check_passed={check['passed']}")


if __name__ == "__main__":
    main()
