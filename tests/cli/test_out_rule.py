"""Every command's `--out` under one rule (klgap/job/outdir.py), played as a user: a file, a folder of the user's,
or a klgap folder of another kind is refused with one line, exit 2, and left exactly as it was; a folder klgap
wrote of the same kind is used; every writer of a run folder takes its lock (issue 28)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from klgap.cli.main import main
from klgap.plan.sites import hook_name
from tests.helpers import random_sae

QUICKSTART = Path(__file__).parents[2] / "replications" / "smollm2-135m-quickstart" / "results"
HOOK = hook_name("mlp_out", 0)


def _replicate(sae, out, *extra) -> list[str]:
    return ["replicate", "--model", "tiny-gpt2", "--sae", str(sae), "--dataset", "random", "--tokens", "128",
            "--context-len", "32", "--batch-size", "2", "--interventions", "sae,epsilon_random", "--quiet",
            "--out", str(out), *extra]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """An SAE file, the two shard folders of a run, and a finished run folder (all tiny-gpt2, 128 tokens)."""
    root = tmp_path_factory.mktemp("made")
    sae = random_sae(root / "sae.safetensors", 64, 128, HOOK)
    for i in (1, 2):
        assert main([*_replicate(sae, root / f"s{i}"), "--shard", f"{i}/2"]) == 0
    assert main(_replicate(sae, root / "run")) == 0
    return root


def _snapshot(path: Path) -> dict[str, bytes] | bytes | None:
    """Every file under `path` (or the file itself) with its bytes: what must be left as it was."""
    if path.is_file():
        return path.read_bytes()
    if not path.exists():
        return None
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _a_file(out: Path) -> str:
    out.write_text("a user's notes")
    return f"{str(out)!r} is a file, not a folder"


def _a_users_folder(out: Path) -> str:
    out.mkdir()
    (out / "notes.txt").write_text("a user's notes")
    (out / "data").mkdir()
    return "is a folder klgap did not write (it holds data, notes.txt)"


def _under_a_file(out: Path) -> str:
    out.parent.mkdir(exist_ok=True)
    (out.parent / "results.txt").write_text("a user's notes")
    return "is a file, not a folder"


def _an_sae_folder(out: Path) -> str:  # what train-sae writes (training.json marks it)
    out.mkdir()
    (out / "training.json").write_text(json.dumps({"hook_name": HOOK, "d_sae": 128}))
    (out / "cfg.json").write_text("{}")
    return "holds an SAE trained by klgap (its training.json), not a klgap run"


def _a_run_folder(out: Path) -> str:  # a (killed) run: its run_config.json marks it
    out.mkdir()
    (out / "run_config.json").write_text(json.dumps({"model": "tiny-gpt2"}))
    return "holds a klgap run (its run_config.json), not"


def _a_compare_folder(out: Path) -> str:
    out.mkdir()
    (out / "compare.json").write_text(json.dumps({"kind": "compare", "runs": []}))
    return "holds a klgap comparison (its compare.json), not"


def _argv(command: str, made: Path, out: Path) -> list[str]:
    return {
        "replicate": _replicate(made / "sae.safetensors", out),
        "curve": ["curve", "--model", "tiny-gpt2", "--sae", str(made / "sae.safetensors"), "--tokens", "64",
                  "--context-len", "32", "--quiet", "--out", str(out)],
        "merge": ["merge", str(made / "s1"), str(made / "s2"), "--out", str(out), "--quiet"],
        "compare": ["compare", str(QUICKSTART), "--out", str(out)],
        "build-corpus": ["build-corpus", "--out", str(out)],
        "train-sae": ["train-sae", "--model", "tiny-gpt2", "--site", "mlp_out", "--layer", "0", "--tokens", "4000",
                      "--context-len", "64", "--steps", "30", "--quiet", "--out", str(out)],
    }[command]


CASES = [
    ("replicate", _a_file), ("replicate", _a_users_folder), ("replicate", _under_a_file),
    ("replicate", _an_sae_folder), ("replicate", _a_compare_folder),
    ("curve", _a_users_folder), ("curve", _an_sae_folder),
    ("merge", _a_file), ("merge", _a_users_folder), ("merge", _an_sae_folder), ("merge", _a_compare_folder),
    ("compare", _a_file), ("compare", _a_users_folder), ("compare", _a_run_folder),
    ("train-sae", _a_file), ("train-sae", _a_users_folder), ("train-sae", _under_a_file),
    ("train-sae", _a_run_folder), ("train-sae", _a_compare_folder),
    ("build-corpus", _a_users_folder), ("build-corpus", _a_run_folder),
]


@pytest.mark.parametrize("command,what", CASES, ids=[f"{c}-{w.__name__.strip('_')}" for c, w in CASES])
def test_an_out_klgap_may_not_replace_is_refused_and_left_as_it_was(made, tmp_path, capsys, command, what):
    out = tmp_path / "target" / "out" if what is _under_a_file else tmp_path / "out"
    message = what(out)
    if what is _under_a_file:
        out = tmp_path / "target" / "results.txt" / "out"
    before = _snapshot(tmp_path)
    code = main(_argv(command, made, out))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    (line,) = err.splitlines()
    assert line.startswith("klgap: error: ") and message in line, line
    assert _snapshot(tmp_path) == before  # nothing written, nothing removed


def test_train_sae_into_a_finished_run_folder_keeps_the_run(made, tmp_path, capsys):
    """F3: train-sae --out used to delete whatever was there (a finished run, here) and exit 0."""
    import shutil

    run = shutil.copytree(made / "run", tmp_path / "run")
    before = _snapshot(run)
    assert main(_argv("train-sae", made, run)) == 2
    assert "holds a klgap run (its .klgap.json), not an SAE trained by klgap" in capsys.readouterr().err
    assert _snapshot(run) == before


def test_a_command_into_a_folder_klgap_wrote_of_its_kind_uses_it(made, tmp_path, capsys):
    """The rule's other half: compare into its own earlier folder rewrites it; an empty folder is used."""
    out = tmp_path / "cmp"
    assert main(["compare", str(QUICKSTART), "--out", str(out)]) == 0
    assert json.loads((out / ".klgap.json").read_text())["kind"] == "compare"
    (out / "compare.csv").unlink()
    assert main(["compare", str(QUICKSTART), str(made / "run"), "--out", str(out)]) == 0
    assert len(json.loads((out / "compare.json").read_text())["runs"]) == 2 and (out / "compare.csv").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["compare", str(QUICKSTART), "--out", str(empty)]) == 0
    assert (empty / "compare.json").is_file()


