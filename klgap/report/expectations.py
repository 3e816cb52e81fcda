"""Replication targets and their verdicts: ``expected.json`` beside a replication's files, checked against a run
folder's reports (no model, no SAE).

``expected.json`` (:class:`Expected`) lists targets, each tied to the replication file it is about (``config``),
a quantity of the report, the sites/layers it covers and the interval the measured number must fall in (given
as ``interval`` or as ``value`` ± ``rel_tol`` / ``abs_tol``). :func:`check_run` reads a run or study folder and gives
one :class:`Verdict` per target: ``matches`` (every covered run's number inside the interval), ``differs`` (one
outside) or ``not measured`` (a covered layer or the quantity is missing). ``klgap replicate --config`` checks
the targets of its file at the end of the run; ``klgap check RUN --expected FILE`` does it for any run folder.
The verdicts are written to ``OUT/expected_check.json`` (:class:`ExpectationCheck`) and rendered as the report's
"Replication targets" section.
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import ValidationError, model_validator

from klgap.errors import KlgapError
from klgap.render.formatting import fmt, fmt_ci
from klgap.report.numbers import finite
from klgap.report.schema import BASELINE, Report, SiteSummary, StrictModel, StudyReport
from klgap.report.read import load_report
from klgap.report.between_saes import BetweenSaes

EXPECTED_FILE = "expected.json"
CHECK_FILE = "expected_check.json"

Quantity = Literal[
    "kl_mean",  # mean KL of `intervention`
    "ce_delta_mean",  # mean ΔCE of `intervention`
    "kl_ratio",  # mean KL sae / mean KL `baseline`, with its context-bootstrap interval
    "ce_delta_ratio",  # mean ΔCE sae / mean ΔCE `baseline`, with its interval
    "kl_ratio_at_offset",  # single-token: mean KL sae / mean KL `baseline` at position t + `offset`
    "z_mean", "z_median", "frac_z_above_2",  # many-samples: the SAE's z-scores among the draws
    "sae_equivalent_cos",  # robustness curve: the cosine where cosine-matched noise does the SAE's damage
    "kl_div_score", "ce_loss_score",  # sae_lens's normalised scores (runs with sae and zero)
    "explained_variance",  # the SAE's explained variance on the run's tokens
    "kl_ratio_across_seeds",  # a study over seeds of one recipe: the mean of the seeds' ratios, two-level interval
]
Status = Literal["matches", "differs", "not measured"]


class Measurement(StrictModel):
    where: str  # "resid_pre L6"
    value: float | None
    ci_low: float | None = None
    ci_high: float | None = None
    seed_range: tuple[float | None, float | None] | None = None  # kl_ratio_across_seeds: the seeds' lowest and highest


class Target(StrictModel):
    """One number (or one number per covered layer) a replication must reproduce."""

    name: str  # "layer 6 KL ratio sae/epsilon_random"
    config: str  # the replication file it is about, beside expected.json: "all_tokens.toml"
    quantity: Quantity
    intervention: str = "sae"  # kl_mean / ce_delta_mean: whose mean
    baseline: str = BASELINE  # the ratios: sae over this
    offset: int | None = None  # kl_ratio_at_offset: t + offset
    site: str | None = None  # None: every site the run measured
    layers: list[int] | None = None  # None: every layer the run measured (at least one)
    value: float | None = None  # the target's own number (the study's, or the committed result)
    rel_tol: float | None = None  # interval = value·(1 ± rel_tol)
    abs_tol: float | None = None  # interval = value ± abs_tol
    interval: tuple[float | None, float | None] | None = None  # [low, high]; null: unbounded on that side
    # kl_ratio_across_seeds: interval = value ± seed_spread × half the range of the seeds' ratios as measured
    seed_spread: float | None = None
    study: str | None = None  # how the source states it ("2.2×–4.5×"); default: the value
    source: str = ""  # where the number comes from (file, cell, section)

    @model_validator(mode="after")
    def _one_interval(self) -> "Target":
        given = (("value", self.value), ("rel_tol", self.rel_tol), ("abs_tol", self.abs_tol),
                 ("seed_spread", self.seed_spread),
                 *(("interval", end) for end in self.interval or ()))
        for what, number in given:
            if number is not None and not math.isfinite(number):
                raise ValueError(f"target {self.name!r}: {what} holds {number}; give finite numbers (null for an "
                                 "unbounded side of an interval)")
        ways = [self.interval is not None, self.rel_tol is not None, self.abs_tol is not None,
                self.seed_spread is not None]
        if sum(ways) != 1:
            raise ValueError(f"target {self.name!r}: give exactly one of interval, rel_tol, abs_tol, seed_spread")
        relative = (self.rel_tol, self.abs_tol, self.seed_spread)
        if any(way is not None for way in relative) and self.value is None:
            raise ValueError(f"target {self.name!r}: rel_tol / abs_tol / seed_spread need a value")
        if self.seed_spread is not None and (self.quantity != "kl_ratio_across_seeds" or self.seed_spread < 0):
            raise ValueError(f"target {self.name!r}: seed_spread (≥ 0, a multiple of half the seeds' range) goes with "
                             "quantity kl_ratio_across_seeds")
        low, high = self.bounds if self.seed_spread is None else (self.value, self.value)
        if low is None and high is None or low is not None and high is not None and low > high:
            raise ValueError(f"target {self.name!r}: interval {[low, high]} is empty or unbounded on both sides")
        if (self.quantity == "kl_ratio_at_offset") != (self.offset is not None):
            raise ValueError(f"target {self.name!r}: offset goes with quantity kl_ratio_at_offset, and only with it")
        return self

    @property
    def bounds(self) -> tuple[float | None, float | None]:
        """The interval the number must fall in (:meth:`bounds_at` for a tolerance from the seeds' spread)."""
        return self.bounds_at(None)

    def bounds_at(self, measured: Measurement | None) -> tuple[float | None, float | None]:
        """The interval, with `seed_spread` taken from the seeds' range the measurement holds (unbounded where
        it holds none)."""
        if self.interval is not None:
            return self.interval
        value = float(self.value)  # type: ignore[arg-type]  (checked above)
        if self.seed_spread is not None:
            spread = measured.seed_range if measured is not None else None
            if spread is None or None in spread:
                return None, None
            half = self.seed_spread * (spread[1] - spread[0]) / 2  # type: ignore[operator]
        else:
            half = abs(value) * self.rel_tol if self.rel_tol is not None else float(self.abs_tol)  # type: ignore[arg-type]
        return value - half, value + half

    def bounds_text(self, measured: Measurement | None = None) -> str:
        if self.seed_spread is not None and (measured is None or measured.seed_range is None):
            return f"within {fmt(self.seed_spread)} × half the seeds' range of {fmt(self.value)}"
        low, high = self.bounds_at(measured)
        if high is None:
            return f"≥ {fmt(low)}"
        if low is None:
            return f"≤ {fmt(high)}"
        return f"in [{fmt(low)}, {fmt(high)}]"

    def study_text(self) -> str:
        return self.study if self.study is not None else fmt(self.value) if self.value is not None else self.bounds_text()


class Expected(StrictModel):
    """expected.json: a replication folder's targets."""

    description: str = ""
    note: str = ""
    reference: str = "the study's"  # how verdicts name the source: "matches the study's 2.53"
    targets: list[Target]

    def for_config(self, name: str) -> list[Target]:
        return [t for t in self.targets if t.config == name]




class Verdict(StrictModel):
    target: Target
    status: Status
    measurements: list[Measurement]
    text: str  # one line: "layer 6 KL ratio sae/epsilon_random: 2.47 [2.41, 2.53], in [2.28, 2.79]: matches ..."


class ExpectationCheck(StrictModel):
    """OUT/expected_check.json: the verdict of every target of one replication file on one run folder."""

    expected: str  # the expected.json checked against
    run: str
    verdicts: list[Verdict]

    @property
    def replicated(self) -> bool:
        return bool(self.verdicts) and all(v.status == "matches" for v in self.verdicts)

    def summary(self) -> str:
        n = sum(v.status == "matches" for v in self.verdicts)
        return f"{n} of {len(self.verdicts)} targets match"


# ----------------------------------------------------------------------------- reading


def load_expected(path: str | Path) -> Expected:
    """Read and validate an expected.json; KlgapError naming the first problems."""
    path = Path(path)
    if not path.is_file():
        raise KlgapError(f"no expectations file at {str(path)!r} (an expected.json beside a replication's files)")
    try:
        return Expected.model_validate(json.loads(path.read_text()))
    except ValueError as exc:  # JSON syntax and pydantic's ValidationError alike
        raise KlgapError(f"{str(path)!r} is not a valid expectations file: {problems(exc)}") from exc


def problems(exc: ValueError) -> str:
    """A JSON or pydantic error in one line: the first three problems, each ``json.path: what``."""
    found = exc.errors()[:3] if isinstance(exc, ValidationError) else None
    if found:
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in found)
    return " ".join(str(exc).split())


