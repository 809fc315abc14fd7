"""Line charts as inline SVG text, for the HTML report: no plotting library, no network.

:func:`line_chart` draws lines of ``(x, y)`` points in a plot area with axes, nice ticks, a grid
and one hoverable dot per point (its ``<title>`` is the tooltip). A ``nan`` y leaves a gap.
Every text drawn is escaped.

Only the standard library is imported here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

__all__ = ["PALETTE", "Line", "line_chart", "nice_ticks"]

#: Line colors (Tableau 10): distinguishable, and readable on white.
PALETTE = (
    "#4e79a7",
    "#f28e2b",
    "#59a14f",
    "#e15759",
    "#76b7b2",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#bab0ac",
)
# Space around the plot area, in pixels: left for the y tick labels, bottom for the x ones.
_LEFT, _RIGHT, _TOP, _BOTTOM = 46, 14, 30, 40


@dataclass(frozen=True)
class Line:
    """One line of a chart.

    Attributes:
        label: its name (the legend is drawn by the page, not in the chart).
        points: ``(x, y)`` pairs sorted by x; a ``nan`` y is a gap in the line.
        color: a CSS color.
        dashed: draw it dashed (e.g. an earlier run).
        bold: draw it thicker (e.g. the ``all`` line).
        hints: the tooltip of each point (same length as ``points``), or empty for none.
    """

    label: str
    points: Sequence[tuple[float, float]]
    color: str
    dashed: bool = False
    bold: bool = False
    hints: Sequence[str] = ()


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values that cover ``[low, high]`` with about ``count`` intervals.

    The step is 1, 2, 2.5 or 5 times a power of ten; ticks are its multiples within the range.

    Args:
        low: the smallest value to cover.
        high: the largest (equal to ``low``: the range ``[low, low + 1]``).
        count: about how many intervals.

    Returns:
        The ticks, increasing.

    Examples:
        >>> nice_ticks(0, 1)
        [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
        >>> nice_ticks(0, 1000)
        [0.0, 200.0, 400.0, 600.0, 800.0, 1000.0]
        >>> nice_ticks(50, 300)
        [50.0, 100.0, 150.0, 200.0, 250.0, 300.0]
    """
    if not high > low:
        high = low + 1
    raw = (high - low) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    first, last = math.ceil(low / step - 1e-9), math.floor(high / step + 1e-9)
    return [round(k * step, 12) + 0.0 for k in range(first, last + 1)]


def _label(value: float) -> str:
    text = f"{value:.6g}"
    return text if "e" in text or abs(value) < 10_000 else f"{value:,.0f}"


def _segments(line: Line) -> list[list[int]]:
    """The runs of consecutive points with a defined y, as lists of point positions."""
    segments: list[list[int]] = [[]]
    for position, (_, y) in enumerate(line.points):
        if math.isnan(y):
            if segments[-1]:
                segments.append([])
        else:
            segments[-1].append(position)
    return [segment for segment in segments if segment]


def line_chart(
    lines: Sequence[Line],
    *,
    title: str,
    x_label: str,
    y_range: tuple[float, float] | None = None,
    width: int = 380,
    height: int = 250,
) -> str:
    """An SVG line chart, as text to put in an HTML page.

    Args:
        lines: what to draw; the x range covers every point of every line.
        title: drawn above the plot area (and the SVG's accessible name).
        x_label: drawn under the x axis.
        y_range: the y axis range; None fits it to the defined y values (from 0 when they are
            all positive).
        width: in pixels.
        height: in pixels.

    Returns:
        ``<svg ...>...</svg>`` for an HTML page (no XML namespace: the HTML parser gives it):
        a ``<polyline>`` per stretch of defined points of each line (class ``line``,
        ``data-label`` the line's label) and a ``<circle>`` per defined point.

    Examples:
        >>> svg = line_chart([Line("all", [(0, 0.5), (10, 1.0)], "#000")], title="bit-match",
        ...                  x_label="step", y_range=(0, 1))
        >>> svg.startswith("<svg") and svg.count("<polyline") == 1 and svg.count("<circle") == 2
        True
    """
    xs = [x for line in lines for x, _ in line.points]
    ys = [y for line in lines for _, y in line.points if not math.isnan(y)]
    x_low, x_high = (min(xs), max(xs)) if xs else (0.0, 1.0)
    if x_high == x_low:
        x_low, x_high = x_low - 1, x_high + 1
    if y_range is not None:
        y_low, y_high = y_range
    else:
        y_low = min([0.0, *ys]) if ys else 0.0
        y_high = max(ys) if ys else 1.0
        y_high = y_high if y_high > y_low else y_low + 1
        ticks = nice_ticks(y_low, y_high, 4)
        if ticks[-1] < y_high and len(ticks) > 1:  # end the axis on a tick above the data
            y_high = ticks[-1] + (ticks[1] - ticks[0])
    x_ticks = nice_ticks(x_low, x_high, 5)
    y_ticks = nice_ticks(y_low, y_high, 4)
    plot_w, plot_h = width - _LEFT - _RIGHT, height - _TOP - _BOTTOM

    def px(x: float) -> float:
        return _LEFT + (x - x_low) / (x_high - x_low) * plot_w

    def py(y: float) -> float:
        return _TOP + (y_high - y) / (y_high - y_low) * plot_h

    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        f'<text class="chart-title" x="{_LEFT}" y="{_TOP - 12}">{escape(title)}</text>',
    ]
    for tick in y_ticks:
        y = py(tick)
        parts.append(
            f'<line class="grid" x1="{_LEFT}" x2="{_LEFT + plot_w}" y1="{y:.1f}" y2="{y:.1f}"/>'
        )
        parts.append(
            f'<text class="tick" x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"{escape(_label(tick))}</text>"
        )
    for tick in x_ticks:
        x = px(tick)
        parts.append(
            f'<line class="axis" x1="{x:.1f}" x2="{x:.1f}" y1="{_TOP + plot_h}" '
            f'y2="{_TOP + plot_h + 4}"/>'
        )
        parts.append(
            f'<text class="tick" x="{x:.1f}" y="{_TOP + plot_h + 17}" text-anchor="middle">'
            f"{escape(_label(tick))}</text>"
        )
    parts.append(
        f'<line class="axis" x1="{_LEFT}" x2="{_LEFT + plot_w}" y1="{_TOP + plot_h}" '
        f'y2="{_TOP + plot_h}"/>'
    )
    parts.append(
        f'<text class="axis-label" x="{_LEFT + plot_w / 2:.1f}" y="{height - 6}" '
        f'text-anchor="middle">{escape(x_label)}</text>'
    )
    for line in lines:
        stroke = f'stroke="{escape(line.color)}" stroke-width="{2.6 if line.bold else 1.6}"'
        dash = ' stroke-dasharray="5 4"' if line.dashed else ""
        label = escape(line.label)
        for segment in _segments(line):
            points = " ".join(
                f"{px(line.points[i][0]):.1f},{py(line.points[i][1]):.1f}" for i in segment
            )
            parts.append(
                f'<polyline class="line" data-label="{label}" fill="none" {stroke}{dash} '
                f'points="{points}"/>'
            )
        for position, (x, y) in enumerate(line.points):
            if math.isnan(y):
                continue
            hint = line.hints[position] if line.hints else f"{line.label}: {y:.3f}"
            parts.append(
                f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="{3.2 if line.bold else 2.6}" '
                f'fill="{escape(line.color)}"><title>{escape(hint)}</title></circle>'
            )
    parts.append("</svg>")
    return "".join(parts)
