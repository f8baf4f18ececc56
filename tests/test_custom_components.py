"""The custom loss, metric, layers and weight hooks, against NumPy and the stock Keras objects they resemble."""

import keras
import numpy as np
import pytest

from tfjobs.features import NUMBERS
from tfjobs.modeling.layers import (
    ColumnNormCap,
    DenseLayer,
    FanInNormal,
    FeatureVector,
    GroupLasso,
    ResidualBlock,
    TrainingNoise,
)
from tfjobs.modeling.losses import HuberLoss
from tfjobs.modeling.metrics import HuberMetric


def huber_numpy(y_true, y_pred, delta):
    error = np.abs(np.asarray(y_pred, np.float64).reshape(-1) - np.asarray(y_true, np.float64))
    return np.where(error <= delta, 0.5 * error**2, delta * (error - 0.5 * delta))


@pytest.mark.parametrize("delta", [0.5, 1.0, 2.5])
def test_huber_loss_matches_keras_huber_with_and_without_sample_weights(delta):
    rng = np.random.default_rng(0)
    y_true = rng.normal(size=32).astype("float32")
    y_pred = (y_true + rng.normal(scale=2.0, size=32)).astype("float32")[:, None]  # [batch, 1] as models give
    weights = rng.uniform(size=32).astype("float32")
    reference = keras.losses.Huber(delta=delta)
    np.testing.assert_allclose(HuberLoss(delta)(y_true, y_pred), reference(y_true[:, None], y_pred), rtol=1e-6)
    np.testing.assert_allclose(
        HuberLoss(delta)(y_true, y_pred, sample_weight=weights),
        reference(y_true[:, None], y_pred, sample_weight=weights),
        rtol=1e-6,
    )


def test_huber_loss_keeps_its_threshold_through_serialization():
    loss = HuberLoss(delta=2.5)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert isinstance(restored, HuberLoss) and restored.delta == 2.5
    with pytest.raises(ValueError, match="positive delta"):
        HuberLoss(delta=0)


def test_huber_metric_streams_a_weighted_mean_over_batches_and_resets():
    rng = np.random.default_rng(1)
    metric = HuberMetric(delta=1.5)
    labels, predictions, weights = [], [], []
    for size in (7, 64, 3):  # uneven batches: a mean of batch means would be wrong
        y_true = rng.normal(size=size).astype("float32")
        y_pred = rng.normal(scale=3.0, size=(size, 1)).astype("float32")
        w = rng.uniform(size=(size, 1)).astype("float32")
        metric.update_state(y_true, y_pred, sample_weight=w)
        labels.append(y_true), predictions.append(y_pred), weights.append(w.reshape(-1))
    values = huber_numpy(np.concatenate(labels), np.concatenate(predictions), 1.5)
    expected = np.average(values, weights=np.concatenate(weights))
    np.testing.assert_allclose(float(metric.result()), expected, rtol=1e-5)

    metric.reset_state()
    assert float(metric.result()) == 0.0
    metric.update_state(np.zeros(4), np.full((4, 1), 3.0))  # no weights: a plain mean
    np.testing.assert_allclose(float(metric.result()), 1.5 * (3.0 - 0.75), rtol=1e-6)
    assert HuberMetric.from_config(metric.get_config()).delta == 1.5


def test_fan_in_normal_scale_and_seeds():
    weights = np.asarray(FanInNormal(scale=2.0, seed=3)((400, 300)))
    np.testing.assert_allclose(weights.std(), 2.0 / np.sqrt(400), rtol=0.02)
    np.testing.assert_array_equal(weights, np.asarray(FanInNormal(scale=2.0, seed=3)((400, 300))))
    assert not np.allclose(np.asarray(FanInNormal()((4, 3))), np.asarray(FanInNormal()((4, 3))))
    assert FanInNormal.from_config(FanInNormal(scale=2.0, seed=3).get_config()).get_config() == {"scale": 2.0, "seed": 3}


def test_group_lasso_penalizes_each_input_row_norm():
    kernel = np.array([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]], np.float32)
    np.testing.assert_allclose(float(GroupLasso(0.1)(kernel)), 0.1 * (5.0 + 0.0 + 1.0), rtol=1e-5)

    import tensorflow as tf

    variable = tf.Variable(kernel)
    with tf.GradientTape() as tape:
        penalty = GroupLasso(0.1)(variable)
    gradient = tape.gradient(penalty, variable).numpy()
    assert np.isfinite(gradient).all() and (gradient[1] == 0).all()  # a zero row stays put


