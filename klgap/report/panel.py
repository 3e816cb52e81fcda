"""The baseline panel: the SAE against every baseline a run measured, each with its ratio, Holm-adjusted p and a
one-line verdict, and the sentence a page opens with (issue 31: a verdict that turns on which random error is
called "the baseline" must name all of them).

Which interventions are baselines is declared by their plugins (klgap.protocols.BaselineRole), recorded when the
run opened and carried by the report (``baselines``: recorded name -> how a sentence names it). A pure function of
the typed report's comparisons: nothing is recomputed, every number is the one its comparison section and Holm
family hold (klgap/report/holm.py). Reports written before klgap recorded baselines have no panel (None), and open
with the one-baseline sentence as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from klgap.render.formatting import fmt_ci, fmt_p
from klgap.report.quality import SaeQuality, notes_text, reconstruction_phrase, sae_quality
from klgap.report.schema import BASELINE, Comparison, SiteSummary
from klgap.report.summary import summary_row

#: a difference is claimed where the ratio's 95% interval excludes 1 and the Holm-corrected p is at most this
ALPHA = 0.05

Verdict = Literal["holds", "reversed", "not resolved"]


@dataclass(frozen=True)
class PanelRow:
    """The SAE against one baseline: KL(sae)/KL(baseline) with its 95% context-bootstrap interval, the Wilcoxon p on
    per-context means and its Holm correction within the baseline's family, and the verdict they give."""

    baseline: str  # the recorded intervention name
    label: str  # how a sentence names it ("isotropic noise")
    ratio: float | None
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    p_holm: float | None
    holm_family: str | None
    holm_family_size: int | None
    n_contexts: int
    verdict: Verdict

    @property
    def p_used(self) -> float | None:
        """The p-value the verdict reads: Holm-corrected where the report has it, else the raw one."""
        return self.p_holm if self.p_holm is not None else self.p_value

    def ratio_text(self) -> str:
        """'1.462× [1.407, 1.522]'."""
        return fmt_ci(self.ratio, self.ci_low, self.ci_high).replace(" ", "× ", 1)

    def short(self) -> str:
        """The verdict without its numbers: 'the gap holds against isotropic noise'."""
        return {"holds": f"the gap holds against {self.label}",
                "reversed": f"reversed: the SAE does less damage than {self.label}",
                "not resolved": f"not resolved: indistinguishable from {self.label}"}[self.verdict]

    def line(self) -> str:
        """The row's verdict in one line: 'holds: the SAE does 1.462× [1.407, 1.522] the damage of isotropic noise
        (Holm p = 3.52e-12)'."""
        p = f"{'Holm ' if self.p_holm is not None else ''}p = {fmt_p(self.p_used)}"
        if self.verdict == "holds":
            return f"holds: the SAE does {self.ratio_text()} the damage of {self.label} ({p})"
        if self.verdict == "reversed":
            return f"reversed: the SAE does less damage than {self.label}, {self.ratio_text()} ({p})"
        excludes = (self.ci_low is not None and self.ci_low > 1) or (self.ci_high is not None and self.ci_high < 1)
        why = f"the interval excludes 1 but {p} > {ALPHA:g}" if excludes else "the interval includes 1"
        return f"not resolved: indistinguishable from {self.label}, {self.ratio_text()} ({why})"


def verdict_of(comparison: Comparison) -> Verdict:
    """'holds' where the ratio's interval lies above 1 and the (Holm-corrected) p ≤ ALPHA, 'reversed' where it lies
    below 1 and p ≤ ALPHA, else 'not resolved'."""
    ratio, test = comparison.kl_ratio, comparison.wilcoxon_kl
    p = test.p_holm if test.p_holm is not None else test.p_value
    significant = p is not None and p <= ALPHA
    if significant and ratio.ci_low is not None and ratio.ci_low > 1:
        return "holds"
    if significant and ratio.ci_high is not None and ratio.ci_high < 1:
        return "reversed"
    return "not resolved"


