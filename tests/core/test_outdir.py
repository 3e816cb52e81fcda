"""klgap/job/outdir.py: which folders klgap recognises as its own, and of which kind (the marker, or for folders
written before it, the file each kind always holds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from klgap.errors import KlgapError
from klgap.job.outdir import MARKER, check_out, kind_of, mark


def _write(root: Path, files: dict[str, object]) -> Path:
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return root


@pytest.mark.parametrize("files,kind", [
    ({MARKER: {"kind": "compare"}, "notes.txt": "x"}, "compare"),
    ({"run_config.json": {"model": "m"}, "parts/batch_00000.json": {}}, "run"),
    ({"run.json": {"model": "m"}}, "run"),
    ({"report.json": {"schema_version": "0.4.0", "kind": "run"}, "tokens.parquet": ""}, "run"),
    ({"report.json": {"schema_version": "0.1.0"}}, "run"),  # a report written before reports said their kind
    ({"report.json": {"schema_version": "0.4.0", "kind": "study"}}, "study"),
    ({"mlp_out_L01/run_config.json": {"model": "m"}}, "study"),  # a study killed before its report
    ({"mlp_out_L01/step-000011/run_config.json": {"model": "m"}}, "study"),  # ... over checkpoints
    ({"shard_plan.json": {"kind": "study"}}, "study"),
    ({"shard_plan.json": {"kind": "joint"}}, "run"),
    ({"training.json": {"hook_name": "blocks.0.hook_mlp_out", "d_sae": 8}, "cfg.json": {}}, "sae"),
    ({"compare.json": {"kind": "compare"}}, "compare"),
    ({"corpus.json": {"sources": []}, "train/corpus.jsonl": ""}, "corpus"),
    ({"training.json": {"loss": 1.0}}, None),  # someone else's training.json
    ({"report.json": "not json"}, None),
    ({"notes.txt": "x"}, None),
])
def test_kind_of_a_folder(tmp_path, files, kind):
    found = kind_of(_write(tmp_path / "out", files))
    assert (found[0] if found else None) == kind


def test_check_out_and_mark(tmp_path):
    out = tmp_path / "out"
    check_out(out, "run")  # missing: fine, nothing created
    assert not out.exists()
    out.mkdir()
    (out / ".klgap.lock").write_text("")
    check_out(out, "sae")  # empty but for klgap's lock
    mark(out, "sae")
    assert kind_of(out) == ("sae", MARKER)
    check_out(out, "sae")
    with pytest.raises(KlgapError, match=r"--out '.*' holds an SAE trained by klgap \(its .klgap.json\), not a klgap "
                                         "run; give --out another folder"):
        check_out(out, "run")
    (tmp_path / "f").write_text("x")
    with pytest.raises(KlgapError, match="is a file, not a folder; give --sae-out a folder path"):
        check_out(tmp_path / "f" / "sub", "run", flag="--sae-out")
