"""Write a replication's expected.json from its committed results (the targets a re-run must reproduce).

    .venv/bin/python scripts/expected_from_results.py  # rewrites the SmolLM2, cross-model and error-decomposition expected.json files

Per site/layer: the all-token KL ratio sae/epsilon_random must fall in the committed 95% context-bootstrap
interval; the single-token ratio at t within 10% of the committed one; the many-samples mean z-score within two
standard errors of the committed one (its spread over contexts); a robustness curve's SAE-equivalent cosine within
0.02. Run it again only when the committed results are replaced (and say so in the commit).
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from klgap.report.expectations import Expected, Target  # noqa: E402
from klgap.report.read import load_report  # noqa: E402
from klgap.report.schema import Report  # noqa: E402

NOTE = ("Targets from the committed results in results/ (scripts/expected_from_results.py): a re-run of the same "
        "file with the same seed reproduces them to float rounding on CPU; the intervals allow another device, "
        "a retrained SAE (training on CPU threads is not bit-reproducible) and the sampling spread of the run.")


def _runs(folder: Path) -> list[Report]:
    report = load_report(folder)
    return [report] if isinstance(report, Report) else [load_report(folder / run.path) for run in report.runs]


def targets(config: str, folder: Path, results: str) -> list[Target]:
    out = []
    for run in _runs(folder / results):
        where = f"{run.site} L{run.layer}"
        common = dict(config=config, site=run.site, layers=[run.layer], source=f"{results}/report.json")
        if run.mode == "all_tokens" and "epsilon_random" in run.comparisons:
            ratio = run.comparisons["epsilon_random"].kl_ratio
            out.append(Target(name=f"{where} KL ratio sae/epsilon_random", quantity="kl_ratio", value=ratio.ratio,
                              interval=(ratio.ci_low, ratio.ci_high), **common))
        if run.curve is not None and run.curve.sae_equivalent_cos:
            cos = next(iter(run.curve.sae_equivalent_cos.values()))
            out.append(Target(name=f"{where} SAE-equivalent cosine", quantity="sae_equivalent_cos", value=cos,
                              abs_tol=0.02, **common))
        if run.single_token is not None:
            sae, base = run.single_token.kl_by_offset["sae"]["0"], run.single_token.kl_by_offset["epsilon_random"]["0"]
            out.append(Target(name=f"{where} single-token KL ratio at t", quantity="kl_ratio_at_offset", offset=0,
                              value=sae / base, rel_tol=0.1, **common))
        if run.many_samples is not None:
            zs = [c.z for c in run.many_samples.per_context if c.z is not None and math.isfinite(c.z)]
            se = statistics.stdev(zs) / math.sqrt(len(zs))
            out.append(Target(name=f"{where} mean z of the SAE's KL among the draws", quantity="z_mean",
                              value=run.many_samples.z_mean, abs_tol=round(2 * se, 3), **common))
    return out


def write(folder: Path, description: str, parts: list[tuple[str, str]], note: str = NOTE) -> None:
    found = [t for config, results in parts for t in targets(config, folder, results)]
    expected = Expected(description=description, note=note, reference="the committed result", targets=found)
    (folder / "expected.json").write_text(expected.model_dump_json(indent=2, exclude_defaults=True) + "\n")
    print(f"wrote {folder / 'expected.json'}: {len(found)} targets")


def main() -> None:
    reps = ROOT / "replications"
    write(reps / "smollm2-135m-offline", "SmolLM2-135M offline replication: the committed results of its three files",
          [("all_tokens.toml", "results/all_tokens"), ("single_token.toml", "results/single_token"),
           ("many_samples.toml", "results/many_samples")])
    write(reps / "smollm2-135m-quickstart", "The quickstart: the committed result of config.toml",
          [("config.toml", "results")])
    write(reps / "cross-model-robustness", "Cross-model robustness curves: the committed results of both models",
          [("smollm2.toml", "results/smollm2"), ("gemma3.toml", "results/gemma3")])
    write(reps / "error-decomposition", "Error decomposition on SmolLM2-135M: the committed result of all_tokens.toml",
          [("all_tokens.toml", "results")])


if __name__ == "__main__":
    main()
