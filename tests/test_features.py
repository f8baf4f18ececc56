"""Feature kinds (tfjobs.features): cleaning that agrees between validate and the model, mergeable statistics,
the tabular family's encoders, and a dataset that uses every option, through validate -> shard -> adapt."""

import json
import subprocess
import sys

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from conftest import ROOT, tiny_spec
from tfjobs.adapt import adapt_preprocessing
from tfjobs.features import NUMBERS, kinds
from tfjobs.features.numeric import NumericStatistics
from tfjobs.features.preprocessing import FeaturePreprocessor
from tfjobs.fetch import fetch_dataset
from tfjobs.shard import shard_dataset
from tfjobs.spec import json_schema, parse_spec
from tfjobs.storage.layout import Layout
from tfjobs.storage.store import read_json
from tfjobs.validate import validate_dataset

NA = ["", "NA", "N/A", "NaN", "nan", "null", "None"]


def feature(**options):
    return tiny_spec(features={"x": options}).feature("x")


def in_model(feature_, texts):
    """What the model makes of raw CSV text: ``parse_text`` (serving_raw) then ``clean_tensor``."""
    return feature_.clean_tensor(feature_.parse_text(tf.constant(texts), NA), NA)


def test_the_built_in_kinds_are_registered_and_their_options_have_a_json_schema():
    assert {"numeric", "categorical", "integer_categorical", "text"} <= set(kinds())
    branches = {b["title"]: b for b in json_schema()["properties"]["features"]["additionalProperties"]["oneOf"]}
    assert branches["numeric"]["properties"]["transform"]["enum"] == ["normalize", "rescale", "discretize"]
    assert branches["categorical"]["properties"]["delimiter"]["type"] == "string"


def test_the_committed_json_schema_is_current():
    completed = subprocess.run([sys.executable, "-m", "tfjobs.spec", "--schema"], capture_output=True, text=True,
                               cwd=ROOT, check=True)
    assert json.loads(completed.stdout) == json.loads((ROOT / "include" / "spec.schema.json").read_text()), (
        "regenerate it: python -m tfjobs.spec --schema > include/spec.schema.json")


NUMBERS_TEXT = ["1.5", " 2 ", "\t3e2", "NA", "", "null", " NaN ", "-0.25", "+4", ".5", "1e-3\r"]
IDS_TEXT = ["3", " 4 ", "5.0", "NA", "", "-7", "\t12"]
STRINGS_TEXT = [" red", "blue\t", "NA", "", "null", "green", " N/A "]
LISTS_TEXT = [" a | b |", "NA", "c", "a||b", " | ", "b|null|c", ""]
MESSAGES_TEXT = [" Free £100!\t", "NA", "", 'say "hi"  to\tme ', "\r\nnull", "None of it.", " ünïcødé "]


@pytest.mark.parametrize(("options", "texts"), [
    ({"kind": "numeric"}, NUMBERS_TEXT),
    ({"kind": "integer_categorical"}, IDS_TEXT),
    ({"kind": "categorical"}, STRINGS_TEXT),
    ({"kind": "text"}, MESSAGES_TEXT),  # stripped, NA tokens missing; the inside is the message's own
])
def test_validate_and_the_model_clean_raw_text_alike(options, texts):
    f = feature(**options)
    validated = f.clean(pd.Series(texts), NA)
    assert not any(rows.any() for rows, _ in validated.rejected)
    model = in_model(f, texts).numpy()
    expected = validated.values
    if expected.dtype == object:
        assert [v.decode() for v in model] == expected.tolist()
    else:
        np.testing.assert_array_equal(model, expected)  # NaN where missing, in both
    assert validated.missing.tolist() == [t.strip() in NA for t in texts]


def test_a_delimited_list_is_split_and_cleaned_alike():
    f = feature(kind="categorical", delimiter="|", encoding="multi_hot")
    validated = f.clean(pd.Series(LISTS_TEXT), NA)
    assert validated.values.tolist() == ["a|b", "", "c", "a|b", "", "b|c", ""]
    assert validated.missing.tolist() == [False, True, False, False, True, False, True]
    model = in_model(f, LISTS_TEXT).to_list()
    assert [[t.decode() for t in row] for row in model] == [v.split("|") if v else [] for v in validated.values]
    # What is stored (the cleaned, joined value) cleans to the same tokens again.
    again = f.clean_tensor(tf.constant(validated.values.tolist()), NA).to_list()
    assert again == model


