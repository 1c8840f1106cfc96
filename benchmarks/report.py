"""Result rows, budgets and the printed tables.

Every row compares a figure with a baseline measured in the same run, so the
ratio means something on a noisy machine where absolute times do not.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

Unit = Literal["s", "B", "req/s", "x"]
Bound = Literal["value", "ratio", "gain"]


@dataclass(frozen=True)
class Budget:
    """An upper (or, with ``at_least``, lower) limit on the value, the ratio, or the gain."""

    bound: Bound
    limit: float
    at_least: bool = False

    def holds(self, row: Row) -> bool:
        figure = {"value": row.measured, "ratio": row.ratio, "gain": row.gain}[self.bound]
        if figure is None:
            raise ValueError(f"row {row.name!r} has no baseline for a {self.bound} budget")
        return figure >= self.limit if self.at_least else figure <= self.limit

    def describe(self, unit: Unit) -> str:
        sign = ">=" if self.at_least else "<="
        if self.bound == "ratio":
            return f"ratio {sign} {self.limit:g}"
        limit = fmt(self.limit, unit)
        return f"{sign} {limit}" if self.bound == "value" else f"gain {sign} {limit}"


@dataclass(frozen=True)
class Row:
    """One figure: what was measured, against what, and the budget it must keep."""

    name: str
    measured: float
    baseline: float | None
    unit: Unit
    budget: Budget | None = None
    paired_ratio: float | None = None  # median of per-pair ratios, when runs come in pairs

    @property
    def ratio(self) -> float | None:
        if self.paired_ratio is not None:
            return self.paired_ratio
        if self.baseline is None or self.baseline == 0:
            return None
        return self.measured / self.baseline

    @property
    def gain(self) -> float | None:
        return None if self.baseline is None else self.measured - self.baseline

    @property
    def verdict(self) -> str:
        if self.budget is None:
            return "info"
        return "PASS" if self.budget.holds(self) else "FAIL"


@dataclass
class Table:
    """The rows of one benchmark, with notes on how they were measured."""

    title: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def render(self) -> str:
        header = ("name", "measured", "baseline", "ratio", "budget", "result")
        cells = [header] + [
            (row.name, fmt(row.measured, row.unit),
             "-" if row.baseline is None else fmt(row.baseline, row.unit),
             "-" if row.ratio is None else _ratio(row.ratio),
             "-" if row.budget is None else row.budget.describe(row.unit),
             row.verdict)
            for row in self.rows
        ]
        widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
        lines = [f"== {self.title} =="]
        for n, line in enumerate(cells):
            lines.append("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
            if n == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines.extend(f"  {note}" for note in self.notes)
        return "\n".join(lines)


def fmt(value: float, unit: Unit) -> str:
    """A figure with a readable unit: seconds scaled to ns..s, bytes to B..MiB."""
    if unit == "s":
        for scale, name in ((1.0, "s"), (1e-3, "ms"), (1e-6, "us")):
            if abs(value) >= scale:
                return f"{value / scale:.3g} {name}"
        return f"{value / 1e-9:.3g} ns"
    if unit == "B":
        for scale, name in ((2.0**20, "MiB"), (2.0**10, "KiB")):
            if abs(value) >= scale:
                return f"{value / scale:.3g} {name}"
        return f"{value:.0f} B"
    if unit == "req/s":
        return f"{value:,.0f} req/s"
    return f"{value:.3g}"


def _ratio(value: float) -> str:
    """Three decimals where a budget of 0.99 or 1.5 must be told apart, else three digits."""
    return f"{value:.3f}" if 0.01 <= value < 100 else f"{value:.3g}"


def median(values: Iterable[float]) -> float:
    """The median, refusing an empty sample instead of inventing a figure."""
    sample = list(values)
    if not sample:
        raise ValueError("no measurements to take a median of")
    return statistics.median(sample)
