"""klgap.job.distributed: a process's rank from the launcher's environment, the split of a run's batches, the CUDA
device of a rank (CUDA faked: torch.cuda.is_available / device_count monkeypatched), gloo, and the commands that
run on rank 0 only. Real launches: tests/cli/test_torchrun.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from klgap.cli.main import main
from klgap.plan.config import RunConfig
from klgap.job.distributed import SINGLE, World, cuda_device, read_world
from klgap.errors import KlgapError
from klgap.plan.resolve import pick_device, resolve


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
    # srun --gpus-per-task=1: each task sees its own GPU as cuda:0; torchrun's ranks all see the node's GPUs
    assert cuda_device("cuda", World(1, 2, 1, "srun"), 1) == "cuda:0"
    with pytest.raises(KlgapError, match="LOCAL_RANK 1 but this node shows 1 GPU: start at most 1 ranks per node"):
        cuda_device("cuda", two, 1)
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


def _machine(monkeypatch, gpus: int, **env: str) -> None:
    """This process as a launcher and a machine with `gpus` CUDA devices would show it (no GPU needed)."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_STEP_ID", "SLURM_STEPID", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)


def test_ranks_with_cuda_take_cuda_local_rank(monkeypatch):
    """Two torchrun ranks on a 2-GPU node: `auto` and `cuda` both give each rank its own GPU, and a resolved
    plan carries it; a fixed cuda:N (every rank on one GPU) is refused; `cpu` stays cpu."""
    for rank in (0, 1):
        _machine(monkeypatch, 2, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
        assert pick_device("auto") == pick_device("cuda") == torch.device(f"cuda:{rank}")
        plan = resolve(RunConfig(model="gpt2", site="mlp_out", layer=0, device="auto"))
        assert plan.device == torch.device(f"cuda:{rank}")
        assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(KlgapError, match="--device 'cuda:0' under torchrun with 2 ranks: each rank takes cuda:LOCAL_RANK"):
        pick_device("cuda:0")
    # rank 5 of 8 over two nodes: LOCAL_RANK, not RANK, picks the GPU
    _machine(monkeypatch, 4, RANK="5", WORLD_SIZE="8", LOCAL_RANK="1")
    assert pick_device("auto") == torch.device("cuda:1")


def test_srun_task_with_its_own_gpu_takes_cuda_0(monkeypatch):
    """srun --gpus-per-task=1: each task sees one GPU, as cuda:0, whatever its SLURM_LOCALID; tasks that all
    see the node's GPUs take cuda:SLURM_LOCALID, and more tasks than GPUs are refused in srun's words."""
    _machine(monkeypatch, 1, SLURM_STEP_ID="0", SLURM_PROCID="3", SLURM_NTASKS="4", SLURM_LOCALID="3")
    assert pick_device("auto") == torch.device("cuda:0")
    _machine(monkeypatch, 4, SLURM_STEP_ID="0", SLURM_PROCID="6", SLURM_NTASKS="8", SLURM_LOCALID="2")
    assert pick_device("auto") == torch.device("cuda:2")
    _machine(monkeypatch, 2, SLURM_STEP_ID="0", SLURM_PROCID="2", SLURM_NTASKS="3", SLURM_LOCALID="2")
    with pytest.raises(KlgapError, match=r"SLURM_LOCALID 2 but this node shows 2 GPUs: .*srun --ntasks-per-node=2"):
        pick_device("auto")


def test_more_ranks_than_gpus_is_refused(monkeypatch):
    _machine(monkeypatch, 2, RANK="2", WORLD_SIZE="3", LOCAL_RANK="2")
    with pytest.raises(KlgapError, match=r"LOCAL_RANK 2 but this node shows 2 GPUs: start at most 2 ranks per node "
                                         r"\(torchrun --nproc_per_node=2\)"):
        pick_device("auto")
    with pytest.raises(KlgapError, match="LOCAL_RANK 2 but this node shows 2 GPUs"):
        resolve(RunConfig(model="gpt2", site="mlp_out", layer=0, device="cuda"))
    # torchrun --nproc_per_node=2 on a node with one GPU: not both ranks on cuda:0
    _machine(monkeypatch, 1, RANK="1", WORLD_SIZE="2", LOCAL_RANK="1")
    with pytest.raises(KlgapError, match=r"LOCAL_RANK 1 but this node shows 1 GPU: .* \(torchrun --nproc_per_node=1\)"):
        pick_device("auto")


def test_one_process_names_its_gpu(monkeypatch):
    _machine(monkeypatch, 2)
    assert pick_device("auto") == torch.device("cuda") and pick_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(KlgapError, match="device 'cuda:2' asked for, but this machine shows 2 GPUs: valid: cuda, "
                                         "cuda:0, cuda:1"):
        pick_device("cuda:2")


def test_without_cuda_ranks_run_on_cpu(monkeypatch):
    _machine(monkeypatch, 0, RANK="1", WORLD_SIZE="2", LOCAL_RANK="1")
    assert pick_device("auto") == torch.device("cpu")
    with pytest.raises(KlgapError, match="device 'cuda' asked for, but CUDA is not available here; use --device cpu"):
        pick_device("cuda")


@pytest.mark.parametrize("gpus", [0, 2])
def test_ranks_talk_over_gloo_whatever_the_device(monkeypatch, tmp_path, gpus):
    """The process group is gloo with or without CUDA (the ranks exchange only small CPU objects): torchrun's
    MASTER_ADDR/PORT when set, else a rendezvous file beside --out (srun)."""
    calls = []
    _machine(monkeypatch, gpus)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr("klgap.job.distributed._RENDEZVOUS", [])  # (connect notes the file it met through)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append((backend, kw)))
    monkeypatch.setenv("MASTER_ADDR", "node0")
    monkeypatch.setenv("MASTER_PORT", "29500")
    World(1, 2, 1, "torchrun").connect(tmp_path)
    monkeypatch.delenv("MASTER_ADDR")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_STEP_ID", "3")
    World(0, 2, 0, "srun").connect(tmp_path / "out")
    assert [backend for backend, _ in calls] == ["gloo", "gloo"]
    assert calls[0][1]["init_method"] == "env://" and (calls[0][1]["rank"], calls[0][1]["world_size"]) == (1, 2)
    assert calls[1][1]["init_method"] == f"file://{Path(tmp_path / '.klgap-rendezvous-out-42.3').resolve()}"
