"""`klgap validate`: what klgap writes, checked for its shape and its values. The kind of file comes from its
content (``kind``): a run report (report.json; a `klgap curve` run's holds its robustness curve), a study report,
or a comparison (compare.json, :mod:`klgap.report.compare_schema`); each against its own schema
(:func:`klgap.report.read.validate_report`, :func:`klgap.report.compare_schema.validate_compare`), then its values.

A report that matches the schema can still say something klgap never writes: a NaN literal (klgap writes
null), a negative KL, a p-value outside [0, 1], an interval that does not contain its estimate, counts that
disagree, or a headline ratio that is not mean KL(sae) / mean KL(epsilon_random). :func:`value_problem` walks
the JSON in document order and names the JSON path of the first such value.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from klgap.report.compare_schema import CompareFile
from klgap.errors import KlgapError
from klgap.report.schema import BASELINE, Report, StudyReport
from klgap.report.read import validate_report

#: KL values (means, medians, quantiles, interval ends, per-context values, compare.json's columns): never below 0
KL_KEYS = frozenset({"kl_mean", "kl_median", "kl_p999", "kl_ci_low", "kl_ci_high", "sae_kl", "draw_mean", "kl_sae",
                     f"kl_{BASELINE}"})
#: cosines (a curve's grid, the SAE's own, the noise's cosine at the SAE's KL): within [-1, 1]
COS_KEYS = frozenset({"cos", "cos_mean", "sae_cos", "sae_equivalent_cos"})
#: probabilities and fractions: within [0, 1]
UNIT_KEYS = frozenset({"p_value", "p_holm", "frac_z_above_2", "frac_tokens_gap_positive"})
#: (estimate, low, high) of the intervals a report holds
INTERVALS = (("ratio", "ci_low", "ci_high"), ("kl_mean", "kl_ci_low", "kl_ci_high"),
             ("ratio", "ratio_ci_low", "ratio_ci_high"))
KL_TOLERANCE = 1e-6  # per-token KLs are computed in float32: a mean of exact zeros can land a hair below 0
RATIO_RTOL = 1e-5  # the headline ratio is a ratio of float64 means; kl_mean is rounded from float32 sums


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _walk(node: Any, path: str) -> Iterator[tuple[str, Any]]:
    """Every (JSON path, node) in document order: ``interventions.sae.kl_mean``, ``runs[0].layer``."""
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


def _key(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def _close(a: float, b: float, rtol: float) -> bool:
    return math.isclose(a, b, rel_tol=rtol, abs_tol=1e-12)


def _leaf_problem(path: str, value: Any, under_kl_by_offset: bool) -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value} is not a JSON number (klgap writes null for a value it could not compute)"
    if not _number(value):
        return None
    key = _key(path)
    if (key in KL_KEYS or under_kl_by_offset) and value < -KL_TOLERANCE:
        return f"KL {value} is negative (a KL divergence is ≥ 0)"
    if key in UNIT_KEYS and not 0.0 <= value <= 1.0:
        return f"{value} lies outside [0, 1]"
    if key == "rho" and not -1.0 <= value <= 1.0:
        return f"a correlation of {value} lies outside [-1, 1]"
    if key in COS_KEYS and not -1.0 - 1e-6 <= value <= 1.0 + 1e-6:
        return f"a cosine of {value} lies outside [-1, 1]"
    return None


def _interval_problem(path: str, node: dict[str, Any]) -> tuple[str, str] | None:
    for estimate, low, high in INTERVALS:
        values = [node.get(k) for k in (estimate, low, high)]
        if not all(_number(v) for v in values):
            continue
        x, lo, hi = (float(v) for v in values)
        slack = 1e-9 * max(1.0, abs(x))
        if not lo - slack <= x <= hi + slack:
            where = f"{path}.{estimate}" if path else estimate
            return where, f"{x} lies outside its interval [{lo}, {hi}] ({low}, {high})"
    return None


def _summary_problem(path: str, node: dict[str, Any]) -> tuple[str, str] | None:
    """A run report or a study row: its counts agree, and its headline ratio is the ratio of its means."""
    prefix = f"{path}." if path else ""
    n_tokens, n_contexts = node.get("n_tokens"), node.get("n_contexts")
    for name, stats in node["interventions"].items():
        if not isinstance(stats, dict):
            continue
        finite, nonfinite = stats.get("n_tokens"), stats.get("n_nonfinite")  # KL values used, and left out
        if _number(finite) and _number(nonfinite) and (min(finite, nonfinite) < 0 or (
                _number(n_tokens) and finite + nonfinite != n_tokens)):
            return (f"{prefix}interventions.{name}.n_tokens",
                    f"{finite} (+ {nonfinite} non-finite) disagrees with the report's n_tokens {n_tokens}")
    for name, comparison in node.get("comparisons", {}).items():
        for part in ("kl_ratio", "ce_delta_ratio", "wilcoxon_kl"):
            count = comparison.get(part, {}).get("n_contexts") if isinstance(comparison, dict) else None
            if _number(count) and _number(n_contexts) and not 0 <= count <= n_contexts:
                return (f"{prefix}comparisons.{name}.{part}.n_contexts",
                        f"{count} is more than the report's {n_contexts} contexts")
    headline = node.get(f"kl_ratio_sae_over_{BASELINE}")
    sae, base = (node["interventions"].get(k, {}).get("kl_mean") for k in ("sae", BASELINE))
    if _number(headline) and _number(sae) and _number(base) and base > 0:
        expected = sae / base
        if not _close(float(headline), expected, RATIO_RTOL):
            return (f"{prefix}kl_ratio_sae_over_{BASELINE}",
                    f"{headline} is not interventions.sae.kl_mean / interventions.{BASELINE}.kl_mean = {expected:.6g}")
    ratio = node.get("comparisons", {}).get(BASELINE, {}).get("kl_ratio", {}).get("ratio")
    if _number(headline) and _number(ratio) and not _close(float(headline), float(ratio), RATIO_RTOL):
        return (f"{prefix}kl_ratio_sae_over_{BASELINE}",
                f"{headline} disagrees with comparisons.{BASELINE}.kl_ratio.ratio = {ratio}")
    return None


def _compare_row_problem(path: str, node: dict[str, Any]) -> tuple[str, str] | None:
    """A compare.json row: its ratio is its KL(sae) / KL(baseline), as its run's headline ratio is."""
    ratio, sae, base = node.get("ratio"), node.get("kl_sae"), node.get(f"kl_{BASELINE}")
    if _number(ratio) and _number(sae) and _number(base) and base > 0 and not _close(ratio, sae / base, RATIO_RTOL):
        return f"{path}.ratio", f"{ratio} is not kl_sae / kl_{BASELINE} = {sae / base:.6g}"
    return None


