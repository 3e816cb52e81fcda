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

from klgap.cli.args import build_parser
from klgap.errors import KlgapError
from klgap.render.console import print_sections, print_study, print_summary
from klgap.sae.recipes import print_trained

log = logging.getLogger("klgap")

# ----------------------------------------------------------------------------- commands


def request_of(args: argparse.Namespace, tag: str | None = None) -> Any:
    """The measuring request the flags (over a --config file's keys) make (klgap.job.command.Request)."""
    from klgap.job.command import request_from
    from klgap.job.shards import parse_shard
    from klgap.plan.config import RunConfig

    values: dict[str, Any] = {}
    for item in dataclasses.fields(RunConfig):  # every run flag given on the command line (klgap/cli/args.py)
        value = getattr(args, item.name, None)
        if value is not None:
            values[item.name] = value
    shard = parse_shard(args.shard) if getattr(args, "shard", None) else None
    options: dict[str, Any] = {"out": args.out, "shard": shard, "overwrite": args.overwrite, "wait": args.wait,
                               "dry_run": bool(getattr(args, "dry_run", False))}
    if tag is not None:
        options["tag"] = tag
    return request_from(values, args.config, **options)


def cmd_replicate(args: argparse.Namespace) -> int:
    return run_and_print(request_of(args), args)


def cmd_curve(args: argparse.Namespace) -> int:
    """A replicate run whose interventions are sae, epsilon_random and a cosine_matched grid; with ``--along error``
    sae, the baselines and a length sweep along the error and each baseline (klgap/report/sweep.py)."""
    from klgap.job.command import curve_request

    request = request_of(args)
    return run_and_print(curve_request(request, args.cos, args.norm_frac, bool(args.interventions), args.along,
                                       args.scale, args.baselines), args)


def run_and_print(request: Any, args: argparse.Namespace) -> int:
    """Run a measuring request (klgap.job.command.run_request) and print what it did: the plan of a dry run, a
    shard's next step, or the summary, compounding and replication targets; exit 1 when the pages were not all
    written."""
    from klgap.job.command import run_request
    from klgap.job.distributed import read_world
    from klgap.report.expectations import print_check

    world = read_world()
    request.progress = not args.quiet and world.leader
    found = run_request(request, world)
    if not world.leader:
        return 0
    if found.plan is not None:
        from klgap.plan.dryrun import print_plan

        if found.job is not None and found.job.shape == "joint":
            print("joint run: every (site, layer) below is patched in the same forward, and measured alone")
        print_plan(found.plan)
        return 0
    if request.shard is not None:
        shard = request.shard
        print(f"shard {shard[0]}/{shard[1]} done in {found.out}; when all {shard[1]} shards are done: "
              f"klgap merge SHARD_DIR_1 ... SHARD_DIR_{shard[1]} --out MERGED")
        return 0
    _print_report(found)
    if found.check is not None:
        print_check(found.check)
    return _rendered_or_fail(found.out, found.pages_failure)


def _print_report(found: Any) -> None:
    from klgap.report.schema import StudyReport

    if isinstance(found.report, StudyReport):
        print_study(found.report, found.out)
    else:
        print_summary(found.report, found.out, pages=found.pages_failure is None)
    print_sections(found.report)


def cmd_merge(args: argparse.Namespace) -> int:
    """Join shard folders into one run (or study) folder and build its report from the files alone: no model,
    no SAE is loaded (a test runs it with the model adapters disabled)."""
    from klgap.job.command import merge_shards

    found, n_shards = merge_shards([Path(d) for d in args.shard_dirs], Path(args.out), args.overwrite)
    _print_report(found)
    print(f"merged {n_shards} shards into {found.out}")
    return _rendered_or_fail(found.out, found.pages_failure)


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
        b_dec_init=args.b_dec_init, architecture=args.architecture, k=args.top_k, seed=args.seed, device=args.device,
        dtype=args.dtype, batch_size=args.batch_size, checkpoints=args.checkpoints,
        checkpoint_every=args.checkpoint_every, seeds=args.seeds, exclude_special=args.exclude_special,
        progress=not args.quiet,
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
    from klgap.job.finish import report_tree
    from klgap.job.record import RECORD_FILE
    from klgap.render.pages import rebuild

    folder = Path(args.run_dir)
    with _locked(folder):  # a folder a run is writing is refused, naming the run
        if not (folder / "report.json").is_file() and (folder / RECORD_FILE).is_file():
            report_tree(folder)
        for name, path in rebuild(args.run_dir).items():
            print(f"wrote {path}")
    return 0


