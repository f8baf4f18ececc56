"""The image kind (tfjobs.features.image) and its model part (tfjobs.modeling.image_part).

Validate and the model agree on what an image is; the encoder decodes, resizes, crops and
rescales inside TensorFlow whatever the file's size, format or channels; the adapted state
merges; the part augments only in training and every model kind takes it.
"""

import base64

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from conftest import tiny_spec
from tfjobs.features import OptionsError, parse_feature
from tfjobs.features.preprocessing import FeaturePreprocessor
from tfjobs.spec import SpecError, json_schema

NA = ["", "NA", "null"]
DIGIT = np.array([[0, 0, 5, 13, 9, 1, 0, 0], [0, 0, 13, 15, 10, 15, 5, 0], [0, 3, 15, 2, 0, 11, 8, 0],
                  [0, 4, 12, 0, 0, 8, 8, 0], [0, 5, 8, 0, 0, 9, 8, 0], [0, 4, 11, 0, 1, 12, 7, 0],
                  [0, 2, 14, 5, 10, 12, 0, 0], [0, 0, 6, 13, 10, 0, 0, 0]], np.uint8) * 16  # sklearn's first digit


def image(**options):
    return tiny_spec(features={"img": {"kind": "image", "height": 8, "width": 8, "channels": 1, **options}}).feature("img")


def png(pixels) -> bytes:
    pixels = np.asarray(pixels, np.uint8)
    return tf.io.encode_png(pixels if pixels.ndim == 3 else pixels[..., None]).numpy()


def test_options_are_checked_and_in_the_json_schema():
    feature = image(augmentation={"rotation": 0.05}, crop=0.875, filters=[16])
    assert feature.options.augmentation.rotation == 0.05 and feature.options.filters == (16,)
    with pytest.raises(OptionsError, match="height: Field required"):
        parse_feature("img", {"kind": "image", "width": 8})
    with pytest.raises(SpecError, match=r"features.img.channels: 2 is not one of 1 or 3"):
        image(channels=2)
    with pytest.raises(SpecError, match=r"augmentation.flip: 'sideways' is not one of"):
        image(augmentation={"flip": "sideways"})
    with pytest.raises(SpecError, match="augmentation.zoom"):
        image(augmentation={"zoom": 1.5})
    branch = {b["title"]: b for b in json_schema()["properties"]["features"]["additionalProperties"]["oneOf"]}["image"]
    assert {"height", "width"} <= set(branch["required"]) and "augmentation" in branch["properties"]


def test_validate_keeps_the_bytes_and_quarantines_what_the_model_could_not_decode():
    good = png(DIGIT)
    raw = pd.Series([good, good[:-12], b"<html>not found</html>", None, b"", base64.b64encode(good).decode(), " NA ",
                     "%%% not base64", base64.urlsafe_b64encode(good).decode().rstrip("=")], dtype=object)
    cleaned = image().clean(raw, NA)
    assert cleaned.values[0] == good and cleaned.values[5] == good  # base64 text (a CSV's image) is decoded
    assert cleaned.missing.tolist() == [False, False, False, True, True, False, True, False, False]
    assert cleaned.values[8] == good  # URL-safe and unpadded, as the model's parse_text takes it too
    reasons = {reason: rows.nonzero()[0].tolist() for rows, reason in cleaned.rejected}
    assert reasons == {
        f"cannot be decoded as an image (Invalid PNG data, size {len(good) - 12})": [1],  # truncated
        "cannot be decoded as an image (Unknown image file format. One of JPEG, JPEG XL, PNG, GIF, BMP, WebP "
        "required.)": [2],
        "is neither an image file's bytes nor its base64 text": [7],
    }
    for rows, _ in cleaned.rejected:  # and the model would have failed on each: nothing undecodable gets through
        for value in cleaned.values[rows]:
            if value:
                with pytest.raises(tf.errors.InvalidArgumentError):
                    tf.io.decode_image(value)


def encode(feature, values, state=None):
    state = state or {}
    return feature.encode(tf.constant(values, tf.string), feature.encoder_layers(state), state).numpy()


