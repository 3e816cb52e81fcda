"""A run's output folder: config identity, per-batch parts (so runs resume), atomic writes."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from klgap.errors import KlgapError, WriteError

log = logging.getLogger("klgap")

CONFIG_FILE = "run_config.json"  # the run's identity: a resumed run must match it
PARTS_DIR = "parts"
OUTPUTS = ("report.json", "tokens.parquet")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to a temp file beside `path`, then rename: readers never see half a file."""
    with _atomic_target(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def _atomic_target(path: Path) -> Iterator[str]:
    """A temp file name beside `path` to write to; renamed onto `path` when the block succeeds, removed if not.
    An OSError (disk full, ``ulimit -f``) becomes a :class:`klgap.errors.WriteError` naming `path`."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; a run folder is shared as open() would leave it
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise WriteError(path, exc) from exc
        raise


def atomic_write_parquet(path: Path, frame: pd.DataFrame) -> None:
    with _atomic_target(path) as tmp:
        frame.to_parquet(tmp, index=False)


def _plain(table: pa.Table) -> pa.Table:
    """Without pandas' metadata (each part's records its own index): the parts then concatenate cleanly."""
    return table.replace_schema_metadata(None)


def _filled(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """A part with the columns of `schema` it lacks (a run resumed across klgap versions: parts written before
    ``ce_clean``) as nulls, in the schema's order."""
    missing = [field for field in schema if field.name not in table.schema.names]
    for field in missing:
        table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table.select(schema.names) if missing else table


def _parts_schema(paths: list[Path]) -> pa.Schema:
    """One schema for every part (integers widened where parts differ), without pandas' metadata."""
    return pa.unify_schemas([pq.read_schema(path).remove_metadata() for path in paths], promote_options="permissive")


def _codes(values: np.ndarray, codes: dict[str, int]) -> np.ndarray:
    """Category codes of a part's string column (few distinct names: one comparison per name)."""
    names, first, inverse = np.unique(values.astype(str), return_index=True, return_inverse=True)
    for i in np.argsort(first):  # new names get codes in order of first appearance
        codes.setdefault(str(names[i]), len(codes))
    return np.array([codes[str(n)] for n in names], dtype=np.int32)[inverse]


def refuse_file(folder: Path, flag: str = "--out") -> None:
    """A folder path that is a file, or lies under one, is refused naming the file."""
    folder = Path(folder)
    blocking = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise KlgapError(f"output directory {str(folder)!r} is not writable: {str(blocking)!r} is a file, not "
                         f"a folder; give {flag} a folder path (it is created if missing)")