def _locked(folder: Path) -> Any:
    """The run lock of an existing run folder that a command writes into (report, check --write); nothing for
    a path that is not a folder (the command's own error names it)."""
    from contextlib import nullcontext

    from klgap.job.lock import run_lock

    return run_lock(folder) if folder.is_dir() else nullcontext()


def cmd_validate(args: argparse.Namespace) -> int:
    """A report.json (run, curve, joint, study), compare.json or expected_check.json, or a folder of them, each
    against its own schema, then its values."""
    from klgap.report.validate import validate_any

    found = validate_any(args.report)
    schema = f"schema {found.schema_version}; " if found.schema_version != "-" else ""
    inside = f"; and the {len(found.others)} klgap files inside it" if found.others else ""
    print(f"{args.report}: valid klgap {found.what} ({schema}values checked{inside})")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """The planted-truth testbed's table (klgap/calibrate/): printed, and written to --out when given."""
    from pathlib import Path

    from klgap.calibrate.table import calibrate, markdown, write
    from klgap.calibrate.testbed import Settings

    if args.seeds < 1 or args.tokens < 2 * 32 or args.sae_samples < 0:
        raise KlgapError(f"--seeds must be ≥ 1, --tokens ≥ 64 and --sae-samples ≥ 0, got --seeds {args.seeds} "
                         f"--tokens {args.tokens} --sae-samples {args.sae_samples}")
    found = calibrate(list(range(args.seeds)), Settings(tokens=args.tokens, sae_samples=args.sae_samples))
    print(markdown(found), end="")
    if args.out:
        for path in write(found, Path(args.out)):
            print(f"wrote {path}")
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
        from klgap.job.command import render_folder

        with _locked(Path(args.run_dir)):
            print(f"wrote {write_check(args.run_dir, check)}")
            render_folder(Path(args.run_dir))
    return 0 if check.replicated else 3


def cmd_compare(args: argparse.Namespace) -> int:
    from klgap.job.outdir import claimed
    from klgap.report.compare import compare_runs

    with claimed(args.out, "compare"):
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
    print(f"next: pip install -e '{root}[test]' && klgap plugins && pytest {root / 'tests'}   "
          "(pytest runs before installing too)")
    return 0


#: commands whose ranks share one run's batches under torchrun / srun; the others (train-sae, merge, report,
#: check, ...) run on rank 0 alone and the other ranks exit at once
DISTRIBUTED = ("replicate", "curve")
def cmd_export(args: argparse.Namespace) -> int:
    """A run or study folder as SAEBench's core-eval result file(s) (klgap/report/saebench.py)."""
    from klgap.report.saebench import export_run

    for exported in export_run(args.run_dir, args.export_format, args.out):
        print(f"wrote {exported.path}")
    return 0


COMMANDS = {"calibrate": cmd_calibrate, "check": cmd_check, "merge": cmd_merge, "new-plugin": cmd_new_plugin, "replicate": cmd_replicate, "curve": cmd_curve, "compare": cmd_compare, "export": cmd_export, "report": cmd_report, "train-sae": cmd_train_sae, "plugins": cmd_plugins, "validate": cmd_validate}


#: what Ctrl-C leaves, per command (said after "klgap: interrupted; ")
INTERRUPTED = {
    "replicate": "finished batches are saved, run the same command to resume",
    "curve": "finished batches are saved, run the same command to resume",
    "train-sae": "the SAE in training was not saved and no half SAE is left (SAEs finished before it are saved); "
                 "the same command trains from the start",
}


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
        print(f"klgap: interrupted; {INTERRUPTED.get(args.command, 'nothing half-written is left')}", file=sys.stderr)
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
