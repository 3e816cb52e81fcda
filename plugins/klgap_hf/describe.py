"""``klgap models [NAME|REPO|FOLDER]``: the known families, or one model's site map, without loading weights.

For one model the config is read (HF cache or hub, a folder, a GGUF header, a tiny config) and the model is
built on the meta device, so the module paths printed are the ones the model really has; nothing is computed.
"""

from __future__ import annotations

import dataclasses

import json
from dataclasses import dataclass
from typing import Any

from klgap.errors import KlgapError
from klgap.plan.sites import SITES
from klgap_hf.families import FAMILIES, Family, dims, site_widths, text_config
from klgap_hf.folder import FolderAdapter
from klgap_hf.gguf import GGUFAdapter
from klgap_hf.hub import SAE_LENS_MODELS, AnyRepoAdapter, HubAdapter
from klgap_hf.loaded import family_of, meta_model
from klgap_hf.tiny import TinyAdapter

#: The adapters of this plugin: each can give its model's config without loading weights (``config()``).
DESCRIBABLE = (HubAdapter, FolderAdapter, GGUFAdapter, TinyAdapter, AnyRepoAdapter)


def fast_paths(family: Family) -> str:
    """The fast paths a family allows (both are still checked against full forwards on the first batch)."""
    suffix = "suffix replay" if family.layout() is not None else "no suffix replay (final norm / head not found)"
    cache = "KV cache" if family.kv_cache else f"no KV cache ({family.kv_cache_note})"
    return f"{suffix}, {cache}"


def sae_lens_models_of(family: Family) -> list[str]:
    """sae_lens model names served by the family's example checkpoints (from klgap_hf.hub.SAE_LENS_MODELS)."""
    return [name for repo in family.examples for name in SAE_LENS_MODELS.get(repo, ())]


def families_table() -> list[dict[str, Any]]:
    """One row per hand-written family."""
    return [
        {"family": f.model_type, "examples": list(f.examples), "sites": list(f.sites()), "fast_paths": fast_paths(f),
         "transformer_lens": f.transformer_lens or None, "sae_lens_models": sae_lens_models_of(f), "note": f.note}
        for f in sorted(FAMILIES.values(), key=lambda f: f.model_type)
    ]


def folder_tokenizer_text(adapter: FolderAdapter) -> str:
    """What the folder's tokenizer is ("GPT2TokenizerFast, 257 tokens"), or why there is none and what that means."""
    tokenizer, note = adapter.tokenizer()
    if tokenizer is None:
        return f"none — {note}"
    return f"{type(tokenizer).__name__}, {len(tokenizer)} tokens" + (f" ({note})" if note else "")


def describe(spec: str) -> dict[str, Any]:
    """What `spec` resolves to and its site map (module paths at layer L), from the config and a meta-device build."""
    from klgap.plugins.manager import model_adapter

    ref = model_adapter(spec)
    if not isinstance(ref.adapter, DESCRIBABLE):
        raise KlgapError(f"model {spec!r} comes from plugin {ref.plugin!r}, whose adapter does not describe its site "
                         "map without loading it (klgap models describes Hugging Face models)")
    config = ref.adapter.config()
    model = meta_model(config)
    family = family_of(model)
    d = dims(config)
    widths = site_widths(config)
    sites: dict[str, Any] = {}
    for site in SITES:
        point = family.points()[site]
        if point is None:
            sites[site] = None
            continue
        spec_l = family.site_map(site, 0)
        try:
            model.get_submodule(spec_l.module)  # the map fits this checkpoint's module tree
        except AttributeError as exc:
            raise KlgapError(f"the {family.model_type} site map does not fit {spec!r}: it has no module "
                             f"{spec_l.module!r} ({site})") from exc
        sites[site] = {
            "module": spec_l.module.replace(f"{family.blocks}.0", f"{family.blocks}.{{L}}", 1),
            "io": spec_l.io, "index": spec_l.index,
            "width": widths[site] if not (family.inferred and site == "attn_z") else None,
        }
    cap = getattr(text_config(config), family.softcap, None) if family.softcap else None
    return {
        "tokenizer": folder_tokenizer_text(ref.adapter) if isinstance(ref.adapter, FolderAdapter) else None,
        "model": spec, "resolved_as": ref.name, "plugin": ref.plugin, "adapter": type(ref.adapter).__name__,
        "architecture": config.model_type, "hf_class": type(model).__name__,
        "n_layers": d["n_layers"], "d_model": d["d_model"], "vocab_size": d["vocab_size"],
        "site_map": "generic (klgap_hf.generic)" if family.inferred else f"klgap_hf.families[{family.model_type!r}]",
        "sites": sites, "unmapped": family.unmapped or None,
        "layout": dataclasses.asdict(family.layout()) if family.layout() is not None else None, "logit_softcap": cap, "fast_paths": fast_paths(family),
        "transformer_lens": family.transformer_lens or None, "note": family.note or None,
    }


def print_description(info: dict[str, Any]) -> None:
    print(f"{info['model']}: {info['hf_class']} (model type {info['architecture']}), {info['n_layers']} layers, "
          f"d_model {info['d_model']}, vocab {info['vocab_size']}; site map {info['site_map']}")
    for site, where in info["sites"].items():
        if where is None:
            print(f"  {site:<11} not mapped")
            continue
        part = where["io"] if where["index"] is None else f"{where['io']}[{where['index']}]"
        width = f"  (width {where['width']})" if where["width"] else ""
        print(f"  {site:<11} {where['module']} {part}{width}")
    if info["unmapped"]:
        print(f"unmapped: {info['unmapped']}")
    cap = f", logit soft cap {info['logit_softcap']}" if info["logit_softcap"] else ""
    print(f"fast paths: {info['fast_paths']}{cap}")
    if info["tokenizer"]:
        print(f"tokenizer: {info['tokenizer']}")
    print(f"TransformerLens: {info['transformer_lens'] or 'no HookedTransformer for this family'}")
    if info["note"]:
        print(f"note: {info['note']}")


def print_families(rows: list[dict[str, Any]]) -> None:
    print(f"{len(rows)} families with a site map (any other decoder-only causal LM: the generic map, "
          "resid_pre / resid_post always):")
    for row in rows:
        tl = row["transformer_lens"] or "-"
        print(f"  {row['family']:<12} sites {','.join(row['sites']):<42} TransformerLens {tl:<31} "
              f"e.g. {', '.join(row['examples'][:2])}")
    print("--model takes a registered name (klgap plugins), a hub repo id ORG/NAME or a folder saved with "
          "save_pretrained; `klgap models MODEL` prints its site map")


@dataclass
class ModelsCommand:
    """``klgap models``."""

    description: str = ("list the model families with a site map, or print one model's site map (NAME, hub repo id "
                        "or folder) from its config, without loading weights")

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("model", nargs="?", help="a registered name, hub repo id (ORG/NAME) or model folder")
        parser.add_argument("--json", action="store_true", help="machine-readable output")

    def run(self, args: Any) -> int:
        info: Any = describe(args.model) if args.model else families_table()
        if args.json:
            print(json.dumps(info, indent=2))
        elif args.model:
            print_description(info)
        else:
            print_families(info)
        return 0
