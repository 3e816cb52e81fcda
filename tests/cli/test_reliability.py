"""Faults a user meets, run as a user runs them: each exits with its one-line message and leaves nothing a rerun
would mistake for finished work (issue 17)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from klgap.cli.main import main
from tests.close import assert_identical_frames
from tests.helpers import random_sae, write_sae

HOOK = "blocks.0.hook_mlp_out"  # tiny-gpt2's mlp_out is 64 wide


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def _one_line_error(err: str, message: str) -> None:
    last = err.splitlines()[-1]
    assert last.startswith("klgap: error: ") and message in last, err
    assert "Traceback" not in err


def _replicate(sae, out, *extra: str) -> list[str]:
    return ["replicate", "--model", "tiny-gpt2", "--sae", str(sae), "--tokens", "512", "--context-len", "32",
            "--batch-size", "4", "--interventions", "sae,epsilon_random", "--out", str(out), "--quiet", *extra]


# ----------------------------------------------------------------------------- non-finite SAEs


def _nan_sae(path, tensor: str, value: float, count: int = 1):
    gen = torch.Generator().manual_seed(0)
    tensors = {"W_dec": torch.randn(128, 64, generator=gen) / 8, "b_enc": torch.zeros(128), "b_dec": torch.zeros(64)}
    tensors["W_enc"] = tensors["W_dec"].T.contiguous() * 2
    tensors[tensor].view(-1)[:count] = value
    return write_sae(path, tensors["W_enc"], tensors["W_dec"], tensors["b_enc"], tensors["b_dec"], HOOK)


@pytest.mark.parametrize("tensor,value,count,message", [
    ("W_dec", float("nan"), 1, "W_dec has 1 NaN"),
    ("W_enc", float("inf"), 3, "W_enc has 3 +inf"),
    ("b_dec", float("-inf"), 1, "b_dec has 1 -inf"),
])
def test_a_safetensors_sae_with_a_non_finite_weight_is_refused_and_writes_no_folder(
        tmp_path, capsys, tensor, value, count, message):
    sae = _nan_sae(tmp_path / "sae.safetensors", tensor, value, count)
    code, out, err = _run(_replicate(sae, tmp_path / "run"), capsys)
    assert code == 2
    _one_line_error(err, f"has non-finite weights: {message}")
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_sae_lens_folder_with_a_non_finite_weight_is_refused_by_the_same_check(tmp_path, capsys):
    from sae_lens import StandardSAE, StandardSAEConfig

    cfg = StandardSAEConfig(d_in=64, d_sae=128)
    cfg.metadata.hook_name = HOOK
    sae = StandardSAE(cfg)
    with torch.no_grad():
        sae.W_dec.normal_()
        sae.b_enc[5] = float("nan")
        sae.b_enc[9] = float("nan")
    sae.save_model(tmp_path / "folder")
    code, _, err = _run(_replicate(tmp_path / "folder", tmp_path / "run"), capsys)
    assert code == 2
    _one_line_error(err, "has non-finite weights: b_enc has 2 NaN")
    assert not (tmp_path / "run").exists()


def test_an_sae_object_with_a_nan_is_refused_from_python(tmp_path):
    from sae_lens import StandardSAE, StandardSAEConfig

    import klgap
    from klgap.errors import KlgapError

    cfg = StandardSAEConfig(d_in=64, d_sae=128)
    cfg.metadata.hook_name = HOOK
    sae = StandardSAE(cfg)
    with torch.no_grad():
        sae.W_enc[0, 0] = float("nan")
    with pytest.raises(KlgapError, match="W_enc has 1 NaN"):
        klgap.measure("tiny-gpt2", sae, tokens=256, context_len=32, interventions="sae,epsilon_random",
                      out=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("held,message", [
    ([], "W_dec has 1 NaN"),  # an empty folder is used, and left empty when the SAE is refused
    (["mine.txt"], "is a folder klgap did not write (it holds mine.txt)"),  # a user's folder is never written into
])
def test_an_existing_folder_is_kept_as_it_was_when_the_run_is_refused(tmp_path, capsys, held, message):
    out = tmp_path / "run"
    out.mkdir()
    for name in held:
        (out / name).write_text("a user's file")
    code, _, err = _run(_replicate(_nan_sae(tmp_path / "sae.safetensors", "W_dec", float("nan")), out), capsys)
    assert code == 2
    _one_line_error(err, message)
    assert sorted(p.name for p in out.iterdir()) == held


# ----------------------------------------------------------------------------- non-finite clean logits


def test_a_model_with_non_finite_logits_stops_at_the_first_batch(tmp_path, capsys):
    from klgap.plugins.manager import registry

    tiny = registry("model").get("tiny-gpt2").load(torch.device("cpu"), torch.float32)
    folder = tmp_path / "broken-model"
    tiny.hf_model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    weights = folder / "model.safetensors"
    from safetensors.torch import load_file, save_file

    state = load_file(weights)
    name = next(k for k in state if k.endswith("ln_f.weight"))
    state[name][3] = float("nan")  # every clean logit becomes NaN, as a broken checkpoint would make them
    save_file(state, weights, metadata={"format": "pt"})

    sae = random_sae(tmp_path / "sae.safetensors", 64, 128, HOOK)
    out = tmp_path / "run"
    code, _, err = _run(["replicate", "--model", str(folder), "--sae", str(sae), "--tokens", "512",
                         "--context-len", "32", "--batch-size", "4", "--dataset", "random",
                         "--interventions", "sae,epsilon_random", "--out", str(out), "--quiet"], capsys)
    assert code == 2
    _one_line_error(err, "batch 0 (contexts 0..): the model's clean logits hold")
    assert "NaN" in err and "--dtype float32" in err
    assert not list((out / "parts").glob("batch_*"))
    assert not (out / "report.json").exists()


# ----------------------------------------------------------------------------- resume never reuses a NaN part


def test_a_part_with_nan_kl_is_measured_again_on_resume(tmp_path, capsys, caplog):
    sae = random_sae(tmp_path / "sae.safetensors", 64, 128, HOOK)
    full, broken = tmp_path / "full", tmp_path / "broken"
    assert main(_replicate(sae, full)) == 0
    assert main(_replicate(sae, broken)) == 0
    # what a run with a broken SAE (since fixed in place at the same path) left behind: a part of NaN KLs
    part = broken / "parts" / "batch_00002.parquet"
    table = pq.read_table(part).to_pandas()
    table["kl"] = float("nan")
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), part)
    (broken / "report.json").unlink()
    capsys.readouterr()
    code, _, err = _run(_replicate(sae, broken), capsys)
    assert code == 0, err
    assert "batch 2 in" in caplog.text and "non-finite KL values: measuring it again" in caplog.text
    assert "resuming: 3 of 4 batches already done" in caplog.text
    assert_identical_frames(pd.read_parquet(full / "tokens.parquet"), pd.read_parquet(broken / "tokens.parquet"))
    a, b = (json.loads((d / "report.json").read_text()) for d in (full, broken))
    assert a["interventions"] == b["interventions"]
    assert b["interventions"]["sae"]["kl_mean"] > 0


# ----------------------------------------------------------------------------- --out


def test_out_that_is_a_file_is_named_as_a_file(tmp_path, capsys):
    sae = random_sae(tmp_path / "sae.safetensors", 64, 128, HOOK)
    target = tmp_path / "results.txt"
    target.write_text("not a folder")
    code, _, err = _run(_replicate(sae, target), capsys)
    assert code == 2
    _one_line_error(err, f"{str(target)!r} is a file, not a folder; give --out a folder path")
    assert target.read_text() == "not a folder"


# ----------------------------------------------------------------------------- truthful exits when a file cannot be written


def _klgap_limited(argv: list[str], kib: int | None):
    """The klgap command in a shell with ``ulimit -f kib`` (files larger than that fail with EFBIG)."""
    import os
    import shlex
    import subprocess
    import sys

    limit = f"ulimit -f {kib}; " if kib is not None else ""
    command = f"{limit}exec {shlex.join([sys.executable, '-m', 'klgap.cli.main', *argv])}"
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_figures_and_pages_that_cannot_be_written_fail_the_command(tmp_path):
    sae = random_sae(tmp_path / "sae.safetensors", 64, 128, HOOK)
    out = tmp_path / "run"
    done = _klgap_limited(_replicate(sae, out), kib=50)  # parts, report.json, tokens.parquet fit; figures do not
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("klgap: error: report.md, report.html and the figures of") and "not all written" in last
    assert "File too large" in last and f"klgap report {out}" in last
    assert done.stdout.strip().splitlines()[-1] == f"wrote {out / 'report.json'} and {out / 'tokens.parquet'}"
    assert json.loads((out / "report.json").read_text())["interventions"]["sae"]["kl_mean"] > 0
    assert not list(out.glob(".*.tmp"))  # no half-written temp file left behind
    again = _klgap_limited(["report", str(out)], kib=None)  # the retry it names writes them
    assert again.returncode == 0, again.stderr
    assert (out / "report.html").is_file() and (out / "kl_by_position.png").is_file()


def test_a_report_json_or_tokens_table_that_cannot_be_written_fails_the_command(tmp_path):
    sae = random_sae(tmp_path / "sae.safetensors", 64, 128, HOOK)
    out = tmp_path / "run"
    done = _klgap_limited(_replicate(sae, out), kib=30)  # a part (14 KiB) fits, the tokens table (37 KiB) does not
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"klgap: error: {out / 'tokens.parquet'} was not written: File too large"), last
    assert f"every measured batch is kept in {out / 'parts'}" in last and f"`klgap report {out}`" in last
    assert not (out / "report.json").exists() and not (out / "tokens.parquet").exists()
    assert len(list((out / "parts").glob("batch_*.json"))) == 4


def test_a_full_disk_while_measuring_stops_with_what_was_not_written_and_resumes(tmp_path, capsys, monkeypatch):
    import errno

    sae = random_sae(tmp_path / "sae.safetensors", 64, 128, HOOK)
    out = tmp_path / "run"
    real = pd.DataFrame.to_parquet
    calls = []

    def full_disk(self, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_parquet", full_disk)
    code, _, err = _run(_replicate(sae, out), capsys)
    assert code == 2
    _one_line_error(err, f"{out / 'parts' / 'batch_00002.parquet'} was not written: No space left on device")
    assert "the batches finished before it are kept: free space and run the same command to resume" in err
    assert sorted(p.name for p in (out / "parts").iterdir()) == [
        "batch_00000.json", "batch_00000.parquet", "batch_00001.json", "batch_00001.parquet"]
    monkeypatch.setattr(pd.DataFrame, "to_parquet", real)
    assert main(_replicate(sae, out)) == 0
    assert len(pd.read_parquet(out / "tokens.parquet")) == 2 * 16 * 31


# ----------------------------------------------------------------------------- klgap validate checks values

QUICKSTART = Path(__file__).parents[2] / "replications" / "smollm2-135m-quickstart" / "results" / "report.json"


def _set(data, path: str, value):
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[last] = value


@pytest.mark.parametrize("path,value,message", [
    ("interventions.sae.kl_mean", float("nan"), "interventions.sae.kl_mean: nan is not a JSON number"),
    ("interventions.epsilon_random.kl_median", -0.25, "interventions.epsilon_random.kl_median: KL -0.25 is negative"),
    ("comparisons.epsilon_random.wilcoxon_kl.p_value", 1.5, "comparisons.epsilon_random.wilcoxon_kl.p_value: 1.5 lies outside [0, 1]"),
    ("comparisons.epsilon_random.kl_ratio.ci_low", 9.0, "comparisons.epsilon_random.kl_ratio.ratio: 1.46"),
    ("interventions.sae.n_tokens", 17, "interventions.sae.n_tokens: 17 (+ 0 non-finite) disagrees with the report's n_tokens 8128"),
    ("comparisons.epsilon_random.kl_ratio.n_contexts", 65, "comparisons.epsilon_random.kl_ratio.n_contexts: 65 is more than the report's 64 contexts"),
    ("kl_ratio_sae_over_epsilon_random", 123, "kl_ratio_sae_over_epsilon_random: 123 is not interventions.sae.kl_mean"),
])
def test_validate_names_the_json_path_of_the_first_bad_value(tmp_path, capsys, path, value, message):
    data = json.loads(QUICKSTART.read_text())
    assert main(["validate", str(QUICKSTART)]) == 0
    _set(data, path, value)
    bad = tmp_path / "report.json"
    bad.write_text(json.dumps(data))  # json writes NaN as the literal NaN, as a hand-edited file would hold it
    capsys.readouterr()
    code, _, err = _run(["validate", str(bad)], capsys)
    assert code == 2
    _one_line_error(err, f"{bad}: {message}")


@pytest.mark.parametrize("report", sorted((Path(__file__).parents[2] / "replications").rglob("report.json")),
                         ids=lambda p: str(p.relative_to(p.parents[3])))
def test_every_committed_report_passes_the_value_checks(report):
    from klgap.report.validate import validate_file

    validate_file(report)


# ----------------------------------------------------------------------------- a malformed sae_lens cfg.json


@pytest.mark.parametrize("edit,named", [
    (lambda cfg: cfg.pop("d_in"), "cfg.json lacks d_in "),
    (lambda cfg: (cfg.pop("d_in"), cfg.pop("d_sae")), "cfg.json lacks d_in, d_sae "),
    (lambda cfg: cfg.update(d_sae="wide"), "cfg.json lacks d_sae "),
])
def test_a_sae_lens_cfg_without_its_sizes_names_them_and_what_writes_a_valid_folder(tmp_path, capsys, edit, named):
    from sae_lens import StandardSAE, StandardSAEConfig

    cfg = StandardSAEConfig(d_in=64, d_sae=128)
    cfg.metadata.hook_name = HOOK
    StandardSAE(cfg).save_model(tmp_path / "sae")
    data = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    edit(data)
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(data))
    code, _, err = _run(_replicate(tmp_path / "sae", tmp_path / "run"), capsys)
    assert code == 2
    _one_line_error(err, named)
    assert "a sae_lens cfg.json holds architecture, d_in, d_sae and metadata.hook_name" in err
    assert "klgap train-sae" in err and "TypeError" not in err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- one run per --out


def _slow_run(sae, out) -> list[str]:
    import sys

    return [sys.executable, "-m", "klgap", "replicate", "--model", "tiny-gpt2", "--sae", str(sae), "--dataset",
            "random", "--tokens", str(60 * 32), "--context-len", "32", "--batch-size", "1", "--interventions",
            "sae,epsilon_random", "--out", str(out), "--quiet"]


def _start(argv, out):
    import os
    import subprocess
    import time

    proc = subprocess.Popen(argv, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "parts").glob("batch_*.json"))) < 2:
        time.sleep(0.05)
    assert proc.poll() is None, "the first run ended before the second started"
    return proc


def test_a_second_run_into_the_same_out_is_refused_naming_the_first_then_waits_with_wait(tmp_path, capsys):
    sae = random_sae(tmp_path / "sae.safetensors", 64, 128, HOOK)
    out = tmp_path / "run"
    first = _start(_slow_run(sae, out), out)
    try:
        second = _slow_run(sae, out)[3:]  # the same command, in this process
        code, _, err = _run(second, capsys)
        assert code == 2
        _one_line_error(err, f"{str(out)!r} is in use by another klgap run (pid {first.pid} on ")
        assert "klgap replicate --model tiny-gpt2" in err and "--wait" in err
        assert first.poll() is None  # the first run goes on
        code, _, err = _run([*second, "--wait"], capsys)  # waits for it, then finds every batch done
        assert code == 0, err
        assert first.wait(timeout=120) == 0
    finally:
        first.kill()
    assert json.loads((out / "report.json").read_text())["n_contexts"] == 60
    assert not (out / ".klgap.lock").exists()


def test_a_lock_left_by_a_killed_run_is_taken_by_the_next(tmp_path):
    import os
    import signal
    import subprocess

    sae = random_sae(tmp_path / "sae.safetensors", 64, 128, HOOK)
    out = tmp_path / "run"
    first = _start(_slow_run(sae, out), out)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert (out / ".klgap.lock").exists()  # SIGKILL leaves the file; the OS released its lock
    done = subprocess.run(_slow_run(sae, out), capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stderr and not (out / ".klgap.lock").exists()


# ----------------------------------------------------------------------------- train-sae interrupted while saving


def _train(out) -> list[str]:
    return ["train-sae", "--model", "tiny-gpt2", "--site", "mlp_out", "--layer", "0", "--tokens", "4000",
            "--context-len", "64", "--steps", "30", "--out", str(out), "--quiet"]


def test_train_sae_killed_while_saving_leaves_no_half_sae_and_a_rerun_makes_it(tmp_path, capsys, monkeypatch):
    import klgap.sae.fit

    out = tmp_path / "sae"
    (tmp_path / ".sae.partial-left-by-a-sigkill").mkdir()  # what a SIGKILL during an earlier save leaves

    def killed(*args, **kwargs):  # the weights are saved; training.json is not written yet
        raise KeyboardInterrupt

    monkeypatch.setattr(klgap.sae.fit, "evaluate", killed)
    code, _, err = _run(_train(out), capsys)
    assert code == 130 and "interrupted" in err
    assert not out.exists()  # no cfg.json + weights without training.json where replicate would look
    assert [p.name for p in tmp_path.iterdir()] == []  # its staging folder and the earlier leftover are gone
    monkeypatch.undo()
    assert main(_train(out)) == 0
    assert json.loads((out / "training.json").read_text())["hook_name"] == HOOK
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]
    code, printed, err = _run(_replicate(out, tmp_path / "run"), capsys)
    assert code == 0, err
    assert re.search(r"the SAE's reconstruction \(explained variance -?[\d.]+, L0 [\d.]+(, kl_div_score -?[\d.]+, ce_loss_score (withheld|-?[\d.]+))?(, clean CE [\d.]+ nats/token)?\) moves the next-token "
                     "distribution", printed)


# ----------------------------------------------------------------------------- transcoders, SAEs without a hook name


def test_a_plain_transcoder_file_that_does_not_read_the_mlp_input_is_refused(tmp_path, capsys):
    """A plain file with W_skip is a skip transcoder; one whose hook_name is not the MLP's input (here mlp_out) is
    refused by name before anything loads."""
    from safetensors.torch import load_file, save_file

    sae = random_sae(tmp_path / "sae.safetensors", 64, 128, HOOK)
    tensors = load_file(sae)
    tensors["W_skip"] = torch.eye(64)
    save_file(tensors, sae, metadata={"hook_name": HOOK, "hook_name_out": HOOK})
    code, _, err = _run(_replicate(sae, tmp_path / "run"), capsys)
    assert code == 2
    _one_line_error(err, f"reads {HOOK}; klgap measures transcoders that read the MLP's input")
    assert not (tmp_path / "run").exists()


def test_a_sae_lens_skip_transcoder_of_other_sites_is_refused(tmp_path, capsys):
    from sae_lens import SkipTranscoder, SkipTranscoderConfig

    cfg = SkipTranscoderConfig(d_in=64, d_sae=128, d_out=64, apply_b_dec_to_input=False)
    cfg.metadata.hook_name = HOOK
    SkipTranscoder(cfg).save_model(tmp_path / "tc")
    code, _, err = _run(_replicate(tmp_path / "tc", tmp_path / "run"), capsys)
    assert code == 2
    _one_line_error(err, f"(a skip_transcoder) reads {HOOK}; klgap measures transcoders that read the MLP's input")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags,message", [
    ([], "no hook name); give --site and --layer"),
    (["--site", "mlp_out"], "give --site and --layer"),
    (["--layer", "0"], "give --site and --layer"),
])
def test_an_sae_without_a_hook_name_needs_site_and_layer(tmp_path, capsys, flags, message):
    sae = random_sae(tmp_path / "sae.safetensors", 64, 128, None)
    code, _, err = _run(_replicate(sae, tmp_path / "run", *flags), capsys)
    assert code == 2
    _one_line_error(err, message)
    assert not (tmp_path / "run").exists()
    if flags:
        return
    code, printed, err = _run(_replicate(sae, tmp_path / "run", "--site", "mlp_out", "--layer", "0"), capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "report.json").read_text())["hook_name"] == HOOK


# ----------------------------------------------------------------------------- a token source that runs short


class _ShortSource:
    """A plugin's token source that has only 3 contexts, whatever is asked."""

    description = "three contexts (a test source that runs short)"

    def contexts(self, model, n_contexts, context_len, seed, prepend_bos, arg):
        return torch.randint(0, 200, (min(3, n_contexts), context_len), generator=torch.Generator().manual_seed(seed))


