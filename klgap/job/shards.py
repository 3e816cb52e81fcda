"""Split a run over machines (``--shard I/N``) and join the pieces (``klgap merge``).

Shard I of N measures the batches b with ``b % N == I - 1`` of every (site, layer) of the command, with
the same per-batch random streams as the unsharded run, and writes only per-batch parts plus
``shard_plan.json`` (the command's configuration). ``klgap merge SHARD_DIR... --out OUT`` checks that the
shards come from one command and cover 1..N, copies their parts and run.json into OUT and builds the report from those files (no model, no
SAE) exactly as the unsharded run does at its end: the numbers are identical (tests/cli/test_shards.py). A joint
run's shard holds its single-site and subset folders too; each is merged likewise.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from klgap.errors import KlgapError
from klgap.job.folder import CONFIG_FILE, RunDir, atomic_write_json
from klgap.job.record import read_record, write_record

PLAN_FILE = "shard_plan.json"
SHARD_FILE = "shard.json"


def parse_shard(text: str) -> tuple[int, int]:
    """``"2/4"`` -> (2, 4); I counts from 1 (``1/4`` … ``4/4``), as a Slurm array ``--array=1-4`` does."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if match is None:
        raise KlgapError(f"--shard {text!r} is not I/N; write e.g. --shard 2/4 (shard 2 of 4, counting from 1)")
    index, count = int(match[1]), int(match[2])
    if count < 1 or not 1 <= index <= count:
        raise KlgapError(f"--shard {text!r}: I must lie in 1..N and N >= 1, e.g. --shard 1/{max(count, 1)}")
    return index, count


def write_plan(out: Path, kind: str, config: dict[str, Any], sites: list[str], layers: Any, shard: tuple[int, int],
               runs: list[str] | None = None) -> None:
    """shard_plan.json: the command's kind (run, study, checkpoints, joint), configuration, sites and layers, and
    its run folders in the order their reports are built (``runs``)."""
    atomic_write_json(Path(out) / PLAN_FILE, {"kind": kind, "config": config, "sites": sites, "layers": layers,
                                              "shard": list(shard), **({"runs": runs} if runs is not None else {})})


def _read_plan(folder: Path) -> dict[str, Any]:
    path = folder / PLAN_FILE
    if not path.is_file():
        raise KlgapError(
            f"{str(folder)!r} is not a shard folder (no {PLAN_FILE}); shards are written by "
            "`klgap replicate ... --shard I/N --out DIR`"
        )
    return json.loads(path.read_text())


def _sub_runs(folder: Path) -> list[str]:
    """Run folders inside a shard folder, relative, sorted: ``"."`` for a single run, ``site_Lnn`` for a study,
    ``site_Lnn/step-NNNNNN`` for a study over checkpoints, ``"."`` then ``single/site_Lnn`` and ``subsets/NAME`` for
    a joint run (klgap/job/plan.py)."""
    return sorted(p.parent.relative_to(folder).as_posix() for p in folder.rglob(CONFIG_FILE))


def check_shards(folders: list[Path]) -> dict[str, Any]:
    """The common plan of `folders`; a clear error if they are not the complete shards of one command."""
    plans = [_read_plan(f) for f in folders]
    first = {k: v for k, v in plans[0].items() if k != "shard"}
    for folder, plan in zip(folders, plans, strict=True):
        other = {k: v for k, v in plan.items() if k != "shard"}
        if other != first:
            key = next(k for k in sorted(set(first) | set(other)) if first.get(k) != other.get(k))
            detail = key
            if key == "config":
                field = next(k for k in sorted(set(first["config"]) | set(other["config"]))
                             if first["config"].get(k) != other["config"].get(k))
                detail = f"config {field}: {first['config'].get(field)!r} vs {other['config'].get(field)!r}"
            raise KlgapError(f"{str(folder)!r} is a shard of another command than {str(folders[0])!r} ({detail})")
    counts = {plan["shard"][1] for plan in plans}
    if len(counts) != 1:
        raise KlgapError(f"the shards were split different ways ({', '.join(f'/{n}' for n in sorted(counts))}); "
                         "merge the shards of one --shard I/N split")
    n = counts.pop()
    seen: dict[int, Path] = {}
    for folder, plan in zip(folders, plans, strict=True):
        index = plan["shard"][0]
        if index in seen:
            raise KlgapError(f"shard {index}/{n} is given twice: {str(seen[index])!r} and {str(folder)!r}")
        seen[index] = folder
    missing = [f"{i}/{n}" for i in range(1, n + 1) if i not in seen]
    if missing:
        raise KlgapError(f"shard{'s' if len(missing) > 1 else ''} {', '.join(missing)} missing; give all {n} shard folders")
    return {**first, "n_shards": n}


