"""Feature profiles merge like one pass, and their distances flag what moved (and only that)."""

import numpy as np
import pytest

from conftest import tiny_spec
from tfjobs.features import Drift, Feature
from tfjobs.features.profiles import QuantileSketch, jensen_shannon

SPEC = tiny_spec()
NUMBER, CATEGORY, INTEGER = SPEC.feature("size"), SPEC.feature("colour"), SPEC.feature("batch")
RNG = np.random.default_rng(0)
INCOMES = RNG.gamma(4.0, 0.97, 50_000)  # shaped like housing's median_income


def profile(feature, *batches):
    """The result of one profile fed ``batches``, merged from one partial profile per batch."""
    partials = []
    for batch in batches:
        partial = feature.profile()
        partial.update(batch)
        partials.append(partial)
    for partial in partials[1:]:
        partials[0].merge(partial)
    return partials[0].result()


def test_numeric_profile_merged_from_batches_matches_one_pass():
    merged = profile(NUMBER, *np.array_split(INCOMES, 7))
    whole = profile(NUMBER, INCOMES)
    for key in ("count", "missing", "min", "max"):
        assert merged[key] == whole[key]
    assert merged["mean"] == pytest.approx(INCOMES.mean()) and merged["std"] == pytest.approx(INCOMES.std())
    truth = np.quantile(INCOMES, np.linspace(0, 1, 101))
    assert np.abs(np.array(merged["quantiles"]) - truth).max() < 0.02 * (truth[-1] - truth[0])
    assert sum(merged["histogram"]["counts"]) == pytest.approx(len(INCOMES), abs=len(merged["histogram"]["counts"]))


def test_the_sketch_keeps_its_size_and_exact_extremes():
    sketch = QuantileSketch(size=100)
    for batch in np.array_split(INCOMES, 50):
        sketch.update(batch)
    assert sketch.values.size <= 200 and (sketch.min, sketch.max) == (INCOMES.min(), INCOMES.max())


def test_jensen_shannon_flags_a_shift_and_missing_values_not_a_sample():
    baseline = profile(NUMBER, INCOMES)
    sample = NUMBER.drift(baseline, profile(NUMBER, RNG.choice(INCOMES, 4000)))
    shifted = NUMBER.drift(baseline, profile(NUMBER, RNG.choice(INCOMES, 4000) + 2.0))
    holes = RNG.choice(INCOMES, 4000)
    holes[:2000] = np.nan
    missing = NUMBER.drift(baseline, profile(NUMBER, holes))
    assert sample.measure == "jensen_shannon" and sample.distance < 0.01
    assert shifted.distance > 0.15 and shifted.detail.startswith("mean 3.883 -> 5.")
    assert missing.distance > 0.15 and "missing 0.0% -> 50.0%" in missing.detail
    assert 0 <= jensen_shannon(baseline, profile(NUMBER, np.full(10, 1e9))) <= 1


def test_values_shared_by_many_rows_do_not_look_like_drift():
    ages = np.minimum(RNG.integers(1, 60, 20_000), 52).astype(float)  # housing_median_age: 52 is a cap
    assert NUMBER.drift(profile(NUMBER, ages), profile(NUMBER, ages[:3000])).distance < 0.01


def test_l_infinity_names_a_new_dominant_category():
    colours = RNG.choice(["red", "green", "blue"], 10_000, p=[0.5, 0.3, 0.2]).astype(object)
    baseline = profile(CATEGORY, *np.array_split(colours, 3))
    assert baseline["top_values"][0] == {"value": "red", "count": int((colours == "red").sum()),
                                         "share": pytest.approx((colours == "red").mean())}
    assert CATEGORY.drift(baseline, profile(CATEGORY, colours[:3000])).distance < 0.03
    delivery = colours[:5000].copy()
    delivery[:3000] = "ultraviolet"
    drift = CATEGORY.drift(baseline, profile(CATEGORY, delivery))
    assert drift == Drift("l_infinity", pytest.approx(0.6), "'ultraviolet' (never seen in training): 0.0% of rows -> 60.0%")
    missing = colours[:5000].copy()
    missing[:2000] = ""
    assert CATEGORY.drift(baseline, profile(CATEGORY, missing)).detail == "(missing): 0.0% of rows -> 40.0%"


def test_integer_ids_follow_the_categorical_profile():
    years = RNG.integers(2007, 2010, 1000)
    drift = INTEGER.drift(profile(INTEGER, years), profile(INTEGER, np.full(100, 2031)))
    assert drift.distance == 1.0 and "'2031' (never seen in training)" in drift.detail


def test_a_kind_without_a_profile_is_skipped():
    class Opaque(Feature):
        pass  # no kind name: not registered, answers nothing of its own

    assert Opaque("x").profile() is None and Opaque("x").drift({}, {}) is None
