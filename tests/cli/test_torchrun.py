"""Real launches: `torchrun --nproc_per_node=2 -m klgap replicate ...` (gloo, CPU, tiny-gpt2) and two srun-like
tasks (SLURM_* only, no torchrun) give the 1-process numbers; a killed 2-rank run finishes with 1 process; a
`--shard I/N` job-array task launched with torchrun splits only its shard among its ranks."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist

from klgap.cli.main import main
from klgap.plan.sites import hook_name
from tests.close import assert_identical_frames
from tests.helpers import random_sae

pytestmark = [
    pytest.mark.torchrun,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed without gloo"),
]

N_BATCHES = 8
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_STEP_ID", "SLURM_STEPID",
              "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_ID")


def _args(sae: Path, out: Path) -> list[str]:
    return ["replicate", "--model", "tiny-gpt2", "--sae", str(sae), "--dataset", "random", "--tokens", str(N_BATCHES * 32),
            "--context-len", "32", "--batch-size", "1", "--interventions", "sae,epsilon_random,theta_random",
            "--device", "cpu", "--quiet", "--out", str(out)]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    return {**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra}


def _numbers(folder: Path) -> dict:
    report = json.loads((folder / "report.json").read_text())
    return {k: v for k, v in report.items() if k not in ("provenance", "world_size")}


def _measured(log: str) -> dict[int, list[int]]:
    """rank -> the batches it says it measured ("rank R of N measured batches [...]")."""
    found = re.findall(r"rank (\d+) of 2 measured batches \[([\d, ]*)\]", log)
    return {int(rank): [int(b) for b in batches.split(",") if b.strip()] for rank, batches in found}


@pytest.fixture
def one_thread():
    """The launched ranks run at OMP_NUM_THREADS=1; an in-process reference run uses one thread too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def launched(tmp_path_factory, load_model):
    """The SAE, a 1-process run and a 2-rank torchrun run of the same command (run once for the module)."""
    root = tmp_path_factory.mktemp("torchrun")
    sae = random_sae(root / "sae.safetensors", load_model("tiny-gpt2").d_model, 128, hook_name("mlp_out", 1), seed=2)
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "klgap", *_args(sae, root / "two")],
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_args(sae, root / "one")) == 0
    finally:
        torch.set_num_threads(threads)
    return root, sae, done.stdout + done.stderr


def test_two_ranks_give_the_one_process_report(launched):
    root, _, _ = launched
    one, two = json.loads((root / "one" / "report.json").read_text()), json.loads((root / "two" / "report.json").read_text())
    assert two["interventions"] == one["interventions"] and one["interventions"]["sae"]["kl_mean"] > 0
    assert _numbers(root / "two") == _numbers(root / "one")  # every number, not only the interventions block
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert json.loads((root / "two" / "run.json").read_text())["world_size"] == 2
    assert_identical_frames(pd.read_parquet(root / "two" / "tokens.parquet"), pd.read_parquet(root / "one" / "tokens.parquet"))
    assert not list((root / "two").glob(".klgap-*"))  # no probe or rendezvous file left behind


def test_two_ranks_never_write_the_same_part(launched):
    root, _, log = launched
    measured = _measured(log)
    assert sorted(measured) == [0, 1]
    assert not set(measured[0]) & set(measured[1])
    assert sorted(measured[0] + measured[1]) == list(range(N_BATCHES))
    assert len(list((root / "two" / "parts").glob("batch_*.parquet"))) == N_BATCHES


def test_killed_two_rank_run_resumes_with_one_process(launched, tmp_path, one_thread, caplog):
    """Parts of both ranks lost, no report (what a kill leaves): one process measures only those and gives the
    same numbers."""
    root, sae, log = launched
    shutil.copytree(root / "two", tmp_path / "killed")
    measured = _measured(log)
    lost = [measured[0][-1], measured[1][-1], measured[1][-2]]
    for batch in lost:
        (tmp_path / "killed" / "parts" / f"batch_{batch:05d}.json").unlink()
    (tmp_path / "killed" / "report.json").unlink()
    assert main(_args(sae, tmp_path / "killed")) == 0
    assert f"resuming: {N_BATCHES - len(lost)} of {N_BATCHES} batches already done" in caplog.text
    assert _numbers(tmp_path / "killed") == _numbers(root / "one")
    assert json.loads((tmp_path / "killed" / "report.json").read_text())["world_size"] == 1


