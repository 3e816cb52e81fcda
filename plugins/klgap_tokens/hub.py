"""`hf:NAME[:SPLIT]`: text from a Hugging Face dataset, streamed (the study's OpenWebText, for instance).

NAME is a hub dataset id (``Skylion007/openwebtext``) or a local folder ``datasets.load_dataset`` reads
(e.g. a folder of .jsonl files with a ``text`` field). Documents are read in order until there is enough
text for the contexts asked for (plus a margin), tokenized, joined and packed like ``text:PATH``. The hub
is checked before the download: an offline machine gets a one-line error naming the dataset at once.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import Tensor

from klgap.errors import HubUnavailableError, KlgapError
from klgap.plugins.hubcheck import hub_reachable, offline_env
from klgap.protocols import LoadedModel, TokenRole, TokenSplit
from klgap_tokens.checks import check_request, text_tokenizer
from klgap_tokens.loading import root_cause
from klgap_tokens.packing import pack, tokenize_documents
from klgap_tokens.splits import hf_split

MARGIN = 1.25  # read this many times the tokens needed (documents are cut at context boundaries)
CHARS_PER_TOKEN = 6  # generous for English BPE (~4.5): read enough documents without tokenizing twice


def parse_arg(arg: str | None) -> tuple[str, str]:
    if not arg:
        raise KlgapError("token source 'hf' needs a dataset: --dataset hf:NAME[:SPLIT], e.g. hf:Skylion007/openwebtext")
    name, _, split = arg.partition(":")
    return name, split or "train"


def open_stream(name: str, split: str) -> Any:
    """An iterable dataset of rows (streamed from the hub, or read from a local folder)."""
    import datasets

    local = Path(name).expanduser()
    if not local.exists():
        if offline_env() or not hub_reachable():
            raise HubUnavailableError(
                f"dataset {name!r} needs the Hugging Face hub, which this machine cannot reach; use "
                "--dataset text:PATH (e.g. a corpus from `klgap build-corpus`) or --dataset sample"
            )
    previous = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(logging.CRITICAL)
    try:
        return datasets.load_dataset(str(local) if local.exists() else name, split=split, streaming=True)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types
        raise KlgapError(f"could not open dataset {name!r} split {split!r}: {root_cause(exc)}") from exc
    finally:
        datasets.logging.set_verbosity(previous)


def stream_documents(rows: Any, tokenizer: Any, n_tokens: int, name: str) -> Tensor:
    """Tokens of the first documents of `rows`: enough characters for `n_tokens` (CHARS_PER_TOKEN each)."""
    documents: list[str] = []
    chars = 0
    for row in rows:
        text = row.get("text") if isinstance(row, dict) else None
        if text is None:
            raise KlgapError(f"dataset {name!r} has no 'text' field; its fields are: {', '.join(row)}")
        if text:
            documents.append(text)
            chars += len(text)
        if chars >= n_tokens * CHARS_PER_TOKEN:
            break
    return tokenize_documents(tokenizer, documents)


class HubDataset:
    """A Hugging Face dataset, streamed: ``--dataset hf:NAME[:SPLIT]`` (field ``text``)."""

    description = "a Hugging Face dataset, streamed: hf:NAME[:SPLIT] (field text), or a local folder it reads; hub ids need the hub"

    def split_for(self, arg: str | None, role: TokenRole) -> TokenSplit:
        """`hf:NAME` reads its train split to train and its first eval split to measure
        (klgap_tokens.splits.hf_split); `hf:NAME:SPLIT` names its split."""
        return hf_split(arg, role)

    def contexts(
        self, model: LoadedModel, n_contexts: int, context_len: int, seed: int, prepend_bos: bool, arg: str | None
    ) -> Tensor:
        """The first documents of the dataset, tokenized and packed; `seed` shuffles the packed contexts."""
        name, split = parse_arg(arg)
        check_request(model, n_contexts, context_len, prepend_bos)
        tokenizer = text_tokenizer(model)
        rows = open_stream(name, split)
        tokens = stream_documents(rows, tokenizer, int(n_contexts * context_len * MARGIN), name)
        bos = model.bos_token_id if prepend_bos else None
        return pack(tokens, n_contexts, context_len, bos, seed, f"dataset {name!r} ({split})")
