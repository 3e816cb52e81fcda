"""What a page opens with, beyond the SAE-against-baseline verdict (klgap.report.summary.SummaryRow.verdict): a
robustness curve's finding, a joint run's, a comparison's. One sentence each, read from the typed report; the
terminal and the pages print the same sentences."""

from __future__ import annotations

from collections.abc import Sequence

from klgap.render.formatting import fmt, fmt_ci, fmt_fixed, fmt_p
from klgap.report.compounding import Compounding
from klgap.report.schema import BASELINE, Curve
from klgap.report.summary import SummaryRow


def curve_findings(curve: Curve | None, where: str = "") -> list[str]:
    """Per norm fraction of a robustness curve, where noise does the SAE's damage: 'At blocks.1.hook_resid_pre,
    cosine-matched noise at norm 0.9·‖x‖ does the SAE's damage (KL 0.0486) at cos 0.693; the SAE's own cos(x, x̂)
    is 0.786: its error does more damage than random noise at its cosine.' Empty without a curve or its SAE."""
    if curve is None or curve.sae is None:
        return []
    sae = curve.sae
    at = f"At {where}, c" if where else "C"
    out = []
    for frac, cos in curve.sae_equivalent_cos.items():
        noise = f"{at}osine-matched noise at norm {frac}·‖x‖"
        if cos is None:
            out.append(f"{noise} never does the SAE's damage (KL {fmt(sae.kl_mean)}) on the measured grid: the SAE's "
                       f"KL lies outside the curve's range (SAE cos {fmt_fixed(sae.cos_mean)}).")
            continue
        sentence = (f"{noise} does the SAE's damage (KL {fmt(sae.kl_mean)}) at cos {fmt_fixed(cos)}; the SAE's own "
                    f"cos(x, x̂) is {fmt_fixed(sae.cos_mean)}")
        if sae.cos_mean is not None and round(cos, 3) < round(sae.cos_mean, 3):
            sentence += ": its error does more damage than random noise at its cosine"
        elif sae.cos_mean is not None and round(cos, 3) > round(sae.cos_mean, 3):
            sentence += ": its error does less damage than random noise at its cosine"
        out.append(sentence + ".")
    return out


def compounding_finding(found: Compounding, model: str) -> str:
    """A joint run in one sentence: the SAEs patched together against random errors of the same sizes, against
    the largest single-site ratio, and how the SAE's KL adds up over the sites."""
    sites = [site.hook_name for site in found.sites]
    joint = found.joint_kl_ratio
    head = f"With the SAEs of {', '.join(sites)} of {model} patched in the same forward"
    if joint is None:
        sentence = f"{head}, no {BASELINE} baseline was compared, so there is no joint ratio"
    else:
        sentence = (f"{head}, they move the next-token distribution "
                    f"{fmt_ci(joint.ratio, joint.ci_low, joint.ci_high).replace(' ', '× ', 1)} as much as random "
                    f"errors of the same sizes")
        diff = found.joint_minus_max_single_ratio
        if diff is not None and found.max_single is not None:
            side = "above" if (diff.estimate or 0) > 0 else "below"
            sentence += (f", {side} the largest ratio of a site alone ({found.max_single}: "
                         f"{fmt_fixed(found.max_single_kl_ratio)}; difference "
                         f"{fmt_ci(diff.estimate, diff.ci_low, diff.ci_high)}, one-sided p = {fmt_p(diff.p_value)})")
    sae = found.additivity.get("sae")
    if sae is not None:
        ratio = sae.joint_over_sum
        sentence += (f"; the SAE's KL is {sae.verdict} over the sites (joint KL "
                     f"{fmt_ci(ratio.ratio, ratio.ci_low, ratio.ci_high).replace(' ', '× ', 1)} the sum of the sites "
                     "alone)")
    return sentence + "."


def compare_finding(rows: Sequence[SummaryRow]) -> str:
    """A comparison in one sentence: at how many of the runs the SAE's KL ratio over the baseline is resolved
    above 1, below 1, or not resolved, and the range of the ratios."""
    measured = [r for r in rows if r.ratio is not None]
    if not measured:
        return f"None of the {len(rows)} runs compared the SAE with {BASELINE}, so there is no ratio to compare."
    above = sum(1 for r in measured if r.ratio_ci_low is not None and r.ratio_ci_low > 1)
    below = sum(1 for r in measured if r.ratio_ci_high is not None and r.ratio_ci_high < 1)
    counts = {"above 1": above, "below 1": below, "including 1 (no gap resolved)": len(measured) - above - below}
    where = ", ".join(f"{side} at {n} run{'s' * (n != 1)}" for side, n in counts.items() if n)
    ratios = [r.ratio for r in measured]
    if len(measured) == 1:
        head = f"KL(sae)/KL({BASELINE}) is {fmt_fixed(ratios[0])}×, its 95% interval {where.replace(' at 1 run', '')}"
    else:
        head = (f"Across {len(measured)} runs, KL(sae)/KL({BASELINE}) ranges from {fmt_fixed(min(ratios))}× to "
                f"{fmt_fixed(max(ratios))}×; its 95% interval lies {where}")
    missing = len(rows) - len(measured)
    return head + (f" ({missing} more without the baseline)" if missing else "") + "."
