"""The look of every figure: its canvas, title, legend, how it is saved, and its colours.

Figures are plain matplotlib ``Figure`` objects (no pyplot: drawing never touches the caller's backend or open
figures), saved as PNG atomically. Every title is centred on the figure and names what is drawn and for which run;
every legend sits beside the axes, never over the data.

Colours and styles: a colour-blind-safe palette for unordered series, a sequential colormap for ordered ones,
and a line style / marker / hatch beside each colour so that no two series look alike however many there are.

Unordered series (interventions, models, runs compared side by side) take Okabe–Ito's colours, then a few of
Paul Tol's, readable with every common colour-vision deficiency: the SAE vermillion, the baseline
(epsilon_random) blue, the others in turn; none is near-black (CIELAB L* ≥ 30) and any two differ by ΔE ≥ 25.
Past the palette's eight the colours come round again with another line style, marker and bar hatch
(:func:`styles_for`). Ordered series (the cosines of a robustness curve, the layers of a study) take evenly
spaced colours of the sequential `viridis` map, in their order (its near-black and pale ends left out), so
eleven cosines get eleven colours that read as a progression; among the interventions they are dashed, set apart
from the palette's solid lines.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

from klgap.job.folder import atomic_write_bytes

from klgap.report.robustness import parse_point

SAE, BASELINE_COLOR = "#D55E00", "#0072B2"  # Okabe–Ito vermillion and blue
#: Okabe–Ito (the SAE's and the baseline's colours left out, and its black), then Paul Tol's wine and olive and a
#: mid grey; yellow last (weak on white). Any two of these and the SAE's and baseline's differ by CIELAB ΔE ≥ 25.
PALETTE = ("#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#882255", "#999933", "#777777", "#F0E442")
SEQUENTIAL = "viridis"
SEQUENTIAL_SPAN = (0.15, 0.9)  # viridis below 0.15 is near-black, above 0.9 fades on white
#: what tells series apart once the palette's colours come round again: the k-th round's line style, marker, hatch
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("", "o", "s", "^")
HATCHES = ("", "//", "..", "xx")


@dataclass(frozen=True)
class SeriesStyle:
    """How one series is drawn: its colour, and (lines) its line style and marker, (bars) its hatch."""

    color: str
    linestyle: str = "-"
    marker: str = ""
    hatch: str = ""

    def line(self) -> dict[str, str]:
        """Keyword arguments of Axes.plot / stairs (no marker when the style has none)."""
        return {"color": self.color, "linestyle": self.linestyle, **({"marker": self.marker} if self.marker else {})}

    def bar(self) -> dict[str, str]:
        """Keyword arguments of Axes.bar (the hatch drawn in a darker edge of the bar's colour)."""
        return {"color": self.color, **({"hatch": self.hatch, "edgecolor": "#00000059", "linewidth": 0} if self.hatch
                                        else {})}


def sequential(n: int) -> list[str]:
    """`n` colours in order along the sequential map (its near-black and palest ends left out)."""
    cmap = colormaps[SEQUENTIAL]
    low, high = SEQUENTIAL_SPAN
    if n <= 1:
        return [to_hex(cmap(0.35))] * n
    return [to_hex(cmap(low + (high - low) * i / (n - 1))) for i in range(n)]


def unordered(n: int) -> list[str]:
    """`n` colours of the colour-blind-safe palette (coming round again past its eight: see :func:`unordered_styles`)."""
    return [PALETTE[i % len(PALETTE)] for i in range(n)]


def unordered_styles(n: int) -> list[SeriesStyle]:
    """`n` distinct styles: the palette's colours, and each time they come round, the next line style, marker and
    hatch, so no two of the `n` share their colour and their style."""
    out = []
    for i, color in enumerate(unordered(n)):
        k = (i // len(PALETTE)) % len(LINESTYLES)
        out.append(SeriesStyle(color, LINESTYLES[k], MARKERS[k], HATCHES[k]))
    return out


def styles_for(names: Iterable[str], sae: str = "sae", baseline: str = "epsilon_random") -> dict[str, SeriesStyle]:
    """A style per intervention: the SAE and the baseline fixed (solid, their own colours); curve points
    (cosine_matched) along the sequential map by (norm_frac, cos), dashed (hatched bars); every other intervention
    from the colour-blind-safe palette (:func:`unordered_styles`)."""
    names = list(dict.fromkeys(names))
    points = sorted((parse_point(n), n) for n in names if parse_point(n) is not None)
    out = {name: SeriesStyle(color, "--", "", "/")
           for (_, name), color in zip(points, sequential(len(points)), strict=True)}
    others = [n for n in names if n not in out and n not in (sae, baseline)]
    out.update(zip(others, unordered_styles(len(others)), strict=True))
    out.update({sae: SeriesStyle(SAE), baseline: SeriesStyle(BASELINE_COLOR)})
    return {name: out[name] for name in names}


def colors_for(names: Iterable[str], sae: str = "sae", baseline: str = "epsilon_random") -> dict[str, str]:
    """The colour of each intervention's style (:func:`styles_for`)."""
    return {name: style.color for name, style in styles_for(names, sae, baseline).items()}


def series_styles(labels: Sequence[str], ordered: bool) -> dict[str, SeriesStyle]:
    """Styles for labelled series in the given order: sequential colours when they are ordered (layers), else
    the palette's (:func:`unordered_styles`)."""
    if ordered:
        return {label: SeriesStyle(color) for label, color in zip(labels, sequential(len(labels)), strict=True)}
    return dict(zip(labels, unordered_styles(len(labels)), strict=True))


def series_colors(labels: Sequence[str], ordered: bool) -> dict[str, str]:
    """The colour of each labelled series' style (:func:`series_styles`)."""
    return {label: style.color for label, style in series_styles(labels, ordered).items()}


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