def test_column_norm_cap_matches_keras_max_norm():
    weights = np.random.default_rng(2).normal(scale=3.0, size=(6, 5)).astype("float32")
    capped = np.asarray(ColumnNormCap(2.0)(weights))
    np.testing.assert_allclose(capped, np.asarray(keras.constraints.MaxNorm(2.0, axis=0)(weights)), rtol=1e-5)
    assert (np.linalg.norm(capped, axis=0) <= 2.0 + 1e-5).all()
    within = weights / 100  # columns within the cap stay exactly as they are, update after update
    np.testing.assert_array_equal(np.asarray(ColumnNormCap(2.0)(within)), within)


def test_dense_layer_builds_weights_with_its_hooks_and_round_trips_its_config():
    layer = DenseLayer(3, activation="relu", kernel_regularizer=GroupLasso(0.5), kernel_constraint=ColumnNormCap(1.0))
    x = np.random.default_rng(3).normal(size=(8, 4)).astype("float32")
    y = np.asarray(layer(x))
    assert layer.kernel.shape == (4, 3) and layer.bias.shape == (3,)
    np.testing.assert_allclose(y, np.maximum(x @ np.asarray(layer.kernel) + np.asarray(layer.bias), 0), rtol=1e-5)
    assert isinstance(layer.kernel.constraint, ColumnNormCap)
    np.testing.assert_allclose(float(layer.losses[0]), float(GroupLasso(0.5)(layer.kernel)), rtol=1e-6)

    clone = DenseLayer.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    assert isinstance(clone.kernel_regularizer, GroupLasso) and clone.kernel_regularizer.factor == 0.5


def test_training_noise_acts_only_in_training():
    layer = TrainingNoise(0.5, seed=7)
    x = np.zeros((2000, 4), np.float32)
    np.testing.assert_array_equal(np.asarray(layer(x)), x)
    np.testing.assert_array_equal(np.asarray(layer(x, training=False)), x)
    noisy = np.asarray(layer(x, training=True))
    np.testing.assert_allclose(noisy.std(), 0.5, rtol=0.05)
    assert not np.allclose(noisy, np.asarray(layer(x, training=True)))  # fresh noise each step


def test_residual_block_keeps_its_width_and_names_a_mismatch():
    block = ResidualBlock(8)
    x = np.random.default_rng(4).normal(size=(5, 8)).astype("float32")
    assert np.asarray(block(block(x))).shape == (5, 8)  # applicable again and again
    with pytest.raises(ValueError, match="has width 8 but its input has width 6"):
        ResidualBlock(8)(np.zeros((5, 6), np.float32))


def test_feature_vector_one_hot_and_embedding():
    inputs = {NUMBERS: np.ones((3, 2), np.float32), "colour": np.array([0, 2, 1]), "shape": np.array([1, 1, 0])}
    layer = FeatureVector(2, {"colour": 3, "shape": 2}, {"colour": "embedding"}, {"colour": 4})
    out = np.asarray(layer(inputs))
    assert out.shape == (3, 2 + 4 + 2) == (3, layer.width)
    np.testing.assert_array_equal(out[:, -2:], [[0, 1], [0, 1], [1, 0]])  # one-hot "shape"
    np.testing.assert_allclose(out[0, 2:6], np.asarray(layer.embeddings["colour"].embeddings)[0])


def test_feature_vector_takes_inputs_of_other_forms_through_their_registered_part():
    from tfjobs.modeling import parts

    @keras.saving.register_keras_serializable(package="shardline_test")
    class Flatten2(keras.layers.Layer):
        def call(self, x):
            return keras.ops.reshape(x, (-1, 4))

        def compute_output_shape(self, input_shape):
            return (input_shape[0], 4)

    parts.register_part("grid")(lambda name, config: Flatten2(name=f"grid_{name}"))
    try:
        config = {"form": "grid", "shape": [2, 2], "dtype": "float32"}
        layer = FeatureVector(1, {"colour": 3}, parts={"board": config})
        out = np.asarray(layer({NUMBERS: np.ones((2, 1), np.float32), "colour": np.array([0, 2]),
                                "board": np.arange(8, dtype=np.float32).reshape(2, 2, 2)}))
        assert layer.width == 1 + 3 + 4 and out.shape == (2, 8)
        assert out[1, -4:].tolist() == [4.0, 5.0, 6.0, 7.0]  # the part's vector, after the one-hot
        with pytest.raises(ValueError, match="no model part is registered for that form"):
            FeatureVector(0, {}, parts={"clip": {"form": "video", "shape": [1]}})
    finally:
        del parts.PART_BUILDERS["grid"]
