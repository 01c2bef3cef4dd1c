"""Rows of per-round values -> ONE table of medians, ratios against references, targets.

A ``Row`` holds one contestant's values of one metric in one scenario, a value per round.
Its ratios are median / median of the same scenario and metric for the reference contestant
named in ``refs`` (column -> contestant). A target applies to one column: the median itself
(``median``) or a ratio (``vs direct``, ``vs minimal``, ``vs paired``).
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field

RATIO_COLUMNS = ("vs direct", "vs minimal", "vs paired")


@dataclass
class Row:
    scenario: str
    contestant: str
    metric: str
    values: list[float]
    refs: dict[str, str] = field(default_factory=dict)  # "vs direct" -> "direct", ...
    target: tuple[str, str, float] | None = None  # (column, ">=" | "<=", threshold)
    notes: list[str] = field(default_factory=list)

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    ax = abs(x)
    if ax >= 1000:
        return f"{x:,.0f}"
    if ax >= 100:
        return f"{x:.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    if ax >= 1:
        return f"{x:.2f}"
    if 0 < ax < 0.001:  # a tiny ratio (a link's bytes vs base64's) would show as 0.000
        return f"{x:.1e}"
    return f"{x:.3f}"


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


def evaluate(rows: list[Row]) -> list[dict]:
    """Each row as the table shows it: medians, spread, ratios, target and whether it is met."""
    index = {(r.scenario, r.metric, r.contestant): r for r in rows}
    out = []
    for r in rows:
        cells = {"scenario": r.scenario, "contestant": r.contestant, "metric": r.metric, "median": r.median,
                 "spread": (min(r.values), max(r.values)) if r.values else None}
        for column in RATIO_COLUMNS:
            ref = index.get((r.scenario, r.metric, r.refs.get(column, "")))
            cells[column] = _ratio(r.median, ref.median) if ref is not None else None
        cells["target"], cells["met"] = "", ""
        if r.target is not None:
            column, op, threshold = r.target
            value = cells[column]
            cells["target"] = f"{'' if column == 'median' else column.removeprefix('vs ') + ' '}{op} {threshold:g}"
            if value is None:
                cells["met"] = "n/a"
            else:
                cells["met"] = "yes" if (value >= threshold if op == ">=" else value <= threshold) else "NO"
        cells["notes"] = "; ".join(dict.fromkeys(r.notes))
        out.append(cells)
    return out


def table(rows: list[Row]) -> str:
    header = ["scenario", "contestant", "metric", "median", "min..max", *RATIO_COLUMNS, "target", "met", "notes"]
    lines = []
    for c in evaluate(rows):
        spread = c["spread"]
        lines.append([
            c["scenario"], c["contestant"], c["metric"], _fmt(c["median"]),
            f"{_fmt(spread[0])}..{_fmt(spread[1])}" if spread else "-",
            *(_fmt(c[col]) for col in RATIO_COLUMNS), c["target"], c["met"], c["notes"],
        ])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    numeric = {3, 4, 5, 6, 7}

    def render(cells: list[str]) -> str:
        return " | ".join(str(x).rjust(w) if i in numeric else str(x).ljust(w)
                          for i, (x, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "-+-".join("-" * w for w in widths)
    body, previous = [], None
    for cells in lines:
        if previous is not None and cells[0] != previous:
            body.append(rule)
        previous = cells[0]
        body.append(render(cells))
    return "\n".join([render(header), rule, *body])