def panel_row(name: str, label: str, comparison: Comparison) -> PanelRow:
    ratio, test = comparison.kl_ratio, comparison.wilcoxon_kl
    return PanelRow(baseline=name, label=label, ratio=ratio.ratio, ci_low=ratio.ci_low, ci_high=ratio.ci_high,
                    p_value=test.p_value, p_holm=test.p_holm, holm_family=test.holm_family,
                    holm_family_size=test.holm_family_size, n_contexts=test.n_contexts, verdict=verdict_of(comparison))


@dataclass(frozen=True)
class Panel:
    """One site/layer's baseline panel: a row per declared baseline that has a comparison, in measured order."""

    model: str
    mode: str
    hook_name: str
    rows: tuple[PanelRow, ...]
    quality: SaeQuality | None = None  # the SAE's EV, L0, kl_div_score, named in the sentence (klgap/report/quality.py)

    def by_verdict(self, verdict: Verdict) -> list[PanelRow]:
        return [row for row in self.rows if row.verdict == verdict]

    def sentence(self) -> str:
        """Which baselines the gap holds against and which it does not, in one sentence: 'At blocks.3.hook_mlp_out
        of smollm2-135m the SAE's reconstruction (explained variance 0.745, L0 94.2) moves the next-token
        distribution more than isotropic noise
        (1.462× [1.407, 1.522]), less than PCA at the SAE's explained variance (0.611× [0.580, 0.640]), and is
        indistinguishable from another token's error (0.981× [0.940, 1.030]) (...).'"""
        where = f"At {self.hook_name} of {self.model}" + (f" ({self.mode} mode)" if self.mode != "all_tokens" else "")
        named = lambda rows: _and([f"{r.label} ({r.ratio_text()})" for r in rows])  # noqa: E731
        moves = [f"{side} than {named(rows)}" for side, rows in (("more", self.by_verdict("holds")),
                                                                ("less", self.by_verdict("reversed"))) if rows]
        clauses = [f"moves the next-token distribution {_and(moves, ', ')}"] if moves else []
        if unresolved := self.by_verdict("not resolved"):
            clauses.append(f"is indistinguishable from {named(unresolved)}")
        contexts = max((r.n_contexts for r in self.rows), default=0)
        return (f"{where} {reconstruction_phrase(self.quality)} {_and(clauses, ', and ' if len(moves) > 1 else ' and ')} "
                f"(KL(sae)/KL(baseline) with 95% intervals over {contexts} contexts; a difference is claimed where "
                f"the interval excludes 1 and the Holm-corrected Wilcoxon p ≤ {ALPHA:g}).")


def _and(items: list[str], last: str = " and ") -> str:
    """'a', 'a and b', 'a, b and c' (`last` joins the last two)."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + last + items[-1]


def baseline_panel(run: SiteSummary, model: str, mode: str) -> Panel | None:
    """The panel of a run (or of one run of a study); None when the report does not say which interventions are
    baselines (written before klgap recorded it)."""
    if run.baselines is None:
        return None
    rows = tuple(panel_row(name, label, run.comparisons[name]) for name, label in run.baselines.items()
                 if name in run.comparisons)
    return Panel(model=model, mode=mode, hook_name=run.hook_name, rows=rows, quality=sae_quality(run))


def opening_sentence(run: SiteSummary, model: str, mode: str) -> str:
    """The sentence a page (and the terminal) opens with for one site/layer: the panel's when it holds a baseline
    other than epsilon_random alone, else the one-baseline verdict (klgap.report.summary.SummaryRow.verdict); both
    name the SAE's explained variance and L0 (and kl_div_score where zero was measured), and the report's quality
    notes follow (klgap/report/quality.py)."""
    panel = baseline_panel(run, model, mode)
    if panel is None or not panel.rows or [row.baseline for row in panel.rows] == [BASELINE]:
        sentence = summary_row(run, model, mode).verdict()
    else:
        sentence = panel.sentence()
    return sentence + notes_text(run.quality_notes)


__all__ = ["ALPHA", "Panel", "PanelRow", "baseline_panel", "opening_sentence", "panel_row", "verdict_of"]