def expected_beside(config_file: str | Path) -> tuple[Path, list[Target]] | None:
    """The expected.json beside a replication file and its targets for that file; None when there is none."""
    path = Path(config_file).parent / EXPECTED_FILE
    if not path.is_file():
        return None
    return path, load_expected(path).for_config(Path(config_file).name)


def targets_for_run(expected_path: Path, expected: Expected, report: Report | StudyReport) -> list[Target]:
    """The targets whose replication file declares the run's model and mode (what `klgap check` checks)."""
    chosen = []
    for name in dict.fromkeys(t.config for t in expected.targets):
        file = expected_path.parent / name
        if not file.is_file():
            raise KlgapError(f"{str(expected_path)!r} names replication file {name!r}, which is not beside it")
        declared = tomllib.loads(file.read_text()) if file.suffix == ".toml" else json.loads(file.read_text())
        if declared.get("model") == report.config.get("model") and declared.get("mode", "all_tokens") == report.mode:
            chosen += expected.for_config(name)
    return chosen


def folder_runs(folder: Path) -> list[SiteSummary]:
    """Every site/layer of a run or study folder: its run report where it is there, else the study's row."""
    report = load_report(folder)
    if isinstance(report, Report):
        return [report]
    runs: list[SiteSummary] = []
    for row in report.runs:
        sub = folder / row.path / "report.json"
        runs.append(load_report(sub) if sub.is_file() else row)  # type: ignore[arg-type]
    return runs


