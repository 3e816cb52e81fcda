"""Small configurations whose results are committed (tests/data/golden/) from the code before the run-model
refactor: every later version must reproduce them bit for bit (tests/replications/test_golden.py).

Regenerate (only when a change is meant to alter the numbers, and say so in the commit):
    .venv/bin/python -m tests.golden
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import torch

from tests.helpers import run_config

GOLDEN = Path(__file__).resolve().parent / "data" / "golden"
#: the summary fields of a run report that are numbers of the measurement (not provenance, paths or timings)
NUMBER_KEYS = ("n_tokens", "n_contexts", "interventions", "kl_ratio_sae_over_epsilon_random", "comparisons",
               "sae_metrics", "gap", "curve", "single_token", "many_samples")
BASE = {"model": "tiny-llama", "tokens": 6 * 32, "context_len": 32, "batch_size": 2, "device": "cpu",
        "dataset": "sample", "seed": 3}
CASES = {
    "all_tokens": {"mode": "all_tokens", "interventions": ["sae", "sae_norm_corrected", "sae_norm", "epsilon_random",
                                                           "theta_random", "theta_random_xnorm",
                                                           "cosine_matched:cos=0.8,norm_frac=0.9"]},
    "single_token": {"mode": "single_token", "position": 8, "k": 4, "interventions": ["sae", "epsilon_random", "theta_random"]},
    "many_samples": {"mode": "many_samples", "position": 8, "n_samples": 20, "interventions": ["sae", "epsilon_random"]},
}


def make_sae(folder: Path, d: int, site: str, layer: int) -> Path:
    """A fixed random ReLU SAE in the plain safetensors format."""
    from klgap.plan.sites import hook_name
    from klgap_saes import save_safetensors_sae

    gen = torch.Generator().manual_seed(11)
    W_dec = torch.randn(4 * d, d, generator=gen) / d**0.5
    return save_safetensors_sae(folder / f"{site}_L{layer}.safetensors", 2.0 * W_dec.T, W_dec,
                                torch.full((4 * d,), -0.05), torch.zeros(d), hook_name=hook_name(site, layer))


def numbers(report: dict) -> dict:
    return {key: report.get(key) for key in NUMBER_KEYS}


def token_digest(folder: Path) -> dict:
    """A digest of tokens.parquet's measured columns (exact bytes), plus a few values for a readable diff."""
    frame = pd.read_parquet(folder / "tokens.parquet")
    frame = frame.sort_values(["intervention", "context", "position", "draw"], kind="stable")
    cols = ["kl", "ce_delta", "eps", "cos", "x_norm", "x_hat_norm", "l0"]
    digest = hashlib.sha256(frame[cols].to_numpy().tobytes()).hexdigest()
    return {"rows": len(frame), "sha256": digest, "kl_sum": float(frame["kl"].sum())}


def generate(out: Path) -> dict:
    from klgap.plan.config import RunConfig

    sae = make_sae(out, 64, "resid_pre", 1)
    results = {}
    for name, case in CASES.items():
        run_config(RunConfig(**{**BASE, **case, "sae": str(sae)}), out / name, progress=False)
        report = json.loads((out / name / "report.json").read_text())
        results[name] = {"report": numbers(report), "tokens": token_digest(out / name)}
    # a study: two sites of one batch loop sharing each batch's clean forward
    for site in ("mlp_out", "resid_post"):
        make_sae(out, 64, site, 0)
    template = str(out / "{site}_L{layer}.safetensors")
    run_config(RunConfig(**{**BASE, **CASES["all_tokens"], "sae": template, "site": "mlp_out,resid_post", "layer": 0}),
               out / "study")
    study = json.loads((out / "study" / "report.json").read_text())  # the study report as written
    results["study"] = {
        "runs": [{"site": run["site"], "layer": run["layer"], **{k: run.get(k) for k in NUMBER_KEYS if k in run}}
                 for run in study["runs"]],
        "gap_correlation_between_runs": study["gap_correlation_between_runs"],
        "tokens": {p.parent.name: token_digest(p.parent) for p in sorted((out / "study").glob("*/tokens.parquet"))},
    }
    return results


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        results = generate(Path(tmp))
    GOLDEN.mkdir(parents=True, exist_ok=True)
    (GOLDEN / "runs.json").write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN / 'runs.json'}")