def _checked_sub(folders: list[Path], sub: str) -> tuple[dict[str, Any], list[tuple[Path, list[int]]]]:
    """One run of the shards (`sub`): its identity and, per shard, the batches to copy; a clear error when a
    shard has not finished it or measured another run. Reads only."""
    identity = None
    batches = []
    for folder in folders:
        run = folder / sub
        meta = json.loads((run / SHARD_FILE).read_text()) if (run / SHARD_FILE).is_file() else None
        shard_identity = json.loads((run / CONFIG_FILE).read_text())
        label = shard_identity.pop("shard", "?")
        if meta is None:
            raise KlgapError(f"shard {label} in {str(folder)!r} has not finished {sub!r}; run its command again to finish it")
        lacking = sorted(set(meta["batches"]) - RunDir(run).done_batches())
        if lacking:
            raise KlgapError(f"shard {label} in {str(folder)!r} lacks batches {lacking[:5]} of {sub!r}; "
                             "run its command again to finish it")
        if identity is not None and shard_identity != identity:
            raise KlgapError(f"shard {label} in {str(folder)!r} measured another run than the first shard in {sub!r}")
        identity = shard_identity
        batches.append((run, list(meta["batches"])))
    return identity, batches


def merge_parts(folders: list[Path], out: Path, overwrite: bool, device: str | None = None) -> list[str]:
    """Copy every shard's parts into `out` (one folder per run); return the run folders (relative).

    Every run of every shard is checked (finished, every batch there, one run) before anything is written: a
    merge that fails leaves `out` as it was. `device`: the device the merged run is recorded on (the merging
    machine's; the shards may have run elsewhere — the numbers do not depend on it beyond float round-off, which
    the parts already hold)."""
    subs = _sub_runs(folders[0])
    if not subs:
        raise KlgapError(f"{str(folders[0])!r} holds no run (no {CONFIG_FILE})")
    for folder in folders[1:]:
        if _sub_runs(folder) != subs:
            raise KlgapError(f"{str(folder)!r} holds other runs than {str(folders[0])!r}; was one shard not finished?")
    if any((out / sub / name).exists() for sub in subs for name in ("report.json", CONFIG_FILE)) and not overwrite:
        raise KlgapError(f"{str(out)!r} already holds a run; use another --out, or --overwrite to replace it")
    checked = {sub: _checked_sub(folders, sub) for sub in subs}  # all of it, before the first write
    out.mkdir(parents=True, exist_ok=True)
    for sub in subs:
        identity, batches = checked[sub]
        target = RunDir(out / sub)
        target.clear()
        target.parts.mkdir(parents=True, exist_ok=True)
        for run, indices in batches:
            for index in indices:
                for path in RunDir(run).part_paths(index):
                    shutil.copy2(path, target.parts / path.name)
        if device is not None:
            identity["device"] = device.split(":")[0]  # the device's kind, as identity.run_identity records it
        atomic_write_json(target.root / CONFIG_FILE, identity)
        record = read_record(folders[0] / sub)  # every shard wrote the same record but for its device and ranks
        # the most ranks any shard ran with (a job-array task may be a torchrun launch), whatever the folders' order
        update: dict[str, Any] = {"world_size": max(read_record(folder / sub).world_size for folder in folders)}
        if device is not None:
            update["device"] = device
        write_record(target.root, record.model_copy(update=update))
    return subs


__all__ = ["check_shards", "merge_parts", "parse_shard", "write_plan"]
