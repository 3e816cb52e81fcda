"""Where a trained SAE is saved: ``--out`` under the one rule every ``--out`` shares (klgap/job/outdir.py: a new
or empty folder, or an SAE klgap trained), written in a staging folder beside it and renamed onto it once
complete, with the permissions the user's umask gives (safetensors writes its files 0600)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from klgap.job.folder import current_umask
from klgap.job.outdir import check_out, mark

KIND = "sae"


def check_sae_out(out_dir: Path) -> None:
    """Refuse an `out_dir` an SAE may not be saved to (a file, a user's folder, a run folder), writing nothing."""
    check_out(out_dir, KIND)


def _as_umask_allows(root: Path) -> None:
    """Files 0666 and folders 0777 less the umask, as open() and mkdir would make them."""
    mask = current_umask()
    for folder, _, files in os.walk(root):
        os.chmod(folder, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666 & ~mask)


def stale_prefix(out_dir: Path) -> str:
    """The name prefix of `out_dir`'s staging folders (a killed train-sae's leftovers start with it)."""
    return f".{out_dir.name}.partial-"


@contextmanager
def staged(out_dir: Path) -> Iterator[Path]:
    """A folder beside `out_dir` to save the SAE into, renamed onto `out_dir` once complete (training.json
    last): a train-sae killed while saving leaves no half SAE where replicate (or a config's [train_sae],
    which trains what is missing) would take it for a finished one. Leftovers of a killed run are removed; a
    previous SAE klgap trained at `out_dir` is replaced, anything else there refused (:func:`check_sae_out`)."""
    check_sae_out(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.parent.glob(f"{stale_prefix(out_dir)}*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=stale_prefix(out_dir)))
    try:
        yield staging
        mark(staging, KIND)
        _as_umask_allows(staging)
        check_sae_out(out_dir)  # again: something may have appeared there while it trained
        if out_dir.exists():  # a previous SAE: moved aside, then removed once the new one is in place
            old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f"{stale_prefix(out_dir)}old-"))
            os.replace(out_dir, old / out_dir.name)
            os.replace(staging, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


__all__ = ["check_sae_out", "stale_prefix", "staged"]
