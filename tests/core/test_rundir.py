"""The run folder's files: written atomically, with the permissions the umask gives (not mkstemp's 0600)."""

from __future__ import annotations

import os
import stat

import pandas as pd
import pytest

from klgap.cli.main import main
from klgap.job.folder import atomic_write_bytes, atomic_write_json, atomic_write_parquet
from tests.helpers import random_sae


@pytest.fixture
def umask():
    def set_mask(mask: int) -> None:
        os.umask(mask)

    old = os.umask(0o022)
    yield set_mask
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_writes_honour_the_umask(tmp_path, umask):
    for mask, expected in ((0o022, 0o644), (0o002, 0o664), (0o077, 0o600)):
        umask(mask)
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        atomic_write_json(tmp_path / "a.json", {"a": 1})
        atomic_write_parquet(tmp_path / "a.parquet", pd.DataFrame({"a": [1]}))
        assert {p.name: _mode(p) for p in tmp_path.iterdir()} == dict.fromkeys(["a.bin", "a.json", "a.parquet"], expected)


def test_a_run_folder_can_be_shared(tmp_path, umask):
    """Every file of a run (parts, run.json, report.json, tokens.parquet, pages, figures) is group/world readable
    under umask 022, as a cluster's shared folder needs."""
    out = tmp_path / "run"
    sae = random_sae(tmp_path / "sae.safetensors", 64, 256, "blocks.1.hook_mlp_out")
    assert main(["replicate", "--model", "tiny-gpt2", "--sae", str(sae), "--tokens", "128",
                 "--context-len", "32", "--batch-size", "2", "--dataset", "random", "--out", str(out), "--quiet"]) == 0
    files = [p for p in out.rglob("*") if p.is_file() and not p.name.startswith(".klgap")]
    assert len(files) > 8
    unreadable = {str(p.relative_to(out)): oct(_mode(p)) for p in files if _mode(p) & 0o044 != 0o044}
    assert unreadable == {}
