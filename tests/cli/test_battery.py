"""Issue 28's battery of bad inputs and faults, played as a user plays them (the CLI through main(argv) or a
subprocess, the Python API): each row asserts the one-line error, the exit code (2 for bad input) and what is left
on disk. The --out rule has its own rows (tests/cli/test_out_rule.py), `klgap validate` too
(tests/core/test_validate_kinds.py), and broken entry points theirs (tests/cli/test_third_party_plugin.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from klgap.cli.main import main
from klgap.errors import KlgapError
from klgap.plan.sites import hook_name
from tests.helpers import checkpoint, checkpoints, random_sae

HOOK = hook_name("mlp_out", 0)  # tiny-gpt2's mlp_out is 64 wide
RUN = ["--dataset", "random", "--tokens", "128", "--context-len", "32", "--batch-size", "2", "--interventions",
       "sae,epsilon_random", "--quiet"]


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def _one_line(err: str, *parts: str) -> str:
    (line,) = err.splitlines()
    assert line.startswith("klgap: error: ") and all(p in line for p in parts), line
    return line


def _files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


@pytest.fixture(scope="module")
def sae(tmp_path_factory) -> Path:
    return random_sae(tmp_path_factory.mktemp("sae") / "sae.safetensors", 64, 128, HOOK)


# ----------------------------------------------------------------------------- a study over checkpoints (F5)


CHECKPOINT_ROWS = [
    ("wrong-hook", "was trained on blocks.1.hook_mlp_out, not blocks.0.hook_mlp_out"),
    ("truncated", "could not be read (corrupt or truncated?)"),
    ("nan", "has non-finite weights: W_dec has 1 NaN"),
]


@pytest.mark.parametrize("dry", [True, False], ids=["dry-run", "run"])
@pytest.mark.parametrize("spoil,message", CHECKPOINT_ROWS, ids=[r[0] for r in CHECKPOINT_ROWS])
def test_a_bad_checkpoint_is_refused_by_the_dry_run_and_the_run_before_any_folder(tmp_path, capsys, spoil, message,
                                                                                    dry):
    base = checkpoints(tmp_path, spoil)
    argv = ["replicate", "--model", "tiny-gpt2", "--sae", str(base / "*"), *RUN, "--out", str(tmp_path / "out")]
    code, out, err = _run([*argv, "--dry-run"] if dry else argv, capsys)
    assert code == 2
    _one_line(err, message, "step-000020")
    assert not (tmp_path / "out").exists() and "ok:" not in out  # no bound run folder, no "ok" for the dry run


def test_the_dry_run_of_a_checkpoint_glob_names_the_checkpoints_and_warns_of_another_model(tmp_path, capsys, caplog):
    base = checkpoints(tmp_path, "other-model")
    code, out, err = _run(["replicate", "--model", "tiny-gpt2", "--sae", str(base / "*"), *RUN, "--dry-run"], capsys)
    assert code == 0, err
    assert f"mlp_out L0: 3 checkpoint(s) of {base / '*'} (steps 10, 20, 30): hook name, weights read and finite" in out
    assert "default" not in out and "ok: 3 run(s) check out" in out  # a run per checkpoint
    assert f"checkpoint {base / 'step-000020'} was trained on gpt2, not on tiny-gpt2" in caplog.text


# ----------------------------------------------------------------------------- a model folder (F7, F8)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    from klgap.plugins.manager import registry

    tiny = registry("model").get("tiny-gpt2").load(torch.device("cpu"), torch.float32)
    folder = tmp_path_factory.mktemp("model") / "tiny"
    tiny.hf_model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    return folder


def _config(folder: Path, **changes) -> None:
    data = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**data, **changes}))


def _weights(folder: Path, data) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(data(weights.read_bytes()))


MODEL_ROWS = [
    ("truncated", lambda f: _weights(f, lambda b: b[: len(b) // 2]), "cannot load the weights (SafetensorError: "),
    ("random-bytes", lambda f: _weights(f, lambda b: os.urandom(5000)), "cannot load the weights (SafetensorError: "),
    ("empty", lambda f: _weights(f, lambda b: b""), "cannot load the weights (SafetensorError: "),
    ("wider-mlp-config", lambda f: _config(f, n_inner=512), "config.json disagrees with the weights: 6 tensor(s) "
                                                             "have another shape than config.json says"),
    ("more-layers", lambda f: _config(f, n_layer=4), "config.json disagrees with the weights: 24 tensor(s) "
                                                     "config.json describes are not in the weights"),
]


@pytest.mark.parametrize("edit,message", [r[1:] for r in MODEL_ROWS], ids=[r[0] for r in MODEL_ROWS])
def test_a_damaged_model_folder_is_refused_in_one_line(tmp_path, capsys, model_folder, sae, edit, message):
    folder = shutil.copytree(model_folder, tmp_path / "tiny")
    edit(folder)
    code, out, err = _run(["replicate", "--model", str(folder), "--sae", str(sae), *RUN, "--out",
                           str(tmp_path / "out")], capsys)
    assert code == 2
    _one_line(err, f"model folder {str(folder)!r}: ", message, "save_pretrained wrote together")
    assert not (tmp_path / "out").exists() and "LOAD REPORT" not in out


SHAPE_ROWS = [  # what the model's config alone refutes (it used to load the weights first: 18-42 s for a hub model)
    ("layer", ["--sae", "{l5}"], "--layer 5 is out of range for tiny: valid layers are 0..1"),
    ("context", ["--context-len", "300"], "--context-len 300 exceeds tiny's maximum context of 256"),
    ("width", ["--sae", "{wide}"], "has d_in=32 but tiny mlp_out is 64 wide"),
]


@pytest.mark.parametrize("flags,message", [r[1:] for r in SHAPE_ROWS], ids=[r[0] for r in SHAPE_ROWS])
def test_what_the_model_config_refutes_fails_before_the_weights_load(tmp_path, capsys, monkeypatch, model_folder, sae,
                                                                     flags, message):
    from klgap_hf.folder import FolderAdapter

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(FolderAdapter, "load", no_weights)
    made = {"wide": random_sae(tmp_path / "wide.safetensors", 32, 64, HOOK),
            "l5": random_sae(tmp_path / "l5.safetensors", 64, 128, hook_name("mlp_out", 5))}
    argv = ["replicate", "--model", str(model_folder), "--sae", str(sae), *RUN, "--out", str(tmp_path / "out")]
    code, _, err = _run(argv + [f.format(**made) for f in flags], capsys)
    assert code == 2
    _one_line(err, message)
    assert not (tmp_path / "out").exists()
    if "{l5}" in flags:  # train-sae too
        code, _, err = _run(["train-sae", "--model", str(model_folder), "--site", "mlp_out", "--layer", "5", "--out",
                             str(tmp_path / "sae")], capsys)
        assert code == 2 and message in err and not (tmp_path / "sae").exists()


# ----------------------------------------------------------------------------- config files, names, flags


def _train_sae_config(tmp_path: Path, table: str) -> Path:
    config = tmp_path / "cfg.toml"
    config.write_text(f'model = "tiny-gpt2"\nsite = "mlp_out"\nlayer = 0\nsae = "{tmp_path / "trained"}"\n'
                      f'tokens = 64\ncontext_len = 32\ndataset = "random"\nout = "{tmp_path / "out"}"\n'
                      f"[train_sae]\n{table}\n")
    return config


def _sae_lens_folder(tmp_path: Path, architecture: str) -> Path:
    folder = tmp_path / "sae-folder"
    checkpoint(folder, 1)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "architecture": architecture}))
    return folder


BAD_INPUT_ROWS = [  # (id, argv from (tmp_path, sae), the message)
    ("train-sae-key-typo", lambda t, s: ["replicate", "--config", str(_train_sae_config(t, "tokens = 4000\nstepz = 3"))],
     "unknown [train_sae] key 'stepz' (did you mean 'steps'?)"),
    ("train-sae-not-a-table", lambda t, s: ["replicate", "--config", str(_bad_table(t))],
     "[train_sae] must be a table of train-sae's settings"),
    ("unknown-architecture", lambda t, s: ["replicate", "--model", "tiny-gpt2", "--sae", str(_sae_lens_folder(
        t, "mystery")), *RUN, "--out", str(t / "out")], "cfg.json: unknown SAE architecture 'mystery'"),
    ("duplicate-layer", lambda t, s: ["replicate", "--model", "tiny-gpt2", "--site", "mlp_out", "--layer", "0,1,0",
                                      "--sae", str(t / "sae{layer}"), *RUN, "--out", str(t / "out")],
     "--layer '0,1,0' lists layer 0 twice; list each layer once"),
    ("duplicate-site", lambda t, s: ["replicate", "--model", "tiny-gpt2", "--site", "mlp_out,attn_out,mlp_out",
                                     "--layer", "0", "--sae", str(t / "sae{site}"), *RUN, "--out", str(t / "out")],
     "--site 'mlp_out,attn_out,mlp_out' lists mlp_out twice"),
    ("template-without-layer", lambda t, s: ["replicate", "--model", "tiny-gpt2", "--sae", str(t / "sae_L{layer}"),
                                             *RUN, "--out", str(t / "out")],
     "has {site}/{layer} in it: give --site and --layer to fill them in"),
]


def _bad_table(tmp_path: Path) -> Path:
    config = tmp_path / "cfg.toml"
    config.write_text(f'model = "tiny-gpt2"\nsae = "{tmp_path / "trained"}"\ntrain_sae = 3\n')
    return config


@pytest.mark.parametrize("argv,message", [r[1:] for r in BAD_INPUT_ROWS], ids=[r[0] for r in BAD_INPUT_ROWS])
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, capsys, sae, argv, message):
    argv = argv(tmp_path, sae)
    before = _files(tmp_path)
    code, _, err = _run(argv, capsys)
    assert code == 2
    _one_line(err, message)
    assert _files(tmp_path) == before  # nothing trained, no run folder


def test_a_template_for_one_site_and_layer_is_filled_in(tmp_path, capsys, sae):
    shutil.copy(sae, tmp_path / "sae_mlp_out_L0.safetensors")
    code, _, err = _run(["replicate", "--model", "tiny-gpt2", "--sae", str(tmp_path / "sae_{site}_L{layer}.safetensors"),
                         "--site", "mlp_out", "--layer", "0", *RUN, "--out", str(tmp_path / "out")], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["sae"]["source"] == str(tmp_path / "sae_mlp_out_L0.safetensors") and report["hook_name"] == HOOK


def test_debug_after_the_subcommand_shows_the_traceback(tmp_path, sae):
    """The error line says "run with --debug"; `klgap replicate ... --debug` is accepted (it was refused)."""
    with pytest.raises(KlgapError, match="lists layer 0 twice"):
        main(["replicate", "--model", "tiny-gpt2", "--site", "mlp_out", "--layer", "0,0", "--sae", str(sae), "--debug"])
    with pytest.raises(KlgapError, match="lists layer 0 twice"):
        main(["--debug", "replicate", "--model", "tiny-gpt2", "--site", "mlp_out", "--layer", "0,0", "--sae", str(sae)])


# ----------------------------------------------------------------------------- train-sae


TRAIN = ["train-sae", "--model", "tiny-gpt2", "--site", "mlp_out", "--layer", "0", "--tokens", "4000",
         "--context-len", "64", "--steps", "30"]


def test_ctrl_c_in_train_sae_promises_no_resume_and_leaves_no_staging_folder(tmp_path, capsys, monkeypatch):
    import klgap.sae.fit

    def interrupted(*args, **kwargs):  # Ctrl-C while sae_lens trains (its checkpoint folder already made)
        raise KeyboardInterrupt

    monkeypatch.setattr(klgap.sae.fit, "_training_sae", interrupted)
    code, _, err = _run([*TRAIN, "--checkpoints", "2", "--quiet", "--out", str(tmp_path / "sae")], capsys)
    assert code == 130
    assert err.splitlines()[-1] == ("klgap: interrupted; the SAE in training was not saved and no half SAE is left (SAEs finished "
                   "before it are saved); the same command trains from the start")
    assert "resume" not in err and _files(tmp_path) == []  # no .sae.checkpoints-* or .sae.partial-* left


def test_train_sae_quiet_shows_no_bars_and_writes_files_as_the_umask_says(tmp_path):
    import shlex

    argv = [sys.executable, "-m", "klgap", *TRAIN, "--quiet", "--out", str(tmp_path / "sae")]
    done = subprocess.run(["bash", "-c", f"umask 022; exec {shlex.join(argv)}"], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert "Training SAE" not in done.stderr and "Estimating norm" not in done.stderr and "%|" not in done.stderr
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in [tmp_path / "sae", *(tmp_path / "sae").iterdir()]}
    assert modes == {"sae": "0o755", "cfg.json": "0o644", "sae_weights.safetensors": "0o644", "training.json": "0o644",
                     ".klgap.json": "0o644"}


# ----------------------------------------------------------------------------- resume, merge


def test_an_sae_replaced_between_a_kill_and_the_resume_is_refused_naming_it(tmp_path, capsys, sae):
    path = shutil.copy(sae, tmp_path / "sae.safetensors")
    out = tmp_path / "out"
    argv = ["replicate", "--model", "tiny-gpt2", "--sae", str(path), *RUN, "--out", str(out)]
    assert main(argv) == 0
    (out / "report.json").unlink()  # what a kill before the end leaves: some parts, no report
    (out / "parts" / "batch_00001.json").unlink()
    before = _files(out)
    random_sae(path, 64, 128, HOOK, seed=7)  # another SAE at the same path
    code, _, err = _run(argv, capsys)
    assert code == 2
    _one_line(err, f"the SAE {str(path)!r} is not the one it measured: its weights changed since (sha256 ",
              "use another --out, or --overwrite to replace it")
    assert _files(out) == before
    code, _, err = _run([*argv, "--overwrite"], capsys)
    assert code == 0, err
    assert json.loads((out / "report.json").read_text())["n_contexts"] == 4


def test_a_merge_of_joint_shards_missing_a_subset_batch_leaves_no_half_merged_folder(tmp_path, capsys):
    for site in ("mlp_out", "attn_out", "resid_post"):
        random_sae(tmp_path / f"{site}.safetensors", 64, 128, hook_name(site, 1), seed=len(site))
    argv = ["replicate", "--model", "tiny-gpt2", "--site", "mlp_out,attn_out,resid_post", "--layer", "1", "--joint",
            "--joint-subsets", "--sae", str(tmp_path / "{site}.safetensors"), *RUN]
    for i in (1, 2):
        assert main([*argv, "--shard", f"{i}/2", "--out", str(tmp_path / f"s{i}")]) == 0
    subset = sorted((tmp_path / "s2" / "subsets").iterdir())[0]
    lost = subset / "parts" / "batch_00001.parquet"
    kept = lost.read_bytes()
    lost.unlink()
    merge = ["merge", str(tmp_path / "s1"), str(tmp_path / "s2"), "--out", str(tmp_path / "m"), "--quiet"]
    capsys.readouterr()
    code, _, err = _run(merge, capsys)
    assert code == 2
    _one_line(err, f"shard 2/2 in {str(tmp_path / 's2')!r} lacks batches [1] of 'subsets/{subset.name}'")
    assert not (tmp_path / "m").exists()  # nothing half-merged that `klgap report` or a retry would take as a run
    lost.write_bytes(kept)
    code, _, err = _run(merge, capsys)  # the retry is not refused
    assert code == 0, err
    report = json.loads((tmp_path / "m" / "report.json").read_text())
    assert len(report["compounding"]["subsets"]) == 3 and main(["validate", str(tmp_path / "m")]) == 0


# ----------------------------------------------------------------------------- the Python API (F9, F10)


def _ids(seed: int, high: int = 200) -> torch.Tensor:
    return torch.randint(1, high, (4, 32), generator=torch.Generator().manual_seed(seed))


def test_measure_refuses_token_ids_outside_the_vocabulary(tmp_path, sae):
    import klgap

    ids = _ids(0)
    ids[2, 5] = 300  # tiny-gpt2's vocabulary is 257
    with pytest.raises(KlgapError, match=r"token source 'given' gave token id 300 \(context 2, position 5; 1 ids in "
                                         r"all\) outside tiny-gpt2's vocabulary of 257 \(ids 0..256\)"):
        klgap.measure("tiny-gpt2", str(sae), tokens=ids, interventions="sae,epsilon_random", out=tmp_path / "out",
                      progress=False)
    assert not (tmp_path / "out").exists()


def test_measure_with_other_token_ids_into_the_same_out_is_another_run(tmp_path, sae):
    import klgap

    kwargs = {"interventions": "sae,epsilon_random", "out": tmp_path / "out", "progress": False}
    first = klgap.measure("tiny-gpt2", str(sae), tokens=_ids(0), **kwargs)
    assert first.report.dataset.startswith("given:4x32:")
    with pytest.raises(KlgapError, match=r"holds a different run \(dataset: 'given:4x32:[0-9a-f]{16}' on disk, "
                                         r"'given:4x32:[0-9a-f]{16}' now\)"):
        klgap.measure("tiny-gpt2", str(sae), tokens=_ids(1), **kwargs)
    assert klgap.load_run(tmp_path / "out") == first  # left as it was
    again = klgap.measure("tiny-gpt2", str(sae), tokens=_ids(1), overwrite=True, **kwargs)
    assert again.report.interventions["sae"].kl_mean != first.report.interventions["sae"].kl_mean
    alone = klgap.measure("tiny-gpt2", str(sae), tokens=_ids(1), interventions="sae,epsilon_random", progress=False)
    assert again.report.interventions == alone.report.interventions  # the new ids' numbers, not the old ones
    assert again == klgap.load_run(tmp_path / "out") and again != first


@pytest.mark.parametrize("tokens", [True, 2.5, "some text", None])
def test_measure_names_a_tokens_value_it_cannot_use(tokens, sae):
    import klgap

    with pytest.raises(KlgapError, match=rf"tokens={tokens!r} is not a token budget \(an int\), a \[n_contexts "
                                         "context_len\\] tensor of token ids, a list of strings or a datasets.Dataset"):
        klgap.measure("tiny-gpt2", str(sae), tokens=tokens, progress=False)
