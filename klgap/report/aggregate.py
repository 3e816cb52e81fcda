"""Reduce a run's parts to the statistics its report holds, streaming: never the whole per-token table at once.

A pure function of the part files (``OUT/parts/batch_*.parquet``, read with pyarrow, a few columns at a time) and
plain arguments. Every number is the one the whole-frame code (klgap/report/build.py before issue 14) gave, computed from
the same values in the same order with the same operations (tests/core/test_aggregate.py):
- per-context sums (ratios, bootstrap intervals, Wilcoxon, curve intervals): pandas groupby part by part, as every
  context lives in one part;
- means, medians, 99.9th percentiles, kl_by_offset: one intervention's column at a time, as the parts hold it;
- top tokens: pandas groupby over ranges of token ids (stats.top_tokens_of); many-samples z-scores: per context.
One exception: the Spearman correlations of the per-token gap come from stats.spearman (exact integer rank sums),
not scipy's spearmanr, whose rank arrays cost ~85 bytes per token; the two agree to ~1e-15 relative
(tests/replications/test_golden.py compares them with rel=1e-12).

Memory beyond the per-context table: ~25 bytes per measured token of one intervention (a float64 column for the
percentiles; the float32 gap, its int32 ranks, one column and its sorted copy for Spearman; benchmarks/README.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from klgap.report import stats
from klgap.report.robustness import build_curve, norm_frac_mean
from klgap.errors import KlgapError
from klgap.report.holm import apply_holm
from klgap.report.schema import Comparison, Curve, GapAnalysis, InterventionStats, ManySamples, SAEMetrics

BASELINE = "epsilon_random"
GAP_COLUMNS = ("cos", "l0", "x_norm", "eps", "position")  # what the per-token gap is correlated with
_SCAN = ["context", "position", "intervention", "draw", "kl", "ce_delta"]

Rows = slice | np.ndarray  # where one intervention's measured rows lie in a part


@dataclass(frozen=True)
class RunStatistics:
    """Everything a run report says about its measurement (field names as in klgap.report.schema.Report)."""

    n_tokens: int  # measured rows of the first intervention (the SAE's)
    n_contexts: int
    interventions: dict[str, InterventionStats]  # in order of first appearance in the parts
    comparisons: dict[str, Comparison]  # each baseline against "sae", p_holm across them
    kl_ratio_sae_over_epsilon_random: float
    sae_metrics: SAEMetrics
    gap: GapAnalysis | None  # None in many_samples mode or without sae and epsilon_random
    curve: Curve | None  # None in many_samples mode or without cosine_matched interventions
    kl_by_offset: dict[str, dict[str, float]] | None  # single_token: intervention -> offset -> mean KL
    many_samples: ManySamples | None


def explained_variance(sides: Sequence[dict[str, Any]]) -> float:
    """1 − Σ‖x − x̂‖² / Σ‖x − x̄‖² over the run, from the parts' side sums (n, sum_x, sum_sq_x, sum_sq_err)."""
    n = sum(s["n"] for s in sides)
    if n == 0:
        return math.nan
    sum_x = np.sum([np.asarray(s["sum_x"]) for s in sides], axis=0)
    # ‖Σx‖² exactly rounded: a BLAS dot's last bit depends on the process's state (alignment, kernels), and this
    # number is compared bit for bit (tests/replications/test_golden.py)
    total = sum(s["sum_sq_x"] for s in sides) - math.fsum((sum_x * sum_x).tolist()) / n
    return 1.0 - sum(s["sum_sq_err"] for s in sides) / total if total > 0 else math.nan


# ----------------------------------------------------------------------------- reading parts


def _read(path: Path, columns: Sequence[str]) -> dict[str, np.ndarray]:
    """Columns of one part as numpy arrays; ``intervention`` as int codes with its names under ``names``."""
    with pq.ParquetFile(path, read_dictionary=["intervention"] if "intervention" in columns else None) as part:
        table = part.read(columns=list(columns), use_threads=False)  # ~5x quicker than pq.read_table for a part
    out: dict[str, Any] = {}
    for name in columns:
        column = table.column(name)
        if name == "intervention":
            column = column.unify_dictionaries().combine_chunks() if column.num_chunks != 1 else column.chunk(0)
            out[name], out["names"] = column.indices.to_numpy(), column.dictionary.to_pylist()
        else:
            out[name] = column.to_numpy()
    return out


