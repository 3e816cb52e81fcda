"""The second-order section of report.md / report.html and the console (klgap/report/second_order.py): measured
against predicted KL per intervention, the ratios SAE / baseline both ways, the site's Fisher sensitivity, or a
study's table of the sensitivity across sites. Every number comes from the report."""

from __future__ import annotations

from klgap.render.blocks import Block, Heading, Para, Table
from klgap.render.formatting import DASH, fmt, fmt_ci, fmt_ci_sig
from klgap.report.schema import MeanCI, RatioCI, Report, StudyReport
from klgap.report.second_order import SecondOrder, Sensitivity

ABOUT = ("To second order a patch δ = x' − x at the site changes the next-token distribution at each measured "
         "position by KL ≈ ½ (Jδ)ᵀ(diag p − ppᵀ)(Jδ), J the Jacobian of the logits with respect to the site "
         "(forward-mode JVPs through the layers above it) and p the clean distribution. Measured/predicted ≈ 1 "
         "where the regime is quadratic, below 1 where the KL saturates. Intervals are bootstraps over whole "
         "contexts.")
SENSITIVITY = ("F is each context's Fisher of its measured next-token distributions with respect to the site's "
               "activations at its patched positions (N = patched positions × d coordinates), so that the summed KL "
               "≈ ½ δᵀFδ. Isotropic: tr(F)/N (Hutchinson, {probes} Rademacher probes per context); covariance-shaped: "
               "tr(FΣ_x)/tr(Σ_x) ({probes} probes of centred activations of random tokens); SAE error: its Rayleigh "
               "quotient δᵀFδ/‖δ‖². Top-{k} share: the share of the SAE error's energy in F's top {k} eigendirections "
               "({steps} Lanczos steps on Fisher-vector products; {converged} of the pairs within ‖Fv − θv‖ ≤ "
               "{tolerance}·θ₁), beside k/N, an isotropic error's share.")


def _mean(value: MeanCI | None) -> str:
    return DASH if value is None else fmt_ci_sig(value.mean, value.ci_low, value.ci_high)


def _ratio(value: RatioCI | None) -> str:
    return DASH if value is None else fmt_ci(value.ratio, value.ci_low, value.ci_high)


def sensitivity_text(found: Sensitivity) -> str:
    return SENSITIVITY.format(probes=found.probes, k=found.top_k, steps=found.lanczos_steps,
                              converged=fmt(found.converged, 3), tolerance=fmt(found.tolerance))


def sensitivity_table(found: Sensitivity) -> Table:
    return Table(["isotropic tr(F)/N [95% CI]", "covariance tr(FΣ)/tr(Σ) [95% CI]", "SAE error δᵀFδ/‖δ‖² [95% CI]",
                  "SAE / isotropic", "SAE / covariance", f"top-{found.top_k} share", "isotropic share k/N"],
                 [[_mean(found.isotropic), _ratio(found.covariance), _ratio(found.sae_error),
                   _ratio(found.sae_vs_isotropic), _ratio(found.sae_vs_covariance), _ratio(found.top_share),
                   fmt(found.top_share_isotropic, 3)]])


def run_blocks(found: SecondOrder) -> list[Block]:
    blocks: list[Block] = [
        Heading(2, "Second order: measured against predicted KL"), Para(ABOUT),
        Table(["intervention", "measured KL [95% CI]", "predicted KL [95% CI]", "measured / predicted [95% CI]"],
              [[p.intervention, _mean(p.measured), _mean(p.predicted), _ratio(p.measured_over_predicted)]
               for p in found.interventions]),
    ]
    if found.ratios:
        blocks.append(Table(["baseline", "KL(sae)/KL(baseline) measured [95% CI]", "predicted [95% CI]"],
                            [[r.baseline, _ratio(r.measured), _ratio(r.predicted)] for r in found.ratios]))
    if found.sensitivity is not None:
        blocks += [Heading(3, "Sensitivity of the site's directions"), Para(sensitivity_text(found.sensitivity)),
                   sensitivity_table(found.sensitivity)]
    return blocks


def study_blocks(study: StudyReport) -> list[Block]:
    runs = [run for run in study.runs if getattr(run, "second_order", None) is not None]
    rows = []
    for run in runs:
        found: SecondOrder = run.second_order
        sae = next((p for p in found.interventions if p.intervention == "sae"), None)
        s = found.sensitivity
        rows.append([f"{run.site} L{run.layer}", _ratio(sae.measured_over_predicted) if sae else DASH,
                     *((_ratio(s.sae_vs_isotropic), _ratio(s.sae_vs_covariance), _ratio(s.top_share))
                       if s is not None else (DASH, DASH, DASH))])
    if not rows:
        return []
    return [Heading(2, "Second order across sites"), Para(ABOUT),
            Table(["site/layer", "sae: measured / predicted KL", "SAE error / isotropic", "SAE error / covariance",
                   "top-k share"], rows)]


def blocks(report: Report | StudyReport) -> list[Block]:
    """The section for a run report or a study report."""
    if isinstance(report, StudyReport):
        return study_blocks(report)
    found = getattr(report, "second_order", None)
    return [] if found is None else run_blocks(found)


def sensitivity_line(s: Sensitivity) -> str:
    return (f"SAE error's Fisher Rayleigh quotient: {fmt(s.sae_vs_isotropic.ratio, 3)}× isotropic noise's, "
            f"{fmt(s.sae_vs_covariance.ratio, 3)}× covariance-shaped noise's; {fmt(s.top_share.ratio, 3)} of its "
            f"energy in F's top {s.top_k} directions (isotropic: {fmt(s.top_share_isotropic, 3)})")


def console_lines(report: Report | StudyReport) -> list[str]:
    """Measured / predicted KL per intervention and the SAE error's sensitivity against noise (a study: a line per
    site)."""
    if isinstance(report, StudyReport):
        return [f"{run.site} L{run.layer}: " + sensitivity_line(run.second_order.sensitivity) for run in report.runs
                if getattr(run, "second_order", None) is not None and run.second_order.sensitivity is not None]
    found: SecondOrder = report.second_order
    width = max([len("intervention"), *(len(p.intervention) for p in found.interventions)])
    lines = [f"{'intervention':<{width}} {'measured KL':>12} {'predicted KL':>13} {'measured/predicted':>19}"]
    lines += [f"{p.intervention:<{width}} {fmt(p.measured.mean):>12} {fmt(p.predicted.mean):>13} "
              f"{fmt(p.measured_over_predicted.ratio, 3):>19}" for p in found.interventions]
    if found.sensitivity is not None:
        lines.append(sensitivity_line(found.sensitivity))
    return lines