def test_the_python_api_shares_the_rule(made, tmp_path):
    import klgap
    from klgap.errors import KlgapError

    out = tmp_path / "out"
    _a_users_folder(out)
    before = _snapshot(out)
    with pytest.raises(KlgapError, match=r"out= '.*' is a folder klgap did not write \(it holds data, notes.txt\)"):
        klgap.measure("tiny-gpt2", str(made / "sae.safetensors"), tokens=64, context_len=32, out=out, progress=False)
    assert _snapshot(out) == before
    result = klgap.load_run(made / "run")
    with pytest.raises(KlgapError, match="folder= '.*' is a folder klgap did not write"):
        result.save(out)
    assert _snapshot(out) == before
    saved = result.save(tmp_path / "copy")  # a new folder: written, and marked as klgap's run
    assert json.loads((saved / ".klgap.json").read_text())["kind"] == "run"
    assert klgap.load_run(saved) == result


@pytest.mark.parametrize("argv", [
    ["report", "{run}"],
    ["check", "{run}", "--expected", "{expected}", "--write"],
    ["merge", "{s1}", "{s2}", "--out", "{run}", "--overwrite", "--quiet"],
], ids=["report", "check-write", "merge-overwrite"])
def test_every_writer_of_a_run_folder_takes_its_lock(made, tmp_path, capsys, argv):
    """F6: merge --overwrite into a folder a run was writing exited 0 and mixed two runs' parts."""
    import shutil

    from klgap.job.lock import run_lock

    run = shutil.copytree(made / "run", tmp_path / "run")
    expected = tmp_path / "expected.json"
    (tmp_path / "cfg.toml").write_text('model = "tiny-gpt2"\n')
    expected.write_text(json.dumps({"targets": [{"name": "ratio", "config": "cfg.toml", "quantity": "kl_ratio",
                                                 "interval": [0, 100]}]}))
    before = _snapshot(run)
    argv = [a.format(run=run, s1=made / "s1", s2=made / "s2", expected=expected) for a in argv]
    with run_lock(run):  # a run writing this folder (this process holds its lock, as that run would)
        code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    (line,) = err.splitlines()
    assert f"{str(run)!r} is in use by another klgap run (pid " in line and "--wait" in line
    assert _snapshot(run) == before
