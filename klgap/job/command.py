"""A measuring command from end to end, as a library function: ``klgap replicate``, ``klgap curve`` and
``klgap.run`` are :func:`run_request`; ``klgap merge`` is :func:`merge_shards`. The command line only parses and
prints.

A :class:`Request` (a RunConfig plus what a replication file adds: ``out``, a ``[train_sae]`` recipe, the SAE
checkpoints, expected.json beside it) is planned into a job (klgap/job/plan.py: every value resolved once, before
anything loads or trains); ``dry_run`` stops there. Then, one klgap process (one launch of ranks) per folder
(klgap/job/lock.py): SAEs the recipe makes are trained (rank 0), the job runs (klgap/job/execute.py), its folders
are checked against expected.json and their pages and figures written. A :class:`JobResult` says what happened.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from klgap.errors import KlgapError
from klgap.job.distributed import SINGLE, World
from klgap.job.execute import run_job
from klgap.job.plan import Job, checkpoint_spec, plan_job
from klgap.plan.config import FILE_KEYS, LEGACY_FILE_KEYS, RunConfig, load_config_file
from klgap.plan.dryrun import DryRun, describe
from klgap.plan.grid import parse_layers, parse_sites
from klgap.plan.specs import split_interventions
from klgap.report.expectations import ExpectationCheck, Target, check_run, expected_beside, write_check
from klgap.report.schema import Report, StudyReport

log = logging.getLogger("klgap")


@dataclass
class Request:
    """What a measuring command is asked to do.

    config:           the measurement (flags and replication-file keys named alike).
    out:              its folder (None: ``runs/<model>-<site>-L<layer>-<tag>``, from the job).
    tag:              the default folder's last word: the mode, or ``curve``.
    train_sae:        a replication file's ``[train_sae]`` recipe: SAEs it names that are missing are trained first.
    sae_checkpoints:  an SAE folder trained with ``--checkpoints N``: its checkpoints are measured (over training).
    config_file:      the replication file (its expected.json, beside it, is checked after the run).
    """

    config: RunConfig
    out: str | Path | None = None
    tag: str = "all_tokens"
    train_sae: dict[str, Any] | None = None
    sae_checkpoints: str | None = None
    config_file: str | Path | None = None
    shard: tuple[int, int] | None = None
    overwrite: bool = False
    progress: bool = True
    wait: bool = False
    dry_run: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # the file's other keys (cos, norm_frac, meta, ...)


@dataclass
class JobResult:
    """What a measuring command did: its job (None for a merge), folder and top report (None for a dry run, a
    shard or a rank other than 0), the expected.json verdicts, why the pages were not all written (None when
    they were), and for a dry run what it would run."""

    job: Job | None
    out: Path | None = None
    report: Report | StudyReport | None = None
    check: ExpectationCheck | None = None
    pages_failure: str | None = None
    plan: DryRun | None = None


def request_from(values: dict[str, Any], config_file: str | Path | None = None, **options: Any) -> Request:
    """A request from flag-named values over a replication file's keys (the values win); `options` are the
    Request's other fields (shard, overwrite, progress, wait, dry_run, tag)."""
    merged: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    if config_file is not None:
        for key, value in load_config_file(config_file).items():
            key = key.replace("-", "_")
            if key in LEGACY_FILE_KEYS:
                new = LEGACY_FILE_KEYS[key]
                log.warning("config key %r is deprecated: write %s = %r", key, new, value)
                key = new
            (extra if key in FILE_KEYS else merged)[key] = value
    merged.update({k: v for k, v in values.items() if v is not None})
    if merged.get("interventions") is not None:
        merged["interventions"] = split_interventions(merged["interventions"])
    if isinstance(merged.get("sae"), str) and merged["sae"].startswith("~"):
        merged["sae"] = os.path.expanduser(merged["sae"])
    if "model" not in merged:
        raise KlgapError("--model is required (or a --config that names one), e.g. --model smollm2-135m")
    if extra.get("train_sae") is not None:  # a typo'd key fails now, not after an SAE trained with the default
        from klgap.sae.recipes import check_recipe

        check_recipe(extra["train_sae"])
    config = RunConfig.from_dict(merged)
    out = options.pop("out", None) or extra.get("out")
    rest = {k: v for k, v in extra.items() if k not in ("out", "train_sae", "sae_checkpoints")}
    return Request(config, out, options.pop("tag", config.mode), extra.get("train_sae"), extra.get("sae_checkpoints"),
                   config_file, extra=rest, **options)


