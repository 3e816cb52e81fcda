"""klgap from Python: measure an SAE on a model you already hold (a notebook's objects), or by name as the CLI.

>>> result = klgap.measure(model, sae, tokens=4096)          # a transformers / nnsight model, a sae_lens SAE
>>> result.ratio, result.summary(), result.plot("kl_bars")
>>> klgap.load_run("runs/x").report == klgap.measure(..., out="runs/x").report

Argument names are the CLI's flags (``tokens``, ``context_len``, ``batch_size``, ``position``, ``k``,
``n_samples``, ...). Bad input raises :class:`klgap.KlgapError` with the CLI's one-line message.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from klgap.plan.config import RunConfig, split_interventions
from klgap.errors import KlgapError
from klgap.plugins.manager import ModelRef, get_host
from klgap.protocols import LoadedModel, LoadedSAE
from klgap.report.schema import BASELINE, RatioCI, Report, load_report

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure
    from torch import Tensor

PLOTS = ("kl_bars", "kl_hist", "kl_by_position", "single_token", "many_samples", "robustness", "length_sweep")


# ----------------------------------------------------------------------------- the result


@dataclass
class Result:
    """One measurement: the typed report, the per-token table, and (if it was saved) its folder.

    report: :class:`klgap.Report` (``report.model_dump(mode="json")`` is what report.json holds).
    tokens: one row per token × intervention, with ``model``, ``site``, ``layer`` and ``sae`` columns, so that
            ``pd.concat`` of several results stays tidy.
    path:   the run folder (None when measured in memory).
    """

    report: Report
    tokens: pd.DataFrame
    path: Path | None = None

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
        from klgap.report.schema import as_json

        folder = Path(folder)
        if self.path is not None and self.path.resolve() != folder.resolve():
            shutil.copytree(self.path, folder, dirs_exist_ok=True)
        elif self.path is None:
            folder.mkdir(parents=True, exist_ok=True)
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


# ----------------------------------------------------------------------------- inputs


def _model_ref(model: Any, tokenizer: Any) -> tuple[str, ModelRef | None]:
    """A model name for the config, and for an object the ModelRef that carries it."""
    if isinstance(model, (str, Path)):
        return str(model), None
    loaded = get_host().pm.hook.wrap_model(model=model, tokenizer=tokenizer)
    if loaded is None:
        config = getattr(model, "config", None)
        kind = getattr(config, "model_type", None) or type(model).__name__
        raise KlgapError(f"no model adapter knows model {kind!r}: pass a transformers causal LM, an nnsight "
                         "LanguageModel wrapping one, or a model name / hub repo id / folder (see `klgap plugins`)")
    return loaded.name, ModelRef(loaded.name, HeldModel(loaded), "python")


@dataclass
class HeldModel:
    """A model the caller holds, as an adapter: ``load`` hands it back where it is (no copy)."""

    loaded: LoadedModel
    description: str = "a model object held by the caller (klgap.measure)"

    def placement(self) -> dict[str, str]:
        """The device and dtype flags of where the model is (a held model runs, and gathers, where it is)."""
        return {"device": str(self.loaded.device), "dtype": str(self.loaded.dtype).removeprefix("torch.")}

    def load(self, device: Any, dtype: Any) -> LoadedModel:
        if (str(device), dtype) != (str(self.loaded.device), self.loaded.dtype):
            raise KlgapError(f"the model is on {self.loaded.device} in {self.loaded.dtype}, but device={device} "
                             f"dtype={dtype} was asked for; move it first (model.to(...)) or leave device/dtype out")
        return self.loaded


def _sae_object(sae: Any, device: Any) -> LoadedSAE:
    """An SAE object as a LoadedSAE: through a plugin (sae_lens SAEs), else any module with encode/decode."""
    import torch

    loaded = get_host().pm.hook.wrap_sae(sae=sae, device=device)
    if loaded is not None:
        return loaded
    if not (callable(getattr(sae, "encode", None)) and callable(getattr(sae, "decode", None))):
        raise KlgapError(f"sae={type(sae).__name__} is neither an SAE spec (str), a sae_lens SAE, nor an object "
                         "with encode(x) and decode(features)")
    if isinstance(sae, torch.nn.Module):
        sae = sae.to(device=device, dtype=torch.float32).eval()
    cfg = getattr(sae, "cfg", None)
    hook = getattr(cfg, "hook_name", None) or getattr(getattr(cfg, "metadata", None), "hook_name", None)
    d_in = getattr(cfg, "d_in", None)
    if d_in is None:
        w_dec = getattr(sae, "W_dec", None)
        d_in = w_dec.shape[-1] if w_dec is not None else None
    if d_in is None:
        raise KlgapError(f"cannot tell the width of SAE {type(sae).__name__}: give it cfg.d_in or a W_dec [d_sae d_in]")
    with torch.no_grad():
        d_sae = int(sae.encode(torch.zeros(1, int(d_in), device=device)).shape[-1])
    return LoadedSAE(module=sae, d_in=int(d_in), d_sae=d_sae, hook_name=hook,
                     source=f"in memory: {type(sae).__name__}", architecture=type(sae).__name__,
                     info={"in_memory": True})


@dataclass
class GivenTokens:
    """Token ids the caller handed over, ``[n_contexts context_len]``: used as they are."""

    ids: Tensor
    description: str = "token ids given to klgap.measure"

    def contexts(self, model: Any, n_contexts: int, context_len: int, seed: int, prepend_bos: bool,
                 arg: str | None) -> Tensor:
        return self.ids


def _token_ids(tokens: Any, model: str | LoadedModel | ModelRef, context_len: int, prepend_bos: bool,
               plan_device: str, dtype: str) -> Tensor:
    """Texts (a list of strings, or a datasets.Dataset with a text column) -> contexts packed with the model's
    tokenizer (BOS first), in order; every full context is kept."""
    import torch

    from klgap.job.packing import pack, tokenize_documents

    texts = tokens
    if hasattr(tokens, "column_names"):  # a datasets.Dataset
        columns = [c for c in tokens.column_names if c == "text"] or [
            c for c in tokens.column_names if isinstance(tokens[0][c], str)]
        if not columns:
            raise KlgapError(f"the dataset has no text column (columns: {', '.join(tokens.column_names)})")
        texts = tokens[columns[0]]
    if not texts or not all(isinstance(t, str) for t in texts):
        raise KlgapError("tokens= as texts must be a non-empty list of strings (or a datasets.Dataset with a text column)")
    if isinstance(model, ModelRef):
        loaded = model.adapter.loaded
    else:
        from klgap.job.loading import load_model
        from klgap.plan.resolve import pick_device

        loaded = load_model(model, pick_device(plan_device), getattr(torch, dtype))
    if loaded.tokenizer is None:
        raise KlgapError("tokens= as texts needs the model's tokenizer: pass tokenizer=..., or token ids")
    ids = tokenize_documents(loaded.tokenizer, list(texts))
    bos = loaded.bos_token_id if prepend_bos else None
    n = ids.numel() // (context_len - (bos is not None))
    return pack(ids, max(n, 1), context_len, bos, None, "the texts given to klgap.measure")


# ----------------------------------------------------------------------------- measuring


def measure(model: Any, sae: Any, *, tokens: Any = 8192, site: str | None = None, layer: int | list[int] | None = None,
            mode: str = "all_tokens", interventions: str | list[str] | None = None, seed: int = 0,
            dataset: str | None = None, tokenizer: Any = None, out: str | Path | None = None,
            overwrite: bool = False, progress: bool = True, **options: Any) -> Result:
    """Measure the KL gap of `sae` on `model` (what ``klgap replicate`` does), returning a :class:`Result`.

    model:  a registered name, hub repo id or local folder (as ``--model``); or a ``transformers`` causal LM
            (tokenizer= optional) or an nnsight ``LanguageModel`` wrapping one: its sites are found by the same
            adapters the CLI uses, and it stays on its device and dtype.
    sae:    a spec string (as ``--sae``), a sae_lens ``SAE``, or any module with ``encode``/``decode`` (its
            ``cfg.hook_name`` / ``cfg.metadata.hook_name`` names the site; else give site= and layer=).
    tokens: a token budget (int; text from ``dataset``, default the built-in sample), a ``[n ctx]`` LongTensor
            of token ids, a list of strings, or a ``datasets.Dataset`` with a text column.
    out:    None measures without leaving files behind; a folder writes the CLI's run folder (resumable, and
            ``klgap report`` / ``merge`` / ``compare`` read it).
    options: the other flags by name: context_len, batch_size, position, k, n_samples, sample_intervention,
            device, dtype, include_first_position, drop_last_position, no_bos, no_fast, joint, joint_subsets.
    joint=True: every site x layer listed (``site="resid_post", layer=[3, 10, 17]``) patched in the same forward,
            each with its own SAE: `sae` a spec with {site}/{layer}, or a list of SAE objects in that order; each
            site is also measured alone, and ``result.report.compounding`` compares them (klgap/job/joint.py).
    """
    import torch

    from klgap.job import engine
    from klgap.plan.resolve import TokenSourceRef, pick_device, resolve

    name, ref = _model_ref(model, tokenizer)
    values: dict[str, Any] = {"model": name, "site": site, "layer": layer, "mode": mode, "seed": seed, **options}
    if ref is not None:  # a held model runs where it is
        values = {**ref.adapter.placement(), **values}
    if interventions is not None:
        values["interventions"] = split_interventions(interventions)
    if dataset is not None:
        values["dataset"] = dataset
    if isinstance(sae, (str, Path)):
        values["sae"] = str(sae)
    given = None
    if isinstance(tokens, int) and not isinstance(tokens, bool):
        values["tokens"] = tokens
    else:
        config = RunConfig.from_dict(values)
        if isinstance(tokens, torch.Tensor):
            if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
                raise KlgapError(f"tokens= as ids must be a [n_contexts context_len] integer tensor, got "
                                 f"{tuple(tokens.shape)} {tokens.dtype}")
            ids = tokens.long().cpu()
        else:
            ids = _token_ids(tokens, ref or name, config.context_len, config.prepend_bos, config.device, config.dtype)
        values.update(tokens=int(ids.numel()), context_len=int(ids.shape[1]))
        given = TokenSourceRef("given", f"{ids.shape[0]}x{ids.shape[1]} token ids", "python", GivenTokens(ids))
        values["dataset"] = f"given:{ids.shape[0]}x{ids.shape[1]}"
    config = RunConfig.from_dict(values)
    if isinstance(sae, (list, tuple)):  # joint=True: one SAE object per (site, layer)
        if not config.joint:
            raise KlgapError(f"sae= is a list of {len(sae)} SAEs; pass joint=True to patch them together, or one SAE")
        sae_obj = [_sae_object(s, pick_device(config.device)) for s in sae]
    else:
        sae_obj = None if isinstance(sae, (str, Path)) or sae is None else _sae_object(sae, pick_device(config.device))
    plan = resolve(config, model=ref, sae=sae_obj, tokens=given)
    if out is not None:
        from klgap.job.lock import run_lock

        with run_lock(out):  # as the CLI: a second process writing `out` is refused, naming this one
            engine.run(plan, out, overwrite=overwrite, progress=progress)
        return load_run(out)
    with tempfile.TemporaryDirectory(prefix="klgap-") as tmp:
        engine.run(plan, Path(tmp) / "run", progress=progress)
        result = load_run(Path(tmp) / "run")
    result.path = None
    return result


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
    """Runs side by side (``klgap compare``'s table): Results or run / study folders, one row per site/layer."""
    import pandas as pd

    from klgap.report.compare import COLUMNS, Entry, entries_for
    from klgap.report.panel import baseline_panel
    from klgap.report.summary import summary_row

    if labels is not None and len(labels) != len(runs):
        raise KlgapError(f"labels has {len(labels)} entries for {len(runs)} runs; give one per run")
    entries = []
    for i, run in enumerate(runs):
        label = labels[i] if labels else None
        if isinstance(run, Result):
            report = run.report
            row = summary_row(report, report.model, report.mode)
            entries.append(Entry(label or f"{report.model} {row.where}", str(run.path or ""), row, report.curve,
                                 baseline_panel(report, report.model, report.mode), report.size_bins))
        else:
            entries.extend(entries_for(run, label))
    return pd.DataFrame([{k: r[k] for k in COLUMNS} for r in (e.record() for e in entries)], columns=COLUMNS)


def train_sae(model: Any, site: str | list[str], layer: int | str | list[int], out: str | Path, *,
              tokenizer: Any = None, **flags: Any) -> pd.DataFrame:
    """``klgap train-sae`` (same argument names as its flags: tokens, context_len, dataset, expansion, l1, lr,
    steps or epochs (default one pass over tokens), b_dec_init, seed, device, dtype, batch_size): one row per SAE
    trained, with its held-out numbers.

    model: as for :func:`measure`: a name, hub repo id or folder, or a transformers / nnsight model you hold
    (trained on where it is)."""
    import pandas as pd

    from klgap.sae.train import train_saes

    name, ref = _model_ref(model, tokenizer)
    if ref is not None:  # a held model gathers where it is
        flags = {**ref.adapter.placement(), **flags}
    return pd.DataFrame(train_saes(ref or name, site, layer, out, **flags))


__all__ = ["Result", "compare", "curve", "load_run", "measure", "train_sae"]
