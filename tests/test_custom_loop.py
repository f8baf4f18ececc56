"""The GradientTape loop: the objective, two optimizers, constraints, metrics, callbacks, XLA, parity with fit()."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from test_subclassed_models import FEATURES, regression_spec, toy_data
from tfjobs.modeling.custom_loop import GradientTapeLoop, fit_with_gradient_tape, optimizer_groups
from tfjobs.modeling.models import build_training_model
from tfjobs.train import compile_for_task


def dataset(n=256, seed=0, batch_size=32):
    x, y = toy_data(n, seed)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)


def compiled(kind, spec=None, seed=1, **training):
    spec = spec or regression_spec()
    settings = dataclasses.replace(spec.training, **training)
    keras.utils.set_random_seed(seed)
    model = build_training_model(spec, FEATURES, kind)
    model(toy_data(2)[0])
    compile_for_task(model, spec, settings)
    return model


def weights(model):
    return [np.array(w) for w in model.get_weights()]


def test_the_step_minimizes_the_loss_plus_regularization_and_added_losses():
    model = compiled("wide_deep", regression_spec(wide_penalty=5.0))
    loop = GradientTapeLoop(model, optimizer_groups(model, 0.01))
    x, y = next(iter(dataset()))
    before = model(x, training=False)
    penalty = float(sum(model.losses))
    assert penalty > 0.1  # the wide part's GroupLasso
    expected = float(model.loss(y, before)) + penalty
    np.testing.assert_allclose(float(loop.train_step(x, y)), expected, rtol=1e-5)


@pytest.mark.parametrize("frozen", ["wide", "deep"])
def test_wide_part_trains_with_sgd_and_deep_part_with_adam(frozen):
    # A learning rate of zero for one optimizer freezes exactly the variables it owns.
    model = compiled("wide_deep", learning_rate=0.0 if frozen == "deep" else 0.01)
    groups = optimizer_groups(model, wide_learning_rate=0.0 if frozen == "wide" else 0.05)
    (sgd, wide), (adam, deep) = groups
    assert (type(sgd).__name__, type(adam).__name__) == ("SGD", "Adam")
    assert {v.path for v in wide} == {v.path for v in model.wide_trainable_variables}
    still, moving = (wide, deep) if frozen == "wide" else (deep, wide)
    start = {v.path: np.array(v) for v in model.trainable_variables}
    loop = GradientTapeLoop(model, groups)
    loop.run_epoch(dataset(), loop.train_step)
    assert all(np.array_equal(np.array(v), start[v.path]) for v in still)
    assert all(not np.array_equal(np.array(v), start[v.path]) for v in moving if "kernel" in v.path)
    assert int(sgd.iterations) == int(adam.iterations) == 8


def test_weight_constraints_hold_after_every_update():
    model = compiled("wide_deep", regression_spec(max_norm=0.5), learning_rate=0.5)
    loop = GradientTapeLoop(model, optimizer_groups(model, 0.01))
    loop.run_epoch(dataset(), loop.train_step)
    for layer in model.deep:
        norms = np.linalg.norm(np.array(layer.kernel), axis=0)
        assert norms.max() <= 0.5 + 1e-4 and norms.max() > 0.45  # capped, and the cap was hit


def test_metrics_restart_each_epoch():
    model = compiled("mlp")
    loop = GradientTapeLoop(model, optimizer_groups(model, 0.01))
    loop.run_epoch(dataset(seed=0), loop.test_step)
    second = loop.run_epoch(dataset(seed=5), loop.test_step)
    expected = model.evaluate(dataset(seed=5), return_dict=True, verbose=0)
    for name in ("loss", "rmse", "huber"):
        np.testing.assert_allclose(second[name], expected[name], rtol=1e-5, err_msg=name)


def test_custom_loop_matches_fit_update_for_update(tmp_path):
    """With one optimizer, the loop and fit() take the same steps: same weights, same logs."""
    spec = regression_spec(noise_stddev=0.0)
    for kind in ("mlp", "reconstruction"):
        with_fit, with_loop = compiled(kind, spec), compiled(kind, spec)
        with_loop.set_weights(with_fit.get_weights())
        fitted = with_fit.fit(dataset(), validation_data=dataset(64, 1), epochs=2, shuffle=False, verbose=0)
        looped = fit_with_gradient_tape(with_loop, dataset(), validation_data=dataset(64, 1), epochs=2)
        for a, b in zip(weights(with_fit), weights(with_loop)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=kind)
        assert set(looped.history) == set(fitted.history)
        for name, values in fitted.history.items():
            np.testing.assert_allclose(looped.history[name], values, rtol=1e-4, err_msg=f"{kind} {name}")


def test_xla_compiled_step_trains_like_the_plain_step():
    plain, xla = compiled("wide_deep"), compiled("wide_deep", jit_compile="true")
    xla.set_weights(plain.get_weights())
    assert (plain.jit_compile, xla.jit_compile) == (False, True)  # "auto" on a CPU: no XLA
    for model in (plain, xla):
        fit_with_gradient_tape(model, dataset(), validation_data=dataset(64, 1), epochs=1)
    for a, b in zip(weights(plain), weights(xla)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def test_validation_callbacks_checkpoint_and_early_stopping(tmp_path):
    model = compiled("residual", learning_rate=0.05)
    seen = []
    callbacks = [
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=1, restore_best_weights=True),
        keras.callbacks.ModelCheckpoint(str(tmp_path / "best.weights.h5"), monitor="val_loss", save_best_only=True,
                                        save_weights_only=True),
        keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: seen.append(dict(logs))),
    ]
    # Validation on data unlike the training data: its loss soon stops improving.
    shifted = dataset(64, 1).map(lambda x, y: (x, y + 3.0))
    history = fit_with_gradient_tape(model, dataset(), validation_data=shifted, epochs=30, callbacks=callbacks)
    epochs = len(history.history["val_loss"])
    assert epochs < 30 and len(seen) == epochs and all("val_rmse" in logs for logs in seen)
    best = int(np.argmin(history.history["val_loss"]))
    final = model.evaluate(shifted, return_dict=True, verbose=0)["loss"]
    np.testing.assert_allclose(final, history.history["val_loss"][best], rtol=1e-4)  # best weights restored
    assert (tmp_path / "best.weights.h5").exists()


def test_uncompiled_model_is_refused():
    model = build_training_model(regression_spec(), FEATURES, "mlp")
    with pytest.raises(ValueError, match="call model.compile"):
        optimizer_groups(model, 0.01)
