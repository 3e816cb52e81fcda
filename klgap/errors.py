"""User-facing errors: one line that names the bad value and what would be valid."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class KlgapError(Exception):
    """An error caused by the user's input or environment, printed without a traceback."""


class PluginError(KlgapError):
    """A plugin failed to load or to register; the message names the plugin."""


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
