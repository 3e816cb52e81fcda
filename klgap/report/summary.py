"""A run's summary row: what one site/layer found, against the baseline, in one typed record.

The terminal (`klgap replicate`, a study), report.md / report.html and `klgap compare` all show this row;
:func:`summary_row` is the one place it is read out of a report.
"""

from __future__ import annotations

from dataclasses import dataclass

from klgap.render.formatting import fmt, fmt_ci, fmt_p, fmt_p_holm, fmt_pct
from klgap.report.quality import SaeQuality, reconstruction_phrase, sae_quality
from klgap.report.schema import BASELINE, PrecisionCheck, Report, SiteSummary, StudyReport


@dataclass(frozen=True)
class SummaryRow:
    """One site/layer: mean KL of the SAE and of the baseline, their ratio with its 95% context-bootstrap
    interval, the Wilcoxon p-value (and its Holm correction within the report), the SAE's mean cos(x, x̂) and
    the cosine at which cosine-matched noise does the SAE's damage (first norm of a robustness curve).

    None marks a number the report does not have (or saved as null).
    """

    model: str
    mode: str
    site: str
    layer: int
    hook_name: str
    n_tokens: int
    n_contexts: int
    kl_sae: float | None
    kl_baseline: float | None
    ratio: float | None
    ratio_ci_low: float | None
    ratio_ci_high: float | None
    p_value: float | None
    p_holm: float | None
    sae_cos: float | None
    sae_equivalent_cos: float | None
    baseline: str = BASELINE
    test_contexts: int | None = None  # the contexts the Wilcoxon test paired
    holm_family: str | None = None  # what p_holm was corrected across (klgap.report.holm); None in older reports
    holm_family_size: int | None = None
    quality: SaeQuality | None = None  # the SAE's EV, L0, kl_div_score (klgap/report/quality.py); None for a joint run

    @property
    def where(self) -> str:
        """'mlp_out L3'."""
        return f"{self.site} L{self.layer}"

    def ratio_text(self) -> str:
        """'1.462 [1.401, 1.530]'; '—' without a comparison to the baseline."""
        return fmt_ci(self.ratio, self.ratio_ci_low, self.ratio_ci_high)

    def p_text(self) -> str:
        """'0.002 (Holm 0.004)': the Wilcoxon p-value, with the Holm-corrected one when the report has it and its
        family holds more than this one test."""
        return fmt_p_holm(self.p_value, self.p_holm, self.holm_family_size)

    def verdict(self) -> str:
        """The finding in one sentence: 'At blocks.1.hook_mlp_out of tiny-gpt2 the SAE's reconstruction (explained
        variance 0.832, L0 12.3) moves the next-token distribution 1.462× [1.401, 1.530] as much as a random error
        of the same size (Wilcoxon p = 3.52e-12 over 64 contexts).'"""
        where = f"At {self.hook_name} of {self.model}" + (f" ({self.mode} mode)" if self.mode != "all_tokens" else "")
        if self.ratio is None:
            kl = f"a mean KL of {fmt(self.kl_sae)} nats" if self.kl_sae is not None else "no measured KL"
            return (f"{where} {reconstruction_phrase(self.quality)} gives {kl}; no {self.baseline} baseline was "
                    "compared, so there is no ratio.")
        test = f"Wilcoxon p = {fmt_p(self.p_value)}"
        if self.p_holm is not None and self.holm_family_size != 1:
            test += f", Holm-corrected {fmt_p(self.p_holm)}" + ("," if self.test_contexts else "")
        test += f" over {self.test_contexts} contexts" if self.test_contexts else ""
        sentence = (f"{where} {reconstruction_phrase(self.quality)} moves the next-token distribution "
                    f"{self.ratio_text().replace(' ', '× ', 1)}"
                    f" as much as a random error of the same size ({test})")
        if self.ratio_ci_low is not None and self.ratio_ci_high is not None and self.ratio_ci_low <= 1 <= self.ratio_ci_high:
            sentence += "; the interval includes 1: no gap is resolved at this size"
        return sentence + "."


