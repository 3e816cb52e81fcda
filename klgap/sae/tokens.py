"""The tokens an SAE was trained on, as its training.json records them: the dataset as resolved (with its split),
the token seed, the context length and the token count, so that a run measuring the SAE can tell whether it reads
the same text (klgap/job/disjoint.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TrainingTokens:
    """What train-sae read. dataset: ``NAME[:ARG]`` as resolved (``sample:train``); source: the token source's name;
    split: the split read (None: the whole source, it has no splits); split_of: the argument naming the source
    without a split (klgap.protocols.TokenSplit.whole); seed: the token seed; context_len; tokens: tokens asked for
    (``--tokens``); n_contexts: contexts drawn; prepend_bos: BOS in column 0 of each context; exclude_special: which
    tokens the activations leave out (none, first, all: --exclude-special, the rule of --mask-special) and
    excluded_ids the special token ids that rule left out wherever they stood (``all``)."""

    dataset: str
    source: str
    split: str | None
    split_of: str | None
    seed: int
    context_len: int
    tokens: int
    n_contexts: int
    prepend_bos: bool = True
    exclude_special: str = "first"  # training.json written before klgap recorded it left out position 0 only
    excluded_ids: tuple[int, ...] = ()

    def facts(self) -> dict[str, Any]:
        """training.json's keys for these tokens (``seed`` is written with the rest of the recipe; ``token_seed``
        too, where it differs from the SAE's ``seed``: train-sae --seeds)."""
        return {"dataset": self.dataset, "token_source": self.source, "split": self.split, "split_of": self.split_of,
                "context_len": self.context_len, "tokens": self.tokens, "n_contexts": self.n_contexts,
                "prepend_bos": self.prepend_bos, "exclude_special": self.exclude_special,
                "excluded_token_ids": list(self.excluded_ids)}

    @classmethod
    def of(cls, training: Any) -> TrainingTokens | None:
        """From a training.json as read (or as a loaded SAE's info keeps it); None when it does not record its
        tokens (written before klgap recorded them) or is not a training.json."""
        if not isinstance(training, dict) or not isinstance(training.get("dataset"), str):
            return None
        try:
            return cls(dataset=training["dataset"], source=str(training["token_source"]),
                       split=_text(training.get("split")), split_of=_text(training.get("split_of")),
                       seed=int(training.get("token_seed", training["seed"])), context_len=int(training["context_len"]),
                       tokens=int(training["tokens"]), n_contexts=int(training["n_contexts"]),
                       prepend_bos=bool(training.get("prepend_bos", True)),
                       exclude_special=str(training.get("exclude_special", "first")),
                       excluded_ids=tuple(int(i) for i in training.get("excluded_token_ids", ())))
        except (KeyError, TypeError, ValueError):
            return None


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


__all__ = ["TrainingTokens"]
