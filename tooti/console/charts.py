"""Charts drawn on the server as inline SVG: no script, no library, nothing fetched.

:func:`stacked_bars` draws one bar per day, stacked by series (a model, a node), with a
legend, the day labels and the scale. Colours come from the stylesheet's classes
``c0``…``c7`` (the CSP allows no ``style`` attribute); more than :data:`MAX_SERIES`
series keep the largest and pool the rest as "other". Every label is escaped: a model
name is a node operator's text.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta

from markupsafe import Markup, escape

MAX_SERIES = 8
WIDTH, HEIGHT = 720, 220
LEFT, BOTTOM, TOP = 58, 22, 10


def _pooled(series: Mapping[str, Sequence[int]]) -> list[tuple[str, list[int]]]:
    """The series, largest total first, at most :data:`MAX_SERIES` (the rest pooled)."""
    ranked = sorted(series.items(), key=lambda item: (-sum(item[1]), item[0]))
    kept = [(name, list(values)) for name, values in ranked[:MAX_SERIES - 1]]
    rest = ranked[MAX_SERIES - 1:]
    if len(rest) == 1:
        kept.append((rest[0][0], list(rest[0][1])))
    elif rest:
        kept.append(("other", [sum(v) for v in zip(*(values for _, values in rest),
                                                    strict=True)]))
    return kept


def stacked_bars(days: Sequence[str], series: Mapping[str, Sequence[int]], *,
                 label: str, fmt: Callable[[int], str] = str) -> Markup:
    """One bar per day of ``days`` stacked by ``series`` (name → a value per day);
    ``label`` names the chart for screen readers, ``fmt`` writes the scale's values."""
    pooled = _pooled(series)
    totals = [sum(values[i] for _, values in pooled) for i in range(len(days))]
    peak = max(totals, default=0)
    plot_w, plot_h = WIDTH - LEFT - 8, HEIGHT - BOTTOM - TOP
    parts = [f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
             f'aria-label="{escape(label)}" xmlns="http://www.w3.org/2000/svg">']
    parts.append(f'<line class="axis" x1="{LEFT}" y1="{TOP + plot_h}" x2="{WIDTH - 8}" '
                 f'y2="{TOP + plot_h}" stroke="#dde1e8"/>')
    parts.append(f'<text x="{LEFT - 6}" y="{TOP + 10}" text-anchor="end">'
                 f'{escape(fmt(peak))}</text>')
    parts.append(f'<text x="{LEFT - 6}" y="{TOP + plot_h}" text-anchor="end">0</text>')
    if days:
        slot = plot_w / len(days)
        bar = max(1.0, slot * 0.7)
        step = max(1, len(days) // 8)
        for i, day in enumerate(days):
            x = LEFT + i * slot + (slot - bar) / 2
            y = float(TOP + plot_h)
            for colour, (name, values) in enumerate(pooled):
                value = values[i]
                if value <= 0 or peak <= 0:
                    continue
                h = value / peak * plot_h
                y -= h
                parts.append(f'<rect class="c{colour}" x="{x:.1f}" y="{y:.1f}" '
                             f'width="{bar:.1f}" height="{h:.1f}"><title>'
                             f'{escape(day)} {escape(name)}: {escape(fmt(value))}'
                             f'</title></rect>')
            if i % step == 0:
                parts.append(f'<text x="{x + bar / 2:.1f}" y="{HEIGHT - 6}" '
                             f'text-anchor="middle">{escape(day[5:])}</text>')
    if peak <= 0:
        parts.append(f'<text x="{LEFT + plot_w / 2:.0f}" y="{TOP + plot_h / 2:.0f}" '
                     'text-anchor="middle">nothing yet</text>')
    parts.append("</svg>")
    legend = "".join(f'<span><span class="swatch c{i}"></span>{escape(name)}</span>'
                     for i, (name, _) in enumerate(pooled))
    return Markup("".join(parts) + f'<div class="legend">{legend}</div>')


def by_day(rows: Sequence[tuple[str, str, int]], days: Sequence[str]
           ) -> dict[str, list[int]]:
    """``(day, series, value)`` rows → series name → a value per day of ``days``."""
    index = {day: i for i, day in enumerate(days)}
    out: dict[str, list[int]] = {}
    for day, name, value in rows:
        if day in index:
            out.setdefault(name, [0] * len(days))[index[day]] += value
    return out


def last_days(count: int, now: float) -> list[str]:
    """The ``count`` UTC days up to the one holding ``now``, oldest first
    (``YYYY-MM-DD``, as :mod:`tooti.accounts.reports` names days)."""
    today = datetime.fromtimestamp(now, UTC).date()
    return [(today - timedelta(days=back)).isoformat() for back in range(count - 1, -1, -1)]
