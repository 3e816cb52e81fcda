"""Progress over batches, readable wherever klgap runs: tqdm's bar in a terminal; in a Jupyter kernel, the
notebook widget where ipywidgets is installed, else one line per loop (started when it starts, finished when it
ends) instead of tqdm's fallback, which warns "IProgress not found" and writes a stderr line per update into
the cell's output."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Sized
from typing import Any, TypeVar

T = TypeVar("T")


def in_kernel() -> bool:
    """Whether this process is a Jupyter kernel (an executed or interactive notebook), not a terminal IPython."""
    if "ipykernel" not in sys.modules:
        return False
    from IPython import get_ipython

    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def has_widgets() -> bool:
    """Whether ipywidgets (what tqdm's notebook bar draws with) can be imported."""
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


class OneLine:
    """Iterate `items`, writing '<desc>: N batches ... done in 3.2 s' as one line to stderr."""

    def __init__(self, items: Iterable[T], desc: str, unit: str) -> None:
        self.items, self.desc, self.unit = items, desc, unit

    def __iter__(self) -> Iterator[T]:
        count = f"{len(self.items)} {self.unit}{'es' if self.unit.endswith('h') else 's'} " \
            if isinstance(self.items, Sized) else ""
        sys.stderr.write(f"{self.desc}: {count}...")
        sys.stderr.flush()
        start = time.perf_counter()
        yield from self.items
        sys.stderr.write(f" done in {time.perf_counter() - start:.1f} s\n")
        sys.stderr.flush()


def progress_bar(items: Iterable[T], desc: str, enabled: bool = True, unit: str = "batch") -> Iterable[T]:
    """`items` with progress shown as fits the place (see the module's docstring); `items` itself when disabled."""
    if not enabled:
        return items
    if in_kernel():
        if not has_widgets():
            return OneLine(items, desc, unit)
        from tqdm.notebook import tqdm as notebook_tqdm

        bar: Any = notebook_tqdm(items, desc=desc, unit=unit)
        return bar
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit=unit)
