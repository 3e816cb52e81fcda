"""`klgap validate`: what klgap writes, checked for its shape and its values. The kind of file comes from its
content: a run report (report.json; a `klgap curve` run's holds its robustness curve, a joint run's its
compounding section), a study report (a study over SAE checkpoints holds its over-training section), a
comparison (compare.json, :mod:`klgap.report.compare_schema`) or a run's check against a replication's targets
(expected_check.json, :class:`klgap.report.expectations.ExpectationCheck`); each against its own schema, then its
values. A folder is validated whole: its report.json or compare.json, its expected_check.json, and the report of
every run inside it (a study's sites, a joint run's single-site and subset runs).

A file that matches its schema can still say something klgap never writes. One set of value rules covers every
kind (:data:`RANGES` for single numbers, :func:`node_problem` for numbers that must agree): a NaN literal (klgap
writes null), a negative KL, cross-entropy, count or norm, a p-value outside [0, 1], a Holm-corrected p below its raw p, a cosine
outside [-1, 1], an interval that does not contain its estimate, counts that disagree, a headline ratio that is
not mean KL(sae) / mean KL(epsilon_random), a joint run that asked for subsets without its subsets table, a
comparison of no runs, checkpoints out of training order, a target's verdict that its numbers do not give.
:func:`value_problem` names the JSON path of the first such value.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from klgap.errors import KlgapError
from klgap.report.compare_schema import CompareFile
from klgap.report.expectations import CHECK_FILE, ExpectationCheck, folder_runs, problems, verdict
from klgap.report.read import validate_report
from klgap.report.schema import BASELINE, Report, StudyReport

KL_TOLERANCE = 1e-6  # per-token KLs are computed in float32: a mean of exact zeros can land a hair below 0
RATIO_RTOL = 1e-5  # the headline ratio is a ratio of float64 means; kl_mean is rounded from float32 sums
P_TOLERANCE = 1e-12


@dataclass(frozen=True)
class Range:
    """Numbers that must lie in [low, high] (None: unbounded): those under a key in `keys`, or anywhere below a
    key in `inside` (a dict of values, e.g. ``kl_by_offset``, or an interval object, e.g. a checkpoint's
    ``kl_sae``). `message` says what is wrong with ``{value}``."""

    message: str
    keys: frozenset[str]
    low: float | None
    high: float | None
    inside: frozenset[str] = frozenset()

    def holds(self, keys: list[str]) -> bool:
        return keys[-1] in self.keys or any(key in self.inside for key in keys[:-1])

    def problem(self, value: float) -> str | None:
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            return self.message.format(value=value)
        return None


#: the single-number rules, one per kind of quantity, for every file klgap writes
RANGES = (
    Range("KL {value} is negative (a KL divergence is ≥ 0)",
          frozenset({"kl_mean", "kl_median", "kl_p999", "kl_ci_low", "kl_ci_high", "sae_kl", "draw_mean", "kl_sae",
                     f"kl_{BASELINE}", "joint_kl_mean", "sum_single_kl_mean"}),
          -KL_TOLERANCE, None, inside=frozenset({"kl_mean", "kl_by_offset", "kl_sae", "kl_baseline", "twin_kl", "kl"})),
    Range("a ratio of KLs of {value} is negative", frozenset({f"kl_ratio_sae_over_{BASELINE}", "max_single_kl_ratio"}),
          0.0, None, inside=frozenset({"kl_ratio", "joint_kl_ratio"})),
    Range("a count of {value} is negative",
          frozenset({"n_tokens", "n_contexts", "n", "n_boot", "n_draws", "count", "n_nonfinite", "n_nonfinite_activations",
                     "tokens_seen", "step", "n_fit_tokens", "holm_family_size", "n_activations", "d_in", "d_sae",
                     "world_size", "context_len"}), 0, None),
    Range("{value} lies outside [0, 1]", frozenset({"p_value", "p_holm", "frac_z_above_2", "frac_tokens_gap_positive"}),
          0.0, 1.0),
    Range("a cosine of {value} lies outside [-1, 1]", frozenset({"cos", "cos_mean", "sae_cos", "sae_equivalent_cos"}),
          -1.0 - 1e-6, 1.0 + 1e-6, inside=frozenset({"sae_equivalent_cos"})),
    Range("a correlation of {value} lies outside [-1, 1]", frozenset({"rho"}), -1.0, 1.0),
    Range("a norm of {value} is negative", frozenset({"norm_frac", "norm_frac_mean", "x_norm_mean", "x_hat_norm_mean",
                                                      "eps_mean", "mse", "l0_mean", "draw_std"}),
          0.0, None, inside=frozenset({"lin_norm_frac"})),
    Range("a percentile of {value} lies outside [0, 100]", frozenset({"percentile", "percentile_mean"}), 0.0, 100.0),
    Range("an explained variance of {value} is above 1", frozenset({"explained_variance"}), None, 1.0 + 1e-6),
    Range("a cross-entropy of {value} is negative (−log P ≥ 0)", frozenset({"ce_loss_with_sae", "ce_loss_with_ablation"}),
          -KL_TOLERANCE, None, inside=frozenset({"ce_clean"})),
)
#: (estimate, low, high) of the intervals klgap writes
INTERVALS = (("ratio", "ci_low", "ci_high"), ("kl_mean", "kl_ci_low", "kl_ci_high"),
             ("ratio", "ratio_ci_low", "ratio_ci_high"), ("mean", "ci_low", "ci_high"),
             ("estimate", "ci_low", "ci_high"), ("value", "ci_low", "ci_high"))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _walk(node: Any, path: list[str]) -> Iterator[tuple[list[str], Any]]:
    """Every (path of keys, node) in document order; list items as ``[i]``."""
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, [*path, str(key)])
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, [*path, f"[{i}]"])


def _text(path: list[str]) -> str:
    """``interventions.sae.kl_mean``, ``runs[0].layer``."""
    return "".join(key if key.startswith("[") or not i else f".{key}" for i, key in enumerate(path)) or "(top)"


def _close(a: float, b: float, rtol: float) -> bool:
    return math.isclose(a, b, rel_tol=rtol, abs_tol=1e-12)


def leaf_problem(path: list[str], value: Any) -> str | None:
    """What is wrong with one number, by the rules of its kind (:data:`RANGES`); None if nothing is."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value} is not a JSON number (klgap writes null for a value it could not compute)"
    if not _number(value) or not path:
        return None
    keys = [key for key in path if not key.startswith("[")]
    for rule in RANGES:
        if keys and rule.holds(keys):
            found = rule.problem(value)
            if found:
                return found
    return None


