"""A Job: every measurement of one command, planned once, before anything loads.

A job is the set of measurements that share one clean forward per batch: its *plans* are the (site, layer, SAE)s
it measures, each resolved once (klgap.plan.resolve: plugins looked up, numbers checked, the SAE routed to its
loader and checked; the route is kept, never derived again), and its *cells* are what it writes, one folder each:
a cell patches one of the plans, or several of them jointly in the same forward. Its shape says which report
sits on top:

- ``run``:          one cell, one site: ``OUT/`` is the run folder.
- ``study``:        one cell per (site, layer) (or per SAE of a list: ``sae=[...]`` from Python, or a glob ``--sae
                    'OUT/seed-*'`` of SAEs that are not checkpoints), each in ``OUT/<site>_L<layer>/`` (or
                    ``OUT/<site>_L<layer>/sae-NN/``); a study report.
- ``checkpoints``:  one cell per checkpoint of an SAE at each (site, layer), in ``OUT/<site>_L<layer>/<step>/``; a
                    study report with its over-training section.
- ``joint``:        every site patched together (``OUT/``), each alone (``OUT/single/<site>_L<layer>/``) and, with
                    ``joint_subsets``, every subset of two or more (``OUT/subsets/<a+b>/``); the joint report
                    compares them.

The batch loop (klgap/job/batches.py) runs any job on any executor; :func:`plan_job` is the one place a command
becomes one.
"""

from __future__ import annotations

import dataclasses
import glob
import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from klgap.errors import KlgapError
from klgap.forward.joint import forward_order
from klgap.job.record import SINGLE_DIR, SUBSETS_DIR
from klgap.plan.config import RunConfig
from klgap.plan.grid import parse_layers, parse_sites, sae_for
from klgap.plan.resolve import RunPlan, TokenSourceRef, resolve, token_source
from klgap.plugins.manager import ModelRef, model_adapter
from klgap.protocols import LoadedSAE
from klgap.sae.checkpoints import expand, is_glob, verify
from klgap.sae.seeds import glob_members, is_seed_glob

Shape = Literal["run", "study", "checkpoints", "joint"]


@dataclass(frozen=True)
class Cell:
    """One measurement and its folder.

    path:   the folder under the job's output (``"."``: the output itself).
    sites:  the job's plans it patches (indices into :attr:`Job.plans`), in forward order.
    joint:  patched together in one forward (a joint run or subset; possibly of one site), through the joint
            executors; else one site through its own executor.
    config: a joint cell's configuration as its run.json records it (its own sites and layers); None for a
            single-site cell (its plan's)."""

    path: str
    sites: tuple[int, ...]
    joint: bool = False
    config: RunConfig | None = None


@dataclass(frozen=True)
class Job:
    """What a command measures, resolved and checked; nothing loaded (klgap.job.cells.load_job loads it).

    config:  the command's configuration (a study's site and layer lists, a joint run's list of layers).
    plans:   each (site, layer, SAE) measured, resolved once; ``plans[i].config`` is that site's configuration.
    cells:   the folders written, in the order their reports are built (a joint cell after the sites it patches).
    saes:    each plan's SAE spec as the command names it (None: the model's default SAE).
    pending: plans whose SAE a ``[train_sae]`` table makes before the run (resolved without it; planned again after)."""

    config: RunConfig
    shape: Shape
    plans: tuple[RunPlan, ...]
    cells: tuple[Cell, ...]
    saes: tuple[str | None, ...]
    pending: tuple[int, ...] = ()
    checked: tuple[str, ...] = ()  # a study over checkpoints: what was read and checked of them (--dry-run's lines)

    @classmethod
    def single(cls, plan: RunPlan) -> Job:
        """The one-site job of a resolved plan (klgap.job.cells.prepare, LoadedJob.of_run)."""
        return cls(plan.config, "run", (plan,), (Cell(".", (0,)),), (plan.config.sae,))

    @property
    def study(self) -> bool:
        """A study report sits on top (its cells are its runs)."""
        return self.shape in ("study", "checkpoints")

    @property
    def joint(self) -> Cell | None:
        """A joint job's own cell (every site patched), else None."""
        return next((cell for cell in self.cells if cell.path == "." and cell.joint), None)


