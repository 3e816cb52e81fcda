"""Specs a user writes on the command line, parsed in one place.

`NAME:ARG` (``--sae sae_lens:RELEASE/ID``, ``--dataset text:PATH``): :func:`split_spec`.
An intervention list and one intervention's `NAME:key=value,...` (``--interventions
sae,cosine_matched:cos=0.8,norm_frac=0.9``): :func:`split_interventions`, :func:`parse_intervention`.
"""

from __future__ import annotations

import re

from klgap.errors import KlgapError


def split_spec(text: str) -> tuple[str, str | None]:
    """`"text:corpus/eval"` -> ("text", "corpus/eval"); `"random"` -> ("random", None).

    Only the first ':' splits (the argument may hold more: `hf:name:split`); the argument is None when there
    is no ':' at all and "" when the text ends with it.
    """
    name, sep, arg = str(text).partition(":")
    return name, (arg if sep else None)


def split_interventions(text: str | list[str]) -> list[str]:
    """`"sae,epsilon_random,cosine_matched:cos=0.8,norm_frac=0.9"` -> three specs.

    A comma starts a new intervention unless it is followed by `key=` (a parameter).
    """
    items = [text] if isinstance(text, str) else list(text)
    out: list[str] = []
    for item in items:
        out.extend(p.strip() for p in re.split(r",(?![A-Za-z_][A-Za-z0-9_]*=)", item) if p.strip())
    return out


def parse_intervention(spec: str) -> tuple[str, dict[str, str]]:
    """`"cosine_matched:cos=0.8,norm_frac=0.9"` -> ("cosine_matched", {"cos": "0.8", "norm_frac": "0.9"})."""
    name, rest = split_spec(spec)
    params: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in (rest or "").split(","))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise KlgapError(f"cannot read parameter {part!r} of intervention {spec!r}; write NAME:key=value,key=value")
        params[key.strip()] = value.strip()
    return name.strip(), params