def _as_rows(mask: np.ndarray) -> Rows:
    """The rows of `mask`: a slice when they are contiguous (each intervention's are, in the engine's parts)."""
    idx = np.flatnonzero(mask)
    if idx.size and idx[-1] - idx[0] + 1 == idx.size:
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return idx


def _size(rows: Rows) -> int:
    return rows.stop - rows.start if isinstance(rows, slice) else rows.size


class _Parts:
    """The run's parts and, per part, where each intervention's measured rows (draw < 0) lie."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = [Path(p) for p in paths]
        self.rows: list[dict[str, Rows]] = []
        self.counts: dict[str, int] = {}  # measured rows per intervention, in order of first appearance

    def scan(self, columns: Sequence[str]) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
        """Each part's `columns` (with intervention and draw) and its masks of measured rows per intervention."""
        for path in self.paths:
            part = _read(path, list(dict.fromkeys([*columns, "intervention", "draw"])))
            measured = part["draw"] < 0
            codes = part["intervention"]
            masks = {}
            for code in pd.unique(codes[measured]):  # order of first appearance
                masks[part["names"][code]] = measured & (codes == code)
            self.rows.append({name: _as_rows(mask) for name, mask in masks.items()})
            for name, mask in masks.items():
                self.counts[name] = self.counts.get(name, 0) + int(mask.sum())
            yield part, masks

    def gather(self, name: str, column: str, dtype: type | None = None) -> np.ndarray:
        """One column of `name`'s measured rows across the run, in part order: floats as stored (or `dtype`),
        integers int32."""
        out: np.ndarray | None = None
        start = 0
        for path, rows in zip(self.paths, self.rows, strict=True):
            if name not in rows:
                continue
            values = _read(path, [column])[column][rows[name]]
            if out is None:
                dtype = dtype or (np.int32 if values.dtype.kind in "iu" else values.dtype)
                out = np.empty(self.counts[name], dtype=dtype)
            if out.dtype == np.int32 and values.size and (values.max() >= 2**31 or values.min() < -(2**31)):
                raise KlgapError(f"{path}: column {column!r} holds {values.max()}, beyond int32; not a klgap part")
            out[start : start + values.size] = values
            start += values.size
        return out if out is not None else np.empty(0, dtype=np.float32)


def _num(value: float | None) -> float:
    return math.nan if value is None else value


def _mean(values: np.ndarray) -> float:
    """pandas' mean (NaN skipped; float32 data summed in float32, as the whole-frame code did)."""
    return float(pd.Series(values, copy=False).mean()) if values.size else math.nan


# ----------------------------------------------------------------------------- per part


def _context_sums(values: np.ndarray, contexts: np.ndarray, kahan: bool = False) -> tuple[np.ndarray, ...]:
    """:func:`stats.per_context` of one intervention's rows of one part: (contexts, sum, n), the same pandas calls.

    pandas (3.1) sums groups in sorted order without NaN with ``np.add.reduceat`` and otherwise with its Kahan
    loop; each group's sum depends only on its own values either way, but the whole-run call chose once for the
    run. `kahan` takes the Kahan loop here (a NaN row in an extra last group), for runs whose call took it."""
    if kahan:
        values = np.concatenate([values, np.array([np.nan], dtype=values.dtype)])
        contexts = np.concatenate([contexts, [contexts.max() + 1 if contexts.size else 0]])
    series = pd.Series(values, copy=False)
    grouped = series.where(np.isfinite(series)).groupby(contexts)
    total, count = grouped.sum(min_count=1).fillna(0.0), grouped.count()
    end = -1 if kahan else None
    return total.index.to_numpy()[:end], total.to_numpy()[:end], count.to_numpy()[:end]


def _takes_reduceat(values: np.ndarray, contexts: np.ndarray) -> bool:
    """Whether pandas sums these rows with np.add.reduceat (all finite, contexts in order) — see _context_sums."""
    return bool(np.isfinite(values).all() and np.all(contexts[1:] >= contexts[:-1]))