def site_folder(site: str, layer: int) -> str:
    """``resid_post_L03``: a (site, layer)'s folder name in a study or under a joint run's ``single/``."""
    return f"{site}_L{layer:02d}"


def joint_name(plans: Sequence[RunPlan]) -> str:
    """``resid_post_L03+resid_post_L10``: the sites patched together, in forward order."""
    return "+".join(site_folder(plan.site, plan.layer) for plan in plans)  # type: ignore[arg-type]


def checkpoint_spec(sae: str | None, checkpoints: str | None, trains: bool = False) -> str | None:
    """What a command measures the checkpoints of: ``--sae`` when it is a glob, or a config's ``sae_checkpoints``
    key (an SAE folder trained with ``--checkpoints N``, which a ``[train_sae]`` table may train first); None
    for an ordinary command."""
    if checkpoints is not None:
        if not isinstance(checkpoints, str) or is_glob(checkpoints):
            raise KlgapError(f"sae_checkpoints = {checkpoints!r}: name the SAE folder trained with --checkpoints N "
                             "(e.g. ~/.cache/klgap/saes/MODEL/blocks.{layer}.hook_{site}), not a glob")
        if sae is not None and sae != checkpoints:
            raise KlgapError(f"give the SAE as `sae_checkpoints = {checkpoints!r}` or as --sae {sae!r}, not both")
        return os.path.expanduser(checkpoints)
    if sae is None or not is_glob(sae):
        return None
    if trains and not is_seed_glob(sae):
        raise KlgapError(f"--sae {sae!r} is a glob: a [train_sae] table trains the folder a "
                         "`sae_checkpoints = \"DIR\"` key names; use that key instead of a glob")
    return os.path.expanduser(sae)


def plan_job(config: RunConfig, *, checkpoints: str | None = None, trains: bool = False,
             saes: Sequence[str | LoadedSAE] | None = None, model: ModelRef | None = None,
             tokens: TokenSourceRef | None = None) -> Job:
    """The job of a command: its shape, each (site, layer, SAE) resolved once, its cells and folders.

    checkpoints: an SAE spec whose checkpoints are measured (klgap.job.plan.checkpoint_spec: a glob, or a folder
    trained with checkpoints; ``{site}``/``{layer}`` filled in); trains: an SAE path that does not exist yet is
    left to a ``[train_sae]`` table (its plan is pending); saes: SAEs from Python (specs or LoadedSAE objects),
    one per joint (site, layer) in the order of ``config.joint_cells()``, else one cell each; model, tokens:
    objects the caller holds (klgap.api), in place of what the config names. The job's config records the dataset
    as resolved, with the split it measures (klgap.plan.resolve.token_source)."""
    model = model if model is not None else model_adapter(config.model)
    if tokens is None:  # once for every site: the split measured (an eval split where --dataset names none)
        tokens = token_source(config.dataset, "measure")
        config = dataclasses.replace(config, dataset=tokens.spec)
    if config.joint:  # (a single site's config is checked where it is resolved)
        return _joint(config.validate(), list(saes) if saes is not None else None, model, tokens, trains)
    sites = parse_sites(config.site) if config.site is not None else [None]
    layers = parse_layers(config.layer) if config.layer is not None else [None]
    if layers == "all":
        raise KlgapError("--layer all: list the layers (e.g. 0-11); klgap.job.loading.count_layers counts them")
    if checkpoints is not None and is_glob(checkpoints):
        members = glob_members(checkpoints)  # SAEs side by side (OUT/seed-*), not one SAE's checkpoints
        if members is not None:
            return _over_saes(dataclasses.replace(config, sae=checkpoints), [str(p) for p in members], sites,
                              layers, model, tokens)
        if trains and is_seed_glob(checkpoints) and not glob.glob(checkpoints):  # [train_sae] seeds = N makes them
            single = dataclasses.replace(config, site=sites[0], layer=layers[0], sae=None)
            return Job(config, "run", (resolve(single, model=model, tokens=tokens),), (Cell(".", (0,)),),
                       (checkpoints,), (0,))
    if checkpoints is not None:
        return _checkpoints(dataclasses.replace(config, sae=checkpoints), model, tokens, trains)
    if saes is not None and len(saes) > 1:
        return _over_saes(config, list(saes), sites, layers, model, tokens)
    grid = [(site, layer) for site in sites for layer in layers]
    if len(grid) > 1 and None in sites:
        raise KlgapError("several layers need --site too")
    given = saes[0] if saes else None
    if len(grid) == 1:
        site, layer = grid[0]
        single = dataclasses.replace(config, site=site, layer=layer)
        plan, waiting = _resolve(single, single.sae, model, tokens, trains, given)
        return Job(config, "run", (plan,), (Cell(".", (0,)),), (config.sae,), (0,) if waiting else ())
    plans, specs, pending = [], [], []
    for site, layer in grid:
        spec = sae_for(config.sae, site, layer)
        plan, waiting = _resolve(dataclasses.replace(config, site=site, layer=layer, sae=spec), spec, model, tokens,
                                 trains, given)
        pending += [len(plans)] if waiting else []
        plans.append(plan)
        specs.append(spec)
    cells = tuple(Cell(site_folder(site, layer), (i,))  # type: ignore[arg-type]
                  for i, (site, layer) in enumerate(grid))
    return Job(config, "study", tuple(plans), cells, tuple(specs), tuple(pending))


