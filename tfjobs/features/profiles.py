"""Profiles of delivered values, for people and for drift checks: what the kinds build their ``profile()`` from.

A profile is streaming and mergeable like an adapt state (``update`` with batches,
``merge`` partial profiles, ``result`` a JSON-ready dict), but it describes a
delivery rather than configuring a layer, and its result has a shape the report
renders without knowing the kind:

- ``count``, ``missing``, ``missing_share``: every profile has them;
- ``histogram`` (``{"edges": [...], "counts": [...]}``) and ``quantiles`` (101 values,
  from the minimum to the maximum): a distribution of numbers, drawn as bars;
- ``top_values`` (``[{"value", "count", "share"}, ...]``, most frequent first): a
  distribution of values, drawn as bars;
- any other number (``mean``, ``std``, ``oov_share``, ``decode_failures``, ...): a row of
  the feature's table.

Distances between two results (a delivery's against the training data's), each in [0, 1]:

- :func:`jensen_shannon` for numbers (TFDV's drift comparator for numeric features):
  both distributions are cut into the training data's deciles, plus a bin below its
  minimum, one above its maximum and one for missing values, and the Jensen-Shannon
  divergence (base 2) of the bin shares is taken;
- :func:`l_infinity` for categories (TFDV's comparator for categorical features): the
  largest difference in any one value's share, missing values being a value.

NumPy only: the statistics step reads Parquet and never starts TensorFlow.
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np

from tfjobs.features.base import RunningMoments, Statistics

#: Quantiles kept in a numeric result: 0%, 1%, ..., 100%.
QUANTILES = np.linspace(0.0, 1.0, 101)
#: The equal-mass bins (of the training data) a numeric drift is measured on, as TFDV's 10 histogram buckets.
DRIFT_BINS = 10
HISTOGRAM_BINS = 20
#: Values kept with their counts in a categorical result (the rest are summed up as ``other``).
TOP_VALUES = 1000


class QuantileSketch:
    """Weighted points (value, weight), sorted, compressed to ``size`` points of equal weight when they outgrow it.

    Mergeable (merging concatenates and compresses); each compression moves a rank by
    at most ``1 / size`` of the total weight, so a million rows in 64k-row batches stay
    within about 1% of their true quantiles. Minimum and maximum are exact.
    """

    def __init__(self, size: int = 2000):
        self.size = size
        self.values = np.empty(0, np.float64)
        self.weights = np.empty(0, np.float64)
        self.min = np.inf
        self.max = -np.inf

    def update(self, values: np.ndarray) -> None:
        values = np.asarray(values, np.float64)
        if values.size:
            self._add(values, np.ones(values.size))

    def merge(self, other: QuantileSketch) -> None:
        if other.values.size:
            self._add(other.values, other.weights)
            self.min, self.max = min(self.min, other.min), max(self.max, other.max)

    def _add(self, values: np.ndarray, weights: np.ndarray) -> None:
        self.min, self.max = min(self.min, float(values.min())), max(self.max, float(values.max()))
        values = np.concatenate([self.values, values])
        weights = np.concatenate([self.weights, weights])
        order = np.argsort(values, kind="stable")
        self.values, self.weights = values[order], weights[order]
        if self.values.size > 2 * self.size:
            # The points at the centres of `size` equal slices of the cumulative weight, each carrying one slice.
            cumulative = np.cumsum(self.weights)
            total = cumulative[-1]
            centres = (np.arange(self.size) + 0.5) * total / self.size
            self.values = self.values[np.minimum(np.searchsorted(cumulative, centres), self.values.size - 1)]
            self.weights = np.full(self.size, total / self.size)

    def quantiles(self, probabilities: np.ndarray = QUANTILES) -> list[float]:
        if not self.values.size:
            return []
        cumulative = np.cumsum(self.weights)
        positions = (cumulative - self.weights / 2) / cumulative[-1]
        out = np.interp(probabilities, positions, self.values)
        out[0], out[-1] = self.min, self.max
        return [float(v) for v in out]


class NumericProfile(Statistics):
    """Count, missing (NaN) values, moments, quantiles and a histogram of a column of numbers."""

    def __init__(self):
        self.moments = RunningMoments()
        self.sketch = QuantileSketch()
        self.count = 0
        self.missing = 0

    def update(self, values) -> None:
        values = np.asarray(values, np.float64)
        present = values[~np.isnan(values)]
        self.count += int(values.size)
        self.missing += int(values.size - present.size)
        self.moments.update(present)
        self.sketch.update(present)

    def merge(self, other: NumericProfile) -> None:
        self.count += other.count
        self.missing += other.missing
        self.moments.merge(other.moments)
        self.sketch.merge(other.sketch)

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {"count": self.count, "missing": self.missing,
                               "missing_share": self.missing / self.count if self.count else 0.0}
        if self.moments.count:
            quantiles = self.sketch.quantiles()
            out.update(mean=self.moments.mean, std=float(np.sqrt(self.moments.variance)), min=self.moments.min,
                       median=quantiles[50], max=self.moments.max, quantiles=quantiles,
                       histogram=histogram(quantiles, self.moments.count))
        return out


class ValueCountsProfile(Statistics):
    """Rows, missing rows and how often each value occurs (``tokens`` splits a stored value into its values)."""

    def __init__(self, tokens, missing_value):
        self.tokens = tokens
        self.missing_value = missing_value
        self.counts: collections.Counter = collections.Counter()
        self.count = 0
        self.missing = 0

    def update(self, values) -> None:
        values = np.asarray(values)
        self.count += int(values.size)
        unique, counts = np.unique(values, return_counts=True)
        for value, n in zip(unique.tolist(), counts.tolist()):
            if isinstance(value, bytes):
                value = value.decode()
            if value == self.missing_value:
                self.missing += n
                continue
            for token in self.tokens(value):
                self.counts[str(token)] += n

    def merge(self, other: ValueCountsProfile) -> None:
        self.count += other.count
        self.missing += other.missing
        self.counts.update(other.counts)

    def result(self) -> dict[str, Any]:
        total = sum(self.counts.values()) + self.missing
        ranked = sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))
        kept = ranked[:TOP_VALUES]
        return {
            "count": self.count,
            "missing": self.missing,
            "missing_share": self.missing / self.count if self.count else 0.0,
            "distinct": len(self.counts),
            "values": total,  # values counted (a delimited cell counts each of its values), missing ones included
            "top_values": [{"value": v, "count": n, "share": n / total} for v, n in kept],
            "other_share": sum(n for _, n in ranked[TOP_VALUES:]) / total if total else 0.0,
        }


def histogram(quantiles: list[float], count: int, bins: int = HISTOGRAM_BINS) -> dict[str, list]:
    """Equal-width bins from the minimum to the maximum, their counts estimated from the quantiles."""
    low, high = quantiles[0], quantiles[-1]
    if high <= low:
        return {"edges": [low, high], "counts": [count]}
    edges = np.linspace(low, high, bins + 1)
    shares = np.diff(np.concatenate([[0.0], cdf(quantiles, edges[1:-1]), [1.0]]))
    return {"edges": edges.tolist(), "counts": np.round(shares * count).astype(int).tolist()}


def cdf(quantiles: list[float], x: np.ndarray) -> np.ndarray:
    """P(X <= x) from 101 quantiles: linear between them, steps where values repeat (a value many rows share)."""
    values = np.asarray(quantiles, np.float64)
    probabilities = np.linspace(0.0, 1.0, values.size)
    unique, last = np.unique(values[::-1], return_index=True)
    highest = probabilities[::-1][last]  # for a repeated value, the share of rows at or below it
    return np.where(np.asarray(x) < values[0], 0.0, np.interp(x, unique, highest))


def _shares(profile: dict, edges: np.ndarray) -> np.ndarray:
    """Shares of rows below ``edges[0]``, in each (edges[i], edges[i+1]], above ``edges[-1]``, and missing."""
    missing = profile.get("missing_share", 0.0)
    if "quantiles" not in profile:
        return np.concatenate([np.zeros(edges.size + 1), [1.0]])
    below = cdf(profile["quantiles"], edges)
    present = np.diff(np.concatenate([[0.0], below, [1.0]]))
    return np.concatenate([present * (1.0 - missing), [missing]])


def jensen_shannon(baseline: dict, current: dict, bins: int = DRIFT_BINS) -> float:
    """The Jensen-Shannon divergence (base 2, in [0, 1]) of two numeric profiles, on the baseline's quantile bins."""
    if "quantiles" not in baseline:
        return 0.0 if "quantiles" not in current else 1.0
    edges = np.unique(np.asarray(baseline["quantiles"])[np.linspace(0, 100, bins + 1).astype(int)])
    p, q = _shares(baseline, edges), _shares(current, edges)
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        held = a > 0
        return float((a[held] * np.log2(a[held] / m[held])).sum())

    return float(min(1.0, max(0.0, (kl(p) + kl(q)) / 2)))


