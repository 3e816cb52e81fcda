"""Where a result came from: versions, git hash, machine, time."""

from __future__ import annotations

import datetime as dt
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import klgap

PACKAGES = ("torch", "transformers", "nnsight", "sae-lens", "pandas", "scipy")


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def git_hash() -> str | None:
    """The commit of the klgap checkout, when klgap runs from one."""
    root = Path(klgap.__file__).resolve().parent.parent
    try:
        done = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def provenance() -> dict[str, Any]:
    return {
        "klgap_version": klgap.__version__,
        "git_hash": git_hash(),
        "packages": package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
