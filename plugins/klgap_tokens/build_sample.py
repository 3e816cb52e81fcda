"""Build ``data/sample.txt``: English prose from the docstrings of Python's standard library.

Run once (``python plugins/klgap_tokens/build_sample.py``) and ship the result; the `sample` token
source reads it. For each module in :data:`MODULES` (a fixed list, in this order) it takes
``inspect.getdoc`` of the module, then of its public classes (and their public methods) and
functions in source order, splits the docstrings into paragraphs, keeps prose paragraphs (no code,
doctests, tables or option lists), rejoins their lines and removes repeats. The output depends only
on the Python version's docstrings, never on the machine. The Python documentation is PSF-licensed.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from collections.abc import Iterator
from pathlib import Path

#: The modules read, in order. Ones missing from this Python are skipped.
MODULES: tuple[str, ...] = (
    "argparse", "abc", "ast", "asyncio.events", "asyncio.locks", "asyncio.queues", "asyncio.streams",
    "asyncio.tasks", "base64", "bdb", "bisect", "builtins", "bz2", "calendar", "cmd", "code", "codecs",
    "collections", "concurrent.futures._base", "configparser", "contextlib", "copy", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "dis", "doctest", "email.message", "email.parser", "email.utils",
    "enum", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext",
    "glob", "gzip", "hashlib", "heapq", "hmac", "html.parser", "http.client", "http.cookiejar",
    "http.server", "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "json.decoder",
    "json.encoder", "linecache", "locale", "logging", "logging.handlers", "lzma", "mailbox", "math",
    "mimetypes", "multiprocessing.pool", "netrc", "numbers", "operator", "optparse", "os", "os.path",
    "pathlib", "pdb", "pickle", "pickletools", "pkgutil", "platform", "plistlib", "poplib", "pprint",
    "profile", "pstats", "queue", "quopri", "random", "re", "reprlib", "sched", "secrets", "selectors",
    "shelve", "shlex", "shutil", "signal", "smtplib", "socket", "socketserver", "sqlite3", "ssl", "stat",
    "statistics", "string", "struct", "subprocess", "symtable", "sys", "sysconfig", "tarfile", "tempfile",
    "textwrap", "threading", "time", "timeit", "token", "tokenize", "trace", "traceback", "tracemalloc",
    "types", "typing", "unittest.case", "unittest.mock", "urllib.parse", "urllib.request", "uuid",
    "warnings", "wave", "weakref", "webbrowser", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile",
    "zipimport", "zlib", "zoneinfo",
)

OUT = Path(__file__).with_name("data") / "sample.txt"
MIN_WORDS = 8
_CODE_LINE = re.compile(r"^\s*(>>>|\.\.\.|\$ |[-=~*+|]{3,}|:[a-z]+:|\.\. |#)")
_BULLET = re.compile(r"^\s*([-*+]|\d+[.)])\s+")


def docstrings(module_name: str) -> Iterator[str]:
    """The docstrings of a module, its public classes (with their own public methods) and functions."""
    try:
        module = importlib.import_module(module_name)
    except Exception:  # noqa: BLE001 - a module this Python lacks is skipped
        return
    yield inspect.getdoc(module) or ""
    for name, obj in vars(module).items():  # definition order, deterministic
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            yield inspect.getdoc(obj) or ""
            for attr, member in vars(obj).items():
                if not attr.startswith("_") and callable(member) and member.__doc__:
                    yield inspect.cleandoc(member.__doc__)
        elif callable(obj):
            yield inspect.getdoc(obj) or ""


def is_prose(lines: list[str]) -> bool:
    """True for a paragraph of sentences: no code, doctest, table, option list or indented block."""
    if any(_CODE_LINE.match(line) or line.startswith((" ", "\t")) for line in lines):
        return False
    text = " ".join(lines)
    words = text.split()
    if len(words) < MIN_WORDS or _BULLET.match(lines[0]):
        return False
    letters = sum(c.isalpha() or c.isspace() for c in text)
    return letters / len(text) > 0.85 and text[-1] in ".!?" and text[0].isupper()


def paragraphs(doc: str) -> Iterator[str]:
    """Prose paragraphs of one docstring, each on one line."""
    for block in re.split(r"\n\s*\n", doc):
        lines = [line.rstrip() for line in block.strip("\n").splitlines() if line.strip()]
        if lines and is_prose(lines):
            yield re.sub(r"\s+", " ", " ".join(lines)).strip()


def build() -> str:
    """The whole sample text: unique prose paragraphs separated by blank lines."""
    seen: set[str] = set()
    kept: list[str] = []
    for module_name in MODULES:
        for doc in docstrings(module_name):
            for para in paragraphs(doc):
                if para not in seen:
                    seen.add(para)
                    kept.append(para)
    return "\n\n".join(kept) + "\n"


def main() -> None:
    text = build()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT} ({len(text.encode('utf-8')):,} bytes, Python {sys.version.split()[0]})")


if __name__ == "__main__":
    main()