def model_slug(model: str) -> str:
    """`--model` as one folder name for the default ``runs/...`` folder: a local folder's own name
    (``./ckpt/my-qwen2`` -> ``my-qwen2``), a hub repo id with ``--`` for ``/`` (``EleutherAI--pythia-70m``)."""
    expanded = Path(os.path.expanduser(model))
    if model.startswith((".", "/", "~")) or expanded.is_dir():
        return expanded.resolve().name or "model"
    return model.replace("/", "--")


def default_out(job: Job, tag: str) -> str:
    """``runs/<model>-<sites>-joint-L<layers>-<tag>``, ``runs/<model>-<sites>-study-<tag>`` or, for one site,
    ``runs/<model>-<site>-L<layer>-<tag>`` (the SAE's own site and layer, when it says them)."""
    config, slug = job.config, model_slug(job.config.model)
    if job.shape == "joint":
        grid = config.joint_cells()
        sites, layers = dict.fromkeys(s for s, _ in grid), dict.fromkeys(v for _, v in grid)
        return f"runs/{slug}-{'+'.join(sites)}-joint-L{'+'.join(map(str, layers))}-{tag}"
    if job.study:
        return f"runs/{slug}-{'+'.join(dict.fromkeys(str(p.site) for p in job.plans))}-study-{tag}"
    plan = job.plans[0]
    given = parse_layers(config.layer) if config.layer is not None else [None]
    site, layer = (plan.site, plan.layer) if plan.sae is not None else (config.site, given[0])
    return f"runs/{slug}-{site or 'auto'}-L{'auto' if layer is None else layer}-{tag}"


def plan_request(request: Request) -> Job:
    """The request's job: ``--layer all`` counted on the model, the checkpoints listed, every SAE routed and checked
    (one a [train_sae] recipe makes is left pending)."""
    config, trains = request.config, request.train_sae is not None
    if not config.joint and config.layer is not None and parse_layers(config.layer) == "all":
        if request.dry_run:
            raise KlgapError("--dry-run needs the layers listed (e.g. 0-11), not all: the layer count is the model's")
        if config.site is None:
            raise KlgapError("several layers need --site too")
        from klgap.job.loading import count_layers

        config = dataclasses.replace(config, layer=f"0-{count_layers(config) - 1}")
    checkpoints = None if config.joint else checkpoint_spec(config.sae, request.sae_checkpoints, trains)
    return plan_job(config, checkpoints=checkpoints, trains=trains)


def train_missing(job: Job, recipe: dict[str, Any], progress: bool) -> None:
    """Train, in one pass, every SAE of the job a [train_sae] recipe makes that is not there yet."""
    from klgap.sae.recipes import train_missing_sae

    pairs = list(dict.fromkeys((plan.site, plan.layer) for plan in job.plans))
    if any(site is None or layer is None for site, layer in pairs):
        raise KlgapError("a config with [train_sae] must name site and layer")
    # without a dataset of its own, the recipe trains on the train split of the source the job measures
    train_missing_sae(job.config, recipe, progress, pairs, job.plans[0].tokens.unsplit)  # type: ignore[arg-type]


