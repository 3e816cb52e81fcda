"""The `klgap` command line: replicate, train-sae, plugins."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from klgap.cli.args import FILE_EXTRAS, RUN_FLAGS, build_parser
from klgap.render.console import print_compounding, print_study, print_summary
from klgap.errors import KlgapError
from klgap.sae.recipes import print_trained, train_missing_sae

log = logging.getLogger("klgap")

# ----------------------------------------------------------------------------- commands


def run_config_from_args(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    from klgap.plan.config import RunConfig, load_config_file, split_interventions

    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    if args.config:
        data = load_config_file(args.config)
        for key, value in data.items():
            key = key.replace("-", "_")
            (extra if key in FILE_EXTRAS else values)[key] = value
    for dest in RUN_FLAGS:
        value = getattr(args, dest, None)
        if value is not None:
            values[dest] = value
    if args.include_first_position:
        values["include_first_position"] = True
    if args.drop_last_position:
        values["drop_last_position"] = True
    if args.no_bos:
        values["no_bos"] = True
    if args.no_fast:
        values["no_fast"] = True
    if getattr(args, "remote", None):
        values["remote"] = True
    if getattr(args, "joint", None):
        values["joint"] = True
    if getattr(args, "joint_subsets", None):
        values["joint_subsets"] = True
    if "interventions" in values:
        values["interventions"] = split_interventions(values["interventions"])
    if isinstance(values.get("sae"), str) and values["sae"].startswith("~"):
        values["sae"] = os.path.expanduser(values["sae"])
    if "model" not in values:
        raise KlgapError("--model is required (or a --config that names one), e.g. --model smollm2-135m")
    return RunConfig.from_dict(values), extra


def cmd_replicate(args: argparse.Namespace) -> int:
    config, extra = run_config_from_args(args)
    return run_and_render(config, extra, args, config.mode)


def cmd_curve(args: argparse.Namespace) -> int:
    """A replicate run whose interventions are sae, epsilon_random and a cosine_matched grid; with ``--along error``
    sae, the baselines and a length sweep along the error and each baseline (klgap/report/sweep.py)."""
    from klgap.report.robustness import curve_interventions, parse_cos_grid, parse_norm_fracs

    config, extra = run_config_from_args(args)
    # a replication file may carry its grid as `cos` / `norm_frac` (or `along` / `scale` / `baselines`); flags given
    # on the command line win
    given = {key: getattr(args, key) if getattr(args, key) is not None else extra.get(key)
             for key in ("cos", "norm_frac", "along", "scale", "baselines")}
    if config.mode == "many_samples":
        raise KlgapError("klgap curve measures all_tokens or single_token runs, not many_samples")
    if given["along"] is not None:
        grid = sweep_grid(given)
    else:
        if given["scale"] is not None or given["baselines"] is not None:
            flag = "--scale" if given["scale"] is not None else "--baselines"
            raise KlgapError(f"{flag} sizes a length sweep; give it with --along error (valid --along: error)")
        cosines = parse_cos_grid(given["cos"] if given["cos"] is not None else "0.5:1.0:11")
        grid = curve_interventions(cosines, parse_norm_fracs(given["norm_frac"] if given["norm_frac"] is not None
                                                             else "0.9"))
    chosen = list(args.interventions and config.interventions or [])
    config.interventions = grid + [s for s in chosen if s not in grid]
    kind = "sweep" if given["along"] is not None else "curve"
    return run_and_render(config, extra, args, kind if config.mode == "all_tokens" else f"{kind}-{config.mode}")


def sweep_grid(given: dict[str, Any]) -> list[str]:
    """The interventions of ``klgap curve --along error`` (klgap.report.sweep.sweep_specs) from its flags."""
    from klgap.report.sweep import sweep_specs

    if given["cos"] is not None or given["norm_frac"] is not None:
        flag = "--cos" if given["cos"] is not None else "--norm-frac"
        raise KlgapError(f"{flag} sizes a cosine curve, not a length sweep (--along); give --scale instead, e.g. 0:2:21")
    return sweep_specs(given["along"], given["scale"], given["baselines"])


def model_slug(model: str) -> str:
    """`--model` as one folder name for the default ``runs/...`` folder: a local folder's own name
    (``./ckpt/my-qwen2`` -> ``my-qwen2``), a hub repo id with ``--`` for ``/`` (``EleutherAI--pythia-70m``)."""
    expanded = Path(os.path.expanduser(model))
    if model.startswith((".", "/", "~")) or expanded.is_dir():
        return expanded.resolve().name or "model"
    return model.replace("/", "--")


def run_and_render(config: Any, extra: dict[str, Any], args: argparse.Namespace, tag: str) -> int:
    """Run one site/layer, a study over several, or a joint run (``--joint``: every listed site patched in one
    forward, klgap/job/joint.py); write the report's figures, print the summary.

    Every run of the command is resolved (klgap.plan.resolve) before anything is loaded or trained: a bad name, path
    or number fails in a second, before transformers is imported. Under torchrun / srun every rank runs this:
    the ranks share the batches (klgap.job.distributed), rank 0 trains a missing SAE, shows progress and the report."""
    import dataclasses

    from klgap.job.distributed import read_world
    from klgap.plan.grid import parse_layers, parse_sites
    from klgap.plan.dryrun import dry_run
    from klgap.job.lock import run_lock
    from klgap.job.shards import parse_shard

    world = read_world()
    shard = parse_shard(args.shard) if getattr(args, "shard", None) else None
    expected = _expected_for(args)  # a bad expected.json fails now, not after the run
    if config.joint:
        cells = config.joint_cells()
        sites, layers = list(dict.fromkeys(s for s, _ in cells)), list(dict.fromkeys(v for _, v in cells))
        planned = dataclasses.replace(config, joint=False, joint_subsets=False)
        checkpoints = None
    else:
        from klgap.sae.checkpoints import is_glob
        from klgap.job.checkpoint_study import cells_of, checkpoint_spec

        sites = parse_sites(config.site) if config.site is not None else [None]
        layers = parse_layers(config.layer) if config.layer is not None else [None]
        checkpoints = checkpoint_spec(config.sae, extra.get("checkpoints"), "train_sae" in extra)
        if checkpoints is not None:  # an SAE's checkpoints: another axis of a study (klgap/job/checkpoint_study.py)
            if shard is not None:
                raise KlgapError("--shard is not supported for a study over SAE checkpoints yet; run it unsharded")
            sites, layers = cells_of(checkpoints, sites, layers)
            config.sae = checkpoints
        # the checkpoints of a glob are checked when the study lists them; the other SAEs now
        planned = dataclasses.replace(config, sae=None) if checkpoints and is_glob(checkpoints) else config
    if getattr(args, "dry_run", False):
        from klgap.plan.dryrun import print_plan

        if layers == "all":
            raise KlgapError("--dry-run needs the layers listed (e.g. 0-11), not all: the layer count is the model's")
        plan = dry_run(planned, sites, layers, trains="train_sae" in extra)  # a missing SAE path: an error
        if world.leader:
            if config.joint:
                print("joint run: every (site, layer) below is patched in the same forward, and measured alone")
            print_plan(plan)
        return 0
    several = not config.joint and (checkpoints is not None or len(sites) > 1 or layers == "all" or len(layers) > 1)
    if several and None in sites:
        raise KlgapError("several layers need --site too")
    # every run checked before anything loads (an SAE a [train_sae] table makes may be missing until then)
    plans = dry_run(planned, sites, [0] if layers == "all" else layers, trains="train_sae" in extra).plans
    out = args.out or extra.get("out")
    if out is None and config.joint:
        out = f"runs/{model_slug(config.model)}-{'+'.join(sites)}-joint-L{'+'.join(map(str, layers))}-{tag}"
    elif out is None and several:
        out = f"runs/{model_slug(config.model)}-{'+'.join(sites)}-study-{tag}"
    elif out is None:  # the SAE's own site and layer, when it says them
        site, layer = (plans[0].site, plans[0].layer) if plans[0].sae is not None else (sites[0], layers[0])
        out = f"runs/{model_slug(config.model)}-{site or 'auto'}-L{'auto' if layer is None else layer}-{tag}"
    # one klgap process (one launch of ranks) per --out, until its pages are written
    with run_lock(out, wait=args.wait, leader=world.leader):
        return _run_locked(config, extra, args, sites, layers, several, plans, shard, str(out), world, expected,
                           checkpoints)


def _run_locked(config: Any, extra: dict[str, Any], args: argparse.Namespace, sites: list, layers: Any,
                several: bool, plans: list, shard: tuple[int, int] | None, out: str, world: Any, expected: Any,
                checkpoints: str | None = None) -> int:
    from klgap.job import engine
    from klgap.job.study import run_study

    progress = not args.quiet and world.leader
    world.connect(Path(out))
    kind = "joint" if config.joint else "study" if several else "run"
    if kind == "run":
        config.site, config.layer = sites[0], layers[0]
    if "train_sae" in extra and layers != "all":
        cells = (config.joint_cells() if kind == "joint" else [(s, v) for s in sites for v in layers]
                 if kind == "study" else None)
        world.from_leader(lambda: train_missing_sae(config, extra["train_sae"], progress, cells))
    if kind == "study":
        study = run_study(config, sites, layers, out, overwrite=args.overwrite, progress=progress, shard=shard,
                          world=world, checkpoints=checkpoints)
    else:
        # an SAE trained just now, or a joint run: resolve again
        plan = plans[0] if kind == "run" and (plans[0].sae is not None or not config.sae) else config
        report = engine.run(plan, out, overwrite=args.overwrite, progress=progress, shard=shard, world=world)
    if not world.leader:
        return 0
    if shard is not None:
        return _shard_done(out, kind, config, sites, layers, shard)
    check = _check_expected(expected, Path(out))
    if kind == "study":
        failure = _render(Path(out))
        print_study(study, Path(out))
    else:
        failure = _render_joint(Path(out), report) if kind == "joint" else _render(Path(out))
        print_summary(report, Path(out), pages=failure is None)
        print_compounding(report)
    _print_check(check)
    return _rendered_or_fail(Path(out), failure)


def _render_joint(out: Path, report: Any) -> str | None:
    """A joint run's pages: each site alone, each subset, then the run's own (the first failure, or None)."""
    subsets = report.compounding.subsets if report.compounding is not None else None
    folders = [site.path for site in report.joint or []] + [sub.path for sub in subsets or []]
    failures = [_render(out / folder) for folder in folders]
    return _render(out) or next((f for f in failures if f), None)


def _expected_for(args: argparse.Namespace) -> Any:
    """(expected.json, its targets for this file) beside `--config`, or None (no file, or no target for it)."""
    from klgap.report.expectations import expected_beside

    found = expected_beside(args.config) if getattr(args, "config", None) else None
    return found if found is not None and found[1] else None


def _check_expected(expected: Any, out: Path) -> Any:
    """The run's verdict per target, written to OUT/expected_check.json (the report renders it); None without."""
    if expected is None:
        return None
    from klgap.report.expectations import check_run, write_check

    check = check_run(out, expected[0], expected[1])
    write_check(out, check)
    return check


