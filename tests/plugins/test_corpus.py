"""`klgap build-corpus`: Debian's Python docs + fortunes -> train/eval JSONL that the `text` source reads."""

from __future__ import annotations

import json

import pytest

from klgap.cli.main import main
from klgap.errors import KlgapError
from klgap_tokens.corpus import build_corpus, html_to_text, is_eval

PAGE = """<html><head><title>t</title><script>var x = 1;</script></head><body>
<div class="related" role="navigation"><a href="x">Navigation text</a></div>
<div class="body" role="main">
<h1>Built-in Functions<a class="headerlink" href="#b" title="link">¶</a></h1>
<p>The Python interpreter has a number of <em>functions</em> built into it.</p>
<div class="highlight"><pre>print("code is left out")<a href="#">not this</a></pre></div>
<ul><li>first item</li><li>second <code>item</code></li></ul>
<table><tr><td>cell one</td><td>cell two</td></tr></table>
</div>
<div class="footer">Footer text</div></body></html>"""


def test_html_to_text_keeps_prose_and_drops_code_navigation_and_header_links():
    assert html_to_text(PAGE).splitlines() == [
        "Built-in Functions",
        "The Python interpreter has a number of functions built into it.",
        "first item",
        "second item",
        "cell one",
        "cell two",
    ]


def _sources(tmp_path, n_pages=30):
    doc, fortunes = tmp_path / "html", tmp_path / "fortunes"
    (doc / "library").mkdir(parents=True)
    (doc / "_static").mkdir()
    (doc / "_static" / "skip.html").write_text(PAGE)  # Sphinx's own assets are not documents
    for i in range(n_pages):
        body = " ".join(f"Sentence {j} of page {i} explains something about Python." for j in range(8))
        (doc / "library" / f"page{i}.html").write_text(PAGE.replace("first item", body))
    fortunes.mkdir()
    entries = [f"A wise saying number {i}, long enough to keep.\n\t\t-- Somebody" for i in range(40)]
    (fortunes / "wisdom").write_text("\n%\n".join(entries) + "\n%\n")
    (fortunes / "wisdom.dat").write_bytes(b"\x00\x01binary index")
    (fortunes / "off").mkdir()  # offensive fortunes live in a subfolder that is not read
    (fortunes / "off" / "rude").write_text("not read at all, ever\n%\n")
    return doc, fortunes


def test_build_corpus_splits_deterministically_by_source(tmp_path):
    doc, fortunes = _sources(tmp_path)
    counts = build_corpus(tmp_path / "out", python_doc=doc, fortunes=fortunes, eval_fraction=0.25)
    rows = {split: [json.loads(line) for line in (tmp_path / "out" / split / "corpus.jsonl").open()] for split in counts}
    assert counts["train"]["documents"] + counts["eval"]["documents"] == 30 + 40
    for split, docs in rows.items():
        assert len(docs) == counts[split]["documents"]
        assert all(is_eval(d["source"], 0.25) == (split == "eval") for d in docs)
    sources = [d["source"] for docs in rows.values() for d in docs]
    assert len(set(sources)) == 70 and not any("_static" in s or "off/" in s or ".dat" in s for s in sources)
    assert 5 <= counts["eval"]["documents"] <= 30  # ~25% of 70
    fortune = next(d for docs in rows.values() for d in docs if d["source"] == "fortunes/wisdom#3")
    assert fortune["text"] == "A wise saying number 3, long enough to keep.\n\t\t-- Somebody"
    # the same sources give byte-identical files
    build_corpus(tmp_path / "again", python_doc=doc, fortunes=fortunes, eval_fraction=0.25)
    for split in counts:
        assert (tmp_path / "out" / split / "corpus.jsonl").read_bytes() == (tmp_path / "again" / split / "corpus.jsonl").read_bytes()
    meta = json.loads((tmp_path / "out" / "corpus.json").read_text())
    assert meta["splits"] == counts and meta["eval_fraction"] == 0.25


def test_cli_build_corpus_feeds_the_text_token_source(tmp_path, capsys, load_model):
    tiny_gpt2 = load_model("tiny-gpt2")
    from klgap.plugins.manager import get_host

    doc, fortunes = _sources(tmp_path)
    out = tmp_path / "corpus"
    assert main(["build-corpus", "--out", str(out), "--python-doc", str(doc), "--fortunes", str(fortunes)]) == 0
    printed = capsys.readouterr().out
    assert f"--dataset text:{out / 'eval'}" in printed
    splits = json.loads((out / "corpus.json").read_text())["splits"]
    assert splits["train"]["documents"] + splits["eval"]["documents"] == 70
    for split, c in splits.items():  # one line per split, as the command printed before it moved into the plugin
        assert f"{split}: {c['documents']} documents, {c['characters']:,} characters -> {out / split / 'corpus.jsonl'}\n" in printed
    source = get_host().registry("token_source").get("text")
    contexts = source.contexts(tiny_gpt2, n_contexts=4, context_len=32, seed=0, prepend_bos=True, arg=str(out / "eval"))
    assert contexts.shape == (4, 32) and int(contexts.max()) < tiny_gpt2.vocab_size


def test_missing_sources_name_the_packages(tmp_path, capsys):
    code = main(["build-corpus", "--out", str(tmp_path / "o"), "--python-doc", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert code == 2 and "nope" in err and "apt-get install python3.11-doc fortunes" in err and "Traceback" not in err
    with pytest.raises(KlgapError, match="eval-fraction"):
        doc, fortunes = _sources(tmp_path)
        build_corpus(tmp_path / "o", python_doc=doc, fortunes=fortunes, eval_fraction=1.5)