def render_folder(folder: Path) -> str | None:
    """Figures + report.md/html next to report.json (data first: a failure here loses no data; a study's runs
    too). Returns why they were not all written, or None when they were."""
    from klgap.render.pages import rebuild

    try:
        rebuild(folder)
    except Exception as exc:  # noqa: BLE001 - the numbers are saved; the command still fails, after the summary
        return str(exc) if isinstance(exc, KlgapError) else f"{type(exc).__name__}: {exc}"
    return None


def render_job(out: Path, shape: str, paths: list[str]) -> str | None:
    """The pages of every folder of a job (its cells' `paths`): a joint run's sites and subsets, then its own; a
    study's runs and its own (klgap.render.pages.rebuild draws a study's runs). The first failure (the top
    folder's first), or None."""
    failures = [render_folder(out / path) for path in paths if path != "."] if shape == "joint" else []
    return render_folder(out) or next((f for f in failures if f), None)


def curve_request(request: Request, cos: str | None = None, norm_frac: str | None = None,
                  keep_interventions: bool = False, along: str | None = None, scale: str | None = None,
                  baselines: str | None = None) -> Request:
    """``klgap curve``: the request's interventions become sae, epsilon_random and a cosine_matched grid over
    `cos` x `norm_frac` (given, else the replication file's ``cos`` / ``norm_frac``, else 0.5:1.0:11 x 0.9), plus
    the request's own when `keep_interventions` or its replication file lists ``interventions`` (a committed
    curve file adds ``zero`` so kl_div_score prints). With `along` (``error``): sae, the baselines and a length sweep
    along the error and each of `baselines` over the lengths `scale` instead (klgap/report/sweep.py)."""
    from klgap.report.robustness import curve_interventions, parse_cos_grid, parse_norm_fracs
    from klgap.report.sweep import sweep_specs

    config = request.config
    if config.mode == "many_samples":
        raise KlgapError("klgap curve measures all_tokens or single_token runs, not many_samples")
    # a replication file may carry its grid as `cos` / `norm_frac` (or `along` / `scale` / `baselines`); the
    # arguments (the command line's flags) win
    given = {"cos": cos, "norm_frac": norm_frac, "along": along, "scale": scale, "baselines": baselines}
    given = {key: value if value is not None else request.extra.get(key) for key, value in given.items()}
    if given["along"] is not None:
        if given["cos"] is not None or given["norm_frac"] is not None:
            flag = "--cos" if given["cos"] is not None else "--norm-frac"
            raise KlgapError(f"{flag} sizes a cosine curve, not a length sweep (--along); give --scale instead, "
                             "e.g. 0:2:21")
        grid = sweep_specs(given["along"], given["scale"], given["baselines"])
    else:
        if given["scale"] is not None or given["baselines"] is not None:
            flag = "--scale" if given["scale"] is not None else "--baselines"
            raise KlgapError(f"{flag} sizes a length sweep; give it with --along error (valid --along: error)")
        grid = curve_interventions(parse_cos_grid(str(given["cos"] if given["cos"] is not None else "0.5:1.0:11")),
                                   parse_norm_fracs(str(given["norm_frac"] if given["norm_frac"] is not None
                                                        else "0.9")))
    listed = request.config_file is not None and "interventions" in load_config_file(request.config_file)
    chosen = list(config.interventions) if keep_interventions or listed else []
    interventions = grid + [s for s in chosen if s not in grid]
    kind = "sweep" if given["along"] is not None else "curve"
    tag = kind if config.mode == "all_tokens" else f"{kind}-{config.mode}"
    return dataclasses.replace(request, config=dataclasses.replace(config, interventions=interventions), tag=tag)


def _check(expected: tuple[Path, list[Target]] | None, out: Path) -> ExpectationCheck | None:
    """The run's verdict per target, written to OUT/expected_check.json (the report renders it); None without."""
    if expected is None:
        return None
    check = check_run(out, expected[0], expected[1])
    write_check(out, check)
    return check