def summary_row(run: SiteSummary, model: str, mode: str) -> SummaryRow:
    """The summary row of a run report, or of one run of a study (whose model and mode the study holds)."""
    comparison = run.comparisons.get(BASELINE)
    sae, baseline = run.interventions.get("sae"), run.interventions.get(BASELINE)
    if comparison is not None:
        ratio, low, high = comparison.kl_ratio.ratio, comparison.kl_ratio.ci_low, comparison.kl_ratio.ci_high
    else:  # no comparison (no sae, or an old report): the bare ratio when both were measured
        ratio = run.kl_ratio_sae_over_epsilon_random if sae is not None and baseline is not None else None
        low = high = None
    curve = run.curve
    equivalent = next(iter(curve.sae_equivalent_cos.values()), None) if curve is not None else None
    return SummaryRow(
        model=model, mode=mode, site=run.site, layer=run.layer, hook_name=run.hook_name, n_tokens=run.n_tokens,
        n_contexts=run.n_contexts,
        kl_sae=sae.kl_mean if sae is not None else None,
        kl_baseline=baseline.kl_mean if baseline is not None else None,
        ratio=ratio, ratio_ci_low=low, ratio_ci_high=high,
        p_value=comparison.wilcoxon_kl.p_value if comparison is not None else None,
        p_holm=comparison.wilcoxon_kl.p_holm if comparison is not None else None,
        sae_cos=run.sae_metrics.cos_mean, sae_equivalent_cos=equivalent,
        test_contexts=comparison.wilcoxon_kl.n_contexts if comparison is not None else None,
        holm_family=comparison.wilcoxon_kl.holm_family if comparison is not None else None,
        holm_family_size=comparison.wilcoxon_kl.holm_family_size if comparison is not None else None,
        quality=sae_quality(run),
    )


def summary_rows(report: Report | StudyReport) -> list[SummaryRow]:
    """One row for a run report, one per site/layer for a study."""
    if isinstance(report, StudyReport):
        return [summary_row(run, report.model, report.mode) for run in report.runs]
    return [summary_row(report, report.model, report.mode)]


def precision_sentence(check: PrecisionCheck) -> str:
    """One sentence on a low-precision run's check against float32 (klgap/job/precision.py), for stderr, the
    terminal and the report's opening lines."""
    moved = (f"the headline ratio moved by {fmt_pct(check.ratio_rel_change)} ({fmt(check.ratio_float32)} in float32, "
             f"{fmt(check.ratio)} in {check.dtype})" if check.ratio_float32 is not None
             else "no headline ratio (sae and epsilon_random not both measured)")
    numbers = (f"{check.dtype} against float32 on the first {check.n_contexts} contexts: per-token |ΔKL| max "
               f"{fmt(check.kl_abs_diff_max, 2)} (p99 {fmt(check.kl_abs_diff_p99, 2)}; at most {fmt_pct(check.kl_rel_diff_max)} "
               f"of the mean KL), mean KL moved by at most {fmt_pct(check.kl_mean_rel_change_max)}, {moved}")
    if check.passed:
        elsewhere = (f"; measured in {check.measured_dtype} all the same: the check failed at another site of the "
                     "job (--dtype auto)" if check.measured_dtype != check.dtype else "")
        return f"precision check passed: {numbers} (tolerance {fmt_pct(check.tolerance, 0)}){elsewhere}"
    outcome = (f"measured in {check.measured_dtype} instead (--dtype auto)" if check.measured_dtype != check.dtype
               else f"measured in {check.dtype} anyway; --dtype float32 gives float32's numbers")
    return f"PRECISION CHECK FAILED: {numbers}, above the tolerance of {fmt_pct(check.tolerance, 0)}; {outcome}"
