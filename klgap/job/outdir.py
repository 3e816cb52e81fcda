"""What a command may write into: the one rule every ``--out`` shares (replicate, curve, merge, compare,
train-sae, build-corpus, ``klgap.measure(out=...)``, ``Result.save``).

An ``--out`` is used when it is

- missing (it is created), or an empty folder, or
- a folder klgap wrote, of the same kind: recognised by its marker file ``.klgap.json`` (``{"kind": ...}``),
  or, for folders written before the marker existed, by the file that kind always holds (a run's
  run_config.json / run.json, a study's report.json, a trained SAE's training.json, a comparison's
  compare.json, a corpus's corpus.json).

Anything else is refused with one line, before anything is loaded or written: a file (or a path under one), a
folder holding files klgap did not write, a folder klgap wrote of another kind (a finished run is not an SAE
folder). What a command then does inside a folder of its kind (resume a run, refuse a different one unless
``--overwrite``, replace a trained SAE) is its own business.

:func:`claimed` is how a command takes its ``--out``: the rule, then the folder's lock (klgap/job/lock.py: one
klgap process per folder), then the marker; a command that fails leaves no folder it created behind.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from klgap.errors import KlgapError
from klgap.job.folder import atomic_write_json, refuse_file
from klgap.job.lock import LOCK_FILE, run_lock
from klgap.job.folder import CONFIG_FILE
from klgap.job.record import RECORD_FILE

MARKER = ".klgap.json"
#: the kinds of folder klgap writes, as a refusal names them
KINDS = {"run": "a klgap run", "study": "a klgap study (several runs)", "sae": "an SAE trained by klgap",
         "compare": "a klgap comparison", "corpus": "a corpus built by klgap build-corpus"}
#: what klgap leaves in a folder of any kind while it works (a folder holding only these is empty)
OWN_FILES = (MARKER, LOCK_FILE)
OWN_PREFIXES = (".klgap-write-test.", ".klgap-rendezvous-")  # (the latter: where srun ranks met, in --out until 2026-12)


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _legacy_kind(folder: Path) -> tuple[str, str] | None:
    """(kind, the file that says so) of a folder klgap wrote before the marker existed, else None."""
    for name in (CONFIG_FILE, RECORD_FILE):
        if isinstance(_json(folder / name), dict):
            return "run", name
    report = _json(folder / "report.json")
    if isinstance(report, dict) and "schema_version" in report:
        return ("study" if report.get("kind") == "study" else "run"), "report.json"
    compare = _json(folder / "compare.json")
    if isinstance(compare, dict) and compare.get("kind") == "compare":
        return "compare", "compare.json"
    training = _json(folder / "training.json")
    if isinstance(training, dict) and {"hook_name", "d_sae"} <= set(training):
        return "sae", "training.json"
    corpus = _json(folder / "corpus.json")
    if isinstance(corpus, dict) and "sources" in corpus:
        return "corpus", "corpus.json"
    plan = _json(folder / "shard_plan.json")  # a shard of a study, before its sub-runs' report
    if isinstance(plan, dict) and plan.get("kind") in ("run", "joint", "study", "checkpoints"):
        return ("study" if plan["kind"] in ("study", "checkpoints") else "run"), "shard_plan.json"
    subs = sorted([*folder.glob(f"*/{CONFIG_FILE}"), *folder.glob(f"*/*/{CONFIG_FILE}")])
    if subs:  # a study killed before its report: only its sub-runs (a study over checkpoints: site_Lnn/step-N/)
        return "study", str(subs[0].relative_to(folder))
    return None


def kind_of(folder: str | Path) -> tuple[str, str] | None:
    """(kind, the marker or file that says so) of a folder klgap wrote; None for anything else."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    marker = _json(folder / MARKER)
    if isinstance(marker, dict) and marker.get("kind") in KINDS:
        return marker["kind"], MARKER
    return _legacy_kind(folder)


def foreign_entries(folder: Path) -> list[str]:
    """What `folder` holds besides klgap's own working files (sorted names)."""
    return sorted(p.name for p in folder.iterdir()
                  if p.name not in OWN_FILES and not p.name.startswith(OWN_PREFIXES))


def check_out(out: str | Path, kind: str, flag: str = "--out") -> None:
    """Refuse an `out` that a `kind` folder may not be written into (see the module docstring); write nothing."""
    out = Path(out)
    refuse_file(out, flag)
    if not out.exists():
        return
    found = kind_of(out)
    if found is not None:
        if found[0] != kind:
            raise KlgapError(f"{flag} {str(out)!r} holds {KINDS[found[0]]} (its {found[1]}), not {KINDS[kind]}; "
                             f"give {flag} another folder (klgap replaces only a folder of its own of the same kind)")
        return
    entries = foreign_entries(out)
    if entries:
        shown = ", ".join(entries[:4]) + (f" and {len(entries) - 4} more" if len(entries) > 4 else "")
        raise KlgapError(f"{flag} {str(out)!r} is a folder klgap did not write (it holds {shown}); klgap writes "
                         f"{KINDS[kind]} only into a new or empty folder, or one it wrote: give {flag} another folder")


def mark(folder: str | Path, kind: str) -> None:
    """Write the marker that says klgap wrote `folder`, and what kind of folder it is."""
    from klgap import __version__

    atomic_write_json(Path(folder) / MARKER, {"kind": kind, "written_by": f"klgap {__version__}"})


@contextmanager
def claimed(out: str | Path, kind: str, *, wait: bool = False, flag: str = "--out") -> Iterator[Path]:
    """Take `out` for a command writing a `kind` folder: the rule (:func:`check_out`), then the folder's lock
    (created if missing), the rule again under the lock, then the marker. If the block fails having written
    nothing, the folder is left as it was (one created here is removed again). Under torchrun / srun rank 0 alone
    claims the folder, which the other ranks share (klgap.job.command.run_request)."""
    out = Path(out)
    check_out(out, kind, flag)  # before the folder is created or locked: a file, a user's folder, another kind
    with run_lock(out, wait=wait):
        if not out.is_dir():  # the lock could not create it: the command's own check names why
            yield out
            return
        check_out(out, kind, flag)  # another process may have written it while this one waited
        marked_now = not (out / MARKER).is_file()
        mark(out, kind)
        ok = False
        try:
            yield out
            ok = True
        finally:
            if marked_now and not ok and not foreign_entries(out):
                (out / MARKER).unlink(missing_ok=True)  # as it was; run_lock then removes a folder it created


__all__ = ["KINDS", "MARKER", "check_out", "claimed", "foreign_entries", "kind_of", "mark"]
