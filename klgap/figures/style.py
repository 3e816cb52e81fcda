"""The look of every figure: its canvas, title, legend, how it is saved, and its colours.

Figures are plain matplotlib ``Figure`` objects (no pyplot: drawing never touches the caller's backend or open
figures), saved as PNG atomically. Every title is centred on the figure and names what is drawn and for which run;
every legend sits beside the axes, never over the data.

Colours: a colour-blind-safe palette for unordered series, a sequential colormap for ordered ones.

Unordered series (interventions, models, runs compared side by side) take the Okabe–Ito palette, readable with
every common colour-vision deficiency: the SAE vermillion, the baseline (epsilon_random) blue, the others in turn.
Ordered series (the cosines of a robustness curve, the layers of a study) take evenly spaced colours of the
sequential `viridis` map, in their order, so eleven cosines get eleven colours that read as a progression.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

from klgap.job.folder import atomic_write_bytes

from klgap.report.robustness import parse_point

SAE, BASELINE_COLOR = "#D55E00", "#0072B2"  # Okabe–Ito vermillion and blue
#: Okabe–Ito, the SAE's and the baseline's colours left out; yellow last (weak on white)
OKABE_ITO = ("#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
SEQUENTIAL = "viridis"


def sequential(n: int) -> list[str]:
    """`n` colours in order along the sequential map (its palest end left out, which fades on white)."""
    cmap = colormaps[SEQUENTIAL]
    if n <= 1:
        return [to_hex(cmap(0.35))] * n
    return [to_hex(cmap(0.9 * i / (n - 1))) for i in range(n)]


def unordered(n: int) -> list[str]:
    """`n` colours of the colour-blind-safe palette (repeating only past its six)."""
    return [OKABE_ITO[i % len(OKABE_ITO)] for i in range(n)]


def colors_for(names: Iterable[str], sae: str = "sae", baseline: str = "epsilon_random") -> dict[str, str]:
    """A colour per intervention: the SAE and the baseline fixed; curve points (cosine_matched) along the
    sequential map by (norm_frac, cos); every other intervention from the colour-blind-safe palette."""
    names = list(dict.fromkeys(names))
    points = sorted((parse_point(n), n) for n in names if parse_point(n) is not None)
    out = {name: color for (_, name), color in zip(points, sequential(len(points)), strict=True)}
    others = [n for n in names if n not in out and n not in (sae, baseline)]
    out.update(zip(others, unordered(len(others)), strict=True))
    out.update({sae: SAE, baseline: BASELINE_COLOR})
    return {name: out[name] for name in names}


def series_colors(labels: Sequence[str], ordered: bool) -> dict[str, str]:
    """Colours for labelled series in the given order: sequential when they are ordered (layers), else the palette."""
    colors = sequential(len(labels)) if ordered else unordered(len(labels))
    return dict(zip(labels, colors, strict=True))


DPI = 120


def new_figure(figsize: tuple[float, float]) -> Figure:
    """A figure of its own (not pyplot's), laid out so titles, labels and legends are never clipped."""
    return Figure(figsize=figsize, layout="constrained")


def save(fig: Figure, path: str | Path | None) -> Path | Figure:
    """Render `fig` to PNG bytes and write them atomically to `path`; with no path, hand the figure back."""
    if path is None:
        return fig
    path = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def title(fig: Figure, what: str, label: str) -> None:
    """What is drawn, over the run it is drawn for (model · site Lk · ...), centred on the figure."""
    fig.suptitle(f"{what}\n{label}" if label else what, fontsize=10)


def legend_beside(ax: Any, **kwargs: Any) -> None:
    """The axes' legend to their right, outside the data area (constrained layout makes room for it)."""
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, **kwargs)
