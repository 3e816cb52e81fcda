"""klgap from Python: measure an SAE on a model you already hold (a notebook's objects), or by name as the CLI.

>>> result = klgap.measure(model, sae, tokens=4096)          # a transformers / nnsight model, a sae_lens SAE
>>> result.ratio, result.summary(), result.plot("kl_bars")
>>> klgap.load_run("runs/x").report == klgap.measure(..., out="runs/x").report

Argument names are the CLI's flags (``tokens``, ``context_len``, ``batch_size``, ``position``, ``k``,
``n_samples``, ...). Bad input raises :class:`klgap.KlgapError` with the CLI's one-line message.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from klgap.errors import KlgapError, NoTokenizer
from klgap.plan.config import RunConfig
from klgap.plan.specs import split_interventions
from klgap.report.schema import BASELINE, RatioCI, Report, StudyReport
from klgap.report.read import load_report

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from klgap.job.command import JobResult
    from klgap.plan.dryrun import DryRun

T = TypeVar("T")
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
    measurement: equal reports (provenance included, so two runs of one command differ by their times) and equal
    token tables; where they are saved (`path`) is not part of the value. Results are mutable, so not hashable.
    """

    report: Report
    tokens: pd.DataFrame
    path: Path | None = None
    _html: str | None = field(default=None, init=False, repr=False)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Result):
            return NotImplemented
        return self.report == other.report and self.tokens.equals(other.tokens)

    __hash__ = None  # type: ignore[assignment]

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
        """The same report and the same per-token table (wherever each is saved)."""
        if not isinstance(other, Result):
            return NotImplemented
        return self.report == other.report and self.tokens.equals(other.tokens)

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


def load_result(folder: str | Path) -> Result | StudyResult:
    """A saved run or study folder as a Result, or a StudyResult with each run's."""
    folder = Path(folder)
    report = load_report(folder)
    if isinstance(report, Report):
        return load_run(folder)
    return StudyResult(report, [load_run(folder / run.path) for run in report.runs], folder)


# ----------------------------------------------------------------------------- measuring