def _interval_problem(node: dict[str, Any]) -> tuple[str, str] | None:
    for estimate, low, high in INTERVALS:
        values = [node.get(k) for k in (estimate, low, high)]
        if not all(_number(v) for v in values):
            continue
        x, lo, hi = (float(v) for v in values)
        slack = 1e-9 * max(1.0, abs(x))
        if not lo - slack <= x <= hi + slack:
            return estimate, f"{x} lies outside its interval [{lo}, {hi}] ({low}, {high})"
    return None


def _holm_problem(node: dict[str, Any]) -> tuple[str, str] | None:
    """A Holm-corrected p is never below its raw p (the correction only raises p-values)."""
    raw, holm = node.get("p_value"), node.get("p_holm")
    if _number(raw) and _number(holm) and holm < raw - P_TOLERANCE:
        return "p_holm", f"{holm} is below its uncorrected p_value {raw} (Holm's correction only raises p-values)"
    return None


def _summary_problem(node: dict[str, Any]) -> tuple[str, str] | None:
    """A run report or a study row: its counts agree, and its headline ratio is the ratio of its means."""
    n_tokens, n_contexts = node.get("n_tokens"), node.get("n_contexts")
    for name, stats in node["interventions"].items():
        if not isinstance(stats, dict):
            continue
        finite, nonfinite = stats.get("n_tokens"), stats.get("n_nonfinite")  # KL values used, and left out
        if _number(finite) and _number(nonfinite) and _number(n_tokens) and finite + nonfinite != n_tokens:
            return (f"interventions.{name}.n_tokens",
                    f"{finite} (+ {nonfinite} non-finite) disagrees with the report's n_tokens {n_tokens}")
    for name, comparison in node.get("comparisons", {}).items():
        for part in ("kl_ratio", "ce_delta_ratio", "wilcoxon_kl"):
            count = comparison.get(part, {}).get("n_contexts") if isinstance(comparison, dict) else None
            if _number(count) and _number(n_contexts) and not count <= n_contexts:
                return (f"comparisons.{name}.{part}.n_contexts",
                        f"{count} is more than the report's {n_contexts} contexts")
    headline = node.get(f"kl_ratio_sae_over_{BASELINE}")
    sae, base = (node["interventions"].get(k, {}).get("kl_mean") for k in ("sae", BASELINE))
    if _number(headline) and _number(sae) and _number(base) and base > 0:
        expected = sae / base
        if not _close(float(headline), expected, RATIO_RTOL):
            return (f"kl_ratio_sae_over_{BASELINE}",
                    f"{headline} is not interventions.sae.kl_mean / interventions.{BASELINE}.kl_mean = {expected:.6g}")
    ratio = node.get("comparisons", {}).get(BASELINE, {}).get("kl_ratio", {}).get("ratio")
    if _number(headline) and _number(ratio) and not _close(float(headline), float(ratio), RATIO_RTOL):
        return f"kl_ratio_sae_over_{BASELINE}", f"{headline} disagrees with comparisons.{BASELINE}.kl_ratio.ratio = {ratio}"
    return None


