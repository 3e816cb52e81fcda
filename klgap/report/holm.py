"""Holm families: which Wilcoxon tests (the SAE against a baseline, per-context mean KL) are corrected together.

One family per named baseline: the SAE against `epsilon_random` at every site/layer of a run or study is one
family, against `theta_random` another, and so on. The points of a robustness curve (every `cosine_matched`
intervention) are a family of their own, so adding cosines to a curve never changes the p-value of the SAE against
`epsilon_random`; so are the points of a length sweep (every `along` intervention, klgap/report/sweep.py). A run
report corrects within the run (a named baseline's family is then its one test); a study
corrects across its sites/layers. The terminal, report.md / report.html and `klgap compare` all show the p_holm
this module wrote into the report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from klgap.report import stats
from klgap.report.robustness import is_curve_point
from klgap.report.schema import Comparison
from klgap.report.sweep import is_sweep_point

CURVE_FAMILY = "cosine_matched"  # the family of every robustness-curve point
SWEEP_FAMILY = "along"  # the family of every length-sweep point


def family_of(baseline: str) -> str:
    """The family of the SAE-against-`baseline` test: the baseline's own name, CURVE_FAMILY for a curve point,
    SWEEP_FAMILY for a length-sweep point."""
    if is_sweep_point(baseline):
        return SWEEP_FAMILY
    return CURVE_FAMILY if is_curve_point(baseline) else baseline


def describe(family: str, size: int, n_runs: int) -> str:
    """One line saying what a family of `size` tests over `n_runs` sites/layers holds: 'sae vs epsilon_random at
    12 sites/layers'; curve points counted per site/layer: 'sae vs 1 cosine_matched curve point at each of 2
    sites/layers', 'sae vs 11 cosine_matched curve points at 1 site/layer'."""
    where = "at 1 site/layer" if n_runs == 1 else f"at {n_runs} sites/layers"
    if family == SWEEP_FAMILY:
        return f"sae vs each of {size} length-sweep points (along) {where}"
    if family != CURVE_FAMILY:
        return f"sae vs {family} {where}"
    if n_runs > 1 and size % n_runs:  # points not the same at every site/layer (or some without a p-value)
        return f"sae vs {size} cosine_matched curve points over {n_runs} sites/layers"
    per_run = size // max(n_runs, 1)
    points = f"{per_run} cosine_matched curve point{'s' * (per_run != 1)}"
    return f"sae vs {points} at 1 site/layer" if n_runs == 1 else f"sae vs {points} at each of {n_runs} sites/layers"


def holm_p_values(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm-adjusted p-values of one family given in a list (same order); None (or NaN) stays None and does not
    count towards the family's size. A compounding run's subsets table is one such family (klgap/report/
    compounding.py)."""
    adjusted = stats.holm([float("nan") if p is None else p for p in p_values])
    return [p if p == p else None for p in adjusted]


def apply_holm(runs: Sequence[Mapping[str, Comparison]]) -> None:
    """Set p_holm, holm_family and holm_family_size of every comparison of `runs` (each a run's comparisons by
    baseline name), Holm-correcting within each family across all of them. NaN p-values stay NaN and do not
    count towards a family's size."""
    families: dict[str, list[Comparison]] = {}
    for comparisons in runs:
        for name, comparison in comparisons.items():
            families.setdefault(family_of(name), []).append(comparison)
    for family, members in families.items():
        adjusted = stats.holm([c.wilcoxon_kl.p_value if c.wilcoxon_kl.p_value is not None else float("nan")
                               for c in members])
        n_runs = sum(1 for comparisons in runs if any(family_of(n) == family for n in comparisons))
        size = sum(1 for p in adjusted if p == p)
        for comparison, p in zip(members, adjusted, strict=True):
            test = comparison.wilcoxon_kl
            test.p_holm = p if p == p else None
            test.holm_family = describe(family, size, n_runs)
            test.holm_family_size = size
