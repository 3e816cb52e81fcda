"""Which split each built-in token source reads (klgap.protocols.SplitTokenSource): train-sae reads a source's
train split and measuring reads its eval split when ``--dataset`` names none, so that an SAE is measured on text
it never saw.

- ``sample``: ``sample:train`` / ``sample:eval`` (the first 80% / last 20% of the built-in text); ``sample:all`` is
  all of it (no split).
- ``text:DIR`` where DIR is a corpus ``klgap build-corpus`` wrote (it holds corpus.json): ``text:DIR/train`` /
  ``text:DIR/eval``; ``text:DIR/train`` itself names its split. Any other path has no splits.
- ``hf:NAME``: ``hf:NAME:train`` / its first eval split (validation, test, ...), from the dataset's split names
  (a local folder's files; a hub dataset's when the hub is reachable, else none known).
"""

from __future__ import annotations

import json
from pathlib import Path

from klgap.errors import KlgapError
from klgap.protocols import TokenRole, TokenSplit

#: sample's splits: the first 80% / last 20% of the sample's tokens; `all`: the whole sample (what a bare `sample`
#: read before klgap chose a split by role; it overlaps both)
SAMPLE_SPLITS = {"train": (0.0, 0.8), "eval": (0.8, 1.0), "all": (0.0, 1.0)}
WHOLE = "all"
#: the split each role reads from a corpus `klgap build-corpus` wrote (and from `sample`)
ROLE_SPLIT = {"train": "train", "measure": "eval"}
#: a dataset's splits that measuring reads when `hf:NAME` names none, first found first
EVAL_SPLITS = ("validation", "test", "eval", "valid", "val", "dev")
CORPUS_FILE = "corpus.json"  # what `klgap build-corpus` writes beside its split folders


def sample_split(arg: str | None, role: TokenRole) -> TokenSplit:
    """`sample` with no argument reads the role's split; `sample:train` / `sample:eval` name theirs."""
    if not arg:
        return TokenSplit(ROLE_SPLIT[role], ROLE_SPLIT[role], None, chosen=True)
    if arg not in SAMPLE_SPLITS:
        raise KlgapError(f"token source 'sample' takes no argument or one of {', '.join(SAMPLE_SPLITS)}, got {arg!r}; "
                         f"for your own text use text:{arg}")
    return TokenSplit(arg, None if arg == WHOLE else arg, None)


def corpus_splits(folder: Path) -> list[str]:
    """The split folders of a corpus `klgap build-corpus` wrote at `folder` (its corpus.json's), or [] when
    `folder` is not one."""
    try:
        found = json.loads((folder / CORPUS_FILE).read_text())
    except (OSError, ValueError):
        return []
    splits = found.get("splits") if isinstance(found, dict) else None
    return [name for name in splits if (folder / name).is_dir()] if isinstance(splits, dict) else []


def text_split(arg: str | None, role: TokenRole) -> TokenSplit:
    """`text:DIR` on a built corpus reads the role's split folder; `text:DIR/SPLIT` names its split; any other path
    is read whole. ``whole`` is the corpus folder as an absolute path (the same corpus however it is written)."""
    if not arg:
        raise KlgapError("token source 'text' needs a path: --dataset text:PATH (a .txt, .jsonl or .parquet file or a "
                         "directory)")
    path = Path(arg).expanduser()
    split = ROLE_SPLIT[role]
    if split in corpus_splits(path):
        return TokenSplit(f"{arg.rstrip('/')}/{split}", split, str(path.resolve()), chosen=True)
    if path.name in corpus_splits(path.parent):
        return TokenSplit(arg, path.name, str(path.parent.resolve()))
    return TokenSplit(arg, None, str(path.resolve()))


def dataset_splits(name: str) -> list[str] | None:
    """A dataset's split names: a local folder's (from its file names), a hub dataset's when the hub is reachable;
    None when they cannot be known here (offline, or the dataset cannot be read)."""
    from klgap.plugins.hubcheck import hub_reachable, offline_env

    local = Path(name).expanduser()
    if not local.exists() and (offline_env() or not hub_reachable()):
        return None
    import datasets

    try:
        return list(datasets.get_dataset_split_names(str(local) if local.exists() else name))
    except Exception:  # noqa: BLE001 - datasets raises many types; the read itself says what is wrong
        return None


def hf_split(arg: str | None, role: TokenRole) -> TokenSplit:
    """`hf:NAME:SPLIT` names its split; `hf:NAME` reads `train` to train and its first eval split
    (:data:`EVAL_SPLITS`) to measure, or its one split when it has only one (then the two reads overlap)."""
    if not arg:
        raise KlgapError("token source 'hf' needs a dataset: --dataset hf:NAME[:SPLIT], e.g. hf:Skylion007/openwebtext")
    name, _, split = arg.partition(":")
    if split:
        return TokenSplit(arg, split, name)
    names = dataset_splits(name)
    if names is None:  # not known here: the source's old default, train, as the read will say
        return TokenSplit(arg, None, name)
    wanted = ["train"] if role == "train" else list(EVAL_SPLITS)
    chosen = next((s for s in wanted if s in names), names[0] if names else "train")
    return TokenSplit(f"{name}:{chosen}", chosen, name, chosen=True)


__all__ = ["EVAL_SPLITS", "ROLE_SPLIT", "SAMPLE_SPLITS", "corpus_splits", "dataset_splits", "hf_split", "sample_split",
           "text_split"]
