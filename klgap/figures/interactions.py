"""interactions.png: a joint run's interaction matrix (klgap/report/interactions.py), one panel per intervention:
on the diagonal (grey) each site's KL alone, off it the pairwise interaction term f(a+b) − f(a) − f(b), coloured on
one scale centred at 0 for every panel, an asterisk where the term's 95% context-bootstrap interval excludes 0."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from klgap.figures.style import new_figure, save, title
from klgap.report.interactions import Interactions


def _matrix(found: Interactions, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``[m m]`` terms (diagonal: order 1, off it: order 2; NaN when missing) and whether each interval excludes 0."""
    m = len(found.sites)
    values, sure = np.full((m, m), np.nan), np.zeros((m, m), dtype=bool)
    where = {site: i for i, site in enumerate(found.sites)}
    for term in found.terms:
        if term.order > 2:
            continue
        d = term.terms[name]
        cells = [where[s] for s in term.sites]
        i, j = (cells[0], cells[0]) if term.order == 1 else cells
        for a, b in {(i, j), (j, i)}:
            values[a, b] = math.nan if d.estimate is None else d.estimate
            sure[a, b] = d.ci_low is not None and d.ci_high is not None and (d.ci_low > 0 or d.ci_high < 0)
    return values, sure


def interaction_matrix(found: Interactions, label: str, path: str | Path | None) -> Path | Figure:
    """One panel per intervention (the joint run's order), the sites in forward order on both axes."""
    names = list(found.joint_kl_mean)
    m = len(found.sites)
    side = 1.0 + 0.9 * m
    fig = new_figure((side * len(names) + 1.2, side + 1.2))
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    matrices = [_matrix(found, name) for name in names]
    off = ~np.eye(m, dtype=bool)  # the colour scale is the interactions': the KL alone would wash them out
    finite = np.concatenate([v[off][np.isfinite(v[off])] for v, _ in matrices] + [np.zeros(1)])
    limit = float(np.abs(finite).max()) or 1.0
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="#dddddd")
    image = None
    for ax, name, (values, sure) in zip(axes, names, matrices, strict=True):
        image = ax.imshow(np.where(off, values, np.nan), cmap=cmap, vmin=-limit, vmax=limit)
        for a in range(m):
            for b in range(m):
                if np.isfinite(values[a, b]):
                    dark = a != b and abs(values[a, b]) > 0.6 * limit
                    ax.text(b, a, f"{values[a, b]:.3g}{'*' if sure[a, b] else ''}", ha="center", va="center",
                            fontsize=7, color="white" if dark else "black")
        ax.set_xticks(range(m), found.sites, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(m), found.sites if ax is axes[0] else [""] * m, fontsize=7)
        ax.set_title(name, fontsize=9)
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="pairwise interaction [nats/token]")
    title(fig, "Interaction matrix: each site's KL alone (diagonal, grey) and the pairwise interaction "
          "f(a+b) − f(a) − f(b) (off it); * its 95% interval excludes 0", label)
    return save(fig, path)


__all__ = ["interaction_matrix"]