def _resolve(config: RunConfig, spec: str | None, model: ModelRef, tokens: TokenSourceRef | None, trains: bool,
             given: str | LoadedSAE | None = None) -> tuple[RunPlan, bool]:
    """One (site, layer)'s plan, and whether its SAE is a path a [train_sae] table makes first (then resolved
    without it, to check everything else now)."""
    if isinstance(given, LoadedSAE):
        return resolve(config, model=model, sae=given, tokens=tokens), False
    if isinstance(given, str):
        config = dataclasses.replace(config, sae=given)
        spec = given
    path = Path(spec).expanduser() if spec and ":" not in spec else None
    if trains and path is not None and not path.exists():
        return resolve(dataclasses.replace(config, sae=None), model=model, tokens=tokens), True
    return resolve(config, model=model, tokens=tokens), False


def _over_saes(config: RunConfig, saes: list[str | LoadedSAE], sites: list, layers: list, model: ModelRef,
               tokens: TokenSourceRef | None) -> Job:
    """A study over a list of SAEs (seeds, sweep members): one cell each, at the given site and layer or its own."""
    if len(sites) * len(layers) > 1:
        raise KlgapError(f"{len(saes)} SAEs and {len(sites) * len(layers)} sites/layers: give one site and layer "
                         "(or none: each SAE's own), or joint=True to patch the SAEs together")
    single = dataclasses.replace(config, site=sites[0], layer=layers[0], sae=None)
    plans = [_resolve(single, None, model, tokens, False, sae)[0] for sae in saes]
    where = [site_folder(plan.site, plan.layer) if plan.site is not None else "sae" for plan in plans]
    paths = [w if where.count(w) == 1 else f"{w}/sae-{i:02d}" for i, w in enumerate(where)]
    specs = tuple(sae if isinstance(sae, str) else None for sae in saes)
    return Job(config, "study", tuple(plans), tuple(Cell(p, (i,)) for i, p in enumerate(paths)), specs)