class _Growing:
    """A 1-D array appended to part by part in few allocations (capacity doubles; no per-part arrays kept)."""

    def __init__(self) -> None:
        self.data: np.ndarray | None = None
        self.size = 0

    def extend(self, values: np.ndarray) -> None:
        if self.data is None:
            self.data = np.empty(max(1024, values.size), dtype=values.dtype)
        if self.size + values.size > self.data.size:
            grown = np.empty(max(self.size + values.size, 2 * self.data.size), dtype=self.data.dtype)
            grown[: self.size] = self.data[: self.size]
            self.data = grown
        self.data[self.size : self.size + values.size] = values
        self.size += values.size

    def view(self) -> np.ndarray:
        return self.data[: self.size] if self.data is not None else np.empty(0, dtype=np.float32)


class _ContextSums:
    """Per-context sums of KL and ΔCE per intervention, part by part, as :func:`stats.per_context` of the run."""

    COLUMNS = ("kl", "ce_delta")

    def __init__(self) -> None:
        self.contexts: dict[str, _Growing] = {}
        self.sums: dict[tuple[str, str, str], _Growing] = {}  # (name, column, "sum" | "n")
        self.pieces: dict[str, list[tuple[int, int, int]]] = {}  # per part holding the name: (part, start, stop)
        self.reduceat: dict[tuple[str, str], list[bool]] = {}  # per piece: pandas took reduceat there
        self.last_context: dict[str, int] = {}
        self.in_order: dict[str, bool] = {}  # the intervention's contexts never go back across the run

    def add(self, index: int, part: dict[str, np.ndarray], masks: dict[str, np.ndarray]) -> None:
        for name, mask in masks.items():
            contexts = part["context"][mask]
            if contexts.size:
                previous = self.last_context.get(name, contexts[0])
                self.in_order[name] = self.in_order.get(name, True) and bool(contexts[0] >= previous)
                self.last_context[name] = contexts[-1]
            for column in self.COLUMNS:
                values = part[column][mask]
                keys, total, count = _context_sums(values, contexts)
                self.sums.setdefault((name, column, "sum"), _Growing()).extend(total)
                self.sums.setdefault((name, column, "n"), _Growing()).extend(count)
                self.reduceat.setdefault((name, column), []).append(_takes_reduceat(values, contexts))
            start = self.contexts.setdefault(name, _Growing()).size
            self.contexts[name].extend(keys)
            self.pieces.setdefault(name, []).append((index, start, start + keys.size))

    def redo_as_whole_run(self, parts: _Parts) -> None:
        """Where the whole run's pandas call takes the Kahan loop but a part took reduceat, sum that part again
        the Kahan way (only in runs with non-finite values, or contexts out of order)."""
        for (name, column), flags in self.reduceat.items():
            if all(flags) and self.in_order.get(name, True):
                continue
            for (index, start, stop), flag in zip(self.pieces[name], flags, strict=True):
                if flag:
                    part, rows = _read(parts.paths[index], ["context", column]), parts.rows[index][name]
                    _, total, count = _context_sums(part[column][rows], part["context"][rows], True)
                    self.sums[(name, column, "sum")].data[start:stop] = total
                    self.sums[(name, column, "n")].data[start:stop] = count

    def per_context(self, name: str, column: str) -> pd.DataFrame:
        """:func:`stats.per_context` of the whole run for one intervention and column."""
        if name not in self.contexts:
            return pd.DataFrame({"sum": np.empty(0, np.float32), "n": np.empty(0, np.int64)})
        total, count = self.sums[(name, column, "sum")].view(), self.sums[(name, column, "n")].view()
        frame = pd.DataFrame({"sum": total, "n": count}, index=pd.Index(self.contexts[name].view(), name="context"))
        return frame.sort_index(kind="stable")


