"""What a measurement gives back in Python: :class:`Result` (one run: its typed report, its per-token table, its
folder), :class:`StudyResult` (several runs of one command) and the readers of saved folders (:func:`load_run`,
:func:`load_result`). klgap/api.py makes them; a notebook shows them (klgap/render/notebook.py).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from klgap.errors import KlgapError
from klgap.report.read import load_report
from klgap.report.schema import BASELINE, RatioCI, Report, StudyReport

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

PLOTS = ("kl_bars", "kl_hist", "kl_by_position", "single_token", "many_samples", "robustness", "length_sweep")


# ----------------------------------------------------------------------------- the result


@dataclass(eq=False)
class Result:
    """One measurement: the typed report, the per-token table, and (if it was saved) its folder.

    report: :class:`klgap.Report` (``report.model_dump(mode="json")`` is what report.json holds).
    tokens: one row per token × intervention, with ``model``, ``site``, ``layer`` and ``sae`` columns, so that
            ``pd.concat`` of several results stays tidy.
    path:   the run folder (None when measured in memory).

    A notebook shows a Result as its page opens (the finding, the key table, the figures: ``_repr_html_``);
    ``repr`` gives the finding and the key table as text. Two Results are equal when they hold the same
    measurement: equal reports but for their provenance (when and with which versions each ran: a run repeated
    with the same inputs is equal) and equal token tables; where they are saved (`path`) is not part of the value.
    Results are mutable, so not hashable.
    """

    report: Report
    tokens: pd.DataFrame
    path: Path | None = None
    _html: str | None = field(default=None, init=False, repr=False)

    def __repr__(self) -> str:
        from klgap.render.notebook import result_text

        return result_text(self.report, self.path)

    def _repr_html_(self) -> str:
        """The page's opening block and key table, then the figures inline (drawn once, then kept)."""
        from klgap.render.notebook import result_html

        if self._html is None:
            self._html = result_html(self.report, self.tokens, self.path)
        return self._html

    def __eq__(self, other: object) -> bool:
        """The same measurement: equal reports but for their provenance (when, where and with which versions it
        ran) and the same per-token table, wherever each is saved; a run repeated with the same inputs is equal."""
        if not isinstance(other, Result):
            return NotImplemented
        return (self.report.model_dump(exclude={"provenance"}) == other.report.model_dump(exclude={"provenance"})
                and self.tokens.equals(other.tokens))

    __hash__ = None  # type: ignore[assignment]  (mutable, compared by content)

    @property
    def ratio(self) -> RatioCI | None:
        """KL(sae)/KL(epsilon_random) with its 95% context-bootstrap interval (None without that baseline)."""
        comparison = self.report.comparisons.get(BASELINE)
        return comparison.kl_ratio if comparison is not None else None

    def verdict(self) -> str:
        """The run's finding in one sentence, as its report.md opens: against every baseline measured when there
        are several (klgap.report.panel.opening_sentence), else klgap.report.summary.SummaryRow.verdict."""
        from klgap.report.panel import opening_sentence

        return opening_sentence(self.report, self.report.model, self.report.mode)

    def panel(self) -> pd.DataFrame:
        """The baseline panel (klgap/report/panel.py): one row per baseline measured, indexed by its name, with how
        a sentence names it, KL(sae)/KL(baseline) with its 95% interval, the Wilcoxon p and its Holm correction,
        the verdict (holds / reversed / not resolved) and its line; empty for a report that does not say which
        interventions are baselines."""
        import pandas as pd

        from klgap.report.panel import baseline_panel

        panel = baseline_panel(self.report, self.report.model, self.report.mode)
        rows = [{"baseline": r.baseline, "label": r.label, "ratio": r.ratio, "ci_low": r.ci_low, "ci_high": r.ci_high,
                 "p_value": r.p_value, "p_holm": r.p_holm, "holm_family": r.holm_family, "verdict": r.verdict,
                 "line": r.line()} for r in (panel.rows if panel is not None else ())]
        columns = ["baseline", "label", "ratio", "ci_low", "ci_high", "p_value", "p_holm", "holm_family", "verdict", "line"]
        return pd.DataFrame(rows, columns=columns).set_index("baseline")

    def summary(self) -> pd.DataFrame:
        """The console table as a DataFrame: one row per intervention, with its KL/ΔCE statistics and, for
        each baseline, the SAE's KL ratio over it (95% CI), the Wilcoxon p-value (Holm-corrected within
        holm_family) and the paired ΔCE difference SAE − baseline; for the baselines of the panel
        (:meth:`panel`) how a sentence names them (``baseline``) and the verdict. ``.attrs["finding"]`` is the
        sentence the report opens with (:meth:`verdict`)."""
        import pandas as pd

        panel = self.panel()
        rows = []
        for name, stats in self.report.interventions.items():
            row: dict[str, Any] = {"intervention": name, **stats.model_dump()}
            comparison = self.report.comparisons.get(name)
            row.update(
                ratio_sae_over_this=comparison.kl_ratio.ratio if comparison else None,
                ci_low=comparison.kl_ratio.ci_low if comparison else None,
                ci_high=comparison.kl_ratio.ci_high if comparison else None,
                p_value=comparison.wilcoxon_kl.p_value if comparison else None,
                p_holm=comparison.wilcoxon_kl.p_holm if comparison else None,
                holm_family=comparison.wilcoxon_kl.holm_family if comparison else None,
                ce_delta_diff=comparison.ce_delta_difference.mean if comparison and comparison.ce_delta_difference else None,
                baseline=panel.loc[name, "label"] if name in panel.index else None,
                verdict=panel.loc[name, "verdict"] if name in panel.index else None,
            )
            rows.append(row)
        frame = pd.DataFrame(rows).set_index("intervention")
        frame.attrs["finding"] = self.verdict()
        return frame

    def plot(self, kind: str = "kl_bars") -> Figure:
        """A matplotlib figure of this run: kl_bars, kl_hist, kl_by_position, single_token, many_samples,
        robustness or length_sweep (those that apply to its mode and interventions)."""
        from klgap.figures import runs as plots

        _show_figures_in_notebooks()
        report, tokens = self.report, self.tokens
        if kind == "kl_bars":
            return plots.kl_bars(report, None, tokens=tokens)
        if kind == "kl_hist":
            return plots.kl_histogram(tokens, None, report)
        if kind == "kl_by_position" and report.mode == "all_tokens":
            return plots.kl_by_position(tokens, None, report)
        if kind == "single_token" and report.mode == "single_token":
            return plots.single_token_curve(tokens, None, report)
        if kind == "many_samples" and report.mode == "many_samples":
            return plots.many_samples_hist(tokens, report, None)
        if kind == "robustness" and report.curve is not None:
            points, stars = plots.curves_of([(plots.site_label(report), report.curve)])
            return plots.robustness_curve(points, None, stars, plots.run_label(report))
        if kind == "length_sweep" and report.sweep is not None:
            return plots.length_sweep(report.sweep, None, plots.run_label(report), report.baselines)
        if kind not in PLOTS:
            from klgap.errors import unknown

            raise unknown("plot kind", kind, PLOTS)
        raise KlgapError(f"plot {kind!r} does not apply to this {report.mode} run"
                         + (" (it has no cosine_matched interventions)" if kind == "robustness" else "")
                         + (" (it has no length sweep: klgap.curve(..., along='error'))" if kind == "length_sweep" else ""))

    def save(self, folder: str | Path) -> Path:
        """Write the run folder (report.json, tokens.parquet, report.md/html and figures) to `folder`."""
        from klgap.render.pages import rebuild
        from klgap.job.folder import atomic_write_json, atomic_write_parquet
        from klgap.job.outdir import OWN_FILES, claimed
        from klgap.report.schema import as_json

        folder = Path(folder)
        with claimed(folder, "run", flag="folder="):  # --out's rule: a new or empty folder, or a klgap run's
            if self.path is not None and self.path.resolve() != folder.resolve():
                shutil.copytree(self.path, folder, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns(*OWN_FILES))
            elif self.path is None:
                atomic_write_json(folder / "report.json", as_json(self.report))
                atomic_write_parquet(folder / "tokens.parquet", self.tokens.drop(columns=list(LABELS)))
            rebuild(folder)
        return folder