def in_python_words(function: Callable[..., T]) -> Callable[..., T]:
    """Errors whose command-line message names a flag (klgap.errors.NoTokenizer), said with Python's arguments."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return function(*args, **kwargs)
        except NoTokenizer as exc:
            raise exc.for_python() from None

    return wrapper


@in_python_words
def measure(model: Any, sae: Any, *, tokens: Any = 8192, site: str | list[str] | None = None,
            layer: int | str | list[int] | None = None, mode: str = "all_tokens",
            interventions: str | list[str] | None = None, seed: int = 0, dataset: str | None = None,
            tokenizer: Any = None, name: str | None = None, out: str | Path | None = None, overwrite: bool = False,
            progress: bool = True, checkpoints: str | Path | None = None, dry_run: bool = False,
            **options: Any) -> Result | StudyResult | DryRun:
    """Measure the KL gap of `sae` on `model` (what ``klgap replicate`` does): a :class:`Result` for one site or
    a joint run, a :class:`StudyResult` for several sites, layers, SAEs or checkpoints.

    model:  a registered name, hub repo id or local folder (as ``--model``); or a ``transformers`` causal LM
            (tokenizer= optional) or an nnsight ``LanguageModel`` wrapping one: its sites are found by the same
            adapters the CLI uses, and it stays on its device and dtype.
    name:   a held model's name in the report, its tokens table and compare (default: its config.name_or_path,
            else its model_type; give one to tell two held models apart).
    sae:    a spec string (as ``--sae``; {site}/{layer} in it for several sites/layers; a glob measures every
            checkpoint it matches), a sae_lens ``SAE`` or any module with ``encode``/``decode`` (its
            ``cfg.hook_name`` / ``cfg.metadata.hook_name`` names the site; else give site= and layer=), or a list
            of these: one run each (seeds, sweep members), or with ``joint=True`` one per (site, layer).
    site, layer: one, or lists (``layer=[3, 10]``, ``"0-5"``): one run per (site, layer), a study report over them.
    tokens: a token budget (int; text from ``dataset``, default the built-in sample), a ``[n ctx]`` LongTensor
            of token ids, a list of strings, or a ``datasets.Dataset`` with a text column.
    out:    None measures without leaving files behind; a folder writes the CLI's run folder (resumable, and
            ``klgap report`` / ``merge`` / ``compare`` read it) under ``--out``'s rule (a new or empty folder, or
            a klgap run's). Other token ids (hashed) or another SAE (its weights hashed) there is another run:
            refused unless ``overwrite=True``.
    checkpoints: an SAE folder trained with checkpoints (``klgap train-sae --checkpoints N``): every checkpoint
            measured on the same tokens, the study's over-training section.
    dry_run: resolve and check everything, load nothing; returns what would run (klgap.plan.dryrun.DryRun).
    options: the other flags by name: context_len, batch_size, position, k, n_samples, sample_intervention,
            device, dtype, mask_special, drop_last_position, no_bos, no_fast, joint, joint_subsets,
            fit_tokens.
    joint=True: every site x layer listed (``site="resid_post", layer=[3, 10, 17]``) patched in the same forward,
            each with its own SAE: `sae` a spec with {site}/{layer}, or a list of SAEs in that order; each site is
            also measured alone, and ``result.report.compounding`` compares them (klgap/job/plan.py).
    """
    import torch

    from klgap.job.plan import checkpoint_spec, plan_job
    from klgap.plan.resolve import TokenSourceRef, pick_device
    from klgap.plugins.held import GivenTokens, given_name, model_ref, sae_object, token_ids

    name, ref = model_ref(model, tokenizer, name)
    values: dict[str, Any] = {"model": name, "site": ",".join(site) if isinstance(site, (list, tuple)) else site,
                              "layer": list(layer) if isinstance(layer, tuple) else layer, "mode": mode, "seed": seed,
                              **options}
    if ref is not None:  # a held model runs where it is
        values = {**ref.adapter.placement(), **values}
    if interventions is not None:
        values["interventions"] = split_interventions(interventions)
    if dataset is not None:
        values["dataset"] = dataset
    if isinstance(sae, (str, Path)):
        values["sae"] = str(sae)
    given = None
    readable = isinstance(tokens, (int, torch.Tensor, list, tuple)) or hasattr(tokens, "column_names")
    if isinstance(tokens, bool) or not readable:
        raise KlgapError(f"tokens={tokens!r} is not a token budget (an int), a [n_contexts context_len] tensor of "
                         "token ids, a list of strings or a datasets.Dataset with a text column")
    if isinstance(tokens, int):
        values["tokens"] = tokens
    else:
        config = RunConfig.from_dict(values)
        if isinstance(tokens, torch.Tensor):
            if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
                raise KlgapError(f"tokens= as ids must be a [n_contexts context_len] integer tensor, got "
                                 f"{tuple(tokens.shape)} {tokens.dtype}")
            ids = tokens.long().cpu()
        else:
            ids = token_ids(tokens, ref or name, config.context_len, config.prepend_bos, config.device, config.dtype)
        values.update(tokens=int(ids.numel()), context_len=int(ids.shape[1]))
        given = TokenSourceRef("given", f"{ids.shape[0]}x{ids.shape[1]} token ids", "python", GivenTokens(ids))
        values["dataset"] = given_name(ids)  # in the run's identity: other ids into the same out= are another run
    config = RunConfig.from_dict(values)
    saes = None
    if isinstance(sae, (list, tuple)):  # one per (site, layer) of a joint run, else one run each
        saes = [str(s) if isinstance(s, (str, Path)) else sae_object(s, pick_device(config.device)) for s in sae]
    elif sae is not None and not isinstance(sae, (str, Path)):
        saes = [sae_object(sae, pick_device(config.device))]
    spec = None if config.joint else checkpoint_spec(config.sae, str(checkpoints) if checkpoints else None)
    job = plan_job(config, checkpoints=spec, saes=saes, model=ref, tokens=given)
    if dry_run:
        from klgap.plan.dryrun import describe

        return describe(job.config, job.plans, job.saes, job.checked)
    return _run(job, out, overwrite, progress)


def _run(job: Any, out: str | Path | None, overwrite: bool, progress: bool) -> Result | StudyResult:
    """Run a job into `out` (under its lock, as the CLI), or into a temporary folder left behind empty."""
    from klgap.job.execute import run_job

    if out is not None:
        from klgap.job.outdir import claimed

        from klgap.job.outdir import claimed

        # as the CLI: --out's rule, and a second process writing `out` refused
        with claimed(out, "study" if job.study else "run", flag="out="):
            run_job(job, out, overwrite=overwrite, progress=progress)
        return load_result(out)
    with tempfile.TemporaryDirectory(prefix="klgap-") as tmp:
        run_job(job, Path(tmp) / "run", progress=progress)
        result = load_result(Path(tmp) / "run")
    result.path = None
    if isinstance(result, StudyResult):
        for run in result.runs:
            run.path = None
    return result


def run(config: str | Path | RunConfig, *, out: str | Path | None = None, command: str | None = None,
        shard: tuple[int, int] | str | None = None, overwrite: bool = False, progress: bool = True,
        wait: bool = False, dry_run: bool = False) -> JobResult:
    """``klgap replicate --config FILE`` from Python (``klgap curve`` for a file that holds a ``cos`` grid, or
    ``command="curve"``): resolve, train the SAEs its ``[train_sae]`` table makes that are missing, lock the
    folder, run, check expected.json beside the file, write the pages and figures. Returns a
    :class:`klgap.job.command.JobResult` (its ``report``, ``out``, ``check``; ``plan`` for a dry run).

    config: a replication file (TOML or JSON), or a :class:`RunConfig`. out: its folder (default: the file's
    ``out``, else ``runs/...``). shard: ``(i, n)`` or ``"i/n"``, as ``--shard``."""
    from klgap.job.command import Request, curve_request, request_from, run_request
    from klgap.job.distributed import read_world
    from klgap.job.shards import parse_shard

    if isinstance(shard, str):
        shard = parse_shard(shard)
    options: dict[str, Any] = {"out": out, "shard": shard, "overwrite": overwrite, "progress": progress,
                               "wait": wait, "dry_run": dry_run}
    if isinstance(config, RunConfig):
        request = Request(config, tag=config.mode, **options)
    else:
        request = request_from({}, config, **options)
    if command not in (None, "replicate", "curve"):
        raise KlgapError(f"command={command!r}: klgap.run runs replicate or curve")
    if command == "curve" or (command is None and {"cos", "norm_frac", "along"} & set(request.extra)):
        request = curve_request(request)
    return run_request(request, read_world())


def curve(model: Any, sae: Any, *, cos: str | None = None, norm_frac: str | float | None = None,
          along: str | None = None, scale: str | None = None, baselines: str | list[str] | None = None,
          interventions: str | list[str] | None = None, **kwargs: Any) -> Result:
    """``klgap curve``: KL of cosine_matched noise over a grid of cosines (default 0.5:1.0:11, norm_frac 0.9), with
    sae and epsilon_random, and the SAE's own point on it (``result.report.curve``, ``result.plot("robustness")``).
    With ``along="error"``: a length sweep instead, x + t·(x̂ − x) for each t of `scale` (default "0:2:21"; t = 1 is
    the SAE) and x + t·ε·u along each of `baselines` (default epsilon_random, cov_random_mixture, real_direction)
    (``result.report.sweep``, ``result.plot("length_sweep")``). Other arguments as measure."""
    from klgap.report.robustness import curve_interventions, parse_cos_grid, parse_norm_fracs
    from klgap.report.sweep import sweep_specs

    if along is not None:
        if cos is not None or norm_frac is not None:
            raise KlgapError(f"{'cos' if cos is not None else 'norm_frac'}= sizes a cosine curve, not a length sweep "
                             "(along=); give scale= instead, e.g. '0:2:21'")
        grid = sweep_specs(along, scale, baselines)
    elif scale is not None or baselines is not None:
        raise KlgapError(f"{'scale' if scale is not None else 'baselines'}= sizes a length sweep; give it with "
                         "along='error'")
    else:
        grid = curve_interventions(parse_cos_grid(str(cos if cos is not None else "0.5:1.0:11")),
                                   parse_norm_fracs(str(norm_frac if norm_frac is not None else "0.9")))
    chosen = split_interventions(interventions) if interventions else []
    return measure(model, sae, interventions=grid + [s for s in chosen if s not in grid], **kwargs)


def compare(runs: list[Result | str | Path], labels: list[str] | None = None) -> pd.DataFrame:
    """Runs side by side (``klgap compare``'s table): Results or run / study folders, one row per site/layer.
    Without `labels`, a row is labelled by its model and site/layer, and rows that would share a label (two held
    models both called 'llama': give measure(name=...)) are told apart by their run's place in `runs` ('#2')."""
    import pandas as pd

    from klgap.report.compare import COLUMNS, Entry, entries_for
    from klgap.report.panel import baseline_panel
    from klgap.report.summary import summary_row

    if labels is not None and len(labels) != len(runs):
        raise KlgapError(f"labels has {len(labels)} entries for {len(runs)} runs; give one per run")
    entries, runs_of = [], []
    for i, run in enumerate(runs):
        label = labels[i] if labels else None
        if isinstance(run, Result):
            report = run.report
            row = summary_row(report, report.model, report.mode)
            found = [Entry(label or f"{report.model} {row.where}", str(run.path or ""), row, report.curve,
                           baseline_panel(report, report.model, report.mode), report.size_bins)]
        else:
            found = entries_for(run, label)
        entries += found
        runs_of += [i] * len(found)
    seen = [e.label for e in entries]
    entries = [replace(e, label=f"{e.label} #{i + 1}") if seen.count(e.label) > 1 else e
               for e, i in zip(entries, runs_of, strict=True)]
    return pd.DataFrame([{k: r[k] for k in COLUMNS} for r in (e.record() for e in entries)], columns=COLUMNS)


@in_python_words
def train_sae(model: Any, site: str | list[str], layer: int | str | list[int], out: str | Path, *,
              tokenizer: Any = None, **flags: Any) -> pd.DataFrame:
    """``klgap train-sae`` (same argument names as its flags: tokens, context_len, dataset, expansion, l1, lr,
    steps or epochs (default one pass over tokens), b_dec_init, seed, device, dtype, batch_size): one row per SAE
    trained, with its held-out numbers.

    model: as for :func:`measure`: a name, hub repo id or folder, or a transformers / nnsight model you hold
    (trained on where it is)."""
    import pandas as pd

    from klgap.plugins.held import model_ref
    from klgap.sae.train import train_saes

    name, ref = model_ref(model, tokenizer)
    if ref is not None:  # a held model gathers where it is
        flags = {**ref.adapter.placement(), **flags}
    return pd.DataFrame(train_saes(ref or name, site, layer, out, **flags))


__all__ = ["Result", "StudyResult", "compare", "curve", "load_result", "load_run", "measure", "run", "train_sae"]