def test_srun_tasks_share_a_curve_study_without_torchrun(launched, tmp_path, load_model, one_thread):
    """Two tasks that only SLURM_PROCID / SLURM_NTASKS / SLURM_STEP_ID tell apart (as srun starts them, without
    MASTER_ADDR: they meet through a file in --out) run `klgap curve` over two layers (a study): the study report
    and every sub-run's report of one process."""
    root, _, _ = launched
    for layer in (0, 1):
        random_sae(tmp_path / f"sae{layer}.safetensors", load_model("tiny-gpt2").d_model, 64, hook_name("mlp_out", layer), seed=layer)
    args = ["curve", "--cos", "0.6,0.9", "--model", "tiny-gpt2", "--site", "mlp_out", "--layer", "0,1", "--sae", str(tmp_path / "sae{layer}.safetensors"),
            "--dataset", "random", "--tokens", "128", "--context-len", "32", "--batch-size", "1", "--device", "cpu",
            "--quiet"]
    tasks = [subprocess.Popen([sys.executable, "-m", "klgap", *args, "--out", str(tmp_path / "srun")],
                              env=_env(SLURM_JOB_ID="42", SLURM_STEP_ID="0", SLURM_PROCID=str(rank), SLURM_NTASKS="2",
                                       SLURM_LOCALID=str(rank)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [task.communicate(timeout=600) for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert "rank 1 of 2 measured batches [1, 3]" in outputs[1][1]
    assert main([*args, "--out", str(tmp_path / "single")]) == 0
    study, single = (json.loads((tmp_path / name / "report.json").read_text()) for name in ("srun", "single"))
    drop = ("provenance",)
    assert {k: v for k, v in study.items() if k not in drop} == {k: v for k, v in single.items() if k not in drop}
    assert study["kind"] == "study" and len(study["runs"]) == 2
    for sub in ("mlp_out_L00", "mlp_out_L01"):
        assert _numbers(tmp_path / "srun" / sub) == _numbers(tmp_path / "single" / sub)
        assert len(_numbers(tmp_path / "srun" / sub)["curve"]["points"]) >= 2
    assert not list(tmp_path.glob(".klgap-rendezvous-*")) and not list((tmp_path / "srun").glob(".klgap-*"))


def test_srun_tasks_end_together_when_rank_0_refuses_the_folder(launched, tmp_path):
    """Two srun tasks given a user's folder as --out: rank 0 refuses it and says so to rank 1, which exits with
    the same line instead of waiting for rank 0 forever (the tasks meet beside --out, so no task writes into the
    folder before rank 0 has checked it); the folder is left as it was."""
    _, sae, _ = launched
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    tasks = [subprocess.Popen([sys.executable, "-m", "klgap", *_args(sae, mine)],
                              env=_env(SLURM_JOB_ID="43", SLURM_STEP_ID="0", SLURM_PROCID=str(rank), SLURM_NTASKS="2"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    errors = [task.communicate(timeout=300)[1] for task in tasks]
    assert [task.returncode for task in tasks] == [2, 2], errors
    for stderr in errors:
        assert "is a folder klgap did not write (it holds notes.txt)" in stderr, stderr[-2000:]
    assert errors[1].rstrip().endswith("(rank 0)")
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_a_refusal_on_rank_0_ends_every_rank(launched):
    """Rank 0 refuses the folder (it holds a run of another seed): every rank exits 2 with that one-line message
    instead of waiting for rank 0 forever, and the folder's run is left as it was."""
    root, sae, _ = launched
    before = (root / "two" / "report.json").read_text()
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "klgap", *_args(sae, root / "two"),
                           "--seed", "1"], env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    # both ranks say it (their stderr lines may interleave on one line: count the message, not lines)
    refusal = "klgap: error: "
    assert done.stderr.count("holds a different run (seed: 0 on disk, 1 now)") == 2, done.stderr[-3000:]
    assert done.stderr.count(refusal) == 2 and done.stderr.count("(rank 0)") == 1, done.stderr[-3000:]
    assert "internal error" not in done.stderr  # (torchrun itself then reports the failed workers)
    assert (root / "two" / "report.json").read_text() == before


def test_a_job_array_task_launched_with_torchrun_shares_its_shard(launched, tmp_path, one_thread, capsys):
    """`torchrun --nproc_per_node=2 ... --shard 1/2`: the two ranks measure only shard 1's batches (0, 2, 4, 6),
    split between them; shard 2/2 runs as one process; `klgap merge` of the two gives the 1-process report."""
    root, sae, _ = launched
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "klgap",
                           *_args(sae, tmp_path / "s1"), "--shard", "1/2"], env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    measured = _measured(done.stdout + done.stderr)
    assert measured == {0: [0, 4], 1: [2, 6]}  # shard 1/2's batches, every 2nd of them to each rank
    assert sorted(int(p.stem[len("batch_"):]) for p in (tmp_path / "s1" / "parts").glob("batch_*.json")) == [0, 2, 4, 6]
    assert json.loads((tmp_path / "s1" / "shard.json").read_text())["batches"] == [0, 2, 4, 6]
    assert not (tmp_path / "s1" / "report.json").exists()
    assert done.stdout.count("shard 1/2 done") == 1  # rank 0 says it, once
    assert main([*_args(sae, tmp_path / "s2"), "--shard", "2/2"]) == 0
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "s1"), str(tmp_path / "s2"), "--out", str(tmp_path / "merged"), "--quiet"]) == 0
    merged, one = _numbers(tmp_path / "merged"), _numbers(root / "one")
    assert merged == one and one["interventions"]["sae"]["kl_mean"] > 0
    # the merged run records the most ranks any shard ran with, whichever order the folders are given in
    assert main(["merge", str(tmp_path / "s2"), str(tmp_path / "s1"), "--out", str(tmp_path / "m21"), "--quiet"]) == 0
    for folder in ("merged", "m21"):
        assert json.loads((tmp_path / folder / "report.json").read_text())["world_size"] == 2
    assert_identical_frames(pd.read_parquet(tmp_path / "merged" / "tokens.parquet"),
                                  pd.read_parquet(root / "one" / "tokens.parquet"))


def test_two_ranks_share_a_joint_run(launched, tmp_path, load_model, one_thread):
    """A joint run (every site patched together, each alone) over two torchrun ranks: every folder's numbers of
    one process."""
    lm = load_model("tiny-gpt2")
    for layer in (0, 1):
        random_sae(tmp_path / f"sae{layer}.safetensors", lm.d_model, 64, hook_name("resid_post", layer), seed=layer)
    args = ["replicate", "--model", "tiny-gpt2", "--joint", "--site", "resid_post", "--layer", "0,1", "--sae",
            str(tmp_path / "sae{layer}.safetensors"), "--dataset", "random", "--tokens", "128", "--context-len", "32",
            "--batch-size", "1", "--interventions", "sae,epsilon_random", "--device", "cpu", "--quiet"]
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "klgap", *args, "--out",
                           str(tmp_path / "two")], env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(_measured(done.stdout + done.stderr)) == [0, 1]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    for folder in (".", "single/resid_post_L00", "single/resid_post_L01"):
        assert _numbers(tmp_path / "two" / folder) == _numbers(tmp_path / "one" / folder), folder
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "two" / folder / "tokens.parquet"),
                                      pd.read_parquet(tmp_path / "one" / folder / "tokens.parquet"))
    assert json.loads((tmp_path / "two" / "run.json").read_text())["world_size"] == 2


def test_a_nan_checkpoint_is_named_by_every_rank_before_any_folder(tmp_path):
    """Under torchrun a study over checkpoints with a NaN one got a false "not writable" from rank 1 (rank 0 had
    removed the folder): every rank now reads the checkpoints before any folder and names the bad one."""
    from tests.helpers import checkpoints

    base = checkpoints(tmp_path, "nan")
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "klgap", "replicate", "--model",
                           "tiny-gpt2", "--sae", str(base / "*"), "--dataset", "random", "--tokens", "64",
                           "--context-len", "32", "--device", "cpu", "--quiet", "--out", str(tmp_path / "out")],
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert done.stderr.count(f"the SAE {str(base / 'step-000020')!r} has non-finite weights: W_dec has 1 NaN") == 2, \
        done.stderr[-3000:]
    assert "not writable" not in done.stderr and "internal error" not in done.stderr
    assert not (tmp_path / "out").exists()
