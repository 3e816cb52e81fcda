"""`klgap calibrate`'s table: over seeds, how often each baseline calls each planted error pathological or benign
(klgap/calibrate/testbed.py), written as calibration.json and calibration.md and printed."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from klgap.errors import KlgapError
from klgap.calibrate.testbed import BASELINES, GEOMETRIES, Call, Settings, run_seed
from klgap.report.numbers import finite
from klgap.report.schema import Num, StrictModel

class CalibrationRow(StrictModel):
    """One baseline on one planted geometry over the seeds."""

    geometry: str
    baseline: str
    pathological: float  # share of seeds whose ratio's interval lies above 1
    benign: float  # share of seeds whose interval lies below 1
    median_ratio: Num  # KL(planted)/KL(baseline), median over seeds


class TrainedSae(StrictModel):
    """One seed's SAE trained on the testbed's activations."""

    seed: int
    explained_variance: Num
    error_in_feature_span: Num  # share of its error's energy in the features' span (where the readout is sensitive)


class Calibration(StrictModel):
    """The testbed's sizes, its seeds and the table (false-positive rate: ``random`` called pathological; power:
    ``aligned`` called pathological; ``sae``: each seed's trained SAE's own error, when trained)."""

    settings: dict[str, float | int]
    seeds: list[int]
    rows: list[CalibrationRow]
    saes: list[TrainedSae]


def calibrate(seeds: list[int], settings: Settings = Settings()) -> Calibration:
    """Every seed's calls, as the table's rows."""
    if not seeds:
        raise KlgapError("--seeds must be at least 1")
    calls: list[Call] = []
    saes: list[TrainedSae] = []
    for seed in seeds:
        found, facts = run_seed(settings, seed)
        calls += found
        if facts is not None:
            saes.append(TrainedSae(seed=seed, explained_variance=finite(facts.explained_variance),
                                   error_in_feature_span=finite(facts.error_in_feature_span)))
    rows = []
    for geometry in (*GEOMETRIES, "sae") if saes else GEOMETRIES:
        for name in BASELINES:
            mine = [c for c in calls if c.geometry == geometry and c.baseline == name]
            ratios = np.array([c.ratio for c in mine], dtype=np.float64)
            ratios = ratios[np.isfinite(ratios)]
            rows.append(CalibrationRow(
                geometry=geometry, baseline=name,
                pathological=sum(c.verdict == "pathological" for c in mine) / len(mine),
                benign=sum(c.verdict == "benign" for c in mine) / len(mine),
                median_ratio=finite(float(np.median(ratios))) if ratios.size else None))
    return Calibration(settings=dataclasses.asdict(settings), seeds=seeds, rows=rows, saes=saes)


def markdown(found: Calibration) -> str:
    """The table as markdown: per baseline, its false-positive rate, power and calls on the harmless error."""
    lines = [f"# klgap calibrate: the baselines against planted errors ({len(found.seeds)} seeds)", "",
             "Readout model with thresholded read-offs of known features; planted errors of matched size "
             f"(‖e‖ = {found.settings['error_frac']}·‖x‖). A call is the 95% context-bootstrap interval of "
             "KL(error)/KL(baseline) above 1 (pathological) or below 1 (benign).", "",
             "| baseline | false-positive rate (random called pathological) | power (aligned called pathological) | "
             "orthogonal called benign | median ratio aligned / orthogonal / random |",
             "|---|---|---|---|---|"]
    by = {(r.geometry, r.baseline): r for r in found.rows}
    for name in BASELINES:
        medians = " / ".join("—" if by[g, name].median_ratio is None or math.isnan(by[g, name].median_ratio)
                             else f"{by[g, name].median_ratio:.3g}" for g in GEOMETRIES)
        lines.append(f"| {name} | {by['random', name].pathological:.2f} | {by['aligned', name].pathological:.2f} | "
                     f"{by['orthogonal', name].benign:.2f} | {medians} |")
    if found.saes:
        lines += ["", f"Trained SAEs (sae_lens's toy trainer, {found.settings['sae_samples']} activations): median "
                  f"explained variance {_median([s.explained_variance for s in found.saes]):.3g}, median share of the "
                  f"error's energy in the features' span {_median([s.error_in_feature_span for s in found.saes]):.3g} "
                  "(where the readout is sensitive). Each baseline on the SAE's own error:", "",
                  "| baseline | called pathological | called benign | median ratio |", "|---|---|---|---|"]
        lines += [f"| {name} | {by['sae', name].pathological:.2f} | {by['sae', name].benign:.2f} | "
                  f"{by['sae', name].median_ratio:.3g} |" for name in BASELINES]
    return "\n".join(lines) + "\n"


def _median(values: list[float | None]) -> float:
    kept = [v for v in values if v is not None]
    return float(np.median(kept)) if kept else math.nan


def write(found: Calibration, out: Path) -> list[Path]:
    """calibration.json and calibration.md in `out`: a new or empty folder, or one a calibration wrote."""
    if out.exists() and any(out.iterdir()) and not (out / "calibration.json").exists():
        raise KlgapError(f"--out {str(out)!r} holds files klgap calibrate did not write; give a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "calibration.json", out / "calibration.md"]
    paths[0].write_text(found.model_dump_json(indent=2) + "\n")
    paths[1].write_text(markdown(found))
    return paths


__all__ = ["Calibration", "CalibrationRow", "TrainedSae", "calibrate", "markdown", "write"]