def test_text_the_validate_step_rejects_fails_loudly_in_the_model():
    number = feature(kind="numeric")
    assert number.clean(pd.Series(["abc"]), NA).rejected[0][0].tolist() == [True]
    with pytest.raises(tf.errors.InvalidArgumentError, match="abc"):
        in_model(number, ["abc"])
    ids = feature(kind="integer_categorical")
    assert ids.clean(pd.Series(["1.5"]), NA).rejected[1][0].tolist() == [True]
    with pytest.raises(tf.errors.InvalidArgumentError, match="not an integer"):
        in_model(ids, ["1.5"])


def test_numeric_statistics_merge_to_the_one_pass_result_and_discretize_like_keras():
    values = np.random.default_rng(0).lognormal(3.0, 1.0, 20_000).astype(np.float32)
    values[::97] = np.nan
    whole, halves = NumericStatistics("x", bins=8), [NumericStatistics("x", bins=8) for _ in range(2)]
    whole.update(values)
    halves[0].update(values[:7_000])
    halves[1].update(values[7_000:])
    halves[0].merge(halves[1])
    one, merged = whole.result(), halves[0].result()
    assert merged["missing"] == one["missing"] == int(np.isnan(values).sum())
    for key in ("mean", "variance", "min", "max"):
        assert merged[key] == pytest.approx(one[key], rel=1e-9)
    present = values[~np.isnan(values)]
    keras_layer = keras.layers.Discretization(num_bins=8, epsilon=0.001)
    keras_layer.adapt(present)
    assert one["boundaries"] == pytest.approx(keras_layer.bin_boundaries, rel=1e-6)
    exact = np.quantile(present, np.arange(1, 8) / 8)
    assert merged["boundaries"] == pytest.approx(exact, rel=0.02)  # a summary of two halves stays close


# A dataset that uses every option of the tabular family: the columns and the spec.
FAMILY_FEATURES = {
    "income": {"kind": "numeric"},
    "age": {"kind": "numeric", "transform": "rescale"},
    "latitude": {"kind": "numeric", "transform": "discretize", "bins": 5},
    "longitude": {"kind": "numeric", "transform": "discretize", "bins": 5, "encoding": "embedding", "embedding_dim": 3},
    "city": {"kind": "categorical", "num_bins": 16},
    "tags": {"kind": "categorical", "delimiter": "|", "encoding": "multi_hot"},
    "extras": {"kind": "categorical", "delimiter": ";", "encoding": "count", "num_bins": 8},
    "zone": {"kind": "integer_categorical", "encoding": "embedding", "embedding_dim": 2},
}
FAMILY_CROSSES = [{"features": ["latitude", "longitude"], "num_bins": 32},
                  {"features": ["city", "zone"], "num_bins": 64, "encoding": "embedding", "embedding_dim": 4}]


def family_frame(rows: int = 600) -> pd.DataFrame:
    rng = np.random.default_rng(7)
    tags = np.array(["garden", "pool", "garage", "view"])
    frame = pd.DataFrame({
        "income": rng.normal(5, 2, rows).round(3),
        "age": rng.integers(1, 52, rows),
        "latitude": rng.uniform(32, 42, rows).round(4),
        "longitude": rng.uniform(-124, -114, rows).round(4),
        "city": rng.choice([f"city{i}" for i in range(40)], rows),
        "tags": ["|".join(rng.choice(tags, rng.integers(0, 4), replace=False)) for _ in range(rows)],
        "extras": [";".join(rng.choice(["a", "b", "c"], 2)) for _ in range(rows)],
        "zone": rng.integers(1, 6, rows),
        "kind": rng.choice(["a", "b"], rows),
    })
    frame.loc[::50, "income"] = np.nan
    return frame


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """validate -> shard -> adapt on a CSV whose features use every option of the tabular family."""
    tmp = tmp_path_factory.mktemp("family")
    family_frame().to_csv(tmp / "in.csv", index=False)
    spec = tiny_spec(features=FAMILY_FEATURES, crosses=FAMILY_CROSSES)
    layout = Layout(str(tmp / "store"), spec.name, "2026-11-25")
    fetch_dataset(spec, layout.raw, source_uri=str(tmp / "in.csv"))
    validate_dataset(spec, layout.raw, layout.validated)
    shards = shard_dataset(spec, layout.validated, layout.shards)
    adapt = adapt_preprocessing(spec, shards.manifest_uri, layout.preprocessing)
    return spec, read_json(adapt.state_uri)


