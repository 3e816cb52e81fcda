"""Small configurations whose results are committed (tests/data/golden/) from the code before the run-model
refactor; tests/replications/test_golden.py checks every later version against them, in two steps that each hold
on any CPU (tests/close.py says which tolerance and why):

1. the measurement: a fresh run's per-batch parts (per-token float32 KL, ΔCE, norms, cosines, L0 and each part's
   float64 sums) equal the committed parts (``parts/``) within float32 rounding; token ids, contexts, positions,
   draws and counts exactly;
2. the statistics: the reports built from the *committed* parts are the committed numbers (``runs.json``) within
   rel 1e-12, and their token tables are the ones whose digests ``runs.json`` recorded, bit for bit.

A fresh run's own report is never compared with runs.json directly: under another kernel family its per-token values
differ in the last float32 bits and every statistic inherits that (~1e-4 relative for a ΔCE median); step 1 bounds
that difference where it arises, step 2 checks the statistics at float64 precision.

Regenerate (only when a change is meant to alter the numbers, and say so in the commit):
    .venv/bin/python -m tests.golden
How close a fresh run comes to the committed parts (e.g. under ``ATEN_CPU_CAPABILITY=default``):
    .venv/bin/python -m tests.golden --margins
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
from pathlib import Path

import pandas as pd
import torch

from tests.close import (
    EXACT, FLOAT32_BOUNDED, FLOAT32_CE, FLOAT32_KL, FLOAT32_VALUE, Margin, Tolerance, assert_close_tree, frame_tree,
)
from tests.helpers import run_config

GOLDEN = Path(__file__).resolve().parent / "data" / "golden"
PARTS = GOLDEN / "parts"
#: side-record fields added after the committed parts were written (schema 0.7.0: sae_lens's legacy explained variance)
NEWER_SIDE_FIELDS = frozenset({"sum_ev_legacy"})
#: per-token columns added after the committed parts were written (the clean CE, once per token; checked against an
#: independent Hugging Face forward in tests/core/test_clean_ce.py)
NEWER_PART_COLUMNS = frozenset({"ce_clean"})
#: the summary fields of a run report that are numbers of the measurement (not provenance, paths or timings)
NUMBER_KEYS = ("n_tokens", "n_contexts", "interventions", "kl_ratio_sae_over_epsilon_random", "comparisons",
               "sae_metrics", "gap", "curve", "single_token", "many_samples")
BASE = {"model": "tiny-llama", "tokens": 6 * 32, "context_len": 32, "batch_size": 2, "device": "cpu",
        "dataset": "sample:all", "seed": 3}  # the whole sample, as a bare `sample` read when these were committed
CASES = {
    "all_tokens": {"mode": "all_tokens", "interventions": ["sae", "sae_norm_corrected", "sae_norm", "epsilon_random",
                                                           "theta_random", "theta_random_xnorm",
                                                           "cosine_matched:cos=0.8,norm_frac=0.9"]},
    "single_token": {"mode": "single_token", "position": 8, "k": 4, "interventions": ["sae", "epsilon_random", "theta_random"]},
    "many_samples": {"mode": "many_samples", "position": 8, "n_samples": 20, "interventions": ["sae", "epsilon_random"]},
}
STUDY_SITES = ("mlp_out", "resid_post")
#: every run folder measured, relative to the output folder
RUN_FOLDERS = (*CASES, *(f"study/{site}_L00" for site in STUDY_SITES))
#: the per-token columns of a part, each float column with its tolerance (tests/close.py); the others are exact
TOKEN_TOLERANCE = {"kl": FLOAT32_KL, "ce_delta": FLOAT32_CE, "cos": FLOAT32_BOUNDED, "eps": FLOAT32_VALUE,
                   "x_norm": FLOAT32_VALUE, "x_hat_norm": FLOAT32_VALUE, "l0": FLOAT32_VALUE}


def make_sae(folder: Path, d: int, site: str, layer: int) -> Path:
    """A fixed random ReLU SAE in the plain safetensors format."""
    from klgap.plan.sites import hook_name
    from klgap_saes import save_safetensors_sae

    gen = torch.Generator().manual_seed(11)
    W_dec = torch.randn(4 * d, d, generator=gen) / d**0.5
    return save_safetensors_sae(folder / f"{site}_L{layer}.safetensors", 2.0 * W_dec.T, W_dec,
                                torch.full((4 * d,), -0.05), torch.zeros(d), hook_name=hook_name(site, layer))


#: numbers klgap reports that the committed ones predate (schema 0.7.0), left out of the comparison: fvu is
#: 1 − explained_variance (compared), the legacy explained variance needs the newer side field (tests/core/
#: test_agreement_sae_lens.py checks both against sae_lens's code), and so do the anisotropy numbers
#: (tests/core/test_anisotropy.py checks them against numpy)
NEWER_NUMBERS = {"sae_metrics": frozenset({
    "explained_variance_legacy", "fvu", "mean_offset_share", "top_pc_share", "explained_variance_top_pc_removed",
    "explained_variance_top_pcs_removed", "top_pcs_removed_min", "top_pcs_removed_max"})}


def _known(key: str, value):
    newer = NEWER_NUMBERS.get(key)
    return value if newer is None or not isinstance(value, dict) else {k: v for k, v in value.items() if k not in newer}


def numbers(report: dict) -> dict:
    return {key: _known(key, report.get(key)) for key in NUMBER_KEYS}


def token_digest(folder: Path) -> dict:
    """A digest of tokens.parquet's measured columns (exact bytes), plus a few values for a readable diff."""
    frame = pd.read_parquet(folder / "tokens.parquet")
    frame = frame.sort_values(["intervention", "context", "position", "draw"], kind="stable")
    cols = ["kl", "ce_delta", "eps", "cos", "x_norm", "x_hat_norm", "l0"]
    digest = hashlib.sha256(frame[cols].to_numpy().tobytes()).hexdigest()
    return {"rows": len(frame), "sha256": digest, "kl_sum": float(frame["kl"].sum())}


