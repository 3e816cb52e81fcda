"""The command line: `klgap` parses flags (args.py) and hands the work to the library (main.py); `new-plugin` writes
plugin packages (scaffold.py, scaffold_kinds.py)."""

from klgap.cli.main import main  # noqa: E402  (the `klgap` script's entry point: klgap.cli:main)

__all__ = ["main"]
