"""Token sources and their splits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

from torch import Tensor

if TYPE_CHECKING:
    from klgap.protocols.models import LoadedModel

# --------------------------------------------------------------------------- token sources


@runtime_checkable
class TokenSource(Protocol):
    """Where the text comes from: returns packed contexts of token ids."""

    description: str

    def contexts(
        self,
        model: LoadedModel,
        n_contexts: int,
        context_len: int,
        seed: int,
        prepend_bos: bool,
        arg: str | None,
    ) -> Tensor:
        """Return ``[n_contexts, context_len]`` int64 token ids (first column BOS when `prepend_bos`).

        `arg` is what followed ``NAME:`` in the user's spec (a path, say), or None.
        Raise ``KlgapError`` if fewer than `n_contexts` contexts can be made.
        """
        ...


#: what a run reads a token source for: training an SAE (``train-sae``) or measuring one (``replicate``, ...)
TokenRole = Literal["train", "measure"]


@dataclass(frozen=True)
class TokenSplit:
    """Which part of a token source a run reads (:class:`SplitTokenSource`).

    arg:    the argument ``contexts`` receives to read it (what follows ``NAME:``; None: no argument).
    split:  the split's name (``train``, ``eval``, ``validation``); None: the whole source, no split known.
    whole:  the argument that names the source with no split (its splits' common name: a corpus folder, a dataset
            id; None for a source that takes no argument): two reads with the same ``whole`` and different splits are
            disjoint, a read with no split overlaps every split of the same ``whole``.
    chosen: klgap chose the split for the run's role because the user named none.
    """

    arg: str | None
    split: str | None
    whole: str | None
    chosen: bool = False


@runtime_checkable
class SplitTokenSource(Protocol):
    """Optional capability of a token source: held-apart splits, so that an SAE is measured on text it never saw.

    ``split_for(arg, role)`` says which split a run reads: the one `arg` names, or, when it names none, the
    source's split for `role` (``train`` for train-sae, an eval split for measuring), with ``chosen`` set; a
    ``split`` of None when `arg` has no splits (then the tokens are not known to be disjoint). It reads at most a
    folder listing or a dataset's split names, never the text, and raises KlgapError for an `arg` that cannot be
    right. A source without it is read whole (``random``, token ids given from Python).
    """

    def split_for(self, arg: str | None, role: TokenRole) -> TokenSplit: ...


__all__ = ['SplitTokenSource', 'TokenRole', 'TokenSource', 'TokenSplit']
