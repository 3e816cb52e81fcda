"""What a reader must be able to tell apart and see whole in every figure (issue 35), checked on the Figure
objects klgap draws: no two series share their colour (within CIELAB ΔE < MIN_DELTA_E) and their style (line
style, marker, hatch); at most one series is near-black; every marker (the SAE's star included) lies inside
its axes, not cut at an edge; no axes leaves most of its height empty above or below what it draws."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex, to_rgb
from matplotlib.container import BarContainer, ErrorbarContainer
from matplotlib.lines import Line2D
from matplotlib.patches import StepPatch

MIN_DELTA_E = 10.0  # CIELAB ΔE76 below which two colours read as one
NEAR_BLACK_L = 25.0  # CIELAB lightness below which a colour reads as black
MAX_EMPTY = 0.3  # the most of an axes' height left empty above or below everything drawn in it


def lab(color) -> np.ndarray:
    """CIELAB (D65) of a matplotlib colour."""
    rgb = np.array(to_rgb(color))
    rgb = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]) @ rgb
    xyz = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def delta_e(a, b) -> float:
    return float(np.linalg.norm(lab(a) - lab(b)))


@dataclass(frozen=True)
class Series:
    label: str
    color: str
    linestyle: str
    marker: str
    hatch: str


def _linestyle(line: Line2D) -> str:
    style = line.get_linestyle()
    return {"solid": "-", "dashed": "--", "dotted": ":", "dashdot": "-."}.get(style, style)


def series_of(ax) -> list[Series]:
    """Every labelled series of an axes: lines, bars (a container each), stairs and error-bar markers."""
    out = []
    for line in ax.get_lines():
        if not line.get_label().startswith("_") and len(line.get_xdata()):
            marker = line.get_marker() if line.get_marker() not in (None, "None", "", " ") else ""
            out.append(Series(line.get_label(), to_hex(line.get_color()), _linestyle(line), str(marker), ""))
    for container in ax.containers:
        label = container.get_label() or ""
        if label.startswith("_"):
            continue
        if isinstance(container, BarContainer) and container.patches:
            patch = container.patches[0]
            out.append(Series(label, to_hex(patch.get_facecolor()), "bar", "", patch.get_hatch() or ""))
        elif isinstance(container, ErrorbarContainer):
            line = container.lines[0]
            out.append(Series(label, to_hex(line.get_color()), "none", str(line.get_marker()), ""))
    for patch in ax.patches:
        if isinstance(patch, StepPatch) and not patch.get_label().startswith("_"):
            color = patch.get_facecolor() if patch.get_fill() else patch.get_edgecolor()
            style = "filled" if patch.get_fill() else str(patch.get_linestyle())
            out.append(Series(patch.get_label(), to_hex(color), style, "", ""))
    return out


def assert_distinct_styles(fig) -> None:
    """No two series of an axes share their style and a colour within MIN_DELTA_E; at most one is near-black."""
    for ax in fig.axes:
        found = {s.label: s for s in series_of(ax)}.values()
        for a, b in itertools.combinations(found, 2):
            same_style = (a.linestyle, a.marker, a.hatch) == (b.linestyle, b.marker, b.hatch)
            assert not (same_style and delta_e(a.color, b.color) < MIN_DELTA_E), (
                f"{a.label!r} and {b.label!r} look alike: {a.color} vs {b.color} (ΔE {delta_e(a.color, b.color):.1f}), "
                f"both {a.linestyle} {a.marker} {a.hatch}")
        dark = [s.label for s in found if lab(s.color)[0] < NEAR_BLACK_L]
        assert len(dark) <= 1, f"near-black series: {dark}"


def _drawn_points(ax, line: Line2D) -> np.ndarray:
    """The display coordinates of a line's finite points (non-positive values on a log axis are not drawn)."""
    x, y = (np.asarray(v, dtype=float) for v in line.get_data())
    keep = np.isfinite(x) & np.isfinite(y)
    if ax.get_xscale() == "log":
        keep &= x > 0
    if ax.get_yscale() == "log":
        keep &= y > 0
    return line.get_transform().transform(np.column_stack([x[keep], y[keep]])) if keep.any() else np.empty((0, 2))


def assert_nothing_clipped(fig) -> None:
    """Every marker lies whole inside its axes (its radius in pixels within the axes box); every line point within
    the axes' view limits."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    for ax in fig.axes:
        box = ax.get_window_extent(canvas.get_renderer())
        for line in ax.get_lines():
            if line.get_label().startswith("_child") and not len(line.get_xdata()):
                continue
            points = _drawn_points(ax, line)
            has_marker = line.get_marker() not in (None, "None", "", " ")
            radius = line.get_markersize() * fig.dpi / 72 / 2 if has_marker else 0.0
            marker = line.get_marker()
            rx = 0.0 if marker in ("|", 2, 3) else radius  # an error bar's cap: a line across, no height
            ry = 0.0 if marker in ("_", 0, 1) else radius
            for px, py in points:
                assert box.x0 - 1 <= px - rx and px + rx <= box.x1 + 1 and \
                    box.y0 - 1 <= py - ry and py + ry <= box.y1 + 1, (
                        f"{line.get_label()!r}: a point at ({px:.0f}, {py:.0f}) px (marker {marker!r}, radius "
                        f"{radius:.1f}) leaves the axes [{box.x0:.0f}, {box.x1:.0f}] x [{box.y0:.0f}, {box.y1:.0f}]")


def assert_no_empty_range(fig) -> None:
    """What an axes draws spans its height: at most MAX_EMPTY of it left empty below or above every line."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    for ax in fig.axes:
        lines = [line for line in ax.get_lines() if len(line.get_xdata())]
        points = [p for line in lines for p in _drawn_points(ax, line)]
        if len(points) < 2:
            continue
        to_axes = ax.transAxes.inverted()
        ys = [to_axes.transform(p)[1] for p in points]
        low, high = min(ys), max(ys)
        assert low <= MAX_EMPTY and high >= 1 - MAX_EMPTY, (
            f"axes {ax.get_title() or ax.get_ylabel()!r}: drawn from {low:.2f} to {high:.2f} of its height")
        assert math.isfinite(low) and math.isfinite(high)


def check_figure(fig) -> None:
    assert_distinct_styles(fig)
    assert_nothing_clipped(fig)
    assert_no_empty_range(fig)
