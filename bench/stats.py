"""Percentiles, shared by the load client and the benchmark's report."""

from __future__ import annotations


def percentiles(values: list[float]) -> dict[str, float | None]:
    """Return p50/p90/p99/max (nearest rank) and the count of ``values``."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None, "n": 0}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, int(round(q * len(ordered))) - 1))]

    return {
        "p50": rank(0.50),
        "p90": rank(0.90),
        "p99": rank(0.99),
        "max": ordered[-1],
        "n": len(ordered),
    }