def value_problem(data: Any) -> tuple[str, str] | None:
    """(JSON path, what is wrong) of the first value in a report's JSON that klgap would never write (single
    values first, then values that disagree); None if every value is sound. `data` is the parsed JSON (it
    already matches the schema)."""
    for path, node in _walk(data, ""):  # single values first: a NaN literal is named as itself
        problem = _leaf_problem(path, node, ".kl_by_offset." in f".{path}")
        if problem:
            return path or "(top)", problem
    for path, node in _walk(data, ""):  # then values that must agree with each other
        if isinstance(node, dict):
            found = _interval_problem(path, node)
            if found:
                return found
            if isinstance(node.get("interventions"), dict) and "n_tokens" in node:
                found = _summary_problem(path, node)
                if found:
                    return found
            if "kl_sae" in node and "label" in node:
                found = _compare_row_problem(path, node)
                if found:
                    return found
    return None


@dataclass(frozen=True)
class Validated:
    """A file `klgap validate` found sound: where it is, what it is, and its typed content."""

    file: Path
    model: Report | StudyReport | CompareFile

    @property
    def what(self) -> str:
        """``report``, ``report with a robustness curve (11 points)``, ``study report (4 runs)``, ``comparison (8 runs)``."""
        model = self.model
        if isinstance(model, CompareFile):
            return f"comparison (compare.json, {len(model.runs)} runs)"
        if isinstance(model, StudyReport):
            return f"study report ({len(model.runs)} runs)"
        return f"report with a robustness curve ({len(model.curve.points)} points)" if model.curve else "report"


def _file_of(path: str | Path) -> Path:
    """`path`, or the report.json (else compare.json) of a folder."""
    path = Path(path)
    if not path.is_dir():
        return path
    for name in ("report.json", "compare.json"):
        if (path / name).is_file():
            return path / name
    raise KlgapError(f"{str(path)!r} holds no report.json or compare.json; klgap validate reads a run or study folder, "
                     "a `klgap compare` folder, or one of those files")


def validate_any(path: str | Path) -> Validated:
    """A report.json, compare.json (or the folder of one) checked against its own schema, then its values; the kind
    is read from the file's ``kind``. KlgapError naming the JSON path of the first bad value, or why the file is
    not one klgap validates."""
    file = _file_of(path)
    if not file.is_file():
        raise KlgapError(f"no file at {str(file)!r}")
    try:
        data = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise KlgapError(f"{str(file)!r} is not valid JSON: {exc}") from exc
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind == "compare":
        from klgap.report.compare_schema import validate_compare

        model: Report | StudyReport | CompareFile = validate_compare(data, source=str(file))
    elif kind in ("run", "study") or (isinstance(data, dict) and kind is None and "schema_version" in data):
        model = validate_report(data, source=str(file))
    else:
        raise KlgapError(f"{file}: not a file klgap validates (kind {kind!r}); it validates report.json (a run, a "
                         "curve or a study) and compare.json")
    found = value_problem(data)
    if found is not None:
        where, what = found
        raise KlgapError(f"{file}: {where}: {what}")
    return Validated(file, model)


def validate_file(path: str | Path) -> Report | StudyReport:
    """A report.json (or a run folder's) checked for its shape and then its values; KlgapError naming the JSON
    path of the first bad value."""
    validated = validate_any(Path(path) / "report.json" if Path(path).is_dir() else path)
    if isinstance(validated.model, CompareFile):
        raise KlgapError(f"{validated.file} is a compare.json, not a report")
    return validated.model


__all__ = ["Validated", "validate_any", "validate_file", "value_problem"]