def _print_check(check: Any) -> None:
    if check is not None:
        from klgap.report.expectations import print_check

        print_check(check)


def _shard_done(out: str, kind: str, config: Any, sites: list, layers: Any, shard: tuple[int, int]) -> int:
    from klgap.job.shards import write_plan

    write_plan(Path(out), kind, config.to_dict(), sites, layers, shard)
    print(f"shard {shard[0]}/{shard[1]} done in {out}; when all {shard[1]} shards are done: "
          f"klgap merge SHARD_DIR_1 ... SHARD_DIR_{shard[1]} --out MERGED")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """Join shard folders into one run (or study) folder and build its report from the files alone: no model,
    no SAE is loaded (a test runs it with the model adapters disabled)."""
    from klgap.plan.config import RunConfig
    from klgap.job.engine import report_folder
    from klgap.plan.resolve import pick_device
    from klgap.job.shards import check_shards, merge_parts
    from klgap.job.study import write_study

    folders = [Path(d) for d in args.shard_dirs]
    plan = check_shards(folders)
    out = Path(args.out)
    if out.resolve() in {f.resolve() for f in folders}:
        raise KlgapError(f"--out {args.out!r} is one of the shard folders; merge into a new folder")
    config = RunConfig.from_dict(plan["config"])
    subs = merge_parts(folders, out, args.overwrite, device=str(pick_device(config.device)))
    if plan["kind"] == "study":
        runs = [out / sub for sub in subs]
        for folder in runs:
            report_folder(folder)
        study = write_study(config, runs, out)
        failure = _render(out)
        print_study(study, out)
    else:
        for sub in subs[1:]:  # a joint run: each site alone, then each subset (their compounding reads those)
            report_folder(out / sub)
        report = report_folder(out)
        failure = _render_joint(out, report) if plan["kind"] == "joint" else _render(out)
        print_summary(report, out, pages=failure is None)
        print_compounding(report)
    print(f"merged {plan['n_shards']} shards into {out}")
    return _rendered_or_fail(out, failure)


