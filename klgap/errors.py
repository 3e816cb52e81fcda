"""User-facing errors: one line that names the bad value and what would be valid."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class KlgapError(Exception):
    """An error caused by the user's input or environment, printed without a traceback."""


class PluginError(KlgapError):
    """A plugin failed to load or to register; the message names the plugin."""


class WriteError(KlgapError):
    """A file klgap had to write could not be written (a full disk, a file-size limit, permissions)."""

    def __init__(self, path: object, exc: OSError) -> None:
        self.path = str(path)
        super().__init__(f"{self.path} was not written: {_reason(exc)} (a full disk or a file-size limit?)")


def _reason(exc: OSError) -> str:
    """The OS's words for an OSError; pyarrow's carry the errno only in their text (``[errno 27] ...``)."""
    import os
    import re

    found = re.search(r"\[errno (\d+)\]", str(exc), flags=re.I)
    if found:
        return os.strerror(int(found.group(1)))
    return exc.strerror or str(exc)


class NoTokenizer(KlgapError):
    """A token source needs to tokenize text, and the model has no tokenizer (`note`: why, e.g. which files its
    folder lacks). Its message is the command line's; ``klgap.measure`` says the same in Python's words
    (:meth:`for_python`)."""

    def __init__(self, model: str, note: str | None = None) -> None:
        self.model, self.note = model, note
        why = note or "it has no tokenizer; use --dataset random (token ids), or a model with a tokenizer"
        super().__init__(f"model {model} cannot tokenize text: {why}")

    def for_python(self) -> KlgapError:
        why = f" ({self.note})" if self.note else ""
        return KlgapError(f"model {self.model} has no tokenizer, so text cannot be tokenized{why}: pass "
                          "tokenizer=..., token ids as tokens=<[n_contexts context_len] LongTensor>, or dataset='random'")


class HubUnavailableError(KlgapError):
    """Something needs the Hugging Face hub, which this machine cannot reach."""


def did_you_mean(value: str, valid: Iterable[str]) -> str:
    """A ' (did you mean X?)' suffix when `value` is close to one of `valid`, else ''."""
    close = difflib.get_close_matches(str(value), [str(v) for v in valid], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown(kind: str, value: str, valid: Iterable[str]) -> KlgapError:
    """The standard 'unknown X' error: names the value, suggests a near match, lists what is valid."""
    valid = sorted(valid)
    return KlgapError(
        f"unknown {kind} {value!r}{did_you_mean(value, valid)}; valid: {', '.join(valid) or '(none)'}"
    )