def paired_rows(part: dict[str, np.ndarray], a: np.ndarray, b: np.ndarray) -> tuple[Rows, Rows]:
    """Which of a part's `a` rows and `b` rows (two interventions' masks) are the same tokens, joined on (context,
    position) as :func:`stats.token_gap` joins them: ``(rows of a, rows of b)``, to index ``part[column][mask]``;
    ``slice(None)`` twice when the two hold the same tokens in the same (increasing) order."""
    ctx, pos = part["context"], part["position"]
    ctx_a, pos_a = ctx[a], pos[a]
    increasing = np.all((ctx_a[1:] > ctx_a[:-1]) | ((ctx_a[1:] == ctx_a[:-1]) & (pos_a[1:] > pos_a[:-1])))
    if increasing and np.array_equal(ctx_a, ctx[b]) and np.array_equal(pos_a, pos[b]):
        return slice(0, ctx_a.size), slice(0, ctx_a.size)  # the join pairs row i with row i
    keys = ["context", "position"]
    left = pd.DataFrame({"i": np.arange(ctx_a.size)}, index=pd.MultiIndex.from_arrays([ctx_a, pos_a], names=keys))
    right = pd.Series(np.arange(int(b.sum())), index=pd.MultiIndex.from_arrays([ctx[b], pos[b]], names=keys), name="j")
    joined = left.join(right, how="inner")
    return joined["i"].to_numpy(), joined["j"].to_numpy()


def _part_gap(part: dict[str, np.ndarray], masks: dict[str, np.ndarray],
              baseline: str) -> tuple[np.ndarray, Rows] | None:
    """This part's per-token gap KL(sae) − KL(baseline) joined on (context, position) as :func:`stats.token_gap`,
    and which of the part's sae rows (positions among them) it holds."""
    if "sae" not in masks or baseline not in masks:
        return None
    take, other = paired_rows(part, masks["sae"], masks[baseline])
    kl = part["kl"]
    return kl[masks["sae"]][take] - kl[masks[baseline]][other], take


