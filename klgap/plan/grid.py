"""The (site, layer) grid of a command: `--site mlp_out,attn_out`, `--layer 3,10,17 | 0-5 | all`, and the SAE
spec of each cell (`{site}` / `{layer}` filled in). Cheap to import: the CLI checks a command with it before
anything heavy loads."""

from __future__ import annotations

import re

from klgap.errors import KlgapError
from klgap.plan.sites import SITES, check_site


def parse_layers(text: str | int | list, n_layers: int | None = None) -> list[int] | str:
    """`"3"`, `"3,10,17"`, `"0-5"`, `"all"` -> list of layers (or "all" when n_layers is not known yet)."""
    if isinstance(text, int):
        return [text]
    given = isinstance(text, list)  # a list (from Python, or a config's `layer = [3, 10]`) keeps its order
    layers: list[int] = [int(v) for v in text] if given else []
    text = ",".join(map(str, layers)) if given else str(text).strip()
    if text == "all":
        return list(range(n_layers)) if n_layers is not None else "all"
    for part in filter(None, (p.strip() for p in text.split(","))) if not given else []:
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if match is None:
            raise KlgapError(f"--layer {text!r}: {part!r} is not a layer; write 3, 3,10,17, 0-5 or all")
        low, high = int(match[1]), int(match[2] or match[1])
        if high < low:
            raise KlgapError(f"--layer {text!r}: range {part!r} runs backwards")
        layers.extend(range(low, high + 1))
    if not layers:
        raise KlgapError("--layer is empty; write 3, 3,10,17, 0-5 or all")
    twice = next((layer for i, layer in enumerate(layers) if layer in layers[:i]), None)
    if twice is not None:
        raise KlgapError(f"--layer {text!r} lists layer {twice} twice; list each layer once (3,10,17 or 0-5)")
    return layers if given else sorted(layers)


def parse_sites(text: str) -> list[str]:
    sites = [check_site(s.strip()) for s in str(text).split(",") if s.strip()]
    if not sites:
        raise KlgapError(f"--site is empty; valid: {', '.join(SITES)}")
    twice = next((site for i, site in enumerate(sites) if site in sites[:i]), None)
    if twice is not None:
        raise KlgapError(f"--site {text!r} lists {twice} twice; list each site once")
    return sites


def templated(spec: str | None) -> bool:
    """An SAE spec with ``{site}`` or ``{layer}`` in it: one SAE per (site, layer), filled in by :func:`sae_for`."""
    return spec is not None and ("{layer}" in spec or "{site}" in spec)


def sae_for(template: str | None, site: str, layer: int) -> str | None:
    """An SAE spec for one sub-run: `{layer}` and `{site}` in the template are filled in."""
    if template is None:
        return None
    if "{layer}" not in template and "{site}" not in template:
        raise KlgapError(
            f"--sae {template!r} names one SAE but several sites/layers were asked for; put {{layer}} (and "
            "{site}) in it, e.g. sae_lens:gpt2-small-res-jb/blocks.{layer}.hook_resid_pre, or leave --sae out"
        )
    return template.replace("{layer}", str(layer)).replace("{site}", site)
