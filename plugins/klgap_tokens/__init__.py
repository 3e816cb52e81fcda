"""klgap's built-in token sources: `random`, `text` (local files), `sample` (built-in English), `hf` (datasets);
and the `klgap build-corpus` command that writes an offline English corpus for `text`."""

from __future__ import annotations

import klgap
from klgap_tokens.commands import BuildCorpus
from klgap_tokens.hub import HubDataset
from klgap_tokens.sources import RandomTokens, SampleText, TextFiles

__all__ = ["BuildCorpus", "HubDataset", "RandomTokens", "SampleText", "TextFiles", "register_commands",
           "register_token_sources"]


@klgap.hookimpl
def register_token_sources(register) -> None:
    """Register `random`, `text`, `sample` and `hf`."""
    register("random", RandomTokens(), RandomTokens.description)
    register("text", TextFiles(), TextFiles.description)
    register("sample", SampleText(), SampleText.description)
    register("hf", HubDataset(), HubDataset.description)


@klgap.hookimpl
def register_commands(register) -> None:
    """Register `klgap build-corpus`."""
    register("build-corpus", BuildCorpus(), BuildCorpus.description)
