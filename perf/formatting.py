"""How the perf reports write numbers: SI prefixes, counts per second, GiB, percentages, step ranges.

A module of its own because reading (warnings name step ranges), aggregation, plots (legend and
title labels) and rendering all print numbers, and none of them may import another in a circle.
"""

from __future__ import annotations


def ranges(values: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    parts, values = [], sorted(values)
    start = prev = None
    for v in values + [None]:
        if v is not None and prev is not None and v == prev + 1:
            prev = v
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = v
    return ", ".join(parts)


def si_parts(value: float | None, unit: str, digits: int = 3) -> tuple[str, str]:
    """1.234e12, 'FLOP/s' -> ('1.23', 'TFLOP/s')."""
    if value is None:
        return "n/a", unit
    for factor, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.{digits}g}", f"{prefix}{unit}"
    return f"{value:.{digits}g}", unit


def si(value: float | None, unit: str, digits: int = 3) -> str:
    """1.234e12, 'FLOP/s' -> '1.23 TFLOP/s'."""
    return " ".join(si_parts(value, unit, digits))


def rate(value: float | None) -> str:
    """Counts per second: 13312.4 -> '13,312'; 21.48 -> '21.5'."""
    if value is None:
        return "n/a"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def fmt(value: float | None, spec: str = ".4g") -> str:
    return "n/a" if value is None else format(value, spec)


def gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 2**30:.3g} GiB"


def pct(value: float | None) -> str:
    """A fraction as a percentage: 0.8123 -> '81.2'."""
    return "n/a" if value is None else f"{100 * value:.1f}"