class _ShortPlugin:
    import klgap as _klgap

    @_klgap.hookimpl
    def register_token_sources(self, register):
        register("short", _ShortSource())


def test_a_token_source_with_fewer_tokens_than_asked_says_how_many_it_has(tmp_path, capsys):
    from klgap.plugins.manager import get_host, reset_host

    reset_host()
    get_host().add_plugin(_ShortPlugin(), "test-short")
    try:
        sae = random_sae(tmp_path / "sae.safetensors", 64, 128, HOOK)
        code, _, err = _run(_replicate(sae, tmp_path / "run", "--dataset", "short"), capsys)
        assert code == 2
        _one_line_error(err, "token source 'short' gave 3 contexts of 32 tokens but --tokens 512 needs 16; nothing "
                             "was measured: give --tokens 96 or less")
        assert not (tmp_path / "run").exists()
        code, printed, err = _run([*_replicate(sae, tmp_path / "run", "--dataset", "short"), "--tokens", "96"], capsys)
        assert code == 0, err
        assert "93 tokens in 3 contexts" in printed  # 3 contexts of 31 measured positions
    finally:
        reset_host()


# ----------------------------------------------------------------------------- compare across models, sites, modes


def test_compare_runs_of_different_modes_tells_them_apart(tmp_path, capsys):
    sae = random_sae(tmp_path / "sae.safetensors", 64, 128, HOOK)
    assert main(_replicate(sae, tmp_path / "all")) == 0
    assert main([*_replicate(sae, tmp_path / "one"), "--mode", "single_token", "--context-len", "64", "--position",
                 "8", "--k", "4"]) == 0
    capsys.readouterr()
    quickstart = QUICKSTART.parent  # another model and site
    code, printed, err = _run(["compare", str(tmp_path / "all"), str(tmp_path / "one"), str(quickstart), "--out",
                               str(tmp_path / "cmp")], capsys)
    assert code == 0, err
    runs = json.loads((tmp_path / "cmp" / "compare.json").read_text())["runs"]
    assert [r["label"] for r in runs] == ["tiny-gpt2 mlp_out L0 all_tokens", "tiny-gpt2 mlp_out L0 single_token",
                                          "smollm2-135m mlp_out L15 all_tokens"]
    assert [r["mode"] for r in runs] == ["all_tokens", "single_token", "all_tokens"]
    assert all(r["ratio"] > 0 for r in runs)