def _study_config(out: Path):
    from klgap.plan.config import RunConfig

    return RunConfig(**{**BASE, **CASES["all_tokens"], "sae": str(out / "{site}_L{layer}.safetensors"),
                        "site": ",".join(STUDY_SITES), "layer": 0})


def measure(out: Path) -> None:
    """Every case into ``out/<case>``, and a study of two sites sharing each batch's clean forward into
    ``out/study``."""
    from klgap.plan.config import RunConfig

    out.mkdir(parents=True, exist_ok=True)
    sae = make_sae(out, 64, "resid_pre", 1)
    for name, case in CASES.items():
        run_config(RunConfig(**{**BASE, **case, "sae": str(sae)}), out / name)
    for site in STUDY_SITES:
        make_sae(out, 64, site, 0)
    run_config(_study_config(out), out / "study")


def numbers_of(out: Path) -> dict:
    """The committed-number view (runs.json's shape) of the folders :func:`measure` writes."""
    results = {}
    for name in CASES:
        report = json.loads((out / name / "report.json").read_text())
        results[name] = {"report": numbers(report), "tokens": token_digest(out / name)}
    study = json.loads((out / "study" / "report.json").read_text())  # the study report as written
    results["study"] = {
        "runs": [{"site": run["site"], "layer": run["layer"], **{k: _known(k, run.get(k)) for k in NUMBER_KEYS if k in run}}
                 for run in study["runs"]],
        "gap_correlation_between_runs": study["gap_correlation_between_runs"],
        "tokens": {p.parent.name: token_digest(p.parent) for p in sorted((out / "study").glob("*/tokens.parquet"))},
    }
    return json.loads(json.dumps(results, sort_keys=True))  # the same JSON round trip as the file


def generate(out: Path) -> dict:
    measure(out)
    return numbers_of(out)


