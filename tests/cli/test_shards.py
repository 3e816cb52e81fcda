"""`--shard I/N` + `klgap merge`: N shard folders merge into the report of the unsharded run."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from klgap.cli.main import main
from klgap.errors import KlgapError
from klgap.job.shards import parse_shard
from klgap.plan.sites import hook_name
from tests.close import assert_identical_frames
from tests.helpers import random_sae

VOLATILE = {"provenance", "created_at", "timing"}


def _numbers(report):
    return {k: v for k, v in report.items() if k not in VOLATILE}


def _base(sae, out):
    return ["replicate", "--model", "tiny-gpt2", "--sae", str(sae), "--dataset", "random", "--tokens", str(5 * 32),
            "--context-len", "32", "--batch-size", "1", "--interventions", "sae,epsilon_random,theta_random",
            "--quiet", "--out", str(out)]


@pytest.fixture
def sae(tmp_path, load_model):
    lm = load_model("tiny-gpt2")
    return random_sae(tmp_path / "sae.safetensors", lm.d_model, 128, hook_name("mlp_out", 1), seed=2)


def test_three_shards_merge_into_the_unsharded_report(tmp_path, sae, capsys):
    assert main(_base(sae, tmp_path / "full")) == 0
    for i in (1, 2, 3):
        assert main([*_base(sae, tmp_path / f"s{i}"), "--shard", f"{i}/3"]) == 0
        assert not (tmp_path / f"s{i}" / "report.json").exists()
    # 5 batches over 3 shards: 1/3 gets batches 0 and 3, 2/3 gets 1 and 4, 3/3 gets 2
    assert json.loads((tmp_path / "s1" / "shard.json").read_text())["batches"] == [0, 3]
    assert json.loads((tmp_path / "s3" / "shard.json").read_text())["batches"] == [2]
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "s2"), str(tmp_path / "s3"), str(tmp_path / "s1"), "--out", str(tmp_path / "m"), "--quiet"]) == 0
    assert "merged 3 shards" in capsys.readouterr().out
    full = json.loads((tmp_path / "full" / "report.json").read_text())
    merged = json.loads((tmp_path / "m" / "report.json").read_text())
    assert _numbers(merged) == _numbers(full)
    assert full["interventions"]["sae"]["kl_mean"] > 0 and full["n_tokens"] == 5 * 31
    assert_identical_frames(pd.read_parquet(tmp_path / "m" / "tokens.parquet"), pd.read_parquet(tmp_path / "full" / "tokens.parquet"))
    assert (tmp_path / "m" / "report.md").is_file()
    assert main(["validate", str(tmp_path / "m")]) == 0


def test_sharded_study_merges_into_the_unsharded_study(tmp_path, load_model, capsys):
    lm = load_model("tiny-gpt2")
    for layer in (0, 1):
        random_sae(tmp_path / f"sae{layer}.safetensors", lm.d_model, 128, hook_name("mlp_out", layer), seed=layer)
    args = ["replicate", "--model", "tiny-gpt2", "--site", "mlp_out", "--layer", "0,1", "--sae", str(tmp_path / "sae{layer}.safetensors"),
            "--dataset", "random", "--tokens", "128", "--context-len", "32", "--batch-size", "2",
            "--interventions", "sae,epsilon_random", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "full")]) == 0
    for i in (1, 2):
        assert main([*args, "--out", str(tmp_path / f"s{i}"), "--shard", f"{i}/2"]) == 0
    assert main(["merge", str(tmp_path / "s1"), str(tmp_path / "s2"), "--out", str(tmp_path / "m"), "--quiet"]) == 0
    full = json.loads((tmp_path / "full" / "report.json").read_text())
    merged = json.loads((tmp_path / "m" / "report.json").read_text())
    assert merged["kind"] == "study" and len(merged["runs"]) == 2
    assert _numbers(merged) == _numbers(full)


def _merged_equals_unsharded(args, tmp_path) -> dict:
    """Run `args` whole and as 2 shards, merge them: every report.json and tokens.parquet below the two folders
    holds the same numbers."""
    assert main([*args, "--out", str(tmp_path / "full")]) == 0
    for i in (1, 2):
        assert main([*args, "--out", str(tmp_path / f"s{i}"), "--shard", f"{i}/2"]) == 0
        assert not list((tmp_path / f"s{i}").rglob("report.json"))
    assert main(["merge", str(tmp_path / "s1"), str(tmp_path / "s2"), "--out", str(tmp_path / "m"), "--quiet"]) == 0
    reports = sorted(p.relative_to(tmp_path / "full") for p in (tmp_path / "full").rglob("report.json"))
    assert reports == sorted(p.relative_to(tmp_path / "m") for p in (tmp_path / "m").rglob("report.json"))
    for path in reports:
        full, merged = (json.loads((tmp_path / root / path).read_text()) for root in ("full", "m"))
        assert _numbers(merged) == _numbers(full), path
        if full.get("kind") == "run":
            pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "m" / path.parent / "tokens.parquet"),
                                          pd.read_parquet(tmp_path / "full" / path.parent / "tokens.parquet"))
    return {str(path.parent): json.loads((tmp_path / "full" / path).read_text()) for path in reports}


def test_a_sharded_study_over_checkpoints_merges_into_the_unsharded_one(tmp_path, load_model):
    from tests.helpers import checkpointed_sae

    folder = checkpointed_sae(load_model("tiny-gpt2"), tmp_path / "sae" / "blocks.1.hook_mlp_out", checkpoints=2,
                              steps=20, n_contexts=40)
    args = ["replicate", "--model", "tiny-gpt2", "--sae", str(folder / "checkpoints" / "*"), "--dataset", "random",
            "--tokens", "96", "--context-len", "32", "--batch-size", "1", "--interventions", "sae,epsilon_random",
            "--quiet"]
    found = _merged_equals_unsharded(args, tmp_path)
    assert len(found["."]["over_training"][0]["points"]) == 2


def test_parse_shard():
    assert parse_shard("2/4") == (2, 4) and parse_shard(" 1 / 1 ") == (1, 1)
    for bad in ("0/4", "5/4", "2", "a/b", "1/0"):
        with pytest.raises(KlgapError, match="--shard"):
            parse_shard(bad)


def test_merge_refuses_incomplete_or_mixed_shards(tmp_path, sae, capsys):
    for i in (1, 2):
        assert main([*_base(sae, tmp_path / f"s{i}"), "--shard", f"{i}/2"]) == 0
    assert main([*_base(sae, tmp_path / "other"), "--shard", "2/2", "--seed", "1"]) == 0
    capsys.readouterr()

    def error(*argv):
        assert main(list(argv)) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
        return err

    assert "shard 2/2 missing" in error("merge", str(tmp_path / "s1"), "--out", str(tmp_path / "m"))
    assert "given twice" in error("merge", str(tmp_path / "s1"), str(tmp_path / "s1"), "--out", str(tmp_path / "m"))
    assert "config seed: 0 vs 1" in error("merge", str(tmp_path / "s1"), str(tmp_path / "other"), "--out", str(tmp_path / "m"))
    assert "not a shard folder" in error("merge", str(tmp_path), "--out", str(tmp_path / "m"))
    (tmp_path / "s2" / "parts" / "batch_00003.json").unlink()  # a shard killed before its last batch
    assert "lacks batches [3]" in error("merge", str(tmp_path / "s1"), str(tmp_path / "s2"), "--out", str(tmp_path / "m"))
    assert not (tmp_path / "m" / "report.json").exists()
    assert "--shard '0/2'" in error(*_base(sae, tmp_path / "x"), "--shard", "0/2")


def test_merge_and_report_load_no_model_and_no_sae(tmp_path, sae, monkeypatch, capsys):
    """With the model adapters disabled (KLGAP_DISABLE_PLUGINS=hf_models) and loading made to fail, `merge` and
    `report` still build the unsharded report: they read run.json and the parts, nothing else."""
    from klgap.job import loading
    from klgap.plugins.manager import reset_host

    assert main(_base(sae, tmp_path / "full")) == 0
    for i in (1, 2):
        assert main([*_base(sae, tmp_path / f"s{i}"), "--shard", f"{i}/2"]) == 0
    monkeypatch.setenv("KLGAP_DISABLE_PLUGINS", "hf_models")
    reset_host()

    def refuse(*args, **kwargs):
        raise AssertionError("a model or SAE was loaded")

    monkeypatch.setattr(loading, "load_model", refuse)  # where load_plan looks them up
    monkeypatch.setattr(loading, "load_sae", refuse)
    try:
        from klgap.plugins.manager import get_host

        assert "tiny-gpt2" not in get_host().registry("model")  # no model adapter is there to call
        assert main(["merge", str(tmp_path / "s1"), str(tmp_path / "s2"), "--out", str(tmp_path / "m"), "--quiet"]) == 0
        merged = json.loads((tmp_path / "m" / "report.json").read_text())
        assert _numbers(merged) == _numbers(json.loads((tmp_path / "full" / "report.json").read_text()))
        (tmp_path / "m" / "report.json").unlink()  # `report` rebuilds a missing report.json from run.json + parts
        assert main(["report", str(tmp_path / "m")]) == 0
        assert _numbers(json.loads((tmp_path / "m" / "report.json").read_text())) == _numbers(merged)
    finally:
        monkeypatch.delenv("KLGAP_DISABLE_PLUGINS")
        reset_host()


def test_report_refuses_an_unfinished_run_and_a_folder_without_run_json(tmp_path, sae, capsys):
    assert main([*_base(sae, tmp_path / "s1"), "--shard", "1/2"]) == 0
    assert main(["report", str(tmp_path / "s1")]) == 2
    assert "holds 3 of its 5 batches" in capsys.readouterr().err
    from klgap.job.finish import report_folder

    (tmp_path / "s1" / "run.json").unlink()  # a folder written before run.json existed
    with pytest.raises(KlgapError, match=r"has no run.json: it was written by an older klgap .* run its command again"):
        report_folder(tmp_path / "s1")
