"""Read documents from a local file or directory with the `datasets` library.

``.jsonl`` / ``.json`` files give their ``text`` field, ``.parquet`` files their ``text`` column, and
any other file is UTF-8 plain text read as one document. A directory is read file by file in sorted
path order (hidden files skipped). Every problem is a one-line KlgapError naming the path.
"""

from __future__ import annotations

import logging
from pathlib import Path

from klgap.errors import KlgapError

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def list_files(path: Path) -> list[Path]:
    """`path` itself, or the non-hidden files under the directory `path` in sorted order."""
    if not path.exists():
        raise KlgapError(
            f"text source {str(path)!r} does not exist; give a .txt, .jsonl or .parquet file or a directory "
            "(an offline English corpus: `klgap build-corpus --out DIR`, then text:DIR/train or text:DIR/eval)"
        )
    if path.is_file():
        return [path]
    files = sorted(
        p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise KlgapError(f"text source directory {str(path)!r} holds no files")
    return files


def check_plain_text(path: Path) -> None:
    """Reject an empty or non-UTF-8 plain-text file before `datasets` sees it."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KlgapError(
            f"text file {str(path)!r} is not UTF-8 (byte {exc.start} is {data[exc.start:exc.start + 1]!r}); "
            "convert it, e.g. with `iconv -t utf-8`"
        ) from None
    if not text.strip():
        raise KlgapError(f"text file {str(path)!r} is empty")


def root_cause(exc: BaseException) -> str:
    """The first line of the innermost exception behind `exc` (datasets wraps the useful one)."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_file(path: Path) -> list[str]:
    """The documents in one file (empty ones dropped)."""
    import datasets

    builder = BUILDERS.get(path.suffix.lower(), "text")
    if builder == "text":
        check_plain_text(path)
    elif path.stat().st_size == 0:
        raise KlgapError(f"{builder} file {str(path)!r} is empty")
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    previous = datasets.logging.get_verbosity()
    bars_were_off = datasets.utils.are_progress_bars_disabled()
    datasets.logging.set_verbosity(logging.CRITICAL)  # failures are re-raised below, once
    datasets.disable_progress_bars()
    try:
        dataset = datasets.load_dataset(builder, data_files=[str(path)], split="train", **kwargs)
    except Exception as exc:  # noqa: BLE001 - datasets wraps parse errors in many types
        raise KlgapError(f"could not read {str(path)!r} as {builder}: {root_cause(exc)}") from exc
    finally:
        datasets.logging.set_verbosity(previous)
        if not bars_were_off:
            datasets.enable_progress_bars()
    if "text" not in dataset.column_names:
        raise KlgapError(
            f"{builder} file {str(path)!r} has no 'text' field; its fields are: {', '.join(dataset.column_names)}"
        )
    documents = [doc for doc in dataset["text"] if isinstance(doc, str) and doc]
    if not documents:
        raise KlgapError(f"{builder} file {str(path)!r} is empty (no non-empty 'text' values)")
    return documents


def read_documents(path: Path) -> list[str]:
    """All documents under `path` (a file or a directory), in a deterministic order."""
    documents: list[str] = []
    for file in list_files(path):
        documents.extend(read_file(file))
    return documents
