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


class Calibration(StrictModel):
    """The testbed's sizes, its seeds and the table (false-positive rate: ``random`` called pathological; power:
    ``aligned`` called pathological)."""

    settings: dict[str, float | int]
    seeds: list[int]
    rows: list[CalibrationRow]


def calibrate(seeds: list[int], settings: Settings = Settings()) -> Calibration:
    """Every seed's calls, as the table's rows."""
    if not seeds:
        raise KlgapError("--seeds must be at least 1")
    calls: list[Call] = [call for seed in seeds for call in run_seed(settings, seed)]
    rows = []
    for geometry in GEOMETRIES:
        for name in BASELINES:
            mine = [c for c in calls if c.geometry == geometry and c.baseline == name]
            ratios = np.array([c.ratio for c in mine], dtype=np.float64)
            ratios = ratios[np.isfinite(ratios)]
            rows.append(CalibrationRow(
                geometry=geometry, baseline=name,
                pathological=sum(c.verdict == "pathological" for c in mine) / len(mine),
                benign=sum(c.verdict == "benign" for c in mine) / len(mine),
                median_ratio=finite(float(np.median(ratios))) if ratios.size else None))
    return Calibration(settings=dataclasses.asdict(settings), seeds=seeds, rows=rows)


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
    return "\n".join(lines) + "\n"


def write(found: Calibration, out: Path) -> list[Path]:
    """calibration.json and calibration.md in `out`: a new or empty folder, or one a calibration wrote."""
    if out.exists() and any(out.iterdir()) and not (out / "calibration.json").exists():
        raise KlgapError(f"--out {str(out)!r} holds files klgap calibrate did not write; give a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "calibration.json", out / "calibration.md"]
    paths[0].write_text(found.model_dump_json(indent=2) + "\n")
    paths[1].write_text(markdown(found))
    return paths


__all__ = ["Calibration", "CalibrationRow", "calibrate", "markdown", "write"]
