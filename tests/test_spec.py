import pytest

from conftest import ROOT, tiny_spec
from tfjobs.spec import SpecError, TrainingSpec, load_spec, parse_spec


def test_every_shipped_spec_loads():
    specs = sorted((ROOT / "include").glob("*.yaml"))
    assert specs
    for path in specs:
        spec = load_spec(path)
        assert spec.label.name not in [f.name for f in spec.features]


def test_errors_name_the_file_and_the_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nsource: {kind: csv, uri: a.csv}\nlabel: {name: y, task: clustering}\n"
                    "features: {a: {kind: numeric}}\n")
    with pytest.raises(SpecError, match=r"bad\.yaml: label\.task 'clustering'"):
        load_spec(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"features": {"a": {"kind": "vector"}}}, r"features\.a\.kind: 'vector' is not one of \['categorical'"),
        ({"features": {"a": {"kind": "numeric", "missing": "drop"}}}, r"features\.a\.missing: 'drop' is not one of"),
        ({"features": {"a": {"kind": "numeric", "bins": 4}}}, r"features\.a: \['bins'\] apply to transform: discretize"),
        ({"features": {"a": {"kind": "numeric", "transform": "log"}}}, r"features\.a\.transform: 'log' is not one of"),
        ({"features": {"a": {"kind": "numeric", "colour": 1}}}, r"features\.a\.colour: is not an option of this kind"),
        ({"features": {"c": {"kind": "categorical", "encoding": "multi_hot"}}}, r"features\.c: encoding multi_hot needs a delimiter"),
        ({"features": {"c": {"kind": "categorical", "delimiter": "|"}}}, r"features\.c: a delimited list needs encoding multi_hot"),
        ({"features": {"c": {"kind": "categorical", "num_bins": 8, "min_frequency": 2}}}, r"num_bins hashes values without a vocabulary"),
        ({"features": {"c": {"kind": "integer_categorical", "delimiter": "|"}}}, r"features\.c\.delimiter: is not an option"),
        ({"crosses": [{"features": ["size", "colour"], "num_bins": 8}]}, r"crosses\[0\]: cross 'size_x_colour' needs an index from 'size'"),
        ({"crosses": [{"features": ["colour", "nope"], "num_bins": 8}]}, r"crosses\[0\]: cross 'colour_x_nope' names 'nope', which is not a feature"),
        ({"crosses": [{"features": ["colour", "batch"]}]}, r"crosses\[0\]\.num_bins: Field required"),
        ({"split": {"train": 0.9, "eval": 0.2, "test": 0.1}}, "sum to 1"),
        ({"split": {"key": ["nope"]}}, r"split\.key names unknown columns \['nope'\]"),
        ({"shards": {"train": 0}}, "positive integer"),
        ({"label": {"name": "kind", "task": "classification", "classes": ["a"]}}, "at least two classes"),
        ({"trainig": {}}, r"unknown top-level fields \['trainig'\]"),
        ({"training": {"epoch": 3}}, r"training has unknown fields \['epoch'\]"),
        ({"source": {"kind": "csv"}}, "needs source.uri"),
        ({"training": {"loop": "sgd"}}, r"training\.loop 'sgd' is not one of \['custom', 'fit'\]"),
        ({"training": {"loss": "mae"}}, r"training\.loss 'mae' is not one of"),
        ({"training": {"loss": "huber"}}, r"'huber' does not fit a classification task; choose one of \['crossentropy'\]"),
        ({"training": {"huber_delta": 0}}, r"training\.huber_delta must be positive"),
        ({"training": {"jit_compile": "maybe"}}, r"training\.jit_compile 'maybe'"),
        ({"features": {"c": {"kind": "categorical", "min_frequency": 0}}}, r"features\.c\.min_frequency: Input should be greater than or equal to 1"),
        ({"evaluation": {"change": {"accuracy": "a lot"}}}, r"evaluation\.change must map metric names to numbers"),
        ({"drift": {"action": "panic"}}, r"drift\.action 'panic' is not one of \('warn', 'stop'\)"),
        ({"drift": {"features": {"nope": 0.1}}}, r"drift\.features names unknown features \['nope'\]"),
        ({"drift": {"threshold": 0}}, r"drift threshold of 'threshold' must be a positive number"),
        ({"serving": {"keep_versions": 0}}, r"serving\.keep_versions must be a positive integer"),
        ({"scoring": {"key": ["kind"]}}, r"scoring\.key names the label 'kind'"),
        ({"source": {"kind": "csv", "uri": "a", "header": False}}, r"header is false: name the file's columns"),
        ({"source": {"kind": "csv", "uri": "a", "column_names": ["x"]}}, r"column_names names the columns of a file without a header"),
        ({"source": {"kind": "csv", "uri": "a", "header": False, "column_names": ["x", "x"]}}, r"column_names must be distinct"),
        ({"source": {"kind": "csv", "uri": "a", "delimiter": "\\t"}}, r"source\.delimiter must be one character"),
        ({"source": {"kind": "csv", "uri": "a", "quoting": "all"}}, r"source\.quoting 'all' is not one of \['minimal', 'none'\]"),
        ({"source": {"kind": "csv", "uri": "a", "encoding": "utf-9"}}, r"source\.encoding 'utf-9' is not an encoding"),
        ({"source": {"kind": "palmerpenguins", "delimiter": "\t"}}, r"source\.delimiter describes a delivered file: it applies to kind csv or landing"),
        ({"features": {"t": {"kind": "text", "output_mode": "one_hot"}}}, r"features\.t\.output_mode: 'one_hot' is not one of"),
        ({"features": {"t": {"kind": "text", "ngrams": 6}}}, r"features\.t\.ngrams: Input should be less than or equal to 5"),
        ({"features": {"t": {"kind": "text", "storage": "proto"}}}, r"features\.t\.storage: 'proto' is not one of"),
    ],
)
def test_bad_specs_are_rejected_with_the_field_named(change, message):
    with pytest.raises(SpecError, match=message):
        tiny_spec(**change)