def _compare_row_problem(node: dict[str, Any]) -> tuple[str, str] | None:
    """A compare.json row: its ratio is its KL(sae) / KL(baseline), as its run's headline ratio is."""
    ratio, sae, base = node.get("ratio"), node.get("kl_sae"), node.get(f"kl_{BASELINE}")
    if _number(ratio) and _number(sae) and _number(base) and base > 0 and not _close(ratio, sae / base, RATIO_RTOL):
        return "ratio", f"{ratio} is not kl_sae / kl_{BASELINE} = {sae / base:.6g}"
    return None


def _file_problem(node: dict[str, Any]) -> tuple[str, str] | None:
    """What a whole file of its kind must hold: a comparison compares runs; a joint run that asked for its
    subsets has their table; a study over checkpoints lists them in training order."""
    kind = node.get("kind")
    if kind == "compare" and not node.get("runs"):
        return "runs", "is empty: klgap compare writes one row per compared site/layer"
    config = node.get("config") if isinstance(node.get("config"), dict) else {}
    if kind in ("run", None) and config.get("joint_subsets") and not (node.get("compounding") or {}).get("subsets"):
        return "compounding.subsets", ("is missing, but the run's config asked for --joint-subsets: the report was "
                                       "built from a folder without its subsets (run or merge it again)")
    for i, curve in enumerate(node.get("over_training") or []):
        steps = [p.get("step") for p in curve.get("points", []) if isinstance(p, dict)]
        if any(not _number(a) or not _number(b) or a >= b for a, b in zip(steps, steps[1:])):
            return f"over_training[{i}].points", f"steps {steps} are not in training order (each checkpoint once)"
    return None


def node_problem(node: dict[str, Any]) -> tuple[str, str] | None:
    """(key relative to `node`, what is wrong) of the first numbers in `node` that disagree; None if none do."""
    for rule in (_interval_problem, _holm_problem, _file_problem):
        found = rule(node)
        if found:
            return found
    if isinstance(node.get("interventions"), dict) and "n_tokens" in node:
        return _summary_problem(node)
    if "kl_sae" in node and "label" in node:
        return _compare_row_problem(node)
    return None


def value_problem(data: Any) -> tuple[str, str] | None:
    """(JSON path, what is wrong) of the first value in a file's JSON that klgap would never write (single
    values first, then values that disagree); None if every value is sound. `data` is the parsed JSON (it
    already matches its schema)."""
    for path, node in _walk(data, []):  # single values first: a NaN literal is named as itself
        problem = leaf_problem(path, node)
        if problem:
            return _text(path), problem
    for path, node in _walk(data, []):  # then values that must agree with each other
        if isinstance(node, dict):
            found = node_problem(node)
            if found:
                return _text([*path, found[0]]), found[1]
    return None


# ----------------------------------------------------------------------------- expected_check.json


def check_problem(check: ExpectationCheck, folder: Path) -> tuple[str, str] | None:
    """A run's verdicts against the run: each verdict is what its target gives on the reports in `folder`
    (recomputed from them, when the folder holds them), else at least what its own numbers give."""
    runs = folder_runs(folder) if (folder / "report.json").is_file() else None
    for i, found in enumerate(check.verdicts):
        again = verdict(found.target, runs) if runs is not None else None
        if again is not None and again.measurements != found.measurements:
            return (f"verdicts[{i}].measurements", f"{_dumped(found.measurements)} are not what the target gives on "
                    f"{folder}'s reports ({_dumped(again.measurements)})")
        low, high = found.target.bounds
        values = [m.value for m in found.measurements]
        inside = bool(values) and all(v is not None and (low is None or v >= low) and (high is None or v <= high)
                                      for v in values)
        status = again.status if again is not None else (
            "not measured" if not values or None in values else "matches" if inside else "differs")
        if found.status != status:
            return f"verdicts[{i}].status", f"{found.status!r}, but its measurements give {status!r}"
    return None


def _dumped(models: list[BaseModel]) -> str:
    return json.dumps([m.model_dump() for m in models])


