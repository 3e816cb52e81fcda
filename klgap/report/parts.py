"""A run's parts, read a few columns at a time (never the whole per-token table), and the per-context sums of
each intervention's KL and ΔCE gathered part by part (klgap/report/aggregate.py reduces them to the report's
statistics; tests/core/test_aggregate.py checks them against the whole-frame code)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from klgap.errors import KlgapError

Rows = slice | np.ndarray  # where one intervention's measured rows lie in a part


def read_columns(path: Path, columns: Sequence[str]) -> dict[str, np.ndarray]:
    """Columns of one part as numpy arrays; ``intervention`` as int codes with its names under ``names``."""
    with pq.ParquetFile(path, read_dictionary=["intervention"] if "intervention" in columns else None) as part:
        table = part.read(columns=list(columns), use_threads=False)  # ~5x quicker than pq.read_table for a part
    out: dict[str, Any] = {}
    for name in columns:
        column = table.column(name)
        if name == "intervention":
            column = column.unify_dictionaries().combine_chunks() if column.num_chunks != 1 else column.chunk(0)
            out[name], out["names"] = column.indices.to_numpy(), column.dictionary.to_pylist()
        else:
            out[name] = column.to_numpy()
    return out


def all_hold(paths: Sequence[Path], column: str) -> bool:
    """Whether every part has `column` (from the parquet footers alone; parts written before klgap kept a column
    lack it). False for no parts."""
    return bool(paths) and all(column in pq.read_schema(path).names for path in paths)


def as_rows(mask: np.ndarray) -> Rows:
    """The rows of `mask`: a slice when they are contiguous (each intervention's are, in the engine's parts)."""
    idx = np.flatnonzero(mask)
    if idx.size and idx[-1] - idx[0] + 1 == idx.size:
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return idx


def n_rows(rows: Rows) -> int:
    return rows.stop - rows.start if isinstance(rows, slice) else rows.size


class Parts:
    """The run's parts and, per part, where each intervention's measured rows (draw < 0) lie."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = [Path(p) for p in paths]
        self.rows: list[dict[str, Rows]] = []
        self.counts: dict[str, int] = {}  # measured rows per intervention, in order of first appearance

    def scan(self, columns: Sequence[str]) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
        """Each part's `columns` (with intervention and draw) and its masks of measured rows per intervention."""
        for path in self.paths:
            part = read_columns(path, list(dict.fromkeys([*columns, "intervention", "draw"])))
            measured = part["draw"] < 0
            codes = part["intervention"]
            masks = {}
            for code in pd.unique(codes[measured]):  # order of first appearance
                masks[part["names"][code]] = measured & (codes == code)
            self.rows.append({name: as_rows(mask) for name, mask in masks.items()})
            for name, mask in masks.items():
                self.counts[name] = self.counts.get(name, 0) + int(mask.sum())
            yield part, masks

    def gather(self, name: str, column: str, dtype: type | None = None) -> np.ndarray:
        """One column of `name`'s measured rows across the run, in part order: floats as stored (or `dtype`),
        integers int32."""
        out: np.ndarray | None = None
        start = 0
        for path, rows in zip(self.paths, self.rows, strict=True):
            if name not in rows:
                continue
            values = read_columns(path, [column])[column][rows[name]]
            if out is None:
                dtype = dtype or (np.int32 if values.dtype.kind in "iu" else values.dtype)
                out = np.empty(self.counts[name], dtype=dtype)
            if out.dtype == np.int32 and values.size and (values.max() >= 2**31 or values.min() < -(2**31)):
                raise KlgapError(f"{path}: column {column!r} holds {values.max()}, beyond int32; not a klgap part")
            out[start : start + values.size] = values
            start += values.size
        return out if out is not None else np.empty(0, dtype=np.float32)


def part_context_sums(values: np.ndarray, contexts: np.ndarray, kahan: bool = False) -> tuple[np.ndarray, ...]:
    """:func:`klgap.report.stats.per_context` of one intervention's rows of one part: (contexts, sum, n), the same pandas calls.

    pandas (3.1) sums groups in sorted order without NaN with ``np.add.reduceat`` and otherwise with its Kahan
    loop; each group's sum depends only on its own values either way, but the whole-run call chose once for the
    run. `kahan` takes the Kahan loop here (a NaN row in an extra last group), for runs whose call took it."""
    if kahan:
        values = np.concatenate([values, np.array([np.nan], dtype=values.dtype)])
        contexts = np.concatenate([contexts, [contexts.max() + 1 if contexts.size else 0]])
    series = pd.Series(values, copy=False)
    grouped = series.where(np.isfinite(series)).groupby(contexts)
    total, count = grouped.sum(min_count=1).fillna(0.0), grouped.count()
    end = -1 if kahan else None
    return total.index.to_numpy()[:end], total.to_numpy()[:end], count.to_numpy()[:end]