def test_any_size_format_and_channel_count_becomes_the_models_input():
    feature = image()
    big = np.repeat(np.repeat(DIGIT, 4, axis=0), 4, axis=1)  # the same digit at 32x32
    rgb = np.stack([DIGIT, DIGIT, DIGIT], axis=-1)
    jpeg = tf.io.encode_jpeg(DIGIT[..., None], quality=100).numpy()
    out = encode(feature, [png(DIGIT), png(big), png(rgb), jpeg, b""])
    assert out.shape == (5, 8, 8, 1) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, ..., 0], DIGIT / 255, atol=1e-7)  # decoded and rescaled, nothing else
    np.testing.assert_allclose(out[1], out[0], atol=1e-6)  # bilinear 4x down-sampling of a 4x blow-up
    np.testing.assert_allclose(out[2], out[0], atol=1 / 255)  # grey made from equal R, G and B
    np.testing.assert_allclose(out[3], out[0], atol=16 / 255)  # a JPEG of it (lossy, even at quality 100)
    assert not out[4].any()  # missing: black


def test_crop_keeps_the_centre_and_colour_has_three_channels():
    feature = image(height=4, width=4, crop=0.5, channels=3)
    assert feature.resized_size == (8, 8)
    out = encode(feature, [png(DIGIT)])
    assert out.shape == (1, 4, 4, 3)
    np.testing.assert_allclose(out[0, ..., 1], DIGIT[2:6, 2:6] / 255, atol=1e-6)  # the central 4x4 of 8x8, grey as RGB


