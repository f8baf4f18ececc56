"""Test metrics accumulate batch by batch (memory does not grow with the split) and match scikit-learn's."""

import numpy as np
import pytest
from sklearn import metrics as sk

from conftest import tiny_spec
from tfjobs.evaluate import SplitMetrics, blessing_failures


def in_batches(spec, labels, predictions, size=7):
    metrics = SplitMetrics(spec)
    for start in range(0, len(labels), size):
        metrics.update(labels[start : start + size], predictions[start : start + size])
    return metrics.result()


def test_classification_metrics_streamed_match_scikit_learn():
    rng = np.random.default_rng(0)
    spec = tiny_spec(label={"name": "kind", "task": "classification", "classes": ["ham", "spam", "eggs"]})
    truth = rng.integers(0, 3, 200)
    predictions = rng.dirichlet(np.ones(3), 200).astype(np.float32)
    labels = np.array([["ham", "spam", "eggs"][i].encode() for i in truth], dtype=object)
    result = in_batches(spec, labels, predictions)
    predicted = predictions.argmax(axis=1)
    assert result["accuracy"] == pytest.approx(sk.accuracy_score(truth, predicted))
    assert result["log_loss"] == pytest.approx(sk.log_loss(truth, predictions, labels=[0, 1, 2]), rel=1e-5)
    assert result["precision_spam"] == pytest.approx(sk.precision_score(truth, predicted, labels=[1], average="macro"))
    assert result["recall_spam"] == pytest.approx(sk.recall_score(truth, predicted, labels=[1], average="macro"))
    assert np.array(result["confusion_matrix"]["counts"]).tolist() == sk.confusion_matrix(truth, predicted).tolist()
    # Per-class metrics have flat names a spec's bounds can use.
    bounded = tiny_spec(label={"name": "kind", "task": "classification", "classes": ["ham", "spam", "eggs"]},
                        evaluation={"min": {"recall_spam": 1.01}})
    assert blessing_failures(bounded, result) == [f"recall_spam {result['recall_spam']:.4g} < required minimum 1.01"]


def test_regression_metrics_streamed_match_scikit_learn():
    rng = np.random.default_rng(1)
    spec = tiny_spec(label={"name": "kind", "task": "regression"})
    labels = rng.normal(2e5, 5e4, 301).astype(np.float32)
    predictions = (labels + rng.normal(0, 1e4, 301)).astype(np.float32).reshape(-1, 1)
    result = in_batches(spec, labels, predictions)
    assert result["rmse"] == pytest.approx(np.sqrt(sk.mean_squared_error(labels, predictions[:, 0])), rel=1e-6)
    assert result["mae"] == pytest.approx(sk.mean_absolute_error(labels, predictions[:, 0]), rel=1e-6)
    assert result["r2"] == pytest.approx(sk.r2_score(labels, predictions[:, 0]), rel=1e-6)


def test_an_empty_split_is_an_error_not_a_nan():
    with pytest.raises(ValueError, match="no records"):
        SplitMetrics(tiny_spec()).result()
