"""`klgap build-corpus`: the token-source plugin's subcommand (klgap.protocols.Command, ``register_commands``).

Writes the offline English corpus of :mod:`klgap_tokens.corpus` (Debian's python3.11-doc + fortunes) as
train/eval JSONL that ``--dataset text:OUT/train`` / ``text:OUT/eval`` read.
"""

from __future__ import annotations

import argparse
from pathlib import Path


class BuildCorpus:
    """``klgap build-corpus --out DIR [--python-doc DIR] [--fortunes DIR] [--eval-fraction F]``."""

    description = "build a local English corpus (train/eval JSONL) from Debian's python3.11-doc and fortunes"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--out", required=True, help="folder for train/corpus.jsonl, eval/corpus.jsonl, corpus.json")
        parser.add_argument("--python-doc", default=None, help="Python HTML docs (default /usr/share/doc/python3.11/html)")
        parser.add_argument("--fortunes", default=None, help="fortune files (default /usr/share/games/fortunes)")
        parser.add_argument("--eval-fraction", type=float, default=0.2, help="share of documents held out (default 0.2)")

    def run(self, args: argparse.Namespace) -> int:
        from klgap_tokens.corpus import FORTUNES, PYTHON_DOC, build_corpus

        python_doc = Path(args.python_doc).expanduser() if args.python_doc else PYTHON_DOC
        fortunes = Path(args.fortunes).expanduser() if args.fortunes else FORTUNES
        from klgap.job.outdir import claimed

        out = Path(args.out)
        with claimed(out, "corpus"):  # --out's one rule: a new or empty folder, or a corpus klgap built
            counts = build_corpus(out, python_doc=python_doc, fortunes=fortunes, eval_fraction=args.eval_fraction)
        for split, c in counts.items():
            print(f"{split}: {c['documents']} documents, {c['characters']:,} characters -> {out / split / 'corpus.jsonl'}")
        print(f"use --dataset text:{out / 'train'} to train an SAE, --dataset text:{out / 'eval'} to measure")
        return 0
