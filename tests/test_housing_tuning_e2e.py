"""The housing DAG tuning through Airflow (`airflow dags test`): two mapped trial runners, one Optuna study.

The same date runs twice: first as the daily run does (tuning off: the mapped runners are
skipped and train uses the spec's settings), then with the `tuning` Param on. Both train
EPOCHS epochs, the length of one trial (the spec's tuning.epochs), so train takes the best
trial's model as it is, and the spec's own settings are trial 0 of the study.
"""

import json
import time

import pytest

from conftest import HOUSING_CSV, ROOT, airflow_dags_test
from tfjobs.spec import load_spec

pytestmark = pytest.mark.slow
DATE = "2026-11-23"
SPEC = load_spec(ROOT / "include" / "housing.yaml")
EPOCHS = SPEC.tuning.epochs
ARTIFACTS = ROOT / "tests" / "artifacts"  # git-ignored


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    dags_test, store = airflow_dags_test(tmp_path_factory.mktemp("airflow"), "housing")
    run_dir = store / "runs" / "housing" / f"{DATE}T000000"
    results = {}
    for name, conf in (("daily", {}), ("tuned", {"tuning": True, "tuning_parallel": 2})):
        started = time.monotonic()
        completed = dags_test(DATE, conf={"source_uri": str(HOUSING_CSV), "epochs": EPOCHS, **conf})
        log = completed.stdout + completed.stderr
        assert completed.returncode == 0, f"{name}:\n{log[-8000:]}"
        results[name] = {
            "seconds": round(time.monotonic() - started, 1),
            "log": log,
            "training": json.loads((run_dir / "train" / "training.json").read_text()),
            "rmse": json.loads((run_dir / "evaluate" / "metrics.json").read_text())["metrics"]["rmse"],
            "tuned": (run_dir / "tune" / "best.json").exists(),
        }
    return store, run_dir, results


def test_the_daily_run_skips_the_runners_and_trains_the_specs_settings(runs):
    _, _, results = runs
    daily = results["daily"]
    assert not daily["tuned"] and daily["training"]["tuned_settings"] == {}
    assert "Tuning is off for this run" in daily["log"]
    assert (daily["training"]["model_kind"], daily["training"]["settings"]["learning_rate"]) == (
        SPEC.model.kind, SPEC.training.learning_rate)


def test_the_study_holds_every_trial_with_its_objective(runs):
    import optuna
    from optuna.trial import TrialState

    store, run_dir, results = runs
    report = json.loads((run_dir / "tune" / "study.json").read_text())
    storage = f"sqlite:///{store / 'tuning' / 'studies.sqlite3'}"
    trials = optuna.load_study(study_name=report["study"], storage=storage).get_trials()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) >= SPEC.tuning.trials >= 8 and len(trials) == len(report["trials"])
    for trial in finished:
        assert trial.value is not None or trial.intermediate_values, trial.number
        assert set(trial.params) == set(SPEC.tuning.space)
    # Each trial's settings and objective are in the task log, and the table in the run report.
    log = results["tuned"]["log"]
    assert all(f"Trial {t.number}: " in log or f"Trial {t.number} pruned" in log for t in finished)
    assert f"trial  state     {report['objective']}" in log
    # Two mapped runners took part (in `airflow dags test` one after the other: the first ran them all).
    assert {t.user_attrs["runner"] for t in finished} <= {0, 1} and "Runner 1 ran trials" in log


def test_train_used_the_best_trials_settings(runs):
    _, run_dir, results = runs
    best = json.loads((run_dir / "tune" / "best.json").read_text())
    training = results["tuned"]["training"]
    assert training["tuned_settings"] == best["settings"]
    settings = best["settings"]
    assert training["settings"]["learning_rate"] == settings.get("training.learning_rate",
                                                                 SPEC.training.learning_rate)
    assert training["model_kind"] == settings.get("model.kind", SPEC.model.kind)
    # One trial is as long as this training: train took the best trial's model rather than train it again.
    trial = json.loads((run_dir / "tune" / "trials" / f"trial-{best['trial']:04d}" / "training.json").read_text())
    assert training["fingerprint"] == trial["fingerprint"] and training["metrics"] == trial["metrics"]
    assert f"Training with trial {best['trial']}'s settings" in results["tuned"]["log"]


def test_the_tuned_model_is_no_worse_on_the_test_split_than_the_specs_defaults(runs):
    """Against the spec's own settings trained on the same data for as long: trial 0 of the study.

    The study picks on the eval split, so there the best trial must beat trial 0 outright. On
    the test split (2,027 rows) the two differ by about 1%, which is also how far two trainings
    of the same settings land apart (the daily run against trial 0): "no worse" is therefore
    judged by the spec's own rule for a model that replaces another, `evaluation.change` (the
    lifecycle's promotion rule, RMSE + $1,000 at most), not by the sign of a 1% difference. The
    worst trials of this space are 5-10% worse on the eval split, and fail that rule.
    """
    from tfjobs.evaluate import change_failures, evaluate_model

    store, run_dir, results = runs
    report = json.loads((run_dir / "tune" / "study.json").read_text())
    defaults = report["trials"][report["defaults_trial"]]
    assert defaults["spec_defaults"] and defaults["state"] == "complete"
    trial_dir = run_dir / "tune" / "trials" / f"trial-{defaults['trial']:04d}"
    evaluated = evaluate_model(SPEC, str(trial_dir / "training_model.keras"), str(trial_dir / "state.json"),
                               str(store / "shards" / "housing" / DATE / "manifest.json"),
                               str(run_dir / "evaluate-spec-defaults"))
    tuned, spec_defaults, daily = results["tuned"]["rmse"], evaluated.metrics["rmse"], results["daily"]["rmse"]
    record = {"epochs": EPOCHS, "test_rmse": {"tuned": tuned, "spec_defaults_trial": spec_defaults,
                                              "daily_run_spec_defaults": daily},
              "best": report["best_trial"], "seconds": {k: r["seconds"] for k, r in results.items()},
              "trials": [{k: t[k] for k in ("trial", "state", "value", "seconds", "settings")}
                         for t in report["trials"]]}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "housing_tuning.json").write_text(json.dumps(record, indent=2) + "\n")  # for the issue notes
    complete = [t for t in report["trials"] if t["state"] == "complete"]
    best = next(t for t in complete if t["trial"] == report["best_trial"])
    assert best["value"] == min(t["value"] for t in complete) <= defaults["value"], record
    _, failures = change_failures(SPEC, {"rmse": tuned}, {"rmse": spec_defaults})
    assert SPEC.evaluation.change and not failures, (failures, record)