# ----------------------------------------------------------------------------- measuring


def measure(target: Target, run: SiteSummary) -> Measurement:
    """The target's quantity in one run (value None where the run does not have it)."""
    where, q = f"{run.site} L{run.layer}", target.quantity
    value = low = high = None
    if q in ("kl_mean", "ce_delta_mean"):
        stats = run.interventions.get(target.intervention)
        value = getattr(stats, q) if stats is not None else None
    elif q in ("kl_ratio", "ce_delta_ratio"):
        comparison = run.comparisons.get(target.baseline)
        if comparison is not None:
            ratio = comparison.kl_ratio if q == "kl_ratio" else comparison.ce_delta_ratio
            value, low, high = ratio.ratio, ratio.ci_low, ratio.ci_high
    elif q == "kl_ratio_at_offset":
        single = run.single_token if isinstance(run, Report) else None
        if single is not None:
            sae = single.kl_by_offset.get(target.intervention, {}).get(str(target.offset))
            base = single.kl_by_offset.get(target.baseline, {}).get(str(target.offset))
            value = sae / base if sae is not None and base else None
    elif q in ("z_mean", "z_median", "frac_z_above_2"):
        many = run.many_samples if isinstance(run, Report) else None
        value = getattr(many, q) if many is not None else None
    elif q == "sae_equivalent_cos":
        value = next(iter(run.curve.sae_equivalent_cos.values()), None) if run.curve is not None else None
    elif q in ("kl_div_score", "ce_loss_score"):
        value = getattr(run.sae_lens_scores, q) if run.sae_lens_scores is not None else None
    elif q == "explained_variance":
        value = run.sae_metrics.explained_variance
    return Measurement(where=where, value=finite(value), ci_low=finite(low), ci_high=finite(high))


def _inside(value: float, bounds: tuple[float | None, float | None]) -> bool:
    low, high = bounds
    return (low is None or value >= low) and (high is None or value <= high)


def across_seeds(group: BetweenSaes) -> Measurement:
    """A study's seeds of one recipe at a site/layer (klgap/report/between_saes.py): the recipe's ratio with its
    two-level interval, and the seeds' range."""
    pooled = group.kl_ratio
    return Measurement(where=f"{group.site} L{group.layer}", value=pooled.ratio if pooled else None,
                       ci_low=pooled.ci_low if pooled else None, ci_high=pooled.ci_high if pooled else None,
                       seed_range=(group.ratio_min, group.ratio_max))


