"""Imports run one way: dags -> operators -> tfjobs; tfjobs runs without Airflow."""

import ast
import subprocess
import sys

import pytest

from conftest import ROOT

JOBS = ["fetch", "validate", "statistics", "shard", "adapt", "tune", "train", "evaluate", "export", "promote",
        "rollback", "score", "predict", "report"]


def top_level_imports(path):
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module.split(".")[0]


def all_imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module.split(".")[0]


def test_tfjobs_never_imports_airflow_dags_or_operators():
    for path in (ROOT / "tfjobs").rglob("*.py"):
        assert not {"airflow", "operators", "dags"} & set(all_imports(path)), path


def test_operators_never_import_dags_and_defer_tensorflow():
    for path in (ROOT / "operators").rglob("*.py"):
        assert "dags" not in set(all_imports(path)), path
        assert not {"tensorflow", "keras", "tensorflow_datasets"} & set(top_level_imports(path)), path


def test_dags_import_no_tensorflow_at_module_level():
    for path in (ROOT / "dags").rglob("*.py"):
        assert not {"tensorflow", "keras", "tfjobs"} & set(top_level_imports(path)) - {"tfjobs"}, path


@pytest.mark.parametrize("job", JOBS)
def test_every_job_has_a_command_line(job):
    completed = subprocess.run([sys.executable, "-m", f"tfjobs.{job}", "--help"], capture_output=True, text=True,
                               cwd=ROOT, check=False)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.startswith("usage: python -m tfjobs.")


def test_tfjobs_imports_without_airflow_installed():
    code = (
        "import sys, builtins\n"
        "real = builtins.__import__\n"
        "def guard(name, *a, **k):\n"
        "    if name.split('.')[0] == 'airflow': raise ImportError('airflow is not installed')\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = guard\n"
        + "".join(f"import tfjobs.{job}\n" for job in JOBS)
        + "import tfjobs.features.preprocessing, tfjobs.modeling.models, tfjobs.modeling.custom_loop\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True)


def string_constants(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value


def test_no_module_outside_the_feature_registry_names_a_feature_kind():
    from tfjobs.features import kinds

    names = set(kinds())
    paths = [p for folder in ("tfjobs", "operators", "dags") for p in (ROOT / folder).rglob("*.py")
             if (ROOT / "tfjobs" / "features") not in p.parents]
    named = [f"{p.relative_to(ROOT)}:{line} {value!r}" for p in paths for line, value in string_constants(p)
             if value in names]
    assert not named, "kinds are named only in tfjobs/features/: " + ", ".join(named)


def test_the_storage_dtypes_are_mapped_in_one_place():
    """Only tfjobs/storage/examples.py maps dtype names (to Arrow, TensorFlow): no second copy of the map."""
    from tfjobs.storage.examples import DTYPES

    copies = []
    for path in (ROOT / "tfjobs").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Dict):
                keys = {k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
                if len(keys & set(DTYPES)) >= 2 and path != ROOT / "tfjobs" / "storage" / "examples.py":
                    copies.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not copies, copies


def test_model_kinds_described_for_the_form_match_the_builders():
    from tfjobs import choices
    from tfjobs.modeling import models

    assert set(models.MODEL_KINDS) == set(choices.MODEL_KINDS)


def test_model_options_a_search_may_set_match_what_the_builders_read():
    from tfjobs import choices
    from tfjobs.modeling import models

    read = {option for kind in models.MODEL_KINDS.values() for option in kind.options}
    assert read == set(choices.MODEL_OPTIONS)
