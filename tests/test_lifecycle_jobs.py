"""Challenger against champion, promotion, scoring and the run report, through the tfjobs library.

Starts from the session's penguins pipeline (one trained, exported model), copied, with
its version promoted to production. A challenger is the same model with noise in its
weights: its accuracy stays high, its log loss grows.
"""

import dataclasses
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tfjobs.evaluate import Forced, change_failures, decide, evaluate_model, higher_is_better
from tfjobs.export import ExportArgs, NotBlessedError, export_model
from tfjobs.promote import check_consistent, set_production
from tfjobs.spec import EvaluationSpec
from tfjobs.statistics import compute_statistics
from tfjobs.storage.layout import Layout
from tfjobs.storage.store import read_json

CHAMPION = 1764028800
LOG_LOSS_MAY_GROW = EvaluationSpec(min={"accuracy": 0.8}, change={"log_loss": 0.001, "accuracy": -0.05})


def test_a_change_threshold_follows_the_metrics_direction():
    spec = dataclasses.replace(_tiny(), evaluation=EvaluationSpec(change={"accuracy": -0.01, "log_loss": 0.1}))
    comparison, failures = change_failures(spec, {"accuracy": 0.95, "log_loss": 0.3}, {"accuracy": 0.97, "log_loss": 0.1})
    assert higher_is_better("recall_spam") and not higher_is_better("rmse")
    assert comparison["accuracy"]["change"] == pytest.approx(-0.02) and not comparison["accuracy"]["passed"]
    assert failures == ["accuracy 0.95 vs production's 0.97: change -0.02, allowed at least -0.01 (higher is better)",
                        "log_loss 0.3 vs production's 0.1: change +0.2, allowed at most +0.1 (lower is better)"]
    regression = dataclasses.replace(_tiny(), evaluation=EvaluationSpec(change={"rmse": 500}))
    assert change_failures(regression, {"rmse": 50_400.0}, {"rmse": 50_000.0})[1] == []
    champion = {"version": 7, "run": "r1", "metrics": {}}
    assert decide(spec, [], failures, champion, None)[0] == "keep production"
    assert decide(spec, [], failures, champion, Forced("alice", "now"))[0] == "promote (forced)"
    assert decide(spec, ["accuracy 0.5 < required minimum 0.9"], [], champion, Forced("alice", "now"))[0] == \
        "not blessed"  # a forced promotion cannot pass the absolute bounds
    assert decide(spec, [], [], None, None) == ("promote", "no model in production: judged by the absolute bounds "
                                                "alone, which it clears")


def _tiny():
    from conftest import tiny_spec

    return tiny_spec()


@pytest.fixture(scope="module")
def lifecycle(penguins_pipeline, tmp_path_factory):
    """A copy of the session's penguins store: its version in production, and a noisier challenger run."""
    import keras

    import tfjobs.modeling.models  # noqa: F401  (registers the model's layers)

    first = penguins_pipeline.layout
    root = tmp_path_factory.mktemp("lifecycle") / "store"
    shutil.copytree(first.root, root)
    spec = dataclasses.replace(penguins_pipeline.spec, evaluation=LOG_LOSS_MAY_GROW)
    champion = Layout(str(root), spec.name, first.partition, run=first.run, model_name=spec.model_name)
    compute_statistics(spec, champion.validated, champion.statistics)  # the data it was trained on
    set_production(champion.serving, CHAMPION, reason="the first model", by="test")

    challenger = Layout(str(root), spec.name, first.partition, run="r2", model_name=spec.model_name)
    train = Path(challenger.run_dir) / "train"
    shutil.copytree(Path(champion.run_dir) / "train", train)
    model = keras.saving.load_model(train / "training_model.keras")
    rng = np.random.default_rng(0)
    model.set_weights([w + rng.normal(0, 0.25, w.shape).astype(w.dtype) for w in model.get_weights()])
    model.save(train / "training_model.keras")
    return spec, champion, challenger


def evaluate(spec, layout, output="evaluate", force=None):
    return evaluate_model(spec, f"{layout.run_dir}/train/training_model.keras", f"{layout.run_dir}/train/state.json",
                          f"{layout.shards}/manifest.json", f"{layout.run_dir}/{output}", layout.serving, force)


def test_the_champion_is_scored_on_the_same_rows_and_a_worse_challenger_keeps_production(lifecycle):
    spec, _, challenger = lifecycle
    result = evaluate(spec, challenger)
    metrics = read_json(result.metrics_uri)
    assert result.champion_version == CHAMPION and metrics["champion"]["run"] == "r1"
    assert result.champion_metrics["log_loss"] < result.metrics["log_loss"] - 0.001
    assert (result.verdict, result.blessed) == ("keep production", False)
    assert result.reason.startswith(f"worse than production version {CHAMPION} (run r1) beyond the change thresholds:"
                                    " log_loss")
    assert metrics["comparison"]["log_loss"]["passed"] is False and metrics["forced"] is None
    with pytest.raises(NotBlessedError, match="log_loss"):
        export_model(ExportArgs(spec, f"{challenger.run_dir}/train/training_model.keras",
                                f"{challenger.run_dir}/train/state.json", f"{challenger.shards}/manifest.json",
                                result.metrics_uri, challenger.serving, CHAMPION + 1))


