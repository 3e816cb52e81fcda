"""A joint run's "interactions" section: its joint effect decomposed over the subsets of its sites (Möbius inversion).

With every subset of the sites measured (``--joint-subsets``; with two sites the joint run is the only pair), the
mean KL f(S) of patching the sites S together (f of one site: that site alone; f(∅) = 0) is the sum over the
subsets T ⊆ S of the interaction terms I(T) = Σ_{U ⊆ T} (−1)^{|T|−|U|} f(U): I of one site is its effect alone,
I of a pair what patching both adds beyond the two alone, and so on; the terms of all the subsets of the run's
sites sum to its joint effect, exactly. Each term has a context-bootstrap interval (klgap.report.stats: the same
contexts drawn for every run, which measured the same tokens).

A pure function of the joint run's folder and the folders beside it (``single/``, ``subsets/``): no model.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from pathlib import Path

import pandas as pd

from klgap.job.folder import RunDir
from klgap.job.record import RECORD_FILE, SUBSETS_DIR, RunRecord, read_record
from klgap.report import stats
from klgap.report.aggregate import context_sums
from klgap.report.compounding import N_BOOT, Difference, difference
from klgap.report.schema import Num, StrictModel


class InteractionTerm(StrictModel):
    """The Möbius term of one subset of a joint run's sites, per intervention: its effect alone (one site), the
    pairwise interaction (two), ... with a context-bootstrap interval (p_value: share of replicates ≤ 0)."""

    sites: list[str]  # hook names, forward order
    order: int  # how many sites
    terms: dict[str, Difference]


class Interactions(StrictModel):
    """A joint run's mean KL per intervention as the sum of its interaction terms over every subset of its sites."""

    sites: list[str]  # hook names, forward order
    joint_kl_mean: dict[str, Num]  # f(all sites) from the same per-context sums: the sum of every term
    terms: list[InteractionTerm]  # by order, then forward order


Effect = dict[frozenset[str], Path]  # a subset of sites (hook names) -> the folder that patched them together


def _measured(record: RunRecord, rundir: RunDir) -> Effect | None:
    """Every subset of the run's sites with the folder that measured it (the sites alone, the subsets beside the
    joint run, the run itself); None when one is missing."""
    assert record.joint is not None
    found: Effect = {frozenset([site.hook_name]): rundir.root / site.path for site in record.joint}
    found[frozenset(site.hook_name for site in record.joint)] = rundir.root
    top = (rundir.root / record.joint[0].path).parent.parent  # the joint run holding single/ and subsets/
    for folder in sorted((top / SUBSETS_DIR).iterdir()) if (top / SUBSETS_DIR).is_dir() else []:
        if (folder / RECORD_FILE).is_file():
            sub = read_record(folder)
            found.setdefault(frozenset(site.hook_name for site in sub.joint or []), folder)
    hooks = [site.hook_name for site in record.joint]
    needed = [frozenset(c) for r in range(1, len(hooks) + 1) for c in combinations(hooks, r)]
    return found if all(s in found for s in needed) else None


def signed_sum(frames: Sequence[pd.DataFrame], signs: Sequence[int], seed: int, n_boot: int = N_BOOT) -> Difference:
    """Σ signᵢ · mean(framesᵢ) over tokens, the bootstrap resampling the same whole contexts for every frame."""
    found = stats.context_bootstrap(frames, lambda m: sum(s * v for s, v in zip(signs, m, strict=True)), n_boot, seed)
    return difference(found, n_boot)


def interactions(record: RunRecord, rundir: RunDir) -> Interactions | None:
    """The interactions section of a joint run of two or more sites whose subsets were all measured; else None."""
    if record.joint is None or len(record.joint) < 2 or (measured := _measured(record, rundir)) is None:
        return None
    hooks = [site.hook_name for site in record.joint]
    sums = {subset: context_sums(RunDir(folder).finished_parts()[0]) for subset, folder in measured.items()}
    names, seed = record.names, record.seed
    terms = []
    for order in range(1, len(hooks) + 1):
        for chosen in combinations(hooks, order):
            below = [frozenset(c) for r in range(1, order + 1) for c in combinations(chosen, r)]
            signs = [(-1) ** (order - len(u)) for u in below]
            terms.append(InteractionTerm(sites=list(chosen), order=order, terms={
                name: signed_sum([sums[u](name, "kl") for u in below], signs, seed) for name in names}))
    whole = sums[frozenset(hooks)]
    joint = {name: float(whole(name, "kl")["sum"].sum() / whole(name, "kl")["n"].sum()) for name in names}
    return Interactions(sites=hooks, joint_kl_mean=joint, terms=terms)


__all__ = ["InteractionTerm", "Interactions", "interactions", "signed_sum"]