def verdict(target: Target, runs: list[SiteSummary], reference: str = "the study's",
            groups: list[BetweenSaes] | None = None) -> Verdict:
    """The target against the runs it covers (its site, its layers); kl_ratio_across_seeds against the study's
    `groups` of seeds instead."""
    seeds = target.quantity == "kl_ratio_across_seeds"
    units = [g for g in groups or [] if g.kind == "seeds"] if seeds else runs
    covered = [r for r in units if (target.site is None or r.site == target.site)
               and (target.layers is None or r.layer in target.layers)]
    measured = [across_seeds(r) if seeds else measure(target, r) for r in covered]  # type: ignore[arg-type]
    missing = [f"L{layer}" for layer in (target.layers or []) if layer not in {r.layer for r in covered}]
    missing += [m.where for m in measured if m.value is None]
    outside = [m for m in measured if m.value is not None and not _inside(m.value, target.bounds_at(m))]
    if missing or not measured:
        status: Status = "not measured"
    else:
        status = "differs" if outside else "matches"
    return Verdict(target=target, status=status, measurements=measured, text=_line(target, status, measured, outside, missing, reference))


def measured_text(measurements: list[Measurement]) -> str:
    """'2.47 [2.41, 2.53]' for one run; '2.31–4.12 over 12 runs' for several."""
    values = [m.value for m in measurements if m.value is not None]
    if not values:
        return "—"
    if len(measurements) == 1:
        m = measurements[0]
        return fmt_ci(m.value, m.ci_low, m.ci_high) if m.ci_low is not None else fmt(m.value)
    return f"{fmt(min(values))}–{fmt(max(values))} over {len(values)} runs"


def _line(target: Target, status: Status, measured: list[Measurement], outside: list[Measurement],
          missing: list[str], reference: str) -> str:
    head = f"{target.name}: {measured_text(measured)}, {target.bounds_text(measured[0] if len(measured) == 1 else None)}"
    if status == "not measured":
        return f"{head}: not measured ({', '.join(missing) or 'no run of this site/layer'})"
    if status == "differs":
        where = ", ".join(f"{m.where} {fmt(m.value)}" for m in outside)
        return f"{head}: differs from {reference} {target.study_text()} ({where} outside)"
    return f"{head}: matches {reference} {target.study_text()}"


def check_run(folder: str | Path, expected_path: str | Path, targets: list[Target] | None = None) -> ExpectationCheck:
    """Every target (default: those whose replication file declares the run's model and mode) on a run folder."""
    folder, expected_path = Path(folder), Path(expected_path)
    expected = load_expected(expected_path)
    if targets is None:
        targets = targets_for_run(expected_path, expected, load_report(folder))
        if not targets:
            files = ", ".join(dict.fromkeys(t.config for t in expected.targets))
            raise KlgapError(f"{str(expected_path)!r} has no target for this run's model and mode (its files: {files})")
    runs = folder_runs(folder)
    report = load_report(folder)
    groups = (report.between_saes or []) if isinstance(report, StudyReport) else []
    return ExpectationCheck(expected=str(expected_path), run=str(folder),
                            verdicts=[verdict(t, runs, expected.reference, groups) for t in targets])


def write_check(folder: str | Path, check: ExpectationCheck) -> Path:
    from klgap.job.folder import atomic_write_bytes

    path = Path(folder) / CHECK_FILE
    atomic_write_bytes(path, (check.model_dump_json(indent=2) + "\n").encode("utf-8"))
    return path


def load_check(folder: str | Path) -> ExpectationCheck | None:
    """OUT/expected_check.json, or None when the run was never checked."""
    path = Path(folder) / CHECK_FILE
    if not path.is_file():
        return None
    try:
        return ExpectationCheck.model_validate_json(path.read_text())
    except ValueError as exc:
        raise KlgapError(f"{str(path)!r} is not a valid expectation check: {problems(exc)}; `klgap check RUN "
                         "--expected FILE --write` writes it again") from exc


def print_check(check: ExpectationCheck) -> None:
    print(f"replication targets ({check.expected}): {check.summary()}")
    for v in check.verdicts:
        print(f"  [{v.status}] {v.text}")
