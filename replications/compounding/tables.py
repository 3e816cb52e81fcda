"""Print the README's three tables (markdown) from a joint run folder's report.json, e.g. the committed one:

    .venv/bin/python replications/compounding/tables.py replications/compounding/results

tests/replications/test_compounding_results.py checks that the README's tables are these, cell for cell.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from klgap.render.formatting import fmt, fmt_ci, fmt_p  # noqa: E402
from klgap.render.compounding_page import subset_table  # noqa: E402
from klgap.report.read import load_report  # noqa: E402


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def main(folder: str) -> None:
    found = load_report(folder).compounding
    names = list(found.additivity)
    print(markdown(["site", "KL ratio sae/epsilon_random [95% CI]", *(f"KL {n}" for n in names)],
                   [[s.hook_name, fmt_ci(s.kl_ratio.ratio, s.kl_ratio.ci_low, s.kl_ratio.ci_high),
                     *(fmt(s.kl_mean[n]) for n in names)] for s in found.sites]))
    print()
    print(markdown(["intervention", "joint KL", "Σ KL alone", "joint/Σ [95% CI]", "Wilcoxon p", "verdict"],
                   [[n, fmt(a.joint_kl_mean), fmt(a.sum_single_kl_mean),
                     fmt_ci(a.joint_over_sum.ratio, a.joint_over_sum.ci_low, a.joint_over_sum.ci_high),
                     fmt_p(a.wilcoxon_joint_vs_sum.p_value), a.verdict] for n, a in found.additivity.items()]))
    print()
    print(markdown(*subset_table(found)))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "replications" / "compounding" / "results"))
