"""The token sources: `random` ids, `text` from local files, and the built-in English `sample`."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

from klgap.errors import KlgapError
from klgap.protocols import LoadedModel, TokenRole, TokenSplit
from klgap_tokens.checks import check_request, text_tokenizer
from klgap_tokens.loading import read_documents
from klgap_tokens.packing import pack, tokenize_documents
from klgap_tokens.splits import SAMPLE_SPLITS, sample_split, text_split


def bos_for(model: LoadedModel, prepend_bos: bool) -> int | None:
    """The BOS id to put in column 0, or None when no BOS is wanted or the model has none."""
    return model.bos_token_id if prepend_bos else None


class RandomTokens:
    """Uniform random token ids (never BOS); BOS in column 0 when asked for."""

    description = "uniform random token ids (no text needed)"

    def contexts(
        self, model: LoadedModel, n_contexts: int, context_len: int, seed: int, prepend_bos: bool, arg: str | None
    ) -> Tensor:
        """``[n_contexts, context_len]`` int64 ids drawn from a generator seeded with `seed`."""
        if arg:
            raise KlgapError(f"token source 'random' takes no argument, got {arg!r}; write --dataset random")
        check_request(model, n_contexts, context_len, prepend_bos)
        vocab = model.vocab_size
        if model.tokenizer is not None and hasattr(model.tokenizer, "__len__"):
            vocab = min(vocab, len(model.tokenizer))  # ids past the tokenizer are untrained padding rows
        bos = bos_for(model, prepend_bos)
        excluded = model.bos_token_id if model.bos_token_id is not None and model.bos_token_id < vocab else None
        n_choices = vocab - (excluded is not None)
        if n_choices < 1:
            raise KlgapError(f"model {model.name} has no token ids to draw besides BOS (vocab_size={vocab})")
        width = context_len - (bos is not None)
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, n_choices, (n_contexts, width), generator=gen, dtype=torch.long)
        if excluded is not None:
            ids = ids + (ids >= excluded).long()  # skip over the BOS id
        if bos is not None:
            ids = torch.cat([torch.full((n_contexts, 1), bos, dtype=torch.long), ids], dim=1)
        return ids


def text_contexts(
    model: LoadedModel,
    path: Path,
    n_contexts: int,
    context_len: int,
    seed: int,
    prepend_bos: bool,
    split: str | None = None,
) -> Tensor:
    """Contexts packed from the documents under `path` (see :mod:`klgap_tokens.packing`)."""
    check_request(model, n_contexts, context_len, prepend_bos)
    tokens = tokenize_documents(text_tokenizer(model), read_documents(path))
    source = repr(str(path))
    if split is not None:
        low, high = SAMPLE_SPLITS[split]
        tokens = tokens[int(low * len(tokens)) : int(high * len(tokens))]
        source = f"{source} ({split} split)"
    return pack(tokens, n_contexts, context_len, bos_for(model, prepend_bos), seed, source)


class TextFiles:
    """Local text: a .txt/.jsonl/.parquet file or a directory of them (``--dataset text:PATH``)."""

    description = "local text: text:PATH to a .txt, .jsonl (field text) or .parquet (column text) file or a directory"

    def contexts(
        self, model: LoadedModel, n_contexts: int, context_len: int, seed: int, prepend_bos: bool, arg: str | None
    ) -> Tensor:
        """Tokenize, join and pack the text at `arg`; `seed` shuffles the packed contexts."""
        if not arg:
            raise KlgapError("token source 'text' needs a path: --dataset text:PATH (a .txt, .jsonl or .parquet file or a directory)")
        return text_contexts(model, Path(arg).expanduser(), n_contexts, context_len, seed, prepend_bos)

    def split_for(self, arg: str | None, role: TokenRole) -> TokenSplit:
        """A corpus `klgap build-corpus` wrote: its train split to train, its eval split to measure
        (klgap_tokens.splits.text_split); any other path is read whole."""
        return text_split(arg, role)


def sample_path() -> Path:
    """The built-in sample text shipped in ``klgap_tokens/data/sample.txt``."""
    resource = resources.files("klgap_tokens").joinpath("data", "sample.txt")
    if not resource.is_file():
        raise KlgapError(f"the built-in sample text is missing from this install ({resource}); reinstall klgap")
    return Path(str(resource))


class SampleText:
    """English prose from Python's standard-library docstrings, shipped with klgap (~440 KB)."""

    description = (
        "English prose from the docstrings of Python's standard library, shipped with klgap (~440 KB); "
        "sample:train / sample:eval are its first 80% / last 20% (train-sae reads sample:train, a run sample:eval "
        "when none is named), sample:all all of it; for real runs use text:PATH"
    )

    def split_for(self, arg: str | None, role: TokenRole) -> TokenSplit:
        """`sample:train` to train and `sample:eval` to measure when no split is named."""
        return sample_split(arg, role)

    def contexts(
        self, model: LoadedModel, n_contexts: int, context_len: int, seed: int, prepend_bos: bool, arg: str | None
    ) -> Tensor:
        """Like `text` on the built-in file (or on its train / eval split; no argument: the whole file)."""
        if arg:
            sample_split(arg, "measure")  # a bad argument: the one-line error naming the valid ones
        try:
            return text_contexts(model, sample_path(), n_contexts, context_len, seed, prepend_bos, split=arg or None)
        except KlgapError as exc:
            if "not enough text" in str(exc):
                raise KlgapError(f"{exc} (the built-in sample is small: use --dataset text:PATH for more)") from None
            raise