def value_shares(profile: dict) -> dict[str, float]:
    """Each kept value's share of the rows (``None``: missing)."""
    shares = {entry["value"]: entry["share"] for entry in profile.get("top_values", [])}
    if profile.get("missing"):
        shares[None] = profile["missing"] / max(profile.get("values", 0), 1)
    return shares


def l_infinity(baseline: dict, current: dict) -> tuple[float, Any]:
    """The largest difference in one value's share between two value profiles, and that value."""
    before, after = value_shares(baseline), value_shares(current)
    worst, distance = None, 0.0
    for value in before.keys() | after.keys():
        difference = abs(after.get(value, 0.0) - before.get(value, 0.0))
        if difference > distance:
            worst, distance = value, difference
    return float(distance), worst


def describe_numeric_drift(baseline: dict, current: dict) -> str:
    parts = []
    for key in ("mean", "median", "std"):
        if key in baseline and key in current:
            parts.append(f"{key} {baseline[key]:.4g} -> {current[key]:.4g}")
    parts.append(f"missing {baseline.get('missing_share', 0):.1%} -> {current.get('missing_share', 0):.1%}")
    return ", ".join(parts)


def describe_value_drift(baseline: dict, current: dict, value: Any) -> str:
    name = "(missing)" if value is None else repr(value)
    before, after = value_shares(baseline).get(value, 0.0), value_shares(current).get(value, 0.0)
    new = " (never seen in training)" if value is not None and value not in value_shares(baseline) else ""
    return f"{name}{new}: {before:.1%} of rows -> {after:.1%}"