def test_label_cannot_also_be_a_feature():
    with pytest.raises(SpecError, match="also listed as a feature"):
        tiny_spec(features={"kind": {"kind": "categorical"}})


def test_training_overrides_are_cast_and_checked():
    settings = TrainingSpec().with_overrides({"epochs": "7", "learning_rate": "0.5"})
    assert (settings.epochs, settings.learning_rate) == (7, 0.5)
    with pytest.raises(SpecError, match="Unknown training setting 'epoch'"):
        TrainingSpec().with_overrides({"epoch": 3})
    with pytest.raises(SpecError, match="'batch_size' must be int, got 'many'"):
        TrainingSpec().with_overrides({"batch_size": "many"})


def test_loss_loop_and_xla_settings_come_from_the_spec_or_overrides():
    regression = parse_spec({**_minimal(), "training": {"loss": "huber", "huber_delta": 2.0, "jit_compile": True}})
    assert (regression.training.loss_for("regression"), regression.training.jit_compile) == ("huber", "true")
    assert parse_spec(_minimal()).training.loss_for("regression") == "mse"  # the task's default
    assert tiny_spec().training.loss_for("classification") == "crossentropy"
    settings = regression.training.with_overrides({"loop": "custom", "loss": "mse", "wide_learning_rate": "0.1"})
    assert (settings.loop, settings.loss, settings.wide_learning_rate) == ("custom", "mse", 0.1)
    with pytest.raises(SpecError, match="training.loop 'tape'"):
        settings.with_overrides({"loop": "tape"})


def test_fingerprint_follows_content(penguins_spec):
    assert penguins_spec.fingerprint() == load_spec(ROOT / "include" / "penguins.yaml").fingerprint()
    assert tiny_spec().fingerprint() != tiny_spec(shards={"train": 3}).fingerprint()
    assert parse_spec({**_minimal(), "description": "x"}).fingerprint() != parse_spec(_minimal()).fingerprint()


def _minimal():
    return {"name": "m", "source": {"kind": "palmerpenguins"},
            "label": {"name": "y", "task": "regression"}, "features": {"x": {"kind": "numeric"}}}


def test_deterministic_training_is_a_boolean_from_the_spec_or_overrides():
    assert parse_spec({**_minimal(), "training": {"deterministic": True}}).training.deterministic
    assert not TrainingSpec().deterministic  # deterministic kernels are slower: asked for, not the default
    assert TrainingSpec().with_overrides({"deterministic": "true"}).deterministic
    assert not TrainingSpec(deterministic=True).with_overrides({"deterministic": False}).deterministic
    with pytest.raises(SpecError, match="'deterministic' must be bool, got 'sometimes'"):
        TrainingSpec().with_overrides({"deterministic": "sometimes"})
    with pytest.raises(SpecError, match="training.deterministic must be true or false, got 1"):
        parse_spec({**_minimal(), "training": {"deterministic": 1}})


def test_lifecycle_settings_have_defaults_and_read_like_the_issue():
    spec = tiny_spec(evaluation={"min": {"accuracy": 0.9}, "change": {"accuracy": -0.01}},
                     drift={"action": "stop", "features": {"size": 0.05}}, scoring={"key": ["id"]})
    assert spec.evaluation.change == {"accuracy": -0.01}
    assert (spec.drift.action, spec.drift.threshold_of("size"), spec.drift.threshold_of("colour")) == ("stop", 0.05, 0.1)
    assert spec.serving.keep_versions == 5 and spec.scoring.key == ("id",)
    housing = load_spec(ROOT / "include" / "housing.yaml")
    assert housing.evaluation.change == {"rmse": 1000} and housing.drift.action == "stop"


def test_a_run_overrides_feature_options_checked_by_their_kind():
    spec = tiny_spec(features={"note": {"kind": "text", "sequence_length": 16}, "colour": {"kind": "categorical"}})
    chosen = spec.with_feature_options({"note": {"output_mode": "tf_idf", "ngrams": "2", "storage": ""}})
    note = chosen.feature("note")
    # The spec's own options stay (int-family ones too: a form may switch families); "" keeps the spec's value.
    assert (note.options.output_mode, note.options.ngrams, note.options.sequence_length) == ("tf_idf", 2, 16)
    assert note.options.storage == "example" and chosen.fingerprint() != spec.fingerprint()
    assert spec.with_feature_options({"note": {"output_mode": None}}) is spec
    with pytest.raises(SpecError, match=r"features\.note\.output_mode: 'bag' is not one of"):
        spec.with_feature_options({"note": {"output_mode": "bag"}})
    with pytest.raises(SpecError, match=r"feature options given for \['nope'\], which are not features"):
        spec.with_feature_options({"nope": {"output_mode": "int"}})