def takes_reduceat(values: np.ndarray, contexts: np.ndarray) -> bool:
    """Whether pandas sums these rows with np.add.reduceat (all finite, contexts in order) — see _context_sums."""
    return bool(np.isfinite(values).all() and np.all(contexts[1:] >= contexts[:-1]))


class Growing:
    """A 1-D array appended to part by part in few allocations (capacity doubles; no per-part arrays kept)."""

    def __init__(self) -> None:
        self.data: np.ndarray | None = None
        self.size = 0

    def extend(self, values: np.ndarray) -> None:
        if self.data is None:
            self.data = np.empty(max(1024, values.size), dtype=values.dtype)
        if self.size + values.size > self.data.size:
            grown = np.empty(max(self.size + values.size, 2 * self.data.size), dtype=self.data.dtype)
            grown[: self.size] = self.data[: self.size]
            self.data = grown
        self.data[self.size : self.size + values.size] = values
        self.size += values.size

    def view(self) -> np.ndarray:
        return self.data[: self.size] if self.data is not None else np.empty(0, dtype=np.float32)


class ContextSums:
    """Per-context sums of KL and ΔCE per intervention, part by part, as :func:`klgap.report.stats.per_context` of the run."""

    COLUMNS = ("kl", "ce_delta")

    def __init__(self) -> None:
        self.contexts: dict[str, Growing] = {}
        self.sums: dict[tuple[str, str, str], Growing] = {}  # (name, column, "sum" | "n")
        self.pieces: dict[str, list[tuple[int, int, int]]] = {}  # per part holding the name: (part, start, stop)
        self.reduceat: dict[tuple[str, str], list[bool]] = {}  # per piece: pandas took reduceat there
        self.last_context: dict[str, int] = {}
        self.in_order: dict[str, bool] = {}  # the intervention's contexts never go back across the run

    def add(self, index: int, part: dict[str, np.ndarray], masks: dict[str, np.ndarray]) -> None:
        for name, mask in masks.items():
            contexts = part["context"][mask]
            if contexts.size:
                previous = self.last_context.get(name, contexts[0])
                self.in_order[name] = self.in_order.get(name, True) and bool(contexts[0] >= previous)
                self.last_context[name] = contexts[-1]
            for column in self.COLUMNS:
                values = part[column][mask]
                keys, total, count = part_context_sums(values, contexts)
                self.sums.setdefault((name, column, "sum"), Growing()).extend(total)
                self.sums.setdefault((name, column, "n"), Growing()).extend(count)
                self.reduceat.setdefault((name, column), []).append(takes_reduceat(values, contexts))
            start = self.contexts.setdefault(name, Growing()).size
            self.contexts[name].extend(keys)
            self.pieces.setdefault(name, []).append((index, start, start + keys.size))

    def redo_as_whole_run(self, parts: Parts) -> None:
        """Where the whole run's pandas call takes the Kahan loop but a part took reduceat, sum that part again
        the Kahan way (only in runs with non-finite values, or contexts out of order)."""
        for (name, column), flags in self.reduceat.items():
            if all(flags) and self.in_order.get(name, True):
                continue
            for (index, start, stop), flag in zip(self.pieces[name], flags, strict=True):
                if flag:
                    part, rows = read_columns(parts.paths[index], ["context", column]), parts.rows[index][name]
                    _, total, count = part_context_sums(part[column][rows], part["context"][rows], True)
                    self.sums[(name, column, "sum")].data[start:stop] = total
                    self.sums[(name, column, "n")].data[start:stop] = count

    def per_context(self, name: str, column: str) -> pd.DataFrame:
        """:func:`klgap.report.stats.per_context` of the whole run for one intervention and column."""
        if name not in self.contexts:
            return pd.DataFrame({"sum": np.empty(0, np.float32), "n": np.empty(0, np.int64)})
        total, count = self.sums[(name, column, "sum")].view(), self.sums[(name, column, "n")].view()
        frame = pd.DataFrame({"sum": total, "n": count}, index=pd.Index(self.contexts[name].view(), name="context"))
        return frame.sort_index(kind="stable")


__all__ = ["ContextSums", "Growing", "Parts", "Rows", "all_hold", "as_rows", "n_rows", "part_context_sums", "read_columns",
           "takes_reduceat"]