def _checkpoints(config: RunConfig, model: ModelRef, tokens: TokenSourceRef | None, trains: bool) -> Job:
    """One cell per checkpoint of the SAE at each (site, layer) (``config.sae`` names them, with {site}/{layer}),
    in training order; the study's sites and layers are those given, or where the checkpoints were trained. With
    `trains`, checkpoints a [train_sae] table has still to make leave every plan pending (planned again after)."""
    spec = str(config.sae)
    sites = parse_sites(config.site) if config.site is not None else [None]
    layers = parse_layers(config.layer) if config.layer is not None else [None]
    if None in sites or None in layers:
        first = expand(spec)[0]
        sites = [first.site] if None in sites else sites
        layers = [first.layer] if None in layers else layers
    grid = [(site, layer) for site in sites for layer in layers]
    # every checkpoint read and checked (hook, weights) before any folder is bound (klgap.sae.checkpoints.verify)
    checked = tuple(verify(spec, grid, config.model, trains))
    folders = [sae_for(spec, site, layer) if len(grid) > 1 else spec for site, layer in grid]
    if trains and not all(Path(folder).exists() for folder in folders):
        plans = tuple(resolve(dataclasses.replace(config, site=site, layer=layer, sae=None), model=model, tokens=tokens)
                      for site, layer in grid)
        cells = tuple(Cell(site_folder(site, layer), (i,)) for i, (site, layer) in enumerate(grid))
        return Job(config, "checkpoints", plans, cells, tuple(folders), tuple(range(len(plans))), checked)
    plans, cells, specs = [], [], []
    for (site, layer), folder in zip(grid, folders, strict=True):
        for found in expand(str(folder)):
            cells.append(Cell(f"{site_folder(site, layer)}/{found.path.name}", (len(plans),)))
            specs.append(str(found.path))
            plans.append(resolve(dataclasses.replace(config, site=site, layer=layer, sae=str(found.path)), model=model,
                                 tokens=tokens))
    return Job(config, "checkpoints", tuple(plans), tuple(cells), tuple(specs), checked=checked)


def _joint(config: RunConfig, saes: list[str | LoadedSAE] | None, model: ModelRef, tokens: TokenSourceRef | None,
           trains: bool) -> Job:
    """Every (site, layer) patched in one forward, each alone and (``joint_subsets``) every subset of two or more."""
    grid = config.joint_cells()
    if saes is not None and len(saes) != len(grid):
        raise KlgapError(f"a joint run over {len(grid)} sites/layers needs {len(grid)} SAEs (one per site and "
                         f"layer, in order), got {len(saes)}")
    if len(set(grid)) != len(grid):
        raise KlgapError(f"--joint lists a site twice: {grid}; list each (site, layer) once")
    if saes is None and config.sae and len(grid) > 1:
        sae_for(config.sae, *grid[0])  # a template without {layer}/{site} is refused with the study's words
    found = []
    for i, (site, layer) in enumerate(grid):
        templated = bool(config.sae) and ("{layer}" in config.sae or "{site}" in config.sae)
        spec = sae_for(config.sae, site, layer) if templated or (config.sae and len(grid) > 1) else config.sae
        single = dataclasses.replace(config, joint=False, joint_subsets=False, site=site, layer=layer, sae=spec)
        plan, waiting = _resolve(single, spec, model, tokens, trains, saes[i] if saes is not None else None)
        found.append((forward_order(site, layer), plan, spec, waiting))
    found.sort(key=lambda item: item[0])
    plans = tuple(plan for _, plan, _, _ in found)
    n = len(plans)
    cells = [Cell(f"{SINGLE_DIR}/{site_folder(p.site, p.layer)}", (i,))  # type: ignore[arg-type]
             for i, p in enumerate(plans)]
    if config.joint_subsets:
        for size in range(2, n):
            for chosen in itertools.combinations(range(n), size):
                subset = [plans[i] for i in chosen]
                sites = ",".join(dict.fromkeys(str(p.site) for p in subset))
                sub_config = dataclasses.replace(config, joint_subsets=False, site=sites,
                                                 layer=list(dict.fromkeys(p.layer for p in subset)))
                cells.append(Cell(f"{SUBSETS_DIR}/{joint_name(subset)}", chosen, True, sub_config))
    cells.append(Cell(".", tuple(range(n)), True, config))
    return Job(config, "joint", plans, tuple(cells), tuple(spec for _, _, spec, _ in found),
               tuple(i for i, (_, _, _, waiting) in enumerate(found) if waiting))


__all__ = ["Cell", "Job", "Shape", "checkpoint_spec", "joint_name", "plan_job",
           "site_folder"]