class RunDir:
    """``OUT/run_config.json``, ``OUT/parts/batch_00000.{parquet,json}``, ``OUT/report.json``, ``OUT/tokens.parquet``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.parts = self.root / PARTS_DIR

    def check_writable(self) -> bool:
        """Create the folder and prove we can write there, before any heavy work; True if it was created now."""
        refuse_file(self.root)
        created = not self.root.exists()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.root, prefix=".klgap-write-test.")  # a name of its own per rank
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise KlgapError(f"output directory {str(self.root)!r} is not writable: {exc.strerror or exc}") from exc
        return created

    def remove_if_empty(self) -> None:
        """Remove the folder if nothing was written into it (a run that failed before its first file)."""
        try:
            self.root.rmdir()
        except OSError:
            pass

    def prepare(self, identity: dict[str, Any], overwrite: bool) -> int:
        """Bind the folder to a run identity; return how many batches are already done.

        A folder holding a different run is refused unless `overwrite` (which clears it).
        """
        self.check_writable()
        config_path = self.root / CONFIG_FILE
        if config_path.exists():
            try:
                existing = _recorded_before(json.loads(config_path.read_text()), identity, self.root)
            except ValueError:
                existing = None
            if existing != json.loads(json.dumps(identity, default=str)):
                if not overwrite:
                    diff = _first_difference(existing, identity)
                    raise KlgapError(
                        f"{str(self.root)!r} holds a different run ({diff}); use another --out, or "
                        "--overwrite to replace it"
                    )
                self.clear()
        elif overwrite:
            self.clear()
        for name in OUTPUTS:  # a resumed or repeated run rewrites its outputs at the end
            (self.root / name).unlink(missing_ok=True)
        atomic_write_json(config_path, identity)
        self.parts.mkdir(parents=True, exist_ok=True)
        return len(self.done_batches())

    def clear(self) -> None:
        shutil.rmtree(self.parts, ignore_errors=True)
        for name in (*OUTPUTS, CONFIG_FILE):
            (self.root / name).unlink(missing_ok=True)

    def part_paths(self, index: int) -> tuple[Path, Path]:
        return self.parts / f"batch_{index:05d}.parquet", self.parts / f"batch_{index:05d}.json"

    def done_batches(self) -> set[int]:
        """Batches whose parquet and json both exist (the json is written last)."""
        done = set()
        for meta in self.parts.glob("batch_*.json"):
            index = int(meta.stem.split("_")[1])
            if self.part_paths(index)[0].exists():
                done.add(index)
        return done

    def reusable_batches(self) -> set[int]:
        """Finished batches a resume may keep: a part whose KL column holds a NaN or an infinity (an SAE file
        fixed in place since, a broken model) is deleted and measured again."""
        done = self.done_batches()
        for index in sorted(done):
            table_path, meta_path = self.part_paths(index)
            try:
                kl = pq.read_table(table_path, columns=["kl"]).column("kl").to_numpy(zero_copy_only=False)
            except (OSError, KeyError, pa.ArrowException):
                kl = np.array([np.nan])  # unreadable: measured again
            if not np.isfinite(kl.astype(float)).all():
                log.warning("batch %d in %s holds non-finite KL values: measuring it again", index, self.root)
                meta_path.unlink(missing_ok=True)
                table_path.unlink(missing_ok=True)
                done.discard(index)
        return done

    def write_part(self, index: int, frame: pd.DataFrame, side: dict[str, Any]) -> None:
        table_path, meta_path = self.part_paths(index)
        atomic_write_parquet(table_path, frame)
        atomic_write_json(meta_path, side)

    def finished_parts(self) -> tuple[list[Path], list[dict[str, Any]]]:
        """The finished parts' table files and their side JSON, in batch order (what a report is built from)."""
        indices = sorted(self.done_batches())
        return ([self.part_paths(i)[0] for i in indices],
                [json.loads(self.part_paths(i)[1].read_text()) for i in indices])

    def read_parts(self) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
        """Every finished part as one compact frame, filled part by part into preallocated columns (never two
        copies of the table): intervention categorical, integers int32 (~50 bytes per row, not ~200)."""
        indices = sorted(self.done_batches())
        sides = [json.loads(self.part_paths(i)[1].read_text()) for i in indices]
        if not indices:
            return pd.DataFrame(), sides
        paths = [self.part_paths(i)[0] for i in indices]
        sizes = [pq.read_metadata(path).num_rows for path in paths]
        schema = _parts_schema(paths)
        columns: dict[str, np.ndarray] = {}
        categories: dict[str, dict[str, int]] = {}  # string columns (the intervention name): name -> code
        for field in schema:
            if pa.types.is_integer(field.type):  # int32 unless a part holds a value beyond it
                columns[field.name] = np.empty(sum(sizes), dtype=np.int32)
            elif pa.types.is_floating(field.type):
                columns[field.name] = np.empty(sum(sizes), dtype=field.type.to_pandas_dtype())
            else:
                columns[field.name] = np.empty(sum(sizes), dtype=np.int32)
                categories[field.name] = {}
        start = 0
        for path, size in zip(paths, sizes, strict=True):
            part = pq.read_table(path)
            for name, column in columns.items():
                if name not in part.column_names:
                    raise KlgapError(f"{path} has no column {name!r}: the run folder mixes parts of different versions")
                values = part.column(name).to_numpy(zero_copy_only=False)
                if name in categories:
                    values = _codes(values, categories[name])
                elif column.dtype == np.int32 and len(values) and np.abs(values).max() >= 2**31:
                    column = columns[name] = column.astype(np.int64)
                column[start : start + size] = values
            start += size
        frame = pd.DataFrame({
            name: pd.Categorical.from_codes(column, categories=list(categories[name])) if name in categories
            else column
            for name, column in columns.items()
        }, copy=False)
        return frame, sides

    def write_tokens(self, path: Path) -> None:
        """Join the finished parts into one parquet file, a part at a time (never the whole table in memory)."""
        paths = [self.part_paths(i)[0] for i in sorted(self.done_batches())]
        schema = _parts_schema(paths) if paths else pa.schema([])
        with _atomic_target(path) as tmp, pq.ParquetWriter(tmp, schema) as writer:
            for part in paths:
                writer.write_table(_filled(_plain(pq.read_table(part)), schema).cast(schema))


#: identity keys klgap added since folders were first written: a folder without one resumes (it cannot be checked)
LATER_KEYS = ("sae_digest",)


def _recorded_before(old: Any, new: dict[str, Any], root: Path) -> Any:
    """The identity on disk, with the keys klgap did not record yet when it was written taken from `new`
    (a joint run's sites too), so a run killed before an upgrade still resumes; said once as a warning."""
    if not isinstance(old, dict):
        return old
    missing = [key for key in LATER_KEYS if key in new and key not in old]
    if missing:
        log.warning("%s was written before klgap recorded %s: resumed without checking it", root, ", ".join(missing))
        old = {**old, **{key: new[key] for key in missing}}
    if isinstance(old.get("sites"), list) and isinstance(new.get("sites"), list) and len(old["sites"]) == len(new["sites"]):
        old = {**old, "sites": [_recorded_before(a, b, root) for a, b in zip(old["sites"], new["sites"], strict=True)]}
    return old


def _first_difference(old: Any, new: dict[str, Any]) -> str:
    if not isinstance(old, dict):
        return "unreadable run_config.json"
    if "sae_digest" in old and old.get("sae_digest") != new.get("sae_digest") and old.get("sae") == new.get("sae"):
        return (f"the SAE {new.get('sae')!r} is not the one it measured: its weights changed since (sha256 "
                f"{str(old['sae_digest'])[:12]}… then, {str(new.get('sae_digest'))[:12]}… now)")
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), json.loads(json.dumps(new.get(key), default=str))
        if a != b:
            if key == "sites" and isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
                return next(f"site {i}: {_first_difference(x, y)}" for i, (x, y) in enumerate(zip(a, b)) if x != y)
            return f"{key}: {a!r} on disk, {b!r} now"
    return "same keys"
