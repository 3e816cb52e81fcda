"""Site names and the SAE ecosystem's hook names (`blocks.L.hook_mlp_out`, ...)."""

from __future__ import annotations

import re

from klgap.errors import KlgapError, unknown

#: Every site a model adapter maps, in the SAE ecosystem's vocabulary.
SITES: tuple[str, ...] = ("resid_pre", "resid_post", "attn_out", "mlp_in", "mlp_out", "attn_z")

#: The TransformerLens hook of ``mlp_in`` (the MLP's input, after the pre-MLP norm): what a transcoder reads.
MLP_IN_HOOK = "ln2.hook_normalized"

_HOOK_RE = re.compile(
    r"^blocks\.(?P<layer>\d+)\.(?:(?:attn\.)?hook_(?P<site>resid_pre|resid_post|attn_out|mlp_out|z)"
    r"|(?P<mlp_in>ln2\.hook_normalized))$"
)


def check_site(site: str) -> str:
    """Return `site` if it is a known site name, else raise an error listing the valid ones."""
    if site not in SITES:
        raise unknown("site", site, SITES)
    return site


def hook_name(site: str, layer: int) -> str:
    """The TransformerLens/SAELens hook name of a site: `blocks.3.hook_mlp_out`, `blocks.3.attn.hook_z`."""
    check_site(site)
    if site == "attn_z":
        return f"blocks.{layer}.attn.hook_z"
    if site == "mlp_in":
        return f"blocks.{layer}.{MLP_IN_HOOK}"
    return f"blocks.{layer}.hook_{site}"


def parse_hook_name(name: str) -> tuple[str, int]:
    """`blocks.3.hook_mlp_out` -> ('mlp_out', 3); `blocks.3.hook_z` and `blocks.3.attn.hook_z` -> ('attn_z', 3);
    `blocks.3.ln2.hook_normalized` -> ('mlp_in', 3)."""
    match = _HOOK_RE.match(name.strip())
    if match is None:
        raise KlgapError(
            f"cannot read a site from hook name {name!r}; expected blocks.L.hook_resid_pre, "
            "blocks.L.hook_resid_post, blocks.L.hook_attn_out, blocks.L.hook_mlp_out, blocks.L.attn.hook_z or "
            "blocks.L.ln2.hook_normalized (mlp_in)"
        )
    if match["mlp_in"]:
        return "mlp_in", int(match["layer"])
    site = match["site"]
    return ("attn_z" if site == "z" else site), int(match["layer"])
