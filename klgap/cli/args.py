"""The command line's grammar: every subcommand's flags (argparse), and the subcommands plugins register.

The commands themselves are in klgap/cli/main.py; a flag's dest is the RunConfig field of the same name.
"""

from __future__ import annotations

import argparse
from typing import Any



def _int_arg(name: str):
    def parse(text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None

    return parse


def _int_list_arg(name: str):
    """An integer, or a comma list of them (a list when it holds more than one)."""
    def parse(text: str) -> int | list[int]:
        try:
            values = [int(part) for part in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer or a comma list of them, got {text!r}") from None
        return values[0] if len(values) == 1 else values

    return parse


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    """One flag per RunConfig field (``--context-len`` for ``context_len``), its help and default from the field
    (klgap/plan/config.py: :func:`klgap.plan.config.flag`); every flag's parser default is None, so a value
    given in a --config file stands unless the flag is given too. Then the command's own flags."""
    import dataclasses

    from klgap.plan.config import RunConfig, flag_help

    p.add_argument("--config", help="a replication file (TOML or JSON) whose keys are these flags' names")
    for item in dataclasses.fields(RunConfig):
        name = "--" + item.name.replace("_", "-")
        if item.type == "bool":
            p.add_argument(name, action="store_true", default=None, help=flag_help(item))
        elif item.type.startswith("int") and not item.metadata["text"]:
            p.add_argument(name, type=_int_arg(name), help=flag_help(item))
        else:
            p.add_argument(name, help=flag_help(item))
    p.add_argument("--include-first-position", dest="mask_special", action="store_const", const="none",
                   help="deprecated: --mask-special none")
    p.add_argument(
        "--dry-run", action="store_true",
        help="check names, config and SAE ids offline (sae_lens releases against its bundled directory), print "
        "the runs and what they need, load nothing",
    )
    p.add_argument(
        "--shard", help="I/N: measure only shard I of N of the batches (1..N) and write no report; "
        "`klgap merge` joins the N shard folders into the unsharded run's report",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="klgap", description="Measure the KL gap of sparse autoencoders.")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")

    rep = sub.add_parser("replicate", help="run the KL-gap experiment and write OUT/report.json + tokens.parquet", description="run the KL-gap experiment and write OUT/report.json + tokens.parquet")
    _add_run_flags(rep)
    _derived_help(rep)
    rep.add_argument("--out", help="output folder (default runs/MODEL-SITE-LLAYER-MODE)")
    rep.add_argument("--overwrite", action="store_true", help="replace a different run already in --out")
    rep.add_argument("--wait", action="store_true",
                     help="if another klgap run is writing --out, wait for it to finish (then resume), not exit 2")
    rep.add_argument("--quiet", action="store_true", help="no progress bar")

    curve_help = ("robustness curve: KL of cosine_matched noise over a grid of cosines, the SAE's point on it; or, "
                  "with --along error, KL against the length of a patch along the SAE's error and baseline directions")
    curve = sub.add_parser("curve", help=curve_help, description=curve_help)
    _add_run_flags(curve)
    _derived_help(curve, interventions="added to sae, epsilon_random and the cosine_matched grid of --cos × "
                  "--norm-frac (default: none added, or a --config file's `interventions`), comma-separated, e.g. "
                  "theta_random,zero")
    curve.add_argument("--cos", default=None, help="cosine grid START:STOP:COUNT or a list (default 0.5:1.0:11)")
    curve.add_argument("--norm-frac", default=None, help="norm of the noise as a fraction of ‖x‖, or a list (default 0.9)")
    curve.add_argument("--along", default=None, choices=["error"],
                       help="a length sweep instead of a cosine curve: x + t·(x̂ − x) for each t of --scale (t = 1 is "
                            "the SAE), and x + t·ε·u along each --baselines direction u")
    curve.add_argument("--scale", default=None,
                       help="with --along: the lengths t, START:STOP:COUNT or a list (default 0:2:21)")
    curve.add_argument("--baselines", default=None,
                       help="with --along: the perturbations whose directions are swept too, comma-separated "
                            "(default epsilon_random,cov_random_mixture,real_direction)")
    curve.add_argument("--out", help="output folder (default runs/MODEL-SITE-LLAYER-curve)")
    curve.add_argument("--overwrite", action="store_true", help="replace a different run already in --out")
    curve.add_argument("--wait", action="store_true",
                     help="if another klgap run is writing --out, wait for it to finish (then resume), not exit 2")
    curve.add_argument("--quiet", action="store_true", help="no progress bars")

    compare = sub.add_parser("compare", help="overlay robustness curves and ratio tables of several runs", description="overlay robustness curves and ratio tables of several runs")
    compare.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run or study folders (each with report.json)")
    compare.add_argument("--out", required=True, help="folder for compare.json, compare.csv, compare.md and figures")
    compare.add_argument("--label", action="append", help="a label per RUN_DIR, in order (default: model site layer)")

    merge = sub.add_parser("merge", help="join the folders of `--shard I/N` runs into one report (as if unsharded)", description="join the folders of `--shard I/N` runs into one report (as if unsharded)")
    merge.add_argument("shard_dirs", nargs="+", metavar="SHARD_DIR", help="the N shard folders of one command")
    merge.add_argument("--out", required=True, help="folder for the merged run (report.json, tokens.parquet, ...)")
    merge.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    merge.add_argument("--quiet", action="store_true", help="no progress bars")

    new_help = "write a working plugin package (a perturbation, SAE loader, model or token source + its tests) to start from"
    new = sub.add_parser("new-plugin", help=new_help, description=new_help)
    new.add_argument("name", help="plugin name: lower-case letters, digits and _ (e.g. my_noise)")
    new.add_argument("--dir", help="where to write it (default ./klgap-NAME)")
    new.add_argument("--kind", default="perturbation", choices=["perturbation", "sae_loader", "model", "token_source"],
                     help="what the plugin registers (default perturbation); its tests run klgap's conformance suite "
                          "for that kind")

    train = sub.add_parser("train-sae", help="train an SAE with sae_lens's trainer on a site's activations", description="train an SAE with sae_lens's trainer on a site's activations")
    train.add_argument("--model", required=True, help="a registered name, a hub repo id (ORG/NAME) or a model folder")
    train.add_argument("--site", required=True, help="a site, or a comma list (one pass gathers them all)")
    train.add_argument("--layer", required=True, help="a layer, a list (3,10,17,24) or a range (0-5)")
    train.add_argument("--tokens", type=_int_arg("--tokens"), default=200_000,
                       help="training tokens gathered (default 200000); training reads them once unless --epochs or "
                            "--steps say otherwise")
    train.add_argument(
        "--out", required=True,
        help="folder for cfg.json + sae_weights.safetensors + training.json; with several sites/layers put "
        "{site} and {layer} in it, e.g. ~/.cache/klgap/saes/smollm2-135m/blocks.{layer}.hook_{site}",
    )
    train.add_argument("--context-len", type=_int_arg("--context-len"), default=128, help="tokens per context (default 128)")
    train.add_argument("--dataset", default="sample",
                       help="token source NAME[:ARG]: sample (default), text:PATH, hf:NAME[:SPLIT], random (klgap plugins lists "
                            "them); a source with splits is read at its train split when none is named (sample -> "
                            "sample:train; a run reads sample:eval)")
    train.add_argument("--expansion", type=_int_arg("--expansion"), default=8, help="d_sae / d_in (default 8)")
    train.add_argument("--l1", type=float, default=None, help="L1 coefficient (default 5)")
    train.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-3)")
    train.add_argument("--steps", type=_int_arg("--steps"), default=None,
                       help="training steps of 1024 tokens (default: one pass over --tokens, --tokens / 1024 steps); "
                            "not with --epochs")
    train.add_argument("--epochs", type=float, default=None,
                       help="passes over --tokens (default 1; a warning above 4: the SAE may overfit them); not with "
                            "--steps")
    train.add_argument("--b-dec-init", choices=["zeros", "mean"], default="zeros",
                       help="decoder bias at the start: zeros (default) or the activations' mean (sites with a large "
                            "common offset)")
    train.add_argument("--architecture", default="standard",
                       help="standard (ReLU + L1, default) or topk (the --top-k largest latents per token, no L1 "
                            "shrinkage: sites where a few dimensions carry most of the variance)")
    train.add_argument("--top-k", "--k", dest="top_k", type=_int_list_arg("--top-k"), default=None,
                       help="latents per token, for --architecture topk (--k: its old name; replicate's --k is "
                            "single-token mode's measured positions); a list (16,32,64) trains one SAE per k on the "
                            "same tokens, saved as OUT/k-16, ... (measure them with --sae 'OUT/k-*')")
    train.add_argument("--checkpoints", type=_int_arg("--checkpoints"), default=None,
                       help="also save N evenly spaced checkpoints of each SAE under OUT/checkpoints/step-XXXXXX/ "
                            "(the last is the final SAE); measure them with --sae 'OUT/checkpoints/*'")
    train.add_argument("--checkpoint-every", type=_int_arg("--checkpoint-every"), default=None, metavar="STEPS",
                       help="a checkpoint about every STEPS training steps (instead of --checkpoints N)")
    train.add_argument("--exclude-special", default="all",
                       help="tokens whose activations training leaves out, by --mask-special's rule: all (default: "
                            "position 0 and the tokenizer's BOS/EOS/PAD/SEP ids wherever they stand, the tokens a run "
                            "does not measure by default; sae_lens's trainer with exclude_special_tokens=True), first "
                            "(position 0 only), none (every token: sae_lens's default)")
    train.add_argument("--seed", type=_int_arg("--seed"), default=0, help="seed of token sampling, init and shuffling (default 0)")
    train.add_argument("--seeds", type=_int_arg("--seeds"), default=1, metavar="N",
                       help="train N SAEs of the same recipe on the same tokens, seeds --seed, --seed + 1, ... "
                            "(initialisation and token order), saved as OUT/seed-0 ... OUT/seed-{N-1}; measure them "
                            "together with --sae 'OUT/seed-*' (the headline's interval then resamples SAEs and "
                            "contexts; default 1: one SAE at OUT)")
    train.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda or cuda:N (default auto)")
    train.add_argument("--dtype", default="float32", help="dtype of the model while gathering activations (default float32)")
    train.add_argument("--batch-size", type=_int_arg("--batch-size"), default=16, help="contexts per forward pass")
    train.add_argument("--quiet", action="store_true", help="no progress bars")

    rep_cmd = sub.add_parser("report", help="rebuild figures, report.md and report.html from a run folder's data", description="rebuild figures, report.md and report.html from a run folder's data")
    rep_cmd.add_argument("run_dir", help="a run or study folder (report.json, or run.json and parts to build it from)")

    check_help = ("a run folder against a replication's expected.json: one verdict per target (exit 3 if any "
                  "target is not met)")
    check = sub.add_parser("check", help=check_help, description=check_help)
    check.add_argument("run_dir", help="a run or study folder (with report.json)")
    check.add_argument("--expected", required=True, help="an expected.json (beside a replication's files)")
    check.add_argument(
        "--for", dest="for_config", help="check the targets of this replication file (e.g. all_tokens.toml); default: "
        "those whose file declares the run's model and mode",
    )
    check.add_argument("--write", action="store_true",
                       help="also write RUN/expected_check.json and redraw report.md / report.html with the verdicts")

    val_help = ("check what klgap wrote against its schema and its values: a report.json (run, curve or study) or a "
                "compare.json; the kind is read from the file")
    val = sub.add_parser("validate", help=val_help, description=val_help)
    val.add_argument("report", help="a report.json or compare.json, or a run, study or compare folder holding one")

    export_help = ("write a run's or study's numbers as another tool's result file: saebench (SAEBench's core-eval "
                   "JSON, one file per SAE, with the KL gap as extra metrics)")
    export = sub.add_parser("export", help=export_help, description=export_help)
    export.add_argument("run_dir", help="a run or study folder (with report.json)")
    export.add_argument("--format", dest="export_format", default="saebench", help="saebench (the only one so far)")
    export.add_argument("--out", help="a .json file (a run) or a folder, each SAE's file under SAEBench's name in it "
                        "(default RUN/saebench/)")

    cal_help = ("a planted-truth testbed for the baselines (offline, CPU): known features, a readout model with "
                "thresholded read-offs, planted errors aligned with the features, orthogonal to them or random; how "
                "often each baseline calls each one pathological over seeds")
    cal = sub.add_parser("calibrate", help=cal_help, description=cal_help)
    cal.add_argument("--seeds", type=_int_arg("--seeds"), default=20, help="seeds (testbeds) to run (default 20)")
    cal.add_argument("--tokens", type=_int_arg("--tokens"), default=4096, help="tokens per testbed (default 4096)")
    cal.add_argument("--sae-samples", type=_int_arg("--sae-samples"), default=50_000,
                     help="train an SAE per seed on this many activations (sae_lens's toy trainer) and add its own "
                     "error as a row; 0: none (default 50000)")
    cal.add_argument("--out", help="write calibration.json and calibration.md there (a new or empty folder)")

    plugins = sub.add_parser("plugins", help="list plugins and what each registers", description="list plugins and what each registers")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    _add_plugin_commands(sub)
    for command in sub.choices.values():  # `klgap replicate ... --debug` as well as `klgap --debug replicate ...`
        try:
            command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show Python tracebacks")
        except argparse.ArgumentError:  # a plugin's command with a --debug of its own keeps it
            pass
    return parser


def sae_help() -> str:
    """--sae's help, naming every registered SAE loader (plugins' included), so it never lags the registry."""
    from klgap.plugins.manager import get_host

    # the registries as they are (a broken plugin's entries left out): `klgap plugins` and --help still run
    names = ", ".join(sorted(get_host().registries["sae_loader"].names()))
    return (f"an SAE as LOADER:ARG, LOADER one of {names} (`klgap plugins` says what each reads; e.g. "
            "sae_lens:RELEASE/SAE_ID), or a path that a loader recognises (a sae_lens folder, a .safetensors file, "
            "...); a glob ('DIR/checkpoints/*') measures every SAE checkpoint it matches in one study (over training)")


def _derived_help(parser: argparse.ArgumentParser, **helps: str) -> None:
    """Help texts that depend on the command or the plugins: --sae from the loader registry, and the flags named
    in `helps` (a command's own defaults, e.g. `klgap curve`'s interventions)."""
    helps = {"sae": sae_help(), **helps}
    for action in parser._actions:
        if action.dest in helps:
            action.help = helps[action.dest]


def _add_plugin_commands(sub: Any) -> None:
    """Subcommands that plugins register (``register_commands``); a name the core uses is refused."""
    from klgap.plugins.manager import get_host

    host = get_host()
    for name, entry in list(host.registries["command"].entries.items()):  # a broken plugin: `klgap plugins` says so
        if name in sub.choices:
            host.mark_broken(entry.plugin, f"plugin {entry.plugin!r} registers command {name!r}, which klgap itself "
                                           "defines")
            continue
        parser = sub.add_parser(name, help=entry.description, description=entry.description)
        entry.obj.add_arguments(parser)
        parser.set_defaults(plugin_command=entry.obj)