LABELS = ("model", "site", "layer", "sae")


def _show_figures_in_notebooks() -> None:
    """In IPython, make a returned Figure display as a PNG (klgap draws without pyplot, so the inline backend
    may not have registered its formatter); the user's backend is left as it is."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:
        return
    from matplotlib.figure import Figure

    try:
        shell.display_formatter.formatters["image/png"].lookup_by_type(Figure)
    except KeyError:
        from IPython.core.pylabtools import select_figure_formats

        select_figure_formats(shell, {"png"})


def load_run(folder: str | Path) -> Result:
    """A saved run folder (written by ``klgap replicate``, ``klgap merge`` or ``measure(out=...)``) as a Result."""
    import pandas as pd

    folder = Path(folder)
    report = load_report(folder)
    if not isinstance(report, Report):
        raise KlgapError(f"{str(folder)!r} holds a study (several sites/layers); load one of its run folders: "
                         f"{', '.join(run.path for run in report.runs)}")
    tokens = pd.read_parquet(folder / "tokens.parquet")
    labels = {"model": report.model, "site": report.site, "layer": report.layer, "sae": report.sae.source}
    for i, (name, value) in enumerate(labels.items()):
        tokens.insert(i, name, value)
    return Result(report, tokens, folder)


@dataclass
class StudyResult:
    """Several measurements of one command (sites, layers, SAEs or checkpoints): the study report and each run's
    Result, in the study's order; ``tokens`` stacks their per-token tables (labelled by model, site, layer, sae)."""

    report: StudyReport
    runs: list[Result]
    path: Path | None = None

    @property
    def tokens(self) -> pd.DataFrame:
        import pandas as pd

        return pd.concat([run.tokens for run in self.runs], ignore_index=True)

    def between_saes(self) -> pd.DataFrame:
        """Several SAEs of one site that differ in their seed only (``train-sae --seeds``) or their architecture only
        (klgap/report/between_saes.py): one row per SAE with its own ratio to the baseline (interval over contexts),
        and its group's recipe ratio over seeds with the two-level interval (seeds and contexts), the range of the
        SAEs' ratios and the seed's share of the variance (NaN for an architecture control). Empty when the study
        has no such group. ``.attrs["findings"]``: each group's sentence."""
        import pandas as pd

        rows = []
        groups = self.report.between_saes or []  # a registered section: a field of every study report
        for g in groups:
            pooled = g.kl_ratio
            for s in g.saes:
                rows.append({"site": g.site, "layer": g.layer, "kind": g.kind, "path": s.path, "sae": s.sae,
                             "seed": s.seed, "architecture": s.architecture, "ratio": s.kl_ratio.ratio,
                             "ci_low": s.kl_ratio.ci_low, "ci_high": s.kl_ratio.ci_high,
                             "recipe_ratio": pooled.ratio if pooled else None,
                             "recipe_ci_low": pooled.ci_low if pooled else None,
                             "recipe_ci_high": pooled.ci_high if pooled else None,
                             "ratio_min": g.ratio_min, "ratio_max": g.ratio_max,
                             "sae_variance_share": g.sae_variance_share})
        columns = ["site", "layer", "kind", "path", "sae", "seed", "architecture", "ratio", "ci_low", "ci_high",
                   "recipe_ratio", "recipe_ci_low", "recipe_ci_high", "ratio_min", "ratio_max", "sae_variance_share"]
        frame = pd.DataFrame(rows, columns=columns)
        frame.attrs["findings"] = [g.finding for g in groups]
        return frame


def load_result(folder: str | Path) -> Result | StudyResult:
    """A saved run or study folder as a Result, or a StudyResult with each run's."""
    folder = Path(folder)
    report = load_report(folder)
    if isinstance(report, Report):
        return load_run(folder)
    return StudyResult(report, [load_run(folder / run.path) for run in report.runs], folder)


__all__ = ["PLOTS", "Result", "StudyResult", "load_result", "load_run"]