def _part_zscores(part: dict[str, np.ndarray], masks: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Many-samples: per context of this part, the SAE's KL among the random draws (:func:`stats.zscores`)."""
    draws = part["draw"] >= 0
    if not draws.any():
        return []
    sae = masks.get("sae", np.zeros_like(draws))
    sae = pd.Series(part["kl"][sae], index=part["context"][sae])
    out = []
    for context, kl in pd.Series(part["kl"][draws]).groupby(part["context"][draws]):
        sae_kl = float(sae.loc[context])
        out.append({"context": int(context), "sae_kl": sae_kl, **stats.zscores(sae_kl, kl.to_numpy())})
    return out


# ----------------------------------------------------------------------------- the run


def _compare(sums: _ContextSums, names: list[str], seed: int) -> dict[str, Comparison]:
    """For each baseline: KL and ΔCE ratios sae/baseline with context-bootstrap intervals, the paired ΔCE difference
    and the baseline's mean ΔCE with theirs, Wilcoxon; Holm within each family of the run (klgap.report.holm)."""
    out: dict[str, Comparison] = {}
    if "sae" not in names:
        return out
    sae_kl, sae_ce = sums.per_context("sae", "kl"), sums.per_context("sae", "ce_delta")
    for name in names:
        if name == "sae":
            continue
        base_kl, base_ce = sums.per_context(name, "kl"), sums.per_context(name, "ce_delta")
        out[name] = Comparison.model_validate(_clean_json({
            "kl_ratio": stats.ratio_of_means_ci(sae_kl, base_kl, seed=seed),
            "ce_delta_ratio": stats.ratio_of_means_ci(sae_ce, base_ce, seed=seed),
            "wilcoxon_kl": stats.paired_wilcoxon(sae_kl, base_kl),
            "ce_delta_difference": stats.difference_of_means_ci(sae_ce, base_ce, seed=seed),
            "ce_delta_baseline": stats.mean_ci(base_ce, seed=seed),
        }))
    apply_holm([out])
    return out


def _clean_json(obj: Any) -> Any:
    """NaN and infinities as None (as report.json saves them), so a model holds what its file will."""
    if isinstance(obj, dict):
        return {k: _clean_json(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _gap_analysis(parts: _Parts, gap: np.ndarray, take: np.ndarray | None,
                  decode: Callable[[int], str | None]) -> GapAnalysis:
    """Spearman of the gap with each of GAP_COLUMNS, and the tokens with the largest mean gap.
    take: the gap's rows among the run's sae rows, None when it holds all of them in order."""

    def sae_column(column: str) -> np.ndarray:
        values = parts.gather("sae", column)
        return values if take is None else values[take]

    gap_ranks = stats.centred_ranks(gap) if np.isfinite(gap).all() and gap.size >= 3 else None
    spearman = {column: stats.spearman(gap, sae_column(column), gap_ranks) for column in GAP_COLUMNS}
    del gap_ranks
    top = stats.top_tokens_of(sae_column("token_id"), gap)
    return GapAnalysis(
        baseline=BASELINE, gap_mean=_mean(gap), spearman=spearman,
        frac_tokens_gap_positive=float(pd.Series(gap > 0).mean()) if gap.size else math.nan,
        top_tokens=[{"token_id": int(r.token_id), "token": decode(int(r.token_id)), "mean_gap": float(r.mean_gap),
                     "count": int(r["count"])} for _, r in top.iterrows()])


def _per_intervention(parts: _Parts, single_token: bool) -> tuple[dict[str, InterventionStats], dict[str, dict], dict]:
    """Per intervention, one column at a time: KL and ΔCE described (the ΔCE one also returned whole), and in
    single-token mode the mean KL per offset."""
    interventions, ce_delta, kl_by_offset = {}, {}, {}
    for name in parts.counts:
        if single_token:
            kl, offsets = parts.gather(name, "kl"), parts.gather(name, "offset")
            means = pd.Series(kl, copy=False).groupby(offsets).mean()
            kl_by_offset[name] = {str(offset): float(mean) for offset, mean in means.items()}
            del kl, offsets
        # read as float64, as describe casts them (exactly), straight into the array it partitions
        kl = stats.describe(parts.gather(name, "kl", np.float64), overwrite_input=True)
        ce = ce_delta[name] = stats.describe(parts.gather(name, "ce_delta", np.float64), overwrite_input=True)
        interventions[name] = InterventionStats(
            kl_mean=kl["mean"], kl_median=kl["median"], kl_p999=kl["p999"], ce_delta_mean=ce["mean"],
            ce_delta_median=ce["median"], ce_delta_p999=ce["p999"], n_tokens=kl["n"], n_nonfinite=kl["n_nonfinite"])
    return interventions, ce_delta, kl_by_offset


def run_statistics(part_paths: Sequence[Path], sides: Sequence[dict[str, Any]], *, names: list[str], mode: str,
                   seed: int, sample_name: str | None = None,
                   decode: Callable[[int], str | None] = lambda _: None) -> RunStatistics:
    """The report's statistics of a run from its part files (in batch order) and their side JSON.

    names: the interventions in configured order, the SAE's first; mode: all_tokens, single_token or
    many_samples; sample_name: the many-samples draws' intervention; decode(token_id): a token's text."""
    parts = _Parts(part_paths)
    sums = _ContextSums()
    contexts, gaps, takes, zscores, n_draws = _Growing(), _Growing(), [], [], 0
    for index, (part, masks) in enumerate(parts.scan(_SCAN)):
        sums.add(index, part, masks)
        contexts.extend(np.unique(part["context"][part["draw"] < 0]))
        if mode == "many_samples":
            zscores.extend(_part_zscores(part, masks))
            n_draws = max(n_draws, int(part["draw"].max()) + 1)
        elif (joined := _part_gap(part, masks, BASELINE)) is not None:
            gaps.extend(joined[0])
            takes.append((parts.counts["sae"] - _size(parts.rows[-1]["sae"]), joined[1]))  # (sae rows before, rows)
    sums.redo_as_whole_run(parts)

    interventions, ce_delta, kl_by_offset = _per_intervention(parts, mode == "single_token")
    comparisons = _compare(sums, names, seed)
    first = names[0] if names else None  # the SAE's rows: their geometry, one column at a time
    sae_metrics = SAEMetrics(
        explained_variance=explained_variance(sides),
        n_nonfinite_activations=sum(s.get("n_nonfinite_acts", 0) for s in sides),
        **{f"{c}_mean": _mean(parts.gather(first, c)) for c in ("l0", "cos", "eps", "x_norm", "x_hat_norm")})

    gap = curve = None
    if mode != "many_samples":
        if {"sae", BASELINE} <= parts.counts.keys():
            in_order = all(isinstance(t, slice) for _, t in takes) and sum(_size(t) for _, t in takes) == parts.counts["sae"]
            take = None if in_order else np.concatenate(
                [before + (np.arange(t.start, t.stop) if isinstance(t, slice) else t) for before, t in takes])
            gap = _gap_analysis(parts, gaps.view(), take, decode)

        def sae_geometry() -> tuple[float, float] | None:
            if not parts.counts.get("sae"):
                return None
            frac = norm_frac_mean(parts.gather("sae", "x_hat_norm"), parts.gather("sae", "x_norm"))
            return _mean(parts.gather("sae", "cos")), frac

        curve = build_curve(names, kl_by_context=lambda name: sums.per_context(name, "kl"),
                            ce_delta=lambda name: ce_delta.get(name) or stats.describe(np.empty(0)),
                            sae_geometry=sae_geometry, seed=seed)

    return RunStatistics(
        n_tokens=parts.counts.get(first, 0) if first else sum(parts.counts.values()),
        n_contexts=int(np.unique(contexts.view()).size),
        interventions=interventions,
        comparisons=comparisons,
        kl_ratio_sae_over_epsilon_random=_num(comparisons[BASELINE].kl_ratio.ratio) if BASELINE in comparisons
        else math.nan,
        sae_metrics=sae_metrics,
        gap=gap,
        curve=Curve(**curve) if curve is not None else None,
        kl_by_offset=kl_by_offset if mode == "single_token" else None,
        many_samples=ManySamples(**_many_samples(zscores, n_draws, sample_name)) if mode == "many_samples" else None,
    )


def _many_samples(per_context: list[dict[str, Any]], n_draws: int, sample_name: str | None) -> dict[str, Any]:
    per_context = sorted(per_context, key=lambda c: c["context"])
    zs = np.array([c["z"] for c in per_context], dtype=float)
    finite = zs[np.isfinite(zs)]
    return {
        "sample_intervention": sample_name,
        "n_draws": n_draws,
        "z_mean": float(finite.mean()) if finite.size else math.nan,
        "z_median": float(np.median(finite)) if finite.size else math.nan,
        "frac_z_above_2": float((finite > 2).mean()) if finite.size else math.nan,
        "percentile_mean": float(np.mean([c["percentile"] for c in per_context])) if per_context else math.nan,
        "per_context": per_context,
    }


def token_gaps(part_paths: Sequence[Path], baseline: str = BASELINE) -> pd.Series | None:
    """The per-token gap KL(sae) − KL(baseline) of a run, indexed by (context, position), as
    ``stats.token_gap(frame).set_index(["context", "position"])["gap"]``; None when either is missing."""
    parts = _Parts(part_paths)
    gaps, contexts, positions = [], [], []
    for part, masks in parts.scan(["context", "position", "kl"]):
        if (joined := _part_gap(part, masks, baseline)) is not None:
            gaps.append(joined[0])
            contexts.append(part["context"][masks["sae"]][joined[1]])
            positions.append(part["position"][masks["sae"]][joined[1]])
    if not {"sae", baseline} <= set(parts.counts):
        return None
    index = pd.MultiIndex.from_arrays([np.concatenate(contexts), np.concatenate(positions)],
                                      names=["context", "position"])
    return pd.Series(np.concatenate(gaps), index=index, name="gap")


def measured_rows(part_paths: Sequence[Path], columns: Sequence[str]) -> Iterator[tuple[dict[str, np.ndarray],
                                                                                     dict[str, np.ndarray]]]:
    """Each part's `columns` (numpy arrays; with ``intervention`` as codes and ``draw``) and, per intervention, the
    mask of its measured rows (draw < 0), a part at a time in batch order (klgap/report/size_bins.py reads them)."""
    yield from _Parts(part_paths).scan(columns)


def context_sums(part_paths: Sequence[Path]) -> Callable[[str, str], pd.DataFrame]:
    """``per_context(intervention, column)`` of a run's parts: the per-context sums and counts of KL and ΔCE its
    report's ratios are built from (klgap/report/compounding.py pairs a joint run's with its single-site runs')."""
    parts = _Parts(part_paths)
    sums = _ContextSums()
    for index, (part, masks) in enumerate(parts.scan(["context", *_ContextSums.COLUMNS])):
        sums.add(index, part, masks)
    sums.redo_as_whole_run(parts)
    return sums.per_context