def test_statistics_merge_to_the_one_pass_state_and_normalize_per_channel():
    rng = np.random.default_rng(3)
    files = [png(rng.integers(0, 256, (h, 8, 3), dtype=np.uint8)) for h in (8, 8, 8, 12, 16)]
    feature = image(channels=3, normalize=True)
    whole, first, second = feature.statistics(), feature.statistics(), feature.statistics()
    whole.update(np.array(files + [b""], dtype=object))
    first.update(np.array(files[:2], dtype=object))
    second.update(np.array(files[2:] + [b""], dtype=object))
    first.merge(second)
    one, merged = whole.result(), first.result()
    assert one["sizes"] == {"8x8": 3, "12x8": 1, "16x8": 1} and one["formats"] == {"PNG": 5} and one["missing"] == 1
    assert merged["mean"] == pytest.approx(one["mean"], rel=1e-9)
    pixels = encode(image(channels=3), files)  # what the encoder gives before the Normalization layer
    np.testing.assert_allclose(one["mean"], pixels.reshape(-1, 3).mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(one["variance"], pixels.reshape(-1, 3).var(axis=0), rtol=1e-4)
    normalized = encode(feature, files, one).reshape(-1, 3)
    np.testing.assert_allclose(normalized.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(normalized.std(axis=0), 1, atol=1e-3)
    assert feature.state_summary(one).startswith("5 images, sizes 8x8 (3), 12x8 (1), 16x8 (1); PNG 5")


def test_the_skew_checks_values_decode_and_their_base64_text_parses_back():
    feature = image()
    edges = feature.edge_values({})
    assert edges[0] == b"" and len({tf.io.decode_image(e).shape for e in edges[1:]}) >= 3  # sizes, channels, formats
    assert encode(feature, edges).shape == (len(edges), 8, 8, 1)
    texts = feature.text_variants(edges, NA)
    assert texts[0].strip() in NA and all(t != t.strip() for t in texts[1:3])  # padded, as deliveries vary
    assert feature.parse_text(tf.constant(texts), NA).numpy().tolist() == edges
    url_safe = base64.urlsafe_b64encode(edges[1]).decode().rstrip("=")
    assert feature.parse_text(tf.constant([url_safe]), NA).numpy()[0] == edges[1]


def preprocessor(feature_options: dict):
    spec = tiny_spec(features={"img": {"kind": "image", "height": 8, "width": 8, "channels": 1, **feature_options}})
    statistics = spec.feature("img").statistics()
    statistics.update(np.array([png(DIGIT)], dtype=object))
    return FeaturePreprocessor({"features": {"img": {"kind": "image", "options": spec.feature("img").options.model_dump(),
                                                     **statistics.result()}},
                                "label": {"task": "classification", "classes": ["a", "b"]}})


def test_the_preprocessor_gives_the_image_to_the_model_part_and_counts_its_memory():
    layer = preprocessor({"augmentation": {"flip": "horizontal"}, "filters": [4]})
    encodings = layer.encodings
    assert list(encodings) == ["img"] and encodings["img"].form == "image" and encodings["img"].shape == (8, 8, 1)
    assert encodings["img"].part == {"filters": [4], "pooling": "flatten", "flip": "horizontal", "rotation": 0.0,
                                     "zoom": 0.0}
    assert layer.encoded_row_bytes() == 8 + 8 * 8 * 4  # the label, and float32 pixels: what the cache holds


@pytest.mark.parametrize("kind", ["mlp", "residual", "wide_deep"])
def test_every_model_kind_takes_the_image_and_augments_only_in_training(kind, tmp_path):
    from tfjobs.modeling.models import build_training_model, encoded_features

    layer = preprocessor({"augmentation": {"flip": "horizontal", "zoom": 0.2}, "filters": [4, 8]})
    spec = tiny_spec(model={"kind": kind, "hidden_units": [8]})
    model = build_training_model(spec, encoded_features(layer), kind)
    pixels = {"img": layer({"img": tf.constant([png(DIGIT)] * 4)})["img"]}
    keras.utils.set_random_seed(0)
    inference = [np.asarray(model(pixels, training=False)) for _ in range(2)]
    training = [np.asarray(model(pixels, training=True)) for _ in range(2)]
    np.testing.assert_array_equal(inference[0], inference[1])
    assert not np.allclose(training[0], training[1])  # a new random flip and zoom each call
    model.save(tmp_path / "model.keras")
    reloaded = keras.saving.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(np.asarray(reloaded(pixels, training=False)), inference[0], rtol=1e-5)


def test_the_cnn_pools_small_images_less_and_reports_its_width():
    from tfjobs.modeling.image_part import ConvolutionalPart

    small = ConvolutionalPart((8, 8, 1), filters=(16, 32, 64))
    assert small.output_map == (2, 2, 64)  # 8 -> 4 -> 2, then no more pooling
    assert small.compute_output_shape((None, 8, 8, 1)) == (None, 2 * 2 * 64)
    large = ConvolutionalPart((64, 48, 3), filters=(8, 16), pooling="average")
    out = large(np.zeros((2, 64, 48, 3), np.float32))
    assert out.shape == (2, 16) == large.compute_output_shape((2, 64, 48, 3))


PART_UNDER_JAX = """
import json
import keras, numpy as np
from tfjobs.modeling.image_part import ConvolutionalPart
assert keras.backend.backend() == "jax"
keras.utils.set_random_seed(0)
images = np.random.default_rng(0).random((64, 8, 8, 1)).astype("float32")
inputs = keras.Input((8, 8, 1))
model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(
    ConvolutionalPart((8, 8, 1), filters=(4,), flip="horizontal")(inputs)))
model.compile("adam", "sparse_categorical_crossentropy")
history = model.fit(images, np.arange(64) % 2, epochs=2, batch_size=32, verbose=0)
same = np.allclose(model(images[:4], training=False), model(images[:4], training=False))
differs = not np.allclose(model(images[:4], training=True), model(images[:4], training=True))
print(json.dumps({"losses": history.history["loss"], "inference_repeats": bool(same), "training_draws": differs}))
"""


def test_the_image_part_trains_under_jax_and_augments_there_only_in_training():
    import json
    import os
    import subprocess
    import sys

    from conftest import ROOT

    pytest.importorskip("jax")
    completed = subprocess.run([sys.executable, "-c", PART_UNDER_JAX], capture_output=True, text=True, cwd=ROOT,
                               env={**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(ROOT)}, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["inference_repeats"] and result["training_draws"]
    assert all(np.isfinite(result["losses"]))


def test_an_image_and_tabular_features_share_one_feature_vector():
    from tfjobs.features import NUMBERS
    from tfjobs.modeling.models import build_training_model, encoded_features

    image_state = preprocessor({"filters": [4]}).state["features"]["img"]
    state = {"features": {"img": image_state,
                          "size": {"kind": "numeric", "options": {}, "mean": 2.0, "variance": 4.0, "min": 0.0,
                                   "max": 5.0},
                          "colour": {"kind": "categorical", "options": {}, "vocabulary": ["red", ""]}},
             "na_values": NA, "label": {"task": "classification", "classes": ["a", "b"]}}
    layer = FeaturePreprocessor(state)
    assert {name: e.form for name, e in layer.encodings.items()} == {NUMBERS: "vector", "img": "image",
                                                                     "colour": "index"}
    model = build_training_model(tiny_spec(model={"kind": "mlp", "hidden_units": [8]}), encoded_features(layer))
    features = model.get_layer("features")
    assert features.width == 1 + 3 + 4 * 4 * 4  # the number, colour one-hot (with OOV), the CNN's 4x4x4 map
    out = model(layer({"img": tf.constant([png(DIGIT), b""]), "size": tf.constant([1.0, np.nan]),
                       "colour": tf.constant(["red", "blue"])}), training=False)
    assert out.shape == (2, 2) and np.isfinite(np.asarray(out)).all()
