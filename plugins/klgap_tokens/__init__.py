"""klgap's built-in token sources: `random`, `text` (local files), `sample` (built-in English), `hf` (datasets)."""

from __future__ import annotations

import klgap
from klgap_tokens.hub import HubDataset
from klgap_tokens.sources import RandomTokens, SampleText, TextFiles

__all__ = ["HubDataset", "RandomTokens", "SampleText", "TextFiles", "register_token_sources"]


@klgap.hookimpl
def register_token_sources(register) -> None:
    """Register `random`, `text` and `sample`."""
    register("random", RandomTokens(), RandomTokens.description)
    register("text", TextFiles(), TextFiles.description)
    register("sample", SampleText(), SampleText.description)
    register("hf", HubDataset(), HubDataset.description)