def report_committed_parts(fresh: Path, out: Path) -> dict:
    """The numbers klgap reports from the committed parts: each of `fresh`'s run folders (as :func:`measure` wrote
    them: its run.json) copied to `out` with its parts replaced by the committed ones, its report built again (no
    model), and the study report over them."""
    from klgap.job.finish import report_folder
    from klgap.report.study import write_study

    shutil.copytree(fresh, out)
    for folder in RUN_FOLDERS:
        shutil.rmtree(out / folder / "parts")
        shutil.copytree(PARTS / folder, out / folder / "parts")
        report_folder(out / folder)
    write_study(_study_config(out), [out / "study" / f"{site}_L00" for site in STUDY_SITES], out / "study")
    return numbers_of(out)


def _side_tolerance(side: dict):
    """A part's side record: its sums of float32 activations in float64. A sum's rounding is bounded by the
    values' relative rounding times sum |x| <= sqrt(n * sum x^2) (Cauchy-Schwarz), so sum_x's components (which
    cancel towards 0) get that as an absolute floor; sum_sq_x and sum_sq_err (sums of squares) are relative."""
    scale = math.sqrt(side["n"] * side["sum_sq_x"])
    sum_x = Tolerance(rel=FLOAT32_VALUE.rel, abs=FLOAT32_VALUE.rel * scale)
    return lambda path: sum_x if path[-2 if isinstance(path[-1], int) else -1] == "sum_x" else FLOAT32_VALUE


def compare_parts(fresh: Path, committed: Path = PARTS, folders: tuple[str, ...] = RUN_FOLDERS,
                  strict: bool = True) -> dict[str, Margin]:
    """Assert that every run folder's parts under `fresh` equal the committed ones (tolerances: tests/close.py);
    the largest share of its tolerance each field used, over every folder (``strict=False``: floats outside their
    tolerance are measured, not refused)."""
    margins: dict[str, Margin] = {}
    for folder in folders:
        want_dir, got_dir = committed / folder, fresh / folder / "parts"
        names = sorted(p.name for p in want_dir.iterdir())
        assert sorted(p.name for p in got_dir.glob("batch_*")) == names, (folder, names)
        for name in names:
            where = (folder, name)
            if name.endswith(".parquet"):
                got, want = (frame_tree(pd.read_parquet(d / name)) for d in (got_dir, want_dir))
                tolerance = lambda path: TOKEN_TOLERANCE.get(path[-2], EXACT)  # noqa: E731
            else:
                got, want = (json.loads((d / name).read_text()) for d in (got_dir, want_dir))
                tolerance = _side_tolerance(want)
            # fields klgap writes that the committed parts predate (listed, never regenerated): not compared
            newer = NEWER_SIDE_FIELDS | NEWER_PART_COLUMNS
            assert got.keys() - newer == want.keys(), \
                f"{folder}/{name}: fields differ: {sorted((got.keys() - newer) ^ want.keys())}"
            for key in want:
                margin = assert_close_tree(got[key], want[key], (*where, key), tolerance, strict=strict)
                margins.setdefault(key, Margin()).add(margin.used, margin.path)
    return margins


def _regenerate() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        results = generate(Path(tmp))
        shutil.rmtree(PARTS, ignore_errors=True)
        for folder in RUN_FOLDERS:
            shutil.copytree(Path(tmp) / folder / "parts", PARTS / folder)
    (GOLDEN / "runs.json").write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN / 'runs.json'} and {PARTS}")


def _print_margins() -> None:
    import tempfile

    from tests.close import FLOAT64_STATISTIC

    with tempfile.TemporaryDirectory() as tmp:
        measure(Path(tmp) / "fresh")
        for field, margin in sorted(compare_parts(Path(tmp) / "fresh", strict=False).items()):
            print(f"parts {field:12s} {margin.used:6.1%} of its tolerance at {'/'.join(map(str, margin.path))}")
        rebuilt = report_committed_parts(Path(tmp) / "fresh", Path(tmp) / "committed")
    expected = json.loads((GOLDEN / "runs.json").read_text())
    margin = assert_close_tree(rebuilt, expected, tolerance=FLOAT64_STATISTIC, strict=False)
    print(f"statistics   {margin.used:6.1%} of rel {FLOAT64_STATISTIC.rel:g} at {'/'.join(map(str, margin.path))}")


if __name__ == "__main__":
    _print_margins() if "--margins" in sys.argv[1:] else _regenerate()