# ----------------------------------------------------------------------------- files and folders


@dataclass(frozen=True)
class Validated:
    """A file `klgap validate` found sound: where it is, what it is, its typed content, and the other klgap
    files of its folder found sound with it."""

    file: Path
    model: Report | StudyReport | CompareFile | ExpectationCheck
    others: tuple[Path, ...] = ()

    @property
    def what(self) -> str:
        """``report``, ``report with a robustness curve (11 points)``, ``study report (4 runs)``, ``comparison (8 runs)``."""
        model = self.model
        if isinstance(model, CompareFile):
            return f"comparison (compare.json, {len(model.runs)} runs)"
        if isinstance(model, ExpectationCheck):
            return f"check against replication targets ({model.summary()})"
        if isinstance(model, StudyReport):
            extra = f", over training: {len(model.over_training)} SAE(s)" if model.over_training else ""
            return f"study report ({len(model.runs)} runs{extra})"
        if model.compounding is not None:
            return f"joint run report ({len(model.compounding.sites)} sites)"
        return f"report with a robustness curve ({len(model.curve.points)} points)" if model.curve else "report"

    @property
    def schema_version(self) -> str:
        return getattr(self.model, "schema_version", "-")


FOLDER_FILES = ("report.json", "compare.json")


def _file_of(path: Path) -> Path:
    """`path`, or the report.json (else compare.json) of a folder."""
    if not path.is_dir():
        return path
    for name in FOLDER_FILES:
        if (path / name).is_file():
            return path / name
    raise KlgapError(f"{str(path)!r} holds no report.json or compare.json; klgap validate reads a run or study folder, "
                     "a `klgap compare` folder, or one of those files (or an expected_check.json)")


def validate_one(file: Path) -> Report | StudyReport | CompareFile | ExpectationCheck:
    """One file klgap wrote, against its schema and then its values; KlgapError naming the JSON path of the first
    bad value, or why the file is not one klgap validates."""
    if not file.is_file():
        raise KlgapError(f"no file at {str(file)!r}")
    try:
        data = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise KlgapError(f"{str(file)!r} is not valid JSON: {exc}") from exc
    kind = data.get("kind") if isinstance(data, dict) else None
    model: Report | StudyReport | CompareFile | ExpectationCheck
    if kind == "compare":
        from klgap.report.compare_schema import validate_compare

        model = validate_compare(data, source=str(file))
    elif kind in ("run", "study") or (isinstance(data, dict) and kind is None and "schema_version" in data):
        model = validate_report(data, source=str(file))
    elif isinstance(data, dict) and kind is None and "verdicts" in data:
        try:
            model = ExpectationCheck.model_validate(data)
        except ValueError as exc:
            raise KlgapError(f"{file} does not match the expectation check schema: {problems(exc)}") from exc
    else:
        raise KlgapError(f"{file}: not a file klgap validates (kind {kind!r}); it validates report.json (a run, a "
                         "curve, a joint run or a study), compare.json and expected_check.json")
    found = value_problem(data)
    if found is None and isinstance(model, ExpectationCheck):
        found = check_problem(model, file.parent)
    if found is not None:
        where, what = found
        raise KlgapError(f"{file}: {where}: {what}")
    return model


def _inner_files(folder: Path) -> list[Path]:
    """The other klgap files of a folder: its expected_check.json, and the report of every run inside it."""
    inner = [folder / CHECK_FILE] if (folder / CHECK_FILE).is_file() else []
    return inner + sorted(p for p in folder.rglob("*/report.json") if p.parent != folder)


def validate_any(path: str | Path) -> Validated:
    """A report.json, compare.json or expected_check.json, or a folder of them (each checked), against its own
    schema and then its values; the kind is read from the file. KlgapError naming the file and the JSON path of
    the first bad value, or why the file is not one klgap validates."""
    path = Path(path)
    file = _file_of(path)
    model = validate_one(file)
    others = tuple(_inner_files(path)) if path.is_dir() else ()
    for other in others:
        validate_one(other)
    return Validated(file, model, others)


def validate_file(path: str | Path) -> Report | StudyReport:
    """A report.json (or a run folder's) checked for its shape and then its values; KlgapError naming the JSON
    path of the first bad value."""
    validated = validate_any(Path(path) / "report.json" if Path(path).is_dir() else path)
    if not isinstance(validated.model, (Report, StudyReport)):
        raise KlgapError(f"{validated.file} is not a report")
    return validated.model


__all__ = ["RANGES", "Range", "Validated", "check_problem", "leaf_problem", "node_problem", "validate_any",
           "validate_file", "validate_one", "value_problem"]
