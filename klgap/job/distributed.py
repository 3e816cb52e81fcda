"""One run over many processes: the ranks that ``torchrun`` (or Slurm's ``srun``) starts share a run's batches.

Each process reads its place from the environment: ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` under torchrun;
without torchrun, a task that ``srun`` started (``SLURM_STEP_ID`` set) reads ``SLURM_PROCID`` / ``SLURM_NTASKS``
/ ``SLURM_LOCALID``. Every rank loads the model (on ``cuda:LOCAL_RANK`` when CUDA is used); rank 0 alone binds the
run folder (run_config.json, run.json) and hands every rank the list of batches still to do, of which rank r
measures ``todo[r::world_size]``; each writes its own parts (one file per batch: no two ranks write the same
file); after a barrier rank 0 builds the report from the folder. Every batch's draws are seeded by (seed,
batch, intervention name; klgap.job.view.draw_key), never by rank, so the numbers are those of one process, and a killed run resumes with any world
size, 1 included.

The ranks exchange only a few small messages (the plan, errors, barriers), so they talk over gloo on the CPU
whatever device the model is on, with a timeout long enough for the slowest rank to finish its share.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from klgap.errors import KlgapError

log = logging.getLogger("klgap")
T = TypeVar("T")

#: how long a rank waits at a barrier for the others (the slowest rank's share of the batches)
TIMEOUT = datetime.timedelta(hours=48)
RENDEZVOUS_PREFIX = ".klgap-rendezvous"


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of one command (rank 0 of 1 when nothing launched it so)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    launcher: str | None = None  # "torchrun" or "srun"

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def leader(self) -> bool:
        """Rank 0: binds the run folder, writes run.json and the report."""
        return self.rank == 0

    def share(self, todo: list[int]) -> list[int]:
        """This rank's batches of `todo` (the same list on every rank): every world_size-th, from its rank."""
        return todo[self.rank :: self.size]

    def connect(self, out: Path) -> None:
        """Join the other ranks (once per process). torchrun's MASTER_ADDR / MASTER_PORT when set; else (srun)
        a rendezvous file beside the run's --out folder (every rank sees it: one folder for all their parts).
        Beside, not in: no rank writes into --out before rank 0 has claimed it (klgap/job/outdir.py), so a
        rank that arrives first cannot make rank 0 refuse the folder and leave the others waiting."""
        import torch.distributed as dist

        if not self.distributed or dist.is_initialized():
            return
        if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
            init_method = "env://"
        else:
            env = os.environ
            step = f"{env.get('SLURM_JOB_ID', 'job')}.{env.get('SLURM_STEP_ID', env.get('SLURM_STEPID', '0'))}"
            out = Path(out).resolve()
            out.parent.mkdir(parents=True, exist_ok=True)
            _RENDEZVOUS[:] = [out.parent / f"{RENDEZVOUS_PREFIX}-{out.name}-{step}"]
            init_method = f"file://{_RENDEZVOUS[0]}"
        dist.init_process_group("gloo", init_method=init_method, rank=self.rank, world_size=self.size, timeout=TIMEOUT)

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def from_leader(self, work: Callable[[], T]) -> T:
        """Run `work` on rank 0 and give every rank its result; an error there is raised on every rank (rank 0
        raises its own; the others a KlgapError naming it), so no rank waits for a rank 0 that has given up."""
        if not self.distributed:
            return work()
        import torch.distributed as dist

        box: list[object] = [None]
        error: Exception | None = None
        if self.leader:
            try:
                box = [("ok", work())]
            except KlgapError as exc:
                error, box = exc, [("error", str(exc))]
            except Exception as exc:  # noqa: BLE001 - told to the others, then raised here as it was
                error, box = exc, [("error", f"internal error: {type(exc).__name__}: {exc}")]
        dist.broadcast_object_list(box, src=0)
        status, value = box[0]  # type: ignore[misc]
        if error is not None:
            raise error
        if status == "error":
            raise KlgapError(f"{value} (rank 0)")
        return value  # type: ignore[return-value]

    def close(self, finished: bool = False) -> None:
        """Leave the process group. `finished` (every rank got through its command): wait for the others, then
        rank 0 removes the rendezvous file (not after an error: a rank that died would never arrive)."""
        import torch.distributed as dist

        if not (self.distributed and dist.is_initialized()):
            return
        if finished:
            dist.barrier()
        dist.destroy_process_group()
        if finished and self.leader and _RENDEZVOUS:
            _RENDEZVOUS.pop().unlink(missing_ok=True)


SINGLE = World()
_RENDEZVOUS: list[Path] = []  # the file the ranks met through (srun without MASTER_ADDR), removed at the end


def _read_int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise KlgapError(f"environment variable {name}={env[name]!r} is not an integer; torchrun and srun set it "
                         "to one (unset it to run a single process)") from None


def read_world(env: Mapping[str, str] | None = None) -> World:
    """This process's rank, world size and local rank from the environment torchrun or srun sets."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, size = _read_int(env, "RANK"), _read_int(env, "WORLD_SIZE")
        local = _read_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        names, launcher = "RANK / WORLD_SIZE", "torchrun"
    elif ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env) and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        # only a task srun started: a batch script itself also sees SLURM_NTASKS (of the whole allocation)
        rank, size = _read_int(env, "SLURM_PROCID"), _read_int(env, "SLURM_NTASKS")
        local = _read_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        names, launcher = "SLURM_PROCID / SLURM_NTASKS", "srun"
    else:
        return SINGLE
    if size < 1 or not 0 <= rank < size or local < 0:
        raise KlgapError(f"{names} = {rank} / {size}: the rank must lie in 0..world size - 1 (local rank {local})")
    return World(rank, size, local, launcher if size > 1 else None)


def cuda_device(name: str, world: World, n_visible: int) -> str:
    """The CUDA device a rank uses for ``--device`` `name` (cuda or cuda:N) among `n_visible` GPUs:
    ``cuda:LOCAL_RANK`` when several ranks run (an srun task that sees one GPU, as Slurm's
    ``--gpus-per-task=1`` arranges, takes it: ``cuda:0``); a fixed ``cuda:N`` would put every rank on one GPU
    and is refused, and so are more ranks on a node than it has GPUs (torchrun's ranks all see the node's GPUs)."""
    if not world.distributed:
        return name
    if name != "cuda":
        raise KlgapError(f"--device {name!r} under {world.launcher} with {world.size} ranks: each rank takes "
                         "cuda:LOCAL_RANK; give --device cuda (or auto), or cpu")
    if n_visible == 1 and world.launcher == "srun":
        return "cuda:0"
    if world.local_rank >= n_visible:
        local, fix = (("SLURM_LOCALID", f"srun --ntasks-per-node={n_visible}, or --gpus-per-task=1")
                      if world.launcher == "srun" else ("LOCAL_RANK", f"torchrun --nproc_per_node={n_visible}"))
        raise KlgapError(f"{local} {world.local_rank} but this node shows {n_visible} GPU{'s' * (n_visible != 1)}: "
                         f"start at most {n_visible} ranks per node ({fix}), or give --device cpu")
    return f"cuda:{world.local_rank}"


__all__ = ["SINGLE", "TIMEOUT", "World", "cuda_device", "read_world"]