def _render(out: Path) -> str | None:
    """Figures + report.md/html next to report.json (data first: a failure here loses no data). Returns why
    they were not all written, or None when they were."""
    from klgap.render.pages import rebuild

    try:
        rebuild(out)
    except Exception as exc:  # noqa: BLE001 - the numbers are saved; the command still fails, after the summary
        return str(exc) if isinstance(exc, KlgapError) else f"{type(exc).__name__}: {exc}"
    return None


def _rendered_or_fail(out: Path, failure: str | None) -> int:
    """The command's exit: 0 when the pages and figures were written, else an error saying which were not."""
    if failure is not None:
        raise KlgapError(f"report.md, report.html and the figures of {out} were not all written ({failure}); the "
                         f"numbers are saved in report.json and tokens.parquet: retry with `klgap report {out}`")
    return 0


def cmd_train_sae(args: argparse.Namespace) -> int:
    from klgap.sae.train import train_saes

    print_trained(train_saes(
        args.model, str(args.site), str(args.layer), args.out, tokens=args.tokens, context_len=args.context_len,
        dataset=args.dataset, expansion=args.expansion, l1=args.l1, lr=args.lr, steps=args.steps, epochs=args.epochs,
        b_dec_init=args.b_dec_init, architecture=args.architecture, k=args.k, seed=args.seed, device=args.device,
        dtype=args.dtype, batch_size=args.batch_size, checkpoints=args.checkpoints,
        checkpoint_every=args.checkpoint_every, progress=not args.quiet,
    ))
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from klgap.plugins.manager import get_host

    infos = get_host().plugin_infos()
    if args.json:
        print(json.dumps([info.__dict__ for info in infos], indent=2))
        return 0
    host = get_host()
    for info in infos:
        print(f"{info.name}  ({info.package or '?'} {info.version or ''})".rstrip())
        if info.error is not None:
            print(f"  BROKEN: {info.error}")
        for kind, names in info.registers.items():
            print(f"  {kind}:")
            for name in names:
                print(f"    {name:<28} {host.registries[kind].entries[name].description}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Redraw a run's figures and pages; a run folder with parts but no report.json (a killed run's last step)
    gets its report built first, from its files alone."""
    from klgap.job.engine import report_folder
    from klgap.job.record import RECORD_FILE
    from klgap.render.pages import rebuild

    folder = Path(args.run_dir)
    if not (folder / "report.json").is_file() and (folder / RECORD_FILE).is_file():
        report_folder(folder)

    for name, path in rebuild(args.run_dir).items():
        print(f"wrote {path}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """A report.json (run, curve, study) or compare.json, each against its own schema, then its values."""
    from klgap.report.validate import validate_any

    found = validate_any(args.report)
    print(f"{args.report}: valid klgap {found.what} (schema {found.model.schema_version}; values checked)")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """A run or study folder against an expected.json: one verdict per target (no model, no SAE loaded)."""
    from klgap.report.expectations import check_run, expected_beside, print_check, write_check

    targets = None
    if args.for_config:
        found = expected_beside(Path(args.expected).parent / args.for_config)
        targets = found[1] if found is not None else []
        if not targets:
            raise KlgapError(f"{args.expected!r} has no target for {args.for_config!r}")
    check = check_run(args.run_dir, args.expected, targets)
    print_check(check)
    if args.write:
        print(f"wrote {write_check(args.run_dir, check)}")
        _render(Path(args.run_dir))
    return 0 if check.replicated else 3


def cmd_compare(args: argparse.Namespace) -> int:
    from klgap.report.compare import compare_runs

    result = compare_runs(args.run_dirs, args.out, labels=args.label)
    print(result["table_text"])
    if result["panel_text"]:  # each run against every baseline it measured (klgap/report/panel.py)
        print(result["panel_text"])
    for path in result["written"]:
        print(f"wrote {path}")
    return 0


def cmd_new_plugin(args: argparse.Namespace) -> int:
    from klgap.cli.scaffold import create_plugin

    root = create_plugin(args.name, args.dir, kind=args.kind)
    print(f"wrote plugin package {root}:")
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        print(f"  {path.relative_to(root)}")
    print(f"next: pip install -e {root} && klgap plugins   (tests, before or after installing: pytest {root / 'tests'})")
    return 0


#: commands whose ranks share one run's batches under torchrun / srun; the others (train-sae, merge, report,
#: check, ...) run on rank 0 alone and the other ranks exit at once
DISTRIBUTED = ("replicate", "curve")
COMMANDS = {"check": cmd_check, "merge": cmd_merge, "new-plugin": cmd_new_plugin, "replicate": cmd_replicate, "curve": cmd_curve, "compare": cmd_compare, "report": cmd_report, "train-sae": cmd_train_sae, "plugins": cmd_plugins, "validate": cmd_validate}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        parser = build_parser()
    except KlgapError as exc:  # a plugin that fails to load or registers a clashing command
        if "--debug" in (argv if argv is not None else sys.argv[1:]):
            raise
        print(f"klgap: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    from klgap.job.distributed import read_world

    try:
        world = read_world()
    except KlgapError as exc:
        print(f"klgap: error: {exc}", file=sys.stderr)
        return 2
    rank = f"[rank {world.rank}/{world.size}]" if world.distributed else ""  # which rank wrote a line
    logging.basicConfig(level=logging.WARNING, format=f"klgap{rank}: %(message)s")
    if args.version:
        import klgap

        print(klgap.__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    if world.distributed and args.command not in DISTRIBUTED and not world.leader:
        print(f"klgap: {args.command} runs on rank 0 only; rank {world.rank} of {world.size} has nothing to do",
              file=sys.stderr)
        return 0
    if world.distributed and args.command in DISTRIBUTED:
        log.setLevel(logging.INFO)  # each rank says which batches it measured
    try:
        if args.command != "plugins":  # a broken plugin stops every command but the one that lists it
            from klgap.plugins.manager import get_host

            get_host().check()
        if getattr(args, "plugin_command", None) is not None:
            return args.plugin_command.run(args)
        code = COMMANDS[args.command](args)
        world.close(finished=code == 0)
        return code
    except KlgapError as exc:
        if args.debug:
            raise
        print(f"klgap: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `klgap plugins | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("klgap: interrupted; finished batches are saved, run the same command to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001
        if args.debug:
            raise
        print(
            f"klgap: internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr
        )
        return 1
    finally:
        world.close()


if __name__ == "__main__":
    sys.exit(main())
