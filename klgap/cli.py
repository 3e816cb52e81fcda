"""The `klgap` command line: replicate, train-sae, plugins."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from klgap.console import print_study, print_summary
from klgap.errors import KlgapError, unknown

log = logging.getLogger("klgap")

#: flags whose dest is the RunConfig field of the same name (the boolean flags are set below)
RUN_FLAGS = ("model", "site", "layer", "sae", "mode", "interventions", "tokens", "context_len", "batch_size", "seed",
             "device", "dtype", "dataset", "position", "k", "n_samples", "sample_intervention", "device_map")
#: keys of a replication file that are not RunConfig fields
FILE_EXTRAS = ("out", "overwrite", "meta", "description", "train_sae", "cos", "norm_frac")


def _int_arg(name: str):
    def parse(text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None

    return parse


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a replication file (TOML or JSON) whose keys are these flags' names")
    p.add_argument("--model", help="model name (see `klgap plugins`), e.g. smollm2-135m, gpt2, tiny-gpt2")
    p.add_argument(
        "--site", help="resid_pre, resid_post, attn_out, mlp_out or attn_z, or a comma list (default: from the SAE)"
    )
    p.add_argument(
        "--layer", help="layer index, a list (3,10,17), a range (0-5) or all (default: from the SAE); several "
        "sites/layers make one study report, with {layer}/{site} in --sae"
    )
    p.add_argument("--sae", help="sae_lens:RELEASE/SAE_ID, a saved sae_lens folder, or a .safetensors file")
    p.add_argument("--mode", help="all_tokens (default), single_token or many_samples")
    p.add_argument(
        "--interventions",
        help="comma-separated, e.g. sae,epsilon_random,cosine_matched:cos=0.8,norm_frac=0.9 "
        "(default: sae, sae_norm_corrected, sae_norm, epsilon_random, theta_random, theta_random_xnorm)",
    )
    p.add_argument("--tokens", type=_int_arg("--tokens"), help="tokens to read (default 8192)")
    p.add_argument("--context-len", type=_int_arg("--context-len"), help="tokens per context (default 128)")
    p.add_argument("--batch-size", type=_int_arg("--batch-size"), help="contexts per batch (default 8)")
    p.add_argument("--seed", type=_int_arg("--seed"), help="random seed (default 0)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--device-map", help="hub models: spread the layers over devices, e.g. auto (transformers/accelerate)")
    p.add_argument(
        "--remote", action="store_true", default=None,
        help="hub models: run every forward pass on NDIF through nnsight (needs an NDIF API key); nothing is downloaded",
    )
    p.add_argument("--dtype", help="model weights: float32 (default), bfloat16, float16 (KL in float32), or float64 for reference runs (KL in float64)")
    p.add_argument("--dataset", help="token source NAME[:ARG]: sample (default), text:PATH, random")
    p.add_argument("--position", type=_int_arg("--position"), help="single-token / many-samples position t (default 32)")
    p.add_argument("--k", type=_int_arg("--k"), help="single-token: measure positions t..t+k (default 16)")
    p.add_argument("--n-samples", type=_int_arg("--n-samples"), help="many-samples: draws per context (default 500)")
    p.add_argument("--sample-intervention", help="many-samples: the random perturbation drawn (default epsilon_random)")
    p.add_argument(
        "--include-first-position",
        action="store_true",
        default=None,
        help="also patch and measure position 0 (the BOS / attention-sink token); excluded by default",
    )
    p.add_argument("--no-bos", action="store_true", default=None, help="do not prepend BOS to each context")
    p.add_argument(
        "--dry-run", action="store_true",
        help="check names, config and SAE ids offline (sae_lens releases against its bundled directory), print "
        "the runs and what they need, load nothing",
    )
    p.add_argument(
        "--shard", help="I/N: measure only shard I of N of the batches (1..N) and write no report; "
        "`klgap merge` joins the N shard folders into the unsharded run's report",
    )
    p.add_argument(
        "--no-fast", action="store_true", default=None,
        help="all-token mode: run every intervention as a full forward through nnsight instead of rerunning "
        "only the layers above the site",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="klgap", description="Measure the KL gap of sparse autoencoders.")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")

    rep = sub.add_parser("replicate", help="run the KL-gap experiment and write OUT/report.json + tokens.parquet")
    _add_run_flags(rep)
    rep.add_argument("--out", help="output folder (default runs/MODEL-SITE-LLAYER-MODE)")
    rep.add_argument("--overwrite", action="store_true", help="replace a different run already in --out")
    rep.add_argument("--quiet", action="store_true", help="no progress bar")

    curve = sub.add_parser(
        "curve", help="robustness curve: KL of cosine_matched noise over a grid of cosines, the SAE's point on it"
    )
    _add_run_flags(curve)
    curve.add_argument("--cos", default=None, help="cosine grid START:STOP:COUNT or a list (default 0.5:1.0:11)")
    curve.add_argument("--norm-frac", default=None, help="norm of the noise as a fraction of ‖x‖, or a list (default 0.9)")
    curve.add_argument("--out", help="output folder (default runs/MODEL-SITE-LLAYER-curve)")
    curve.add_argument("--overwrite", action="store_true", help="replace a different run already in --out")
    curve.add_argument("--quiet", action="store_true", help="no progress bars")

    compare = sub.add_parser("compare", help="overlay robustness curves and ratio tables of several runs")
    compare.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run or study folders (each with report.json)")
    compare.add_argument("--out", required=True, help="folder for compare.json, compare.csv, compare.md and figures")
    compare.add_argument("--label", action="append", help="a label per RUN_DIR, in order (default: model site layer)")

    merge = sub.add_parser("merge", help="join the folders of `--shard I/N` runs into one report (as if unsharded)")
    merge.add_argument("shard_dirs", nargs="+", metavar="SHARD_DIR", help="the N shard folders of one command")
    merge.add_argument("--out", required=True, help="folder for the merged run (report.json, tokens.parquet, ...)")
    merge.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    merge.add_argument("--quiet", action="store_true", help="no progress bars")

    new = sub.add_parser("new-plugin", help="write a working plugin package (a perturbation + its tests) to start from")
    new.add_argument("name", help="plugin name: lower-case letters, digits and _ (e.g. my_noise)")
    new.add_argument("--dir", help="where to write it (default ./klgap-NAME)")

    train = sub.add_parser("train-sae", help="train an SAE with sae_lens's trainer on a site's activations")
    train.add_argument("--model", required=True)
    train.add_argument("--site", required=True, help="a site, or a comma list (one pass gathers them all)")
    train.add_argument("--layer", required=True, help="a layer, a list (3,10,17,24) or a range (0-5)")
    train.add_argument("--tokens", type=_int_arg("--tokens"), default=200_000, help="training tokens (default 200000)")
    train.add_argument(
        "--out", required=True,
        help="folder for cfg.json + sae_weights.safetensors + training.json; with several sites/layers put "
        "{site} and {layer} in it, e.g. ~/.cache/klgap/saes/smollm2-135m/blocks.{layer}.hook_{site}",
    )
    train.add_argument("--context-len", type=_int_arg("--context-len"), default=128)
    train.add_argument("--dataset", default="sample")
    train.add_argument("--expansion", type=_int_arg("--expansion"), default=8, help="d_sae / d_in (default 8)")
    train.add_argument("--l1", type=float, default=None, help="L1 coefficient (default 5)")
    train.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-3)")
    train.add_argument("--steps", type=_int_arg("--steps"), default=None, help="training steps of 1024 tokens (default 2000)")
    train.add_argument("--b-dec-init", choices=["zeros", "mean"], default="zeros",
                       help="decoder bias at the start: zeros (default) or the activations' mean (sites with a large "
                            "common offset)")
    train.add_argument("--seed", type=_int_arg("--seed"), default=0)
    train.add_argument("--device", default="auto")
    train.add_argument("--dtype", default="float32")
    train.add_argument("--batch-size", type=_int_arg("--batch-size"), default=16, help="contexts per forward pass")
    train.add_argument("--quiet", action="store_true")

    rep_cmd = sub.add_parser("report", help="rebuild figures, report.md and report.html from a run folder's data")
    rep_cmd.add_argument("run_dir")

    val = sub.add_parser("validate", help="check a report.json against the report schema")
    val.add_argument("report", help="a report.json, or a run folder holding one")

    plugins = sub.add_parser("plugins", help="list plugins and what each registers")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    _add_plugin_commands(sub)
    return parser


def _add_plugin_commands(sub: Any) -> None:
    """Subcommands that plugins register (``register_commands``); a name the core uses is refused."""
    from klgap.errors import PluginError
    from klgap.plugins import get_host

    commands = get_host().registry("command")
    for name, entry in commands.entries.items():
        if name in sub.choices:
            raise PluginError(f"plugin {entry.plugin!r} registers command {name!r}, which klgap itself defines")
        parser = sub.add_parser(name, help=entry.description, description=entry.description)
        entry.obj.add_arguments(parser)
        parser.set_defaults(plugin_command=entry.obj)


# ----------------------------------------------------------------------------- commands


def run_config_from_args(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    from klgap.config import RunConfig, load_config_file, split_interventions

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
    if args.no_bos:
        values["no_bos"] = True
    if args.no_fast:
        values["no_fast"] = True
    if getattr(args, "remote", None):
        values["remote"] = True
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
    """A replicate run whose interventions are sae, epsilon_random and a cosine_matched grid."""
    from klgap.robustness import curve_interventions, parse_cos_grid, parse_norm_fracs

    config, extra = run_config_from_args(args)
    # a replication file may carry its grid as `cos` / `norm_frac`; flags given on the command line win
    cos = args.cos if args.cos is not None else extra.get("cos", "0.5:1.0:11")
    norm_frac = args.norm_frac if args.norm_frac is not None else extra.get("norm_frac", "0.9")
    cosines, fracs = parse_cos_grid(cos), parse_norm_fracs(norm_frac)
    if config.mode == "many_samples":
        raise KlgapError("klgap curve measures all_tokens or single_token runs, not many_samples")
    grid = curve_interventions(cosines, fracs)
    chosen = list(args.interventions and config.interventions or [])
    config.interventions = grid + [s for s in chosen if s not in grid]
    return run_and_render(config, extra, args, "curve" if config.mode == "all_tokens" else f"curve-{config.mode}")


def run_and_render(config: Any, extra: dict[str, Any], args: argparse.Namespace, tag: str) -> int:
    """Run one site/layer (or a study over several), write the report's figures, print the summary.

    Every run of the command is resolved (klgap.resolve) before anything is loaded or trained: a bad name, path
    or number fails in a second, before transformers is imported."""
    from klgap.grid import parse_layers, parse_sites
    from klgap.plan import dry_run
    from klgap.shards import parse_shard

    shard = parse_shard(args.shard) if getattr(args, "shard", None) else None
    sites = parse_sites(config.site) if config.site is not None else [None]
    layers = parse_layers(config.layer) if config.layer is not None else [None]
    if getattr(args, "dry_run", False):
        from klgap.plan import print_plan

        if layers == "all":
            raise KlgapError("--dry-run needs the layers listed (e.g. 0-11), not all: the layer count is the model's")
        print_plan(dry_run(config, sites, layers))
        return 0
    several = len(sites) > 1 or layers == "all" or len(layers) > 1
    if several and None in sites:
        raise KlgapError("several layers need --site too")
    # every run checked before anything loads (an SAE a [train_sae] table makes may be missing until then)
    plans = dry_run(config, sites, [0] if layers == "all" else layers, trains="train_sae" in extra).plans
    from klgap import engine
    from klgap.study import run_study

    if several:
        out = args.out or extra.get("out") or f"runs/{config.model}-{'+'.join(sites)}-study-{tag}"
        if "train_sae" in extra and layers != "all":
            train_missing_sae(config, extra["train_sae"], not args.quiet, [(s, v) for s in sites for v in layers])
        study = run_study(config, sites, layers, out, overwrite=args.overwrite, progress=not args.quiet, shard=shard)
        if shard is not None:
            return _shard_done(out, "study", config, sites, layers, shard)
        _render(Path(out))
        print_study(study, Path(out))
        return 0
    config.site, config.layer = sites[0], layers[0]
    out = args.out or extra.get("out")
    if out is None:
        site = config.site or "auto"
        layer = "auto" if config.layer is None else config.layer
        out = f"runs/{config.model}-{site}-L{layer}-{tag}"
    if "train_sae" in extra:
        train_missing_sae(config, extra["train_sae"], progress=not args.quiet)
    plan = plans[0] if plans[0].sae is not None or not config.sae else config  # an SAE trained just now: resolve again
    report = engine.run(plan, out, overwrite=args.overwrite, progress=not args.quiet, shard=shard)
    if shard is not None:
        return _shard_done(out, "run", config, sites, layers, shard)
    _render(Path(out))
    print_summary(report, Path(out))
    return 0


def _shard_done(out: str, kind: str, config: Any, sites: list, layers: Any, shard: tuple[int, int]) -> int:
    from klgap.shards import write_plan

    write_plan(Path(out), kind, config.to_dict(), sites, layers, shard)
    print(f"shard {shard[0]}/{shard[1]} done in {out}; when all {shard[1]} shards are done: "
          f"klgap merge SHARD_DIR_1 ... SHARD_DIR_{shard[1]} --out MERGED")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """Join shard folders into one run (or study) folder and build its report from the files alone: no model,
    no SAE is loaded (a test runs it with the model adapters disabled)."""
    from klgap.config import RunConfig
    from klgap.engine import report_folder
    from klgap.resolve import pick_device
    from klgap.shards import check_shards, merge_parts
    from klgap.study import write_study

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
        _render(out)
        print_study(study, out)
    else:
        report = report_folder(out)
        _render(out)
        print_summary(report, out)
    print(f"merged {plan['n_shards']} shards into {out}")
    return 0


def _render(out: Path) -> None:
    """Figures + report.md/html next to report.json (data first: a failure here loses no data)."""
    from klgap.render import rebuild

    try:
        rebuild(out)
    except Exception as exc:  # noqa: BLE001 - the numbers are saved; say so and go on
        log.warning("could not draw the report (%s: %s); the data is saved, retry with `klgap report %s`",
                    type(exc).__name__, exc, out)


def train_missing_sae(config: Any, recipe: dict[str, Any], progress: bool, pairs: list[tuple[str, int]] | None = None) -> None:
    """A replication file may carry the recipe of its SAEs: train, in one pass over the tokens, every SAE of
    the command (`sae` with {site}/{layer} for a study) that is not there yet."""
    from klgap.grid import sae_for
    from klgap.train import train_saes

    if not config.sae:
        return
    if pairs is None:
        if config.site is None or config.layer is None:
            raise KlgapError("a config with [train_sae] must name site and layer")
        pairs = [(config.site, int(config.layer))]
    template = os.path.expanduser(str(config.sae))
    missing = [(site, layer) for site, layer in pairs
               if not Path(sae_for(template, site, layer) if len(pairs) > 1 else template).exists()]
    if not missing:
        return
    names = ", ".join(f"{site} L{layer}" for site, layer in missing)
    print(f"{len(missing)} SAE(s) not found ({names}): training them from the config's [train_sae] recipe", file=sys.stderr)
    results = train_saes(
        config.model, list(dict.fromkeys(s for s, _ in missing)), [v for v in dict.fromkeys(layer for _, layer in missing)],
        template, tokens=int(recipe.get("tokens", 200_000)), context_len=int(recipe.get("context_len", config.context_len)),
        dataset=recipe.get("dataset", config.dataset), expansion=int(recipe.get("expansion", 8)), l1=recipe.get("l1"),
        lr=recipe.get("lr"), steps=recipe.get("steps"), b_dec_init=recipe.get("b_dec_init", "zeros"),
        seed=int(recipe.get("seed", config.seed)), device=config.device, dtype=config.dtype,
        batch_size=int(recipe.get("batch_size", 16)), progress=progress, only=missing,
        overrides=recipe_overrides(recipe),
    )
    _print_trained(results)


def _print_trained(results: list[dict[str, Any]]) -> None:
    for result in results:
        print(json.dumps({k: v for k, v in result.items() if not isinstance(v, (list, dict))}, indent=2, default=str))
        print(f"wrote SAE to {result['out']} (use --sae {result['out']})")


OVERRIDABLE = {"l1": "l1_coefficient", "lr": "lr", "steps": "steps", "b_dec_init": "b_dec_init"}


def recipe_overrides(recipe: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    """``[train_sae.sites.attn_out_L24]`` tables: per-SAE changes to the recipe (l1, lr, steps, b_dec_init)."""
    from klgap.sites import SITES

    out: dict[tuple[str, int], dict[str, Any]] = {}
    for key, table in (recipe.get("sites") or {}).items():
        site, sep, layer = str(key).rpartition("_L")
        if not sep or site not in SITES or not layer.isdigit():
            raise KlgapError(f"[train_sae.sites.{key}]: name the SAE as SITE_L<layer>, e.g. attn_out_L24 "
                             f"(sites: {', '.join(SITES)})")
        bad = [k for k in table if k not in OVERRIDABLE]
        if bad:
            raise unknown(f"[train_sae.sites.{key}] key", bad[0], list(OVERRIDABLE))
        out[(site, int(layer))] = {OVERRIDABLE[k]: v for k, v in table.items()}
    return out


def cmd_train_sae(args: argparse.Namespace) -> int:
    from klgap.train import train_saes

    _print_trained(train_saes(
        args.model, str(args.site), str(args.layer), args.out, tokens=args.tokens, context_len=args.context_len,
        dataset=args.dataset, expansion=args.expansion, l1=args.l1, lr=args.lr, steps=args.steps,
        b_dec_init=args.b_dec_init, seed=args.seed, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
        progress=not args.quiet,
    ))
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from klgap.plugins import get_host

    infos = get_host().plugin_infos()
    if args.json:
        print(json.dumps([info.__dict__ for info in infos], indent=2))
        return 0
    host = get_host()
    for info in infos:
        print(f"{info.name}  ({info.package or '?'} {info.version or ''})".rstrip())
        for kind, names in info.registers.items():
            print(f"  {kind}:")
            for name in names:
                print(f"    {name:<28} {host.registry(kind).entries[name].description}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Redraw a run's figures and pages; a run folder with parts but no report.json (a killed run's last step)
    gets its report built first, from its files alone."""
    from klgap.engine import report_folder
    from klgap.record import RECORD_FILE
    from klgap.render import rebuild

    folder = Path(args.run_dir)
    if not (folder / "report.json").is_file() and (folder / RECORD_FILE).is_file():
        report_folder(folder)

    for name, path in rebuild(args.run_dir).items():
        print(f"wrote {path}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from klgap.schema import load_report

    report = load_report(args.report)
    print(f"{args.report}: valid klgap report (schema {report.schema_version})")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from klgap.comparison import compare_runs

    result = compare_runs(args.run_dirs, args.out, labels=args.label)
    print(result["table_text"])
    for path in result["written"]:
        print(f"wrote {path}")
    return 0


def cmd_new_plugin(args: argparse.Namespace) -> int:
    from klgap.scaffold import create_plugin

    root = create_plugin(args.name, args.dir)
    print(f"wrote plugin package {root}:")
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        print(f"  {path.relative_to(root)}")
    print(f"next: pip install -e {root} && klgap plugins   (tests: pytest {root / 'tests'})")
    return 0


COMMANDS = {"merge": cmd_merge, "new-plugin": cmd_new_plugin, "replicate": cmd_replicate, "curve": cmd_curve, "compare": cmd_compare, "report": cmd_report, "train-sae": cmd_train_sae, "plugins": cmd_plugins, "validate": cmd_validate}


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
    logging.basicConfig(level=logging.WARNING, format="klgap: %(message)s")
    if args.version:
        import klgap

        print(klgap.__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if getattr(args, "plugin_command", None) is not None:
            return args.plugin_command.run(args)
        return COMMANDS[args.command](args)
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


if __name__ == "__main__":
    sys.exit(main())
