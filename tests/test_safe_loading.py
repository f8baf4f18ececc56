"""Files from the store are data: loading a model runs no code of the file's, and nothing is unpickled."""

import ast
import os

import pytest

from conftest import ROOT

SOURCES = sorted(p for folder in ("tfjobs", "operators", "dags") for p in (ROOT / folder).rglob("*.py"))


def calls(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_every_keras_model_load_is_in_safe_mode():
    loads = []
    for path in SOURCES:
        for node, name in calls(path):
            if name.endswith("load_model"):
                keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
                assert keywords.get("safe_mode") == "True", f"{path.relative_to(ROOT)}:{node.lineno}: {name} without safe_mode=True"
                loads.append(path.name)
            assert not name.endswith("enable_unsafe_deserialization"), f"{path.relative_to(ROOT)}:{node.lineno}"
    assert loads  # the guard looks at the real calls


def test_nothing_is_unpickled():
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                    for alias in node.names} | {node.module.split(".")[0] for node in ast.walk(tree)
                                                if isinstance(node, ast.ImportFrom) and node.module}
        assert not {"pickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"} & imported, path
        for node, name in calls(path):
            keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
            assert keywords.get("allow_pickle") in (None, "False"), f"{path.relative_to(ROOT)}:{node.lineno}"
            assert not name.endswith(("read_pickle", "yaml.load", "unsafe_load")), f"{path.relative_to(ROOT)}:{node.lineno}"


def test_a_model_file_with_code_in_it_is_refused(tmp_path):
    import keras

    from tfjobs.evaluate import load_inference_model

    marker = str(tmp_path / "ran")
    inputs = keras.Input((1,))
    # A Lambda layer's function is Python bytecode in the .keras file: loading it would run it.
    outputs = keras.layers.Lambda(lambda x: x + len(open(marker, "w").name))(inputs)
    keras.Model(inputs, outputs).save(tmp_path / "model.keras")
    os.unlink(marker)
    with pytest.raises(ValueError, match="safe_mode"):
        load_inference_model(str(tmp_path / "model.keras"), str(tmp_path / "state.json"))
    assert not os.path.exists(marker)
