"""klgap.distributed: a process's rank from the launcher's environment, the split of a run's batches, the CUDA
device of a rank, and the commands that run on rank 0 only. Real launches: tests/cli/test_torchrun.py."""

from __future__ import annotations

import pytest

from klgap.cli import main
from klgap.config import RunConfig
from klgap.distributed import SINGLE, World, cuda_device, read_world
from klgap.errors import KlgapError
from klgap.resolve import resolve


def test_torchrun_environment():
    world = read_world({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "9"})
    assert world == World(rank=3, size=4, local_rank=1, launcher="torchrun")  # torchrun's variables win over Slurm's
    assert world.distributed and not world.leader
    assert read_world({"RANK": "0", "WORLD_SIZE": "1"}) == SINGLE


def test_srun_environment_only_inside_an_srun_step():
    task = {"SLURM_PROCID": "2", "SLURM_NTASKS": "3", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "7"}
    # an sbatch script itself sees its allocation's SLURM_NTASKS and SLURM_PROCID=0, but it is one process
    assert read_world(task) == SINGLE
    assert read_world({**task, "SLURM_STEP_ID": "0"}) == World(rank=2, size=3, local_rank=0, launcher="srun")
    assert read_world({}) == SINGLE


@pytest.mark.parametrize("env, words", [
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK / WORLD_SIZE = 2 / 2"),
    ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "0"}, "SLURM_PROCID / SLURM_NTASKS = 0 / 0"),
])
def test_bad_environment_is_refused(env, words):
    with pytest.raises(KlgapError, match=words):
        read_world(env)


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_shares_are_disjoint_and_cover_the_batches(size):
    todo = [0, 2, 3, 5, 6, 7, 11]  # what a resumed run may still have to do
    shares = [World(rank, size, rank).share(todo) for rank in range(size)]
    assert sorted(b for share in shares for b in share) == todo
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_each_rank_takes_its_local_gpu():
    two = World(1, 2, 1, "torchrun")
    assert cuda_device("cuda", SINGLE, 8) == "cuda" and cuda_device("cuda:3", SINGLE, 8) == "cuda:3"
    assert cuda_device("cuda", two, 2) == "cuda:1"
    assert cuda_device("cuda", two, 1) == "cuda:0"  # srun --gpus-per-task=1: each task sees its own GPU as cuda:0
    with pytest.raises(KlgapError, match="--device 'cuda:0' under torchrun with 2 ranks"):
        cuda_device("cuda:0", two, 2)
    with pytest.raises(KlgapError, match="LOCAL_RANK 3 but this node shows 2 GPUs"):
        cuda_device("cuda", World(3, 4, 3, "torchrun"), 2)


def test_one_process_needs_no_process_group():
    assert SINGLE.from_leader(lambda: [1, 2]) == [1, 2]
    SINGLE.barrier()
    SINGLE.close(finished=True)


def test_device_map_is_refused_under_several_ranks(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(KlgapError, match="--device-map 'auto' spreads one model .* 2 ranks run"):
        resolve(RunConfig(model="gpt2", site="mlp_out", layer=0, device_map="auto", device="cpu"))


def test_other_commands_run_on_rank_0_only(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["merge", str(tmp_path / "nothing"), "--out", str(tmp_path / "m")]) == 0  # rank 0 would refuse it
    assert "merge runs on rank 0 only; rank 1 of 2 has nothing to do" in capsys.readouterr().err
    assert main(["train-sae", "--model", "tiny-gpt2", "--site", "mlp_out", "--layer", "0", "--out", str(tmp_path / "s")]) == 0
    assert "train-sae runs on rank 0 only" in capsys.readouterr().err and not (tmp_path / "s").exists()
    monkeypatch.setenv("RANK", "two")
    assert main(["plugins"]) == 2
    assert "RANK='two' is not an integer" in capsys.readouterr().err
