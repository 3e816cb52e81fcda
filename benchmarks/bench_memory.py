"""Peak memory of building a run's report against the number of tokens: parts (and run.json) synthesised at two
sizes, the report built from each folder in a fresh process (klgap.report.build.build_report).

Measuring streams per-batch parts to disk, so its memory does not depend on the number of tokens; this measures
the other half, reducing the parts to what the report holds. No model: the parts are written directly, with the
columns, dtypes and row layout `klgap/job/modes.py` gives them (`table`, one block of rows per intervention, written
by `RunDir.write_part`), KL log-normal, token ids Zipf-distributed over a GPT-2-sized vocabulary. Each size's parts
are written by one subprocess and read by another, which reports its own peak RSS (ru_maxrss). The last line is
machine-readable:

    .venv/bin/python benchmarks/bench_memory.py                # 20,000 and 2,000,000 tokens, 6 interventions
    .venv/bin/python benchmarks/bench_memory.py --large 200000  # quicker

`report_rss_ratio` = peak RSS at the large size / at the small size (target ≤ 1.3).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

INTERVENTIONS = ["sae", "sae_norm_corrected", "sae_norm", "epsilon_random", "theta_random", "theta_random_xnorm"]

WRITE = r"""
import sys
from pathlib import Path
import numpy as np
import pandas as pd
from klgap.job.folder import RunDir

out, n_tokens, context_len, batch_size, names = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5].split(",")
rng = np.random.default_rng(0)
n_pos = context_len - 1  # position 0 is neither patched nor measured
n_contexts = -(-n_tokens // n_pos)
rundir, d, vocab = RunDir(out), 64, 50257
for index in range(-(-n_contexts // batch_size)):
    contexts = np.arange(index * batch_size, min((index + 1) * batch_size, n_contexts))
    n = contexts.size * n_pos
    f32 = lambda a: a.astype(np.float32)
    base = {
        "context": np.repeat(contexts, n_pos).astype(np.int64),
        "position": np.tile(np.arange(1, context_len), contexts.size).astype(np.int64),
        "token_id": np.minimum(rng.zipf(1.2, n), vocab - 1).astype(np.int64),
        "eps": f32(rng.lognormal(0, 0.3, n)), "cos": f32(rng.uniform(0.5, 1.0, n)), "x_norm": f32(rng.lognormal(1, 0.2, n)),
        "x_hat_norm": f32(rng.lognormal(1, 0.2, n)), "l0": f32(rng.integers(5, 80, n)),
    }
    base["offset"] = base["position"]
    frames = [pd.DataFrame({**base, "intervention": name, "draw": -1, "kl": f32(rng.lognormal(-4 + 0.1 * j, 1.0, n)),
                            "ce_delta": f32(rng.normal(0.01, 0.05, n))}) for j, name in enumerate(names)]
    side = {"n": n, "n_nonfinite_acts": 0, "sum_x": rng.normal(0, 1, d).tolist(), "sum_sq_x": float(n * d),
            "sum_sq_err": float(n * d * 0.3)}
    rundir.write_part(index, pd.concat(frames, ignore_index=True), side)

# run.json, as the batch loop writes it when a job opens (klgap/job/batches.py) (what the report needs besides the parts)
from klgap.report.provenance import provenance
from klgap.job.record import InterventionRef, RunRecord, write_record
from klgap.report.schema import SCHEMA_VERSION, ModuleRef, PluginRef, SAEInfo

plugin = PluginRef(plugin="bench", version=None)
write_record(out, RunRecord(
    schema_version=SCHEMA_VERSION, model="synthetic", site="mlp_out", layer=0, hook_name="blocks.0.hook_mlp_out",
    module=ModuleRef(path="h.0.mlp", io="output", index=None),
    sae=SAEInfo(source="synthetic", hook_name="blocks.0.hook_mlp_out", architecture="standard", d_in=d, d_sae=8 * d),
    mode="all_tokens", context_len=context_len, first_position="excluded (not patched, not measured)",
    centered_activations=False, interventions=[InterventionRef(name=n, spec=n, plugin=plugin) for n in names],
    n_contexts=n_contexts, n_batches=-(-n_contexts // batch_size), notes=[], config={"tokens": n_tokens}, seed=0,
    device="cpu", dtype="float32", dataset="synthetic", plugins={}, provenance=provenance()))
"""

BUILD = r"""
import json, resource, sys, time
from pathlib import Path


def build(run: Path, names: list[str]) -> None:
    # The one thing measured: the whole report of a run folder, from its run.json and parts (what
    # `klgap merge` / `klgap report` / the end of `klgap replicate` do).
    from klgap.job.record import read_record
    from klgap.report.build import build_report
    from klgap.job.folder import RunDir

    build_report(read_record(run), RunDir(run))


import klgap.report.build, klgap.job.record, klgap.job.folder  # the imports' memory is part of the baseline, not of the report
imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.perf_counter()
build(Path(sys.argv[1]), sys.argv[2].split(","))
print(json.dumps({"import_mb": imported, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": time.perf_counter() - start}))
"""


def measure(n_tokens: int, context_len: int, batch_size: int, names: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        subprocess.run([sys.executable, "-c", WRITE, str(run), str(n_tokens), str(context_len), str(batch_size),
                        ",".join(names)], check=True)
        done = subprocess.run([sys.executable, "-c", BUILD, str(run), ",".join(names)], capture_output=True, text=True,
                              check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", type=int, default=20_000)
    parser.add_argument("--large", type=int, default=2_000_000)
    parser.add_argument("--context-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--interventions", type=int, default=len(INTERVENTIONS))
    args = parser.parse_args()
    names = INTERVENTIONS[: args.interventions]
    small = measure(args.small, args.context_len, args.batch_size, names)
    large = measure(args.large, args.context_len, args.batch_size, names)
    for label, n, m in (("small", args.small, small), ("large", args.large, large)):
        print(f"{label:5} {n:>9} tokens x {len(names)} interventions: peak RSS {m['peak_mb']:.0f} MB "
              f"(after imports {m['import_mb']:.0f} MB), {m['seconds']:.1f} s")
    print(f"report_rss_ratio={large['peak_mb'] / small['peak_mb']:.3f} peak_rss_small_mb={small['peak_mb']:.0f} "
          f"peak_rss_large_mb={large['peak_mb']:.0f} seconds_large={large['seconds']:.1f}")


if __name__ == "__main__":
    main()
