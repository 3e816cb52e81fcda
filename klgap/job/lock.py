"""One klgap process per run folder: ``OUT/.klgap.lock``, held with ``flock`` for as long as the command runs.

The operating system releases the lock when its process ends in any way (an exception, Ctrl-C, SIGKILL), so a
lock is never stale: a lock file whose process is gone is simply taken. The holder writes who it is into the
file (pid, host, start time, command) so a second command into the same ``--out`` can name it; that command
exits 2 unless it was given ``--wait``, which waits for the first to finish and then resumes from its parts.

Under torchrun only rank 0 takes the lock (every rank writes its own parts of the one folder). On a system
without ``fcntl`` (Windows) runs are not locked.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from klgap.errors import KlgapError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".klgap.lock"
log = logging.getLogger("klgap")


def _owner(path: Path) -> str:
    """Who holds the lock at `path`, as its holder wrote it."""
    try:
        who = json.loads(path.read_text())
        return (f"pid {who['pid']} on {who['host']}, since {who['started']}: {who['command']}")
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not said who it is yet"


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _open_locked(path: Path, wait: bool) -> int:
    """A descriptor of `path` holding its lock; the file at `path` is still the one locked (a holder that
    removed it on release leaves a new one to lock)."""
    waited = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            if not wait:
                os.close(fd)
                raise KlgapError(f"{str(path.parent)!r} is in use by another klgap run ({_owner(path)}); wait for "
                                 "it to finish, run again with --wait to start when it does, or use another --out")
            if not waited:
                log.warning("waiting for the klgap run in %s to finish (%s)", path.parent, _owner(path))
                waited = True
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder removed the file as it released it: lock the new one


@contextmanager
def run_lock(folder: str | Path, wait: bool = False, leader: bool = True) -> Iterator[None]:
    """Hold ``folder/.klgap.lock`` for the block (the folder is created if missing; if it was, and the block
    fails leaving nothing else in it, it is removed again). `leader`: False on ranks other than 0 of a
    torchrun / srun launch (klgap.job.distributed), which share rank 0's folder and take no lock."""
    folder = Path(folder)
    if fcntl is None or not leader:
        yield
        return
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:  # a file, or an unwritable place: the run's own check (RunDir.check_writable) says so
        yield
        return
    path = folder / LOCK_FILE
    try:
        fd = _open_locked(path, wait)
    except PermissionError:
        yield
        return
    ok = False
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                 "command": " ".join(["klgap", *sys.argv[1:]])[:300]}).encode())
        yield
        ok = True
    finally:
        path.unlink(missing_ok=True)  # before the release: a waiter then finds a new file (see _open_locked)
        os.close(fd)
        if created and not ok:
            try:
                folder.rmdir()
            except OSError:
                pass


__all__ = ["LOCK_FILE", "run_lock"]
