"""Commands a plugin adds to the `klgap` command line."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


# --------------------------------------------------------------------------- commands


@runtime_checkable
class Command(Protocol):
    """A ``klgap`` subcommand added by a plugin (``register_commands``)."""

    description: str

    def add_arguments(self, parser: Any) -> None:
        """Declare the command's flags on `parser` (an ``argparse.ArgumentParser``)."""
        ...

    def run(self, args: Any) -> int:
        """Run with the parsed ``argparse.Namespace``; return the exit code. Raise KlgapError for bad input."""
        ...


__all__ = ['Command']
