"""``klgap saes``: the pretrained SAEs sae_lens's bundled directory lists for a model, offline.

One row per SAE: release, id, site, layer, width (d_sae, when the release or id says it), and whether klgap picks
it when a run gives no ``--sae`` (:meth:`SaeLensPretrainedLoader.default_sae`, asked as a run would ask it, with
the model's sae_lens names from its adapter: nothing is loaded). Without ``--model``: one line per model the
directory knows.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any

from klgap.errors import KlgapError
from klgap.protocols import ModelSAENames
from klgap.plan.sites import SITES, parse_hook_name
from klgap_saes.pretrained import SaeLensPretrainedLoader, directory, is_hook_name

#: releases of transcoders / cross-layer transcoders: they do not reconstruct their own input, klgap refuses them
NOT_SAES = re.compile(r"transcoder|(^|[-_])clt([-_]|$)")


@dataclass(frozen=True)
class SAERow:
    """One pretrained SAE. site/layer: from the id when it is a hook name (layer alone from ``layer_12``-style
    ids; then the loaded SAE's cfg, or --site, says the site); width: d_sae as the release or id writes it."""

    release: str
    sae_id: str
    model: str
    repo_id: str
    site: str | None
    layer: int | None
    width: str | None
    default: bool = False

    @property
    def spec(self) -> str:
        return f"sae_lens:{self.release}/{self.sae_id}"


def _place(sae_id: str) -> tuple[str | None, int | None]:
    """(site, layer) the id names: a hook name, a hook name with a suffix (``blocks.3.hook_resid_post__trainer_0``),
    or a layer alone (``layer_12/width_16k/canonical``)."""
    hook = sae_id.split("__")[0]
    if is_hook_name(hook):
        return parse_hook_name(hook)
    found = re.search(r"(?:^|[/_])layer_?(\d+)(?:$|[/_])", sae_id)
    return None, int(found[1]) if found else None


def _order(row: SAERow) -> tuple:
    """Release, then layer, site and id in natural order (blocks.2 before blocks.10)."""
    natural = tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", row.sae_id))
    return row.release, -1 if row.layer is None else row.layer, row.site or "", natural


def _width(release: str, sae_id: str) -> str | None:
    """d_sae from ``width_16k`` (id), ``width-2pow14`` / ``-32k`` / ``-w64k-`` (release), or ``32x`` (expansion)."""
    for pattern, text in ((r"width_(\d+[km]?)", sae_id), (r"-w(\d+k)(?:-|$)", release), (r"-(\d+k)$", release)):
        found = re.search(pattern, text)
        if found:
            return found[1]
    found = re.search(r"width-2pow(\d+)", release)
    if found:
        return str(2 ** int(found[1]))
    found = re.search(r"_(\d+x)(?:_|$)", f"{release}/{sae_id}")
    return found[1] if found else None


def sae_lens_names(model: str) -> ModelSAENames:
    """The sae_lens model names of `--model` (its adapter's, as a run uses them); a model name the directory
    itself uses (``gpt2-small``, ``google/gemma-3-270m``) is taken as it is."""
    from klgap.plugins.capabilities import model_sae_names
    from klgap.plugins.manager import model_adapter

    if model in {lookup.model for lookup in directory().values()}:
        return ModelSAENames(model, (model,))
    ref = model_adapter(model)  # an unknown model: the usual error, listing the names
    names = model_sae_names(ref.name, ref.adapter)
    if names is None:
        raise KlgapError(f"model {model!r}: its adapter names no sae_lens models, so klgap knows no pretrained SAE "
                         f"for it; train one with `klgap train-sae --model {model} ...`, or give --model as "
                         "sae_lens's directory names a model (`klgap saes` lists them)")
    return names


def list_saes(model: str, site: str | None = None) -> tuple[ModelSAENames, list[SAERow], int]:
    """Every SAE of the model's sae_lens names (best name first), and which one klgap picks per site/layer; with
    `site`, also how many SAEs were left out because their id names no site."""
    if site is not None and site not in SITES:
        from klgap.errors import unknown

        raise unknown("site", site, SITES)
    names = sae_lens_names(model)
    rows, unplaced = [], 0
    for sae_model in names.sae_lens_models:
        found = []
        for release, lookup in directory().items():
            if lookup.model != sae_model or NOT_SAES.search(release):
                continue
            for sae_id in lookup.saes_map:
                where = _place(sae_id)
                unplaced += site is not None and where[0] is None
                if site is None or where[0] == site:
                    found.append(SAERow(release, sae_id, lookup.model, lookup.repo_id, *where, _width(release, sae_id)))
        rows += sorted(found, key=_order)
    loader = SaeLensPretrainedLoader()
    defaults = set()
    for where in {(r.site, r.layer) for r in rows if r.site is not None and r.layer is not None}:
        found = loader.default_sae(names, *where)
        if found is not None:
            defaults.add(found[0])
    rows = [dataclasses.replace(r, default=f"{r.release}/{r.sae_id}" in defaults) for r in rows]
    return names, rows, unplaced


def models_table() -> list[dict[str, Any]]:
    """One row per model the directory lists SAEs for: its releases and SAE count."""
    out: dict[str, dict[str, Any]] = {}
    for release, lookup in sorted(directory().items()):
        if NOT_SAES.search(release):
            continue
        row = out.setdefault(lookup.model, {"model": lookup.model, "releases": [], "n_saes": 0})
        row["releases"].append(release)
        row["n_saes"] += len(lookup.saes_map)
    return sorted(out.values(), key=lambda r: r["model"])


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def print_rows(model: str, names: ModelSAENames, rows: list[SAERow], site: str | None, unplaced: int = 0) -> None:
    where = f" at {site}" if site else ""
    left_out = (f"; {unplaced} more SAEs whose id names no site (e.g. Gemma Scope's layer_12/width_16k/...) are listed "
                "without --site") if unplaced else ""
    if not rows:
        print(f"sae_lens's directory lists no SAEs{where} for {model} (sae_lens models: "
              f"{', '.join(names.sae_lens_models) or 'none'}){left_out}; train one with `klgap train-sae`")
        return
    print(f"{len(rows)} pretrained SAEs{where} for {model} in sae_lens's directory "
          f"(sae_lens model {', '.join(names.sae_lens_models)}):")
    widths = [max(len(r.release) for r in rows), max(len(r.sae_id) for r in rows)]
    print(f"  {'release':<{widths[0]}}  {'id':<{widths[1]}}  {'site':<10} {'layer':>5} {'width':>6}")
    for r in rows:
        mark = "*" if r.default else " "
        print(f"{mark} {r.release:<{widths[0]}}  {r.sae_id:<{widths[1]}}  {_cell(r.site):<10} {_cell(r.layer):>5} "
              f"{_cell(r.width):>6}")
    if any(r.default for r in rows):
        print("* what klgap uses when a run gives no --sae (at that site and layer)")
    if any(not is_hook_name(r.sae_id) for r in rows):
        print("an id that is no hook name: klgap reads the site and layer from the SAE's cfg once downloaded, or "
              "give --site and --layer")
    if unplaced:
        print(left_out.lstrip("; "))
    if names.sae_note:
        print(f"note: {names.sae_note}")
    print("use one: --sae sae_lens:RELEASE/ID")


@dataclass
class SaesCommand:
    """``klgap saes``."""

    description: str = ("list the pretrained SAEs sae_lens's bundled directory knows for a model (release, id, site, "
                        "layer, width; * marks klgap's default), offline")

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--model", help="a --model value (smollm2-135m, gpt2, pythia-70m, ORG/NAME) or a model "
                            "name as sae_lens's directory writes it (gpt2-small); default: list the models it knows")
        parser.add_argument("--site", help=f"only SAEs at this site ({', '.join(SITES)})")
        parser.add_argument("--json", action="store_true", help="machine-readable output")

    def run(self, args: Any) -> int:
        if args.model is None:
            if args.site is not None:
                raise KlgapError("--site needs --model (e.g. klgap saes --model gpt2 --site mlp_out)")
            table = models_table()
            if args.json:
                print(json.dumps(table, indent=2))
                return 0
            print(f"sae_lens's directory lists SAEs for {len(table)} models (klgap saes --model NAME lists them):")
            for row in table:
                print(f"  {row['model']:<44} {row['n_saes']:>6} SAEs in {len(row['releases'])} releases")
            return 0
        names, rows, unplaced = list_saes(args.model, args.site)
        if args.json:
            print(json.dumps([{**dataclasses.asdict(r), "spec": r.spec} for r in rows], indent=2))
        else:
            print_rows(args.model, names, rows, args.site, unplaced)
        return 0
