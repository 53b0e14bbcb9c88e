"""Small SVG line charts inlined in the HTML reports (no plotting library; inline SVG needs no xmlns)."""

from __future__ import annotations

from dataclasses import dataclass
from html import escape

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


@dataclass
class Series:
    """One line: its label and its (x, y) points."""

    label: str
    points: list[tuple[float, float]]


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        return [low]
    step = (high - low) / (count - 1)
    return [low + i * step for i in range(count)]


def line_chart(series: list[Series], *, title: str, x_label: str, y_label: str, width: int = 520,
               height: int = 300, y_range: tuple[float, float] | None = None, log_x: bool = False) -> str:
    """An SVG line chart with axes, ticks, markers and a legend; returns the <svg> element as text."""
    import math

    points = [p for s in series for p in s.points]
    if not points:
        return f'<svg width="{width}" height="40"><text x="4" y="24">{escape(title)}: no data</text></svg>'
    fx = (lambda v: math.log10(v)) if log_x else (lambda v: v)
    xs = [fx(x) for x, _ in points]
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x1 = x0 + 1
    y0, y1 = y_range or (min(y for _, y in points), max(y for _, y in points))
    if y1 == y0:
        y1 = y0 + 1
    left, right, top, bottom = 56, 16, 30, 44
    plot_w, plot_h = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (fx(x) - x0) / (x1 - x0) * plot_w

    def sy(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * plot_h

    out = [f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           'font-family="sans-serif" font-size="11" role="img">',
           f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13" font-weight="bold">{escape(title)}</text>',
           f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fafafa" stroke="#999"/>']
    for y in _ticks(y0, y1):
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#e3e3e3"/>')
        out.append(f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.2f}</text>')
    x_values = sorted({x for x, _ in points})
    shown = x_values if len(x_values) <= 10 else x_values[:: max(1, len(x_values) // 8)]
    for x in shown:
        out.append(f'<text x="{sx(x):.1f}" y="{top + plot_h + 16}" text-anchor="middle">{x:g}</text>')
    out.append(f'<text x="{left + plot_w / 2}" y="{height - 6}" text-anchor="middle">{escape(x_label)}</text>')
    out.append(f'<text x="14" y="{top + plot_h / 2}" text-anchor="middle" transform="rotate(-90 14 {top + plot_h / 2})">{escape(y_label)}</text>')
    for i, s in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s.points)
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
        out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}"><title>{escape(s.label)}: {x:g}, {y:.3f}</title></circle>'
                for x, y in s.points]
        out.append(f'<rect x="{left + 10}" y="{top + 8 + 16 * i}" width="12" height="3" fill="{colour}"/>')
        out.append(f'<text x="{left + 28}" y="{top + 13 + 16 * i}">{escape(s.label)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def sparsity_chart(sparsity: dict) -> str:
    """The path's validation accuracy against its local size, the chosen point marked (SVG)."""
    curve = sparsity.get("curve", [])
    chosen = sparsity.get("chosen") or {}
    series = [Series("validation top-1 along the path", [(p["local_size"], p["val_top1"]) for p in curve])]
    if chosen:
        series.append(Series(f"chosen ({chosen['local_size']:.1f} weights per class)",
                             [(chosen["local_size"], chosen["val_top1"])]))
    return line_chart(series, title="accuracy vs explanation size (elastic-net path)",
                      x_label="weights > 0.1 per class (mean)", y_label="validation top-1", y_range=(0.0, 1.0))