def run_request(request: Request, world: World = SINGLE) -> JobResult:
    """Plan, (train,) run, check and render a request. Under torchrun / srun every rank calls this: the ranks
    share the batches (klgap.job.distributed), rank 0 trains a missing SAE and writes the reports and pages."""
    from klgap.job.outdir import claimed

    found = expected_beside(request.config_file) if request.config_file else None
    expected = found if found is not None and found[1] else None  # a bad expected.json fails now, not after the run
    job = plan_request(request)
    if request.dry_run:
        return JobResult(job, plan=describe(job.config, job.plans, job.saes, job.checked))
    out = Path(request.out if request.out is not None else default_out(job, request.tag))
    progress = request.progress and world.leader
    # --out's one rule (klgap/job/outdir.py), then one klgap process (one launch of ranks) per --out until its pages
    # are written. The ranks meet first: rank 0's refusal of the folder then ends every rank
    with contextlib.ExitStack() as held:

        def claim() -> None:  # rank 0 alone: the other ranks share its folder
            held.enter_context(claimed(out, "study" if job.study else "run", wait=request.wait))

        world.connect(out)
        world.from_leader(claim)
        if request.train_sae is not None:
            world.from_leader(lambda: train_missing(job, request.train_sae or {}, progress))
            if job.pending:  # planned again, now that its SAEs are there
                job = plan_request(dataclasses.replace(request, train_sae=None))
        report = run_job(job, out, overwrite=request.overwrite, progress=progress, shard=request.shard, world=world)
        if not world.leader:
            return JobResult(job, out)
        if request.shard is not None:
            write_shard_plan(out, job, request.shard)
            return JobResult(job, out)
        check = _check(expected, out)
        return JobResult(job, out, report, check, render_job(out, job.shape, [cell.path for cell in job.cells]))


def write_shard_plan(out: Path, job: Job, shard: tuple[int, int]) -> None:
    """shard_plan.json: the command's shape, configuration and folders, for ``klgap merge``."""
    from klgap.job.shards import write_plan

    config = job.config
    if job.shape == "joint":
        grid = config.joint_cells()
        sites, layers = list(dict.fromkeys(s for s, _ in grid)), list(dict.fromkeys(v for _, v in grid))
    else:
        sites = parse_sites(config.site) if config.site is not None else [None]
        layers = parse_layers(config.layer) if config.layer is not None else [None]
    kind = {"run": "run", "study": "study", "checkpoints": "checkpoints", "joint": "joint"}[job.shape]
    write_plan(out, kind, config.to_dict(), sites, layers, shard, runs=[cell.path for cell in job.cells])


def merge_shards(folders: list[Path], out: Path, overwrite: bool = False) -> tuple[JobResult, int]:
    """Join shard folders into one folder and build its reports and pages from the files alone: no model, no
    SAE is loaded. Returns the result and the number of shards."""
    from klgap.job.finish import finish_reports
    from klgap.job.shards import check_shards, merge_parts
    from klgap.plan.resolve import pick_device

    plan = check_shards(folders)
    if out.resolve() in {f.resolve() for f in folders}:
        raise KlgapError(f"--out {str(out)!r} is one of the shard folders; merge into a new folder")
    from klgap.job.outdir import claimed

    config = RunConfig.from_dict(plan["config"])
    kind = plan["kind"]
    # --out's one rule, and the lock: a merge into a folder a run is writing is refused (klgap/job/outdir.py)
    with claimed(out, "study" if kind in ("study", "checkpoints") else "run"):
        subs = merge_parts(folders, out, overwrite, device=str(pick_device(config.device)))
        paths = plan.get("runs") or ([*subs[1:], "."] if kind == "joint" else subs)
        report = finish_reports(out, kind, config, paths)
        failure = render_job(out, kind, paths)
    return JobResult(None, out, report, pages_failure=failure), int(plan["n_shards"])


__all__ = ["JobResult", "Request", "curve_request", "default_out", "merge_shards", "model_slug", "plan_request",
           "render_folder", "render_job", "request_from", "run_request", "train_missing", "write_shard_plan"]