def test_every_option_has_its_adapted_state(family):
    _, state = family
    features = state["features"]
    assert features["age"]["options"] == {"transform": "rescale"} and features["age"]["min"] >= 1
    assert len(features["latitude"]["boundaries"]) == 4  # 5 bins
    assert features["city"]["num_bins"] == 16 and 1 <= features["city"]["bins_used"] <= 16
    assert set(features["tags"]["vocabulary"]) == {"garden", "pool", "garage", "view"}  # tokens, no missing token
    assert features["extras"]["values_hashed"] == 2 * features["extras"]["rows"]
    assert -1 in features["zone"]["vocabulary"]
    assert [c["features"] for c in state["crosses"]] == [["latitude", "longitude"], ["city", "zone"]]
    assert state["na_values"] == NA


def test_the_preprocessor_gives_each_option_its_model_input(family):
    _, state = family
    preprocessor = FeaturePreprocessor(state)
    encodings = preprocessor.encodings
    assert encodings[NUMBERS].size == 2  # income normalized, age rescaled
    assert (encodings["latitude"].form, encodings["latitude"].size) == ("index", 5)
    assert encodings["longitude"].encoding == "embedding"
    assert (encodings["city"].form, encodings["city"].size) == ("index", 16)
    assert (encodings["tags"].form, encodings["tags"].size) == ("vector", 5)  # 4 tags + out of vocabulary
    assert (encodings["extras"].form, encodings["extras"].size) == ("vector", 8)
    assert (encodings["latitude_x_longitude"].size, encodings["city_x_zone"].encoding) == (32, "embedding")

    age = state["features"]["age"]
    raw = {
        "income": tf.constant([np.nan, 5.0]), "age": tf.constant([age["min"], age["max"]], tf.float32),
        "latitude": tf.constant([30.0, 45.0]), "longitude": tf.constant([-120.0, -119.0]),
        "city": tf.constant(["city3", "nowhere"]), "tags": tf.constant([" pool | view |", "NA"]),
        "extras": tf.constant(["a;a;b", ""]), "zone": tf.constant([2, 99], tf.int64),
    }
    out = {k: v.numpy() for k, v in preprocessor(raw).items()}
    income, age = (out[NUMBERS][:, preprocessor.numbers.index(name)] for name in ("income", "age"))
    assert income[0] == pytest.approx(0.0, abs=1e-6)  # missing -> the mean -> 0 normalized
    adapted = state["features"]["income"]
    assert income[1] == pytest.approx((5.0 - adapted["mean"]) / np.sqrt(adapted["variance"]), rel=1e-5)
    assert age == pytest.approx([0.0, 1.0])  # rescaled by the training min and max
    assert out["latitude"].tolist() == [0, 4]  # below and above every boundary
    assert 0 <= out["city"].min() and out["city"].max() < 16
    vocabulary = ["[UNK]", *state["features"]["tags"]["vocabulary"]]
    assert out["tags"][0].tolist() == [1.0 if t in ("pool", "view") else 0.0 for t in vocabulary]
    assert out["tags"][1].sum() == 0  # missing: an empty bag
    assert out["extras"][0].sum() == 3 and out["extras"][1].sum() == 0  # counts of hashed values
    assert 0 <= out["latitude_x_longitude"].min() and out["latitude_x_longitude"].max() < 32
    assert out["zone"][1] == 0  # an id never seen: the out-of-vocabulary index


def test_the_fingerprint_follows_each_option(family):
    spec, _ = family
    changed = {**FAMILY_FEATURES, "latitude": {**FAMILY_FEATURES["latitude"], "bins": 6}}
    assert tiny_spec(features=changed, crosses=FAMILY_CROSSES).fingerprint() != spec.fingerprint()
    assert tiny_spec(features=FAMILY_FEATURES, crosses=FAMILY_CROSSES[:1]).fingerprint() != spec.fingerprint()
