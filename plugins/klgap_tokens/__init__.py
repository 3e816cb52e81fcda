"""klgap's built-in token sources: `random`, `text` (local files) and `sample` (built-in English)."""

from __future__ import annotations

import klgap
from klgap_tokens.sources import RandomTokens, SampleText, TextFiles

__all__ = ["RandomTokens", "SampleText", "TextFiles", "register_token_sources"]


@klgap.hookimpl
def register_token_sources(register) -> None:
    """Register `random`, `text` and `sample`."""
    register("random", RandomTokens(), RandomTokens.description)
    register("text", TextFiles(), TextFiles.description)
    register("sample", SampleText(), SampleText.description)
