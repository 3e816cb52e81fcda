"""The KL ratio at matched error size: KL(sae)/KL(baseline) within bins of the token's relative error ε/‖x‖.

A ratio of mean KLs depends on the error's size (KL grows faster than quadratically, then saturates; METHOD.md §9),
so two SAEs of different fidelity are compared fairly only at the same ε/‖x‖. Every measured token falls in one bin
of :data:`EDGES` by the SAE's own ε/‖x‖ (fixed edges, so bins mean the same in every report); within a bin the SAE's
and each baseline's KL are summed over the same tokens, per context, and their ratio gets a bootstrap interval that
resamples whole contexts (klgap.report.stats.ratio_of_means_ci), as the run's headline ratio does (no interval for a
bin whose tokens all come from one context).

All-token runs only (in single-token runs a row's KL is measured after the patched token, not at it). Read a part
at a time from the run's parts (klgap.report.aggregate.measured_rows): memory holds per-context sums only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from klgap.report import stats
from klgap.report.aggregate import measured_rows, paired_rows
from klgap.report.schema import RatioCI, SizeBin, SizeBins

#: bin edges of ε/‖x‖ (the last bin is open: ε ≥ ‖x‖, an error as large as the activation)
EDGES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, math.inf)
COLUMNS = ["context", "position", "kl", "eps", "x_norm"]
#: a bin's ratio gets an interval only when its tokens come from at least this many contexts
MIN_CONTEXTS = 2


def bin_of(eps: np.ndarray, x_norm: np.ndarray, edges: Sequence[float] = EDGES) -> np.ndarray:
    """The bin of each token's ε/‖x‖ (``[n]`` int: bin i holds edges[i] ≤ ε/‖x‖ < edges[i + 1]); −1 where
    ‖x‖ = 0 or either value is not finite."""
    eps, x_norm = np.asarray(eps, dtype=np.float64), np.asarray(x_norm, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(x_norm > 0, eps / x_norm, np.nan)
    index = np.searchsorted(np.asarray(edges, dtype=np.float64), rel, side="right") - 1
    return np.where(np.isfinite(rel) & (index >= 0) & (index < len(edges) - 1), index, -1)


def _context_sums(kl: np.ndarray, contexts: np.ndarray) -> pd.DataFrame:
    """Per-context sum and count of the finite `kl` (:func:`klgap.report.stats.per_context` of these rows)."""
    values = pd.Series(kl, copy=False).where(np.isfinite(kl))
    grouped = values.groupby(contexts)
    return pd.DataFrame({"sum": grouped.sum(min_count=1).fillna(0.0), "n": grouped.count()})


def size_bins(part_paths: Sequence[Path], baselines: Sequence[str], seed: int = 0,
              edges: Sequence[float] = EDGES) -> SizeBins | None:
    """The ratio per bin of the SAE's ε/‖x‖ for each of `baselines` the run measured (in order); None without sae
    rows or without any of them. A bin appears when it holds tokens."""
    pieces: dict[tuple[int, str], list[pd.DataFrame]] = {}  # (bin, intervention) -> per-part per-context sums
    tokens: dict[int, int] = {}
    found: list[str] = []
    for part, masks in measured_rows(part_paths, COLUMNS):
        if "sae" not in masks:
            continue
        sae = masks["sae"]
        bins = bin_of(part["eps"][sae], part["x_norm"][sae], edges)
        contexts, kl = part["context"][sae], part["kl"][sae]
        present = [name for name in baselines if name in masks]
        found += [name for name in present if name not in found]
        for b in np.unique(bins[bins >= 0]):
            tokens[int(b)] = tokens.get(int(b), 0) + int((bins == b).sum())
            rows = bins == b
            pieces.setdefault((int(b), "sae"), []).append(_context_sums(kl[rows], contexts[rows]))
        for name in present:
            take, other = paired_rows(part, sae, masks[name])
            paired_bins, paired_contexts = bins[take], contexts[take]
            base_kl = part["kl"][masks[name]][other]
            for b in np.unique(paired_bins[paired_bins >= 0]):
                rows = paired_bins == b
                pieces.setdefault((int(b), name), []).append(_context_sums(base_kl[rows], paired_contexts[rows]))
    if not tokens or not found:
        return None
    out = []
    for b in sorted(tokens):
        sae_sums = pd.concat(pieces[(b, "sae")]).sort_index(kind="stable")
        ratios = {}
        for name in found:
            if (b, name) in pieces:
                ratio = stats.ratio_of_means_ci(sae_sums, pd.concat(pieces[(b, name)]).sort_index(kind="stable"),
                                                seed=seed)
                if ratio["n_contexts"] < MIN_CONTEXTS:  # resampling one context gives a zero-width interval
                    ratio.update(ci_low=math.nan, ci_high=math.nan)
                ratios[name] = RatioCI(**{k: (v if not isinstance(v, float) or math.isfinite(v) else None)
                                          for k, v in ratio.items()})
        kl_sae = float(sae_sums["sum"].sum() / sae_sums["n"].sum()) if sae_sums["n"].sum() else math.nan
        out.append(SizeBin(low=edges[b], high=edges[b + 1] if math.isfinite(edges[b + 1]) else None,
                           n_tokens=tokens[b], n_contexts=int(len(sae_sums)),
                           kl_sae=kl_sae if math.isfinite(kl_sae) else None, ratios=ratios))
    return SizeBins(baselines=found, bins=out)


__all__ = ["EDGES", "MIN_CONTEXTS", "bin_of", "size_bins"]
