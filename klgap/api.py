"""klgap from Python: measure an SAE on a model you already hold (a notebook's objects), or by name as the CLI.

>>> result = klgap.measure(model, sae, tokens=4096)          # a transformers / nnsight model, a sae_lens SAE
>>> result.ratio, result.summary(), result.plot("kl_bars")
>>> klgap.load_run("runs/x").report == klgap.measure(..., out="runs/x").report

Argument names are the CLI's flags (``tokens``, ``context_len``, ``batch_size``, ``position``, ``k``,
``n_samples``, ...). Bad input raises :class:`klgap.KlgapError` with the CLI's one-line message.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from klgap.errors import KlgapError, NoTokenizer
from klgap.plan.config import RunConfig
from klgap.plan.specs import split_interventions
from klgap.result import Result, StudyResult, load_result, load_run

if TYPE_CHECKING:
    import pandas as pd

    from klgap.job.command import JobResult
    from klgap.plan.dryrun import DryRun

T = TypeVar("T")


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
            checkpoint it matches, or every SAE: ``DIR/seed-*`` of ``train-sae --seeds N``), a sae_lens ``SAE`` or any module with ``encode``/``decode`` (its
            ``cfg.hook_name`` / ``cfg.metadata.hook_name`` names the site; else give site= and layer=), or a list
            of these: one run each (seeds, sweep members), or with ``joint=True`` one per (site, layer). Seeds of
            one recipe (training.json files equal but for the seed) get ``result.between_saes()``: the recipe's
            ratio with an interval over seeds and contexts (klgap/report/between_saes.py).
    site, layer: one, or lists (``layer=[3, 10]``, ``"0-5"``): one run per (site, layer), a study report over them.
    tokens: a token budget (int; text from ``dataset``, default the built-in sample), a ``[n ctx]`` LongTensor
            of token ids, a list of strings, or a ``datasets.Dataset`` with a text column.
    out:    None measures without leaving files behind; a folder writes the CLI's run folder with its pages and figures (resumable, and
            ``klgap report`` / ``merge`` / ``compare`` read it) under ``--out``'s rule (a new or empty folder, or
            a klgap run's). Other token ids (hashed) or another SAE (its weights hashed) there is another run:
            refused unless ``overwrite=True``.
    checkpoints: an SAE folder trained with checkpoints (``klgap train-sae --checkpoints N``): every checkpoint
            measured on the same tokens, the study's over-training section.
    dry_run: resolve and check everything, load nothing; returns what would run (klgap.plan.dryrun.DryRun).
    options: the other flags by name: context_len, batch_size, position, k, n_samples, sample_intervention,
            device, dtype, mask_special, drop_last_position, no_bos, no_fast, joint, joint_subsets,
            joint_baseline, fit_tokens, second_order (the predicted KL beside the measured and the report's
            second_order section).
    joint=True: every site x layer listed (``site="resid_post", layer=[3, 10, 17]``) patched in the same forward,
            each with its own SAE: `sae` a spec with {site}/{layer}, or a list of SAEs in that order; each site is
            also measured alone, and ``result.report.compounding`` compares them (klgap/job/plan.py);
            ``joint_baseline`` ("matched", "clean" or "reencoded") says what sizes each site's baselines.
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

        # as the CLI: --out's rule, and a second process writing `out` refused
        from klgap.job.command import render_job

        with claimed(out, "study" if job.study else "run", flag="out="):
            run_job(job, out, overwrite=overwrite, progress=progress)
            failure = render_job(Path(out), job.shape, [cell.path for cell in job.cells])  # the CLI's pages too
        if failure is not None:
            raise KlgapError(f"the run is saved in {out} but its pages were not all written: {failure}; "
                             f"`klgap report {out}` writes them again")
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

    from klgap.report.compare import COLUMNS, entries_for, entry_of

    if labels is not None and len(labels) != len(runs):
        raise KlgapError(f"labels has {len(labels)} entries for {len(runs)} runs; give one per run")
    entries, runs_of = [], []
    for i, run in enumerate(runs):
        label = labels[i] if labels else None
        if isinstance(run, Result):
            report = run.report
            found = [entry_of(report, report.model, report.mode, str(run.path or ""), label)]
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