def test_a_forced_promotion_is_recorded_with_who_and_when_and_keeps_the_training_statistics(lifecycle):
    spec, champion, challenger = lifecycle
    result = evaluate(spec, challenger, "evaluate", Forced("alice", "2026-11-26T08:00:00+00:00", "manual__1"))
    assert (result.verdict, result.blessed, result.forced) == ("promote (forced)", True, True)
    assert read_json(result.metrics_uri)["forced"] == {"by": "alice", "at": "2026-11-26T08:00:00+00:00",
                                                      "run_id": "manual__1"}
    exported = export_model(ExportArgs(
        spec, f"{challenger.run_dir}/train/training_model.keras", f"{challenger.run_dir}/train/state.json",
        f"{challenger.shards}/manifest.json", result.metrics_uri, challenger.serving, CHAMPION,
        f"{champion.statistics}/statistics.json"))
    assert exported.version == CHAMPION + 1  # the day's second second: the champion holds the first
    metadata = read_json(f"{exported.version_uri}/shardline.json")
    assert metadata["run"] == "r2" and metadata["forced"]["by"] == "alice" and metadata["statistics"]
    assert read_json(f"{exported.version_uri}/statistics.json")["partition"] == champion.partition
    promoted = set_production(challenger.serving, exported.version, reason=result.reason, by="alice",
                              forced=read_json(result.metrics_uri)["forced"])
    assert promoted.previous == CHAMPION and check_consistent(challenger.serving)["forced"]["by"] == "alice"
    set_production(challenger.serving, CHAMPION, reason="back", by="test")


def test_a_delivery_is_scored_in_order_and_its_bad_rows_are_quarantined(lifecycle, tmp_path):
    import palmerpenguins

    from tfjobs.fetch import fetch_dataset
    from tfjobs.score import score_dataset
    from tfjobs.validate import validate_dataset

    spec, champion, _ = lifecycle
    delivery = palmerpenguins.load_penguins().sample(120, random_state=1).drop(columns=["species"]).astype(str)
    delivery.iloc[[5, 50], delivery.columns.get_loc("body_mass_g")] = "heavy"
    delivery.to_csv(tmp_path / "2026-11-26.csv", index=False)
    scoring = Layout(champion.root, "penguins_scoring", "2026-11-26", model_name=spec.model_name)
    fetch_dataset(spec, scoring.raw, partition="2026-11-26", source_uri=str(tmp_path / "{partition}.csv"))
    validated = validate_dataset(spec, scoring.raw, scoring.validated, label_required=False)
    assert (validated.rows_valid, validated.rows_quarantined) == (118, 2)
    output = Layout(champion.root, spec.name, "2026-11-26").predictions
    scored = score_dataset(spec, scoring.validated, champion.serving, output, batch_rows=50)
    predictions = pd.read_parquet(scored.predictions_uri)
    assert scored.rows == len(predictions) == 118 and scored.model_version == CHAMPION
    quarantined = pd.read_csv(validated.quarantine_uri)
    assert sorted(predictions["_line"].tolist() + quarantined["_line"].tolist()) == list(range(2, 122))
    assert predictions["_line"].is_monotonic_increasing and set(quarantined["_line"]) == {7, 52}
    assert set(predictions["prediction"]) <= set(spec.label.classes)
    assert (predictions["model_version"] == CHAMPION).all()
    probabilities = predictions[[f"probability_{c}" for c in spec.label.classes]].to_numpy()
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    assert not score_dataset(spec, scoring.validated, champion.serving, output).rewritten
    with pytest.raises(ValueError, match="was validated as training data"):
        score_dataset(spec, champion.validated, champion.serving, output)


def test_the_run_report_is_one_self_contained_file_with_every_section(lifecycle):
    from tfjobs.run_report import SECTIONS, write_run_report

    spec, champion, challenger = lifecycle
    evaluate(spec, challenger)
    page = Path(write_run_report(spec, challenger)).read_text()
    for name in SECTIONS:
        assert f'<section id="{name}">' in page, name
    assert "keep production" in page and "production&#x27;s model" in page
    assert page.count("data:image/png;base64,") >= 1 + len(spec.features)  # confusion matrix, each feature
    assert not re.search(r'(src|href)="(?!data:|#)', page)  # nothing to fetch: no network needed
    assert "code version" in page and "tensorflow" in page
