"""Every model kind: builds for both tasks, trains, and reloads from .keras in a fresh process."""

import json
import subprocess
import sys

import keras
import numpy as np
import pytest

from conftest import ROOT
from tfjobs import choices
from tfjobs.features import NUMBERS
from tfjobs.modeling.models import MODEL_KINDS, EncodedFeatures, build_training_model
from tfjobs.spec import parse_spec
from tfjobs.modeling.subclassed_models import ReconstructingModel, WideAndDeepModel
from tfjobs.train import compile_for_task

FEATURES = EncodedFeatures(
    numeric_width=3, index_sizes={"colour": 5}, encodings={"colour": "embedding"}, embedding_dims={"colour": 2}
)


def regression_spec(**model):
    return parse_spec({
        "name": "toy",
        "source": {"kind": "csv", "uri": "unused.csv"},
        "label": {"name": "y", "task": "regression"},
        "features": {"a": {"kind": "numeric"}, "b": {"kind": "numeric"}, "c": {"kind": "numeric"},
                     "colour": {"kind": "categorical", "encoding": "embedding", "embedding_dim": 2}},
        "model": {"hidden_units": [16, 8], **model},
        "training": {"loss": "huber", "learning_rate": 0.01},
    })


def toy_data(n=256, seed=0):
    rng = np.random.default_rng(seed)
    x = {NUMBERS: rng.normal(size=(n, 3)).astype("float32"), "colour": rng.integers(0, 5, n).astype("int64")}
    y = (x[NUMBERS] @ np.array([1.0, -2.0, 0.5]) + 0.3 * x["colour"]).astype("float32")
    return x, y


def trained(kind, spec=None, epochs=2):
    spec = spec or regression_spec()
    keras.utils.set_random_seed(1)
    model = build_training_model(spec, FEATURES, kind)
    compile_for_task(model, spec, spec.training)
    x, y = toy_data()
    history = model.fit(x, y, validation_data=toy_data(64, seed=1), epochs=epochs, batch_size=32, verbose=0)
    return model, history.history


RELOAD = """
import json, sys
import numpy as np
if sys.argv[1] == "import":
    import tfjobs.modeling.models  # registers Shardline's layers, models, losses and metrics
import keras
x = dict(np.load(sys.argv[2]))
out = {}
for path in sys.argv[3:]:
    try:
        model = keras.saving.load_model(path)
    except Exception as err:
        out[path] = {"error": f"{type(err).__name__}: {err}"}
        continue
    out[path] = {"predictions": np.asarray(model(x, training=False)).tolist(),
                 "loss": type(model.loss).__name__, "delta": getattr(model.loss, "delta", None)}
print(json.dumps(out))
"""


def test_every_kind_reloads_from_keras_files_in_a_fresh_process_with_identical_predictions(tmp_path):
    x, _ = toy_data(32, seed=2)
    np.savez(tmp_path / "x.npz", **x)
    expected, paths = {}, []
    for kind in sorted(MODEL_KINDS):
        model, _ = trained(kind)
        path = str(tmp_path / f"{kind}.keras")
        model.save(path)
        expected[path] = np.asarray(model(x, training=False))
        paths.append(path)

    def reload(mode):
        completed = subprocess.run([sys.executable, "-c", RELOAD, mode, str(tmp_path / "x.npz"), *paths],
                                   capture_output=True, text=True, cwd=ROOT, check=True)
        return json.loads(completed.stdout.strip().splitlines()[-1])

    reloaded = reload("import")
    for path in paths:
        assert "error" not in reloaded[path], reloaded[path]
        np.testing.assert_allclose(reloaded[path]["predictions"], expected[path], rtol=0, atol=1e-6, err_msg=path)
        assert (reloaded[path]["loss"], reloaded[path]["delta"]) == ("HuberLoss", 1.0)
    # Keras does not import Shardline's modules by itself: without the import, the file names what is missing.
    without_import = reload("no-import")
    for path in paths:
        assert "shardline>" in without_import[path].get("error", ""), without_import[path]


@pytest.mark.parametrize("kind", sorted(choices.MODEL_KINDS))
def test_every_kind_also_classifies(kind, penguins_spec):
    features = EncodedFeatures(numeric_width=4, index_sizes={"island": 4, "sex": 3},
                               encodings={"island": "one_hot", "sex": "embedding"}, embedding_dims={"sex": 2})
    model = build_training_model(penguins_spec, features, kind)
    x = {NUMBERS: np.random.default_rng(0).normal(size=(6, 4)).astype("float32"),
         "island": np.array([0, 1, 2, 3, 1, 0]), "sex": np.array([0, 1, 2, 0, 1, 2])}
    probabilities = np.asarray(model(x))
    assert probabilities.shape == (6, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_residual_model_reuses_one_block():
    shallow = build_training_model(regression_spec(repeats=1), FEATURES, "residual")
    deep = build_training_model(regression_spec(repeats=6), FEATURES, "residual")
    x, _ = toy_data(4)
    shallow(x), deep(x)
    assert len(deep.trainable_variables) == len(shallow.trainable_variables)
    assert not np.allclose(np.asarray(deep(x)), np.asarray(shallow(x)))


def test_wide_and_deep_variables_split_in_two():
    model = build_training_model(regression_spec(), FEATURES, "wide_deep")
    assert isinstance(model, WideAndDeepModel)
    model(toy_data(4)[0])
    wide = {v.path for v in model.wide_trainable_variables}
    deep = {v.path for v in model.deep_trainable_variables}
    assert wide and deep and not wide & deep
    assert wide | deep == {v.path for v in model.trainable_variables}
    assert all("wide" in path for path in wide)


def test_reconstruction_loss_is_added_and_reported_as_a_metric():
    model, history = trained("reconstruction", regression_spec(reconstruction_weight=0.5))
    assert isinstance(model, ReconstructingModel)
    assert {"reconstruction_loss", "val_reconstruction_loss"} <= set(history)
    x, y = toy_data(64, seed=1)
    predictions = model(x, training=False)
    (added,) = model.losses
    code = model.features(x)
    for layer in model.encoder:
        code = layer(code)
    error = float(np.mean((np.asarray(model.decoder(code)) - x[NUMBERS]) ** 2))
    np.testing.assert_allclose(float(added), 0.5 * error, rtol=1e-5)
    # The validation metric is the unweighted error on the validation data (here, the same rows).
    np.testing.assert_allclose(history["val_reconstruction_loss"][-1], error, rtol=1e-4)
    # fit()'s loss is the label's Huber loss plus the weighted reconstruction error.
    huber = float(model.loss(y, predictions))
    np.testing.assert_allclose(history["val_loss"][-1], huber + 0.5 * error, rtol=1e-4)


def test_model_options_no_kind_reads_are_an_error():
    with pytest.raises(ValueError, match=r"model options \['repeat'\] are read by no model kind"):
        build_training_model(regression_spec(repeat=3), FEATURES, "mlp")
    # An option of another kind is fine: the trigger form may pick any kind for the same spec.
    build_training_model(regression_spec(repeats=3), FEATURES, "mlp")
