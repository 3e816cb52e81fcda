"""Build a local English corpus from Debian packages, so long replications need no hub dataset.

Sources (install with ``apt-get install python3.11-doc fortunes``):

- ``python3.11-doc``: the Python documentation as HTML (``/usr/share/doc/python3.11/html``). Each page's main
  body (``<div class="body" role="main">``) becomes one document: paragraphs, list items, headings and table
  cells as text; code blocks (``<pre>``), scripts, navigation and the header-link markers left out.
- ``fortunes``: quotations (``/usr/share/games/fortunes``, files of entries separated by ``%`` lines; the
  ``off/`` folder of offensive ones is not read). Each entry becomes one document.

``build_corpus(out)`` writes ``out/train/corpus.jsonl`` and ``out/eval/corpus.jsonl`` (``{"text", "source"}``
per line): every document goes to eval when a hash of its source path (and entry number) falls in the last
``eval_fraction``, else to train, so the split does not depend on the machine or on file order. Use them as
``--dataset text:OUT/train`` (train an SAE) and ``--dataset text:OUT/eval`` (measure it on text it never saw).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

from klgap.errors import KlgapError

PYTHON_DOC = Path("/usr/share/doc/python3.11/html")
FORTUNES = Path("/usr/share/games/fortunes")
SKIP_TAGS = {"pre", "script", "style", "nav", "head"}
BLOCK_TAGS = {"p", "li", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "td", "th", "blockquote", "div", "section",
              "caption", "figcaption"}


class _BodyText(HTMLParser):
    """Text of the first ``<div role="main">`` (the Sphinx page body), one line per block element."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.depth = 0  # div depth inside the main body (0: outside)
        self.skipping: list[str] = []  # open tags whose content is left out (pre, script, header links)
        self.blocks: list[str] = []
        self.current: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if self.depth == 0:
            if tag == "div" and attrs.get("role") == "main":
                self.depth = 1
            return
        if tag == "div":
            self.depth += 1
        if tag in SKIP_TAGS or (tag == "a" and "headerlink" in (attrs.get("class") or "")):
            self.skipping.append(tag)
        elif tag in BLOCK_TAGS and not self.skipping:
            self._flush()

    def handle_endtag(self, tag):
        if self.depth == 0:
            return
        if self.skipping and tag == self.skipping[-1]:
            self.skipping.pop()
        elif tag in BLOCK_TAGS and not self.skipping:
            self._flush()
        if tag == "div":
            self.depth -= 1
            if self.depth == 0:
                self._flush()

    def handle_data(self, data):
        if self.depth and not self.skipping:
            self.current.append(data)

    def _flush(self):
        text = re.sub(r"\s+", " ", "".join(self.current)).strip()
        self.current = []
        if text:
            self.blocks.append(text)


def html_to_text(html: str) -> str:
    """The main body of a Sphinx HTML page as plain text (blocks separated by newlines)."""
    parser = _BodyText()
    parser.feed(html)
    parser.close()
    parser._flush()
    return "\n".join(parser.blocks)


def python_doc_documents(root: Path = PYTHON_DOC) -> Iterator[tuple[str, str]]:
    """(source, text) per HTML page of the Python documentation, in sorted path order."""
    for path in sorted(root.rglob("*.html")):
        rel = path.relative_to(root)
        if rel.parts[0].startswith("_") or rel.name in ("genindex.html", "search.html", "py-modindex.html"):
            continue
        text = html_to_text(path.read_text(encoding="utf-8", errors="replace"))
        if len(text) > 200:
            yield f"python3.11-doc/{rel}", text


def fortune_documents(root: Path = FORTUNES) -> Iterator[tuple[str, str]]:
    """(source, text) per fortune entry (``%``-separated), offensive ones (``off/``) excluded."""
    for path in sorted(p for p in root.iterdir() if p.is_file() and p.suffix not in (".dat", ".u8") and not p.is_symlink()):
        entries = re.split(r"^%\s*$", path.read_text(encoding="utf-8", errors="replace"), flags=re.M)
        for i, entry in enumerate(entries):
            text = entry.strip()
            if len(text) > 20:
                yield f"fortunes/{path.name}#{i}", text


def is_eval(source: str, eval_fraction: float) -> bool:
    digest = hashlib.sha256(source.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 >= 1.0 - eval_fraction


def build_corpus(out: str | Path, python_doc: Path = PYTHON_DOC, fortunes: Path = FORTUNES,
                 eval_fraction: float = 0.2) -> dict[str, dict[str, int]]:
    """Write OUT/train/corpus.jsonl and OUT/eval/corpus.jsonl; return documents and characters per split."""
    missing = [str(p) for p in (python_doc, fortunes) if not p.is_dir()]
    if missing:
        raise KlgapError(
            f"corpus sources not found: {', '.join(missing)}; install them with "
            "`apt-get install python3.11-doc fortunes` (or pass --python-doc / --fortunes)"
        )
    if not 0 < eval_fraction < 1:
        raise KlgapError(f"--eval-fraction must lie in (0, 1), got {eval_fraction}")
    out = Path(out)
    counts = {"train": {"documents": 0, "characters": 0}, "eval": {"documents": 0, "characters": 0}}
    handles = {}
    try:
        for split in counts:
            (out / split).mkdir(parents=True, exist_ok=True)
            handles[split] = (out / split / "corpus.jsonl.tmp").open("w", encoding="utf-8")
        for source, text in [*python_doc_documents(python_doc), *fortune_documents(fortunes)]:
            split = "eval" if is_eval(source, eval_fraction) else "train"
            handles[split].write(json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n")
            counts[split]["documents"] += 1
            counts[split]["characters"] += len(text)
    finally:
        for handle in handles.values():
            handle.close()
    for split in counts:
        (out / split / "corpus.jsonl.tmp").replace(out / split / "corpus.jsonl")
    (out / "corpus.json").write_text(json.dumps({"sources": [str(python_doc), str(fortunes)],
                                                 "eval_fraction": eval_fraction, "splits": counts}, indent=2))
    return counts
