"""Hyperparameter search: the spec's tuning block, the study its runners share, the best trial and train."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import ROOT, tiny_spec
from tfjobs import tune
from tfjobs.spec import SpecError, load_spec, parse_spec, tunable_settings, tuned_state
from tfjobs.storage.store import read_json, store_for
from tfjobs.train import TrainArgs, train_model

SEARCH = {
    "objective": {"metric": "accuracy"},
    "trials": 4,
    "parallel": 2,
    "algorithm": "random",
    "epochs": 2,
    "space": {
        "training.learning_rate": {"low": 0.002, "high": 0.05, "log": True},
        "training.batch_size": {"choices": [16, 32]},
        "model.hidden_units": {"choices": [[32, 16], [16]]},
    },
}


def penguins_with_tuning(**changes):
    raw = yaml.safe_load((ROOT / "include" / "penguins.yaml").read_text())
    raw["tuning"] = {**SEARCH, **changes}
    return parse_spec(raw)


@pytest.mark.parametrize(("space", "message"), [
    ({"model.kind": {"choices": []}}, r"tuning\.space\.model\.kind\.choices: must list at least one value"),
    ({"training.learning_rate": {"low": 0.1, "high": 0.01}},
     r"tuning\.space\.training\.learning_rate: low 0\.1 is above its high 0\.01"),
    ({"training.learnin_rate": {"low": 0.1, "high": 1}},
     r"tuning\.space\.training\.learnin_rate: unknown setting 'training\.learnin_rate'; known settings: \[.*"
     r"'training\.learning_rate'"),
    ({"model.kind": {"choices": ["mlp", "cnn"]}}, r"tuning\.space\.model\.kind: model\.kind 'cnn' is not one of"),
    ({"training.loss": {"choices": ["huber"]}}, r"tuning\.space\.training\.loss: .*'huber' does not fit a "
     r"classification task"),
    ({"training.batch_size": {"low": 8, "high": 64.5}}, r"training\.batch_size takes whole numbers"),
    ({"training.learning_rate": {"low": 0, "high": 1, "log": True}}, r"log: true needs a positive low"),
    ({"model.dropout": {"low": 0, "high": 1}}, r"tuning\.space\.model\.dropout: model\.dropout must be below 1"),
    ({"training.loop": {"low": 1, "high": 2}}, r"training\.loop is a str setting: give choices"),
    ({"model.hidden_units": {"choices": [[64, 0]]}}, r"model\.hidden_units must be a list of positive integers"),
    ({"training.epochs": {"low": 1, "high": 9}}, r"unknown setting 'training\.epochs'"),
    ({"training.learning_rate": {"low": 0.1, "high": 1, "choices": [0.5]}}, r"give either low and high, or choices"),
    ({}, r"tuning\.space: Dictionary should have at least 1 item"),
])
def test_an_invalid_search_space_fails_at_parse_time_naming_the_field(space, message):
    with pytest.raises(SpecError, match=message):
        penguins_with_tuning(space=space)


@pytest.mark.parametrize(("changes", "message"), [
    ({"objective": {"metric": "rmse"}}, r"tuning\.objective\.metric 'rmse' is not an eval metric of a classification"),
    ({"trials": 0}, r"tuning\.trials: Input should be greater than or equal to 1"),
    ({"algorithm": "grid"}, r"tuning\.algorithm: Input should be 'random' or 'tpe'"),
    ({"pruners": "median"}, r"tuning\.pruners: Extra inputs are not permitted"),
])
def test_the_objective_and_budget_are_checked_too(changes, message):
    with pytest.raises(SpecError, match=message):
        penguins_with_tuning(**changes)


def test_a_spec_file_error_names_the_file(tmp_path):
    raw = yaml.safe_load((ROOT / "include" / "housing.yaml").read_text())
    raw["tuning"]["space"]["model.kind"] = {"choices": []}
    path = tmp_path / "housing.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError, match=r"housing\.yaml: tuning\.space\.model\.kind\.choices: must list"):
        load_spec(path)


def test_the_housing_search_names_settings_of_every_part_and_the_objective_minimizes_rmse():
    spec = load_spec(ROOT / "include" / "housing.yaml")
    assert {"training.learning_rate", "model.kind", "features.ocean_proximity.embedding_dim"} <= set(spec.tuning.space)
    assert spec.tuning.direction("regression") == "minimize"
    assert penguins_with_tuning().tuning.direction("classification") == "maximize"
    # Only options the model alone reads, and only where the feature uses them (an embedding's width).
    assert tunable_settings(spec)["features.ocean_proximity.embedding_dim"] == "int"
    assert not any(name.startswith("features.latitude") for name in tunable_settings(spec))


def test_settings_apply_to_training_model_and_feature_options_and_leave_the_fingerprint_to_what_trains():
    spec = load_spec(ROOT / "include" / "housing.yaml")
    tuned = spec.with_settings({"training.learning_rate": "0.01", "training.batch_size": 128, "model.kind": "mlp",
                                "model.hidden_units": [32], "model.repeats": 2, "model.dropout": 0.1,
                                "features.ocean_proximity.embedding_dim": 5})
    assert (tuned.training.learning_rate, tuned.training.batch_size) == (0.01, 128)
    assert (tuned.model.kind, tuned.model.hidden_units, tuned.model.dropout) == ("mlp", (32,), 0.1)
    assert tuned.model.options["repeats"] == 2 and tuned.feature("ocean_proximity").options.embedding_dim == 5
    assert tuned.fingerprint() != spec.fingerprint()
    # The search itself is not what any step computes: editing it leaves the fingerprint alone.
    assert dataclasses.replace(spec, tuning=None).fingerprint() == spec.fingerprint()
    state = {"features": {"ocean_proximity": {"kind": "categorical", "options": {"embedding_dim": 3}}}}
    assert tuned_state(state, {"features.ocean_proximity.embedding_dim": 5, "training.batch_size": 8}) == {
        "features": {"ocean_proximity": {"kind": "categorical", "options": {"embedding_dim": 5}}}}
    assert state["features"]["ocean_proximity"]["options"]["embedding_dim"] == 3  # a copy
    with pytest.raises(SpecError, match="training.batch_size must be int, got 'many'"):
        spec.with_settings({"training.batch_size": "many"})
    assert tiny_spec().tuning is None


def test_the_spec_defaults_queued_first_are_those_the_space_allows():
    spec = load_spec(ROOT / "include" / "housing.yaml")
    args = tune.TuneArgs(spec, "m", "s", "o", "sqlite://")
    defaults = tune.spec_defaults(args)
    assert defaults["training.learning_rate"] == spec.training.learning_rate
    assert defaults["model.hidden_units"] == "[64, 64]" and defaults["model.kind"] == "wide_deep"
    assert defaults["training.loss"] == "mse"  # the task's default loss, which the spec leaves empty
    # Explicit settings of the run are held in every trial, not searched (epochs only sets the final training).
    held = dataclasses.replace(args, hyperparameters={"learning_rate": "0.02", "epochs": "3"}, model_kind="mlp")
    assert held.fixed == {"training.learning_rate": "0.02", "model.kind": "mlp"}
    assert not {"training.learning_rate", "model.kind"} & set(held.space) and "training.loss" in held.space
    only_learning_rate = penguins_with_tuning(space={"training.learning_rate": {"low": 0.001, "high": 0.1}})
    with pytest.raises(ValueError, match=r"sets every searched setting itself \(\['training.learning_rate'\]\)"):
        tune.plan_study(tune.TuneArgs(only_learning_rate, "m", "s", "o", "sqlite://",
                                      hyperparameters={"learning_rate": "0.02"}))


@pytest.fixture(scope="module")
def study(penguins_pipeline, tmp_path_factory):
    """Two runners, one after the other as `airflow dags test` runs them, share one study of the penguins."""
    run = penguins_pipeline
    spec = penguins_with_tuning()
    output = run.layout.run_dir + "/tune"
    storage = tune.default_storage(str(tmp_path_factory.mktemp("tuning")))
    args = tune.TuneArgs(spec, run.shard.manifest_uri, run.adapt.state_uri, output, storage)
    plan = tune.plan_study(args)
    runners = [tune.run_trials(dataclasses.replace(args, runner=i)) for i in plan.runners]
    best = tune.pick_best(args)
    return args, plan, runners, best


def test_the_study_holds_every_trial_with_its_objective_and_the_report(study):
    args, plan, runners, best = study
    assert plan.runners == [0, 1] and not plan.resumed and plan.queued_defaults["training.batch_size"] == 16
    assert runners[0].trials_run == [0, 1, 2, 3] and runners[1].trials_run == []  # the first runner left none
    report = read_json(best.study_uri)
    assert [t["trial"] for t in report["trials"]] == [0, 1, 2, 3]
    assert all(t["state"] == "complete" and 0 <= t["value"] <= 1 for t in report["trials"])
    assert report["trials"][0]["spec_defaults"] and report["trials"][0]["settings"]["training.learning_rate"] == 0.01
    assert best.best_value == max(t["value"] for t in report["trials"]) and best.trials["complete"] == 4
    assert best.storage.endswith("studies.sqlite3") and not best.storage.startswith("sqlite")
    assert store_for(best.plot_uri).read_bytes(best.plot_uri)[:4] == b"\x89PNG"
    lines = tune.tuning_lines(args.output_uri.rsplit("/", 1)[0])
    assert "4 trials (4 complete, 0 pruned, 0 failed), random" in lines[1] and "(HParams)" in lines[2]
    assert sum(line.strip().startswith(("0", "1", "2", "3")) for line in lines) == 4


def test_each_trial_is_in_tensorboards_hparams_view(study):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args, _, _, best = study
    events = EventAccumulator(f"{best.tensorboard_uri}/trial-0001/tensorboard")
    events.Reload()
    assert {"_hparams_/session_start_info", "objective_val_accuracy"} <= set(events.Tags()["tensors"])
    assert events.SummaryMetadata("_hparams_/session_start_info").plugin_data.plugin_name == "hparams"


def test_a_rerun_resumes_the_study_instead_of_restarting_it(study):
    args, _, _, best = study
    plan = tune.plan_study(args)
    assert plan.resumed and plan.study_name == best.study_name and plan.queued_defaults == {}
    assert tune.run_trials(args).trials_run == []  # all 4 are finished
    more = dataclasses.replace(args, trials=5)
    assert tune.run_trials(more).trials_run == [4]  # more trials extend the same study


def test_train_uses_the_best_settings_and_reuses_the_best_trial_when_it_trained_the_same(study, penguins_pipeline):
    args, _, _, best = study
    run = penguins_pipeline
    output = run.layout.run_dir + "/tuned-train"
    same = TrainArgs(args.spec, args.shards_manifest_uri, args.state_uri, output, hyperparameters={"epochs": 2},
                     tuned_settings=best.best_settings, reuse_uri=best.best_trial_uri)
    result = train_model(same)
    assert result.rewritten and result.metrics == read_json(best.best_trial_uri + "/training.json")["metrics"]
    summary = read_json(result.summary_uri)
    assert summary["tuned_settings"] == best.best_settings
    assert summary["settings"]["batch_size"] == best.best_settings["training.batch_size"]
    # Longer training than the trials had: the same settings, trained anew; an explicit value wins.
    longer = dataclasses.replace(same, output_uri=output + "-longer", hyperparameters={"epochs": 3, "batch_size": 8})
    summary = read_json(train_model(longer).summary_uri)
    assert summary["epochs_run"] == 3 and summary["settings"]["batch_size"] == 8
    assert summary["settings"]["learning_rate"] == best.best_settings["training.learning_rate"]


def test_a_trained_embedding_width_is_the_one_in_the_runs_state(penguins_pipeline, tmp_path):
    """A feature option a trial tunes reaches the model through the run's copy of the state."""
    run = penguins_pipeline
    raw = yaml.safe_load((ROOT / "include" / "penguins.yaml").read_text())
    raw["features"]["island"] = {"kind": "categorical", "encoding": "embedding", "embedding_dim": 2}
    spec = parse_spec(raw)
    assert "features.island.embedding_dim" in tunable_settings(spec)
    state = read_json(run.adapt.state_uri)
    state["features"]["island"]["options"].update(encoding="embedding", embedding_dim=2)
    state_uri = str(tmp_path / "state.json")
    store_for(state_uri).write_bytes(state_uri, json.dumps(state).encode())
    result = train_model(TrainArgs(spec, run.shard.manifest_uri, state_uri, str(tmp_path / "train"),
                                   hyperparameters={"epochs": 1}, tuned_settings={"features.island.embedding_dim": 5}))
    assert read_json(result.state_uri)["features"]["island"]["options"]["embedding_dim"] == 5
    assert read_json(state_uri)["features"]["island"]["options"]["embedding_dim"] == 2  # the adapted state is kept


RUNNER = """
import dataclasses, json, logging, sys
from tfjobs import tune
from tfjobs.spec import parse_spec
logging.basicConfig(level=logging.INFO)
raw = json.loads(sys.argv[1])
args = tune.TuneArgs(parse_spec(raw["spec"]), *raw["args"], heartbeat_s=1, grace_s=4, runner=raw["runner"])
if raw["plan"]:
    tune.plan_study(args)
tune.run_trials(args)
"""


@pytest.mark.slow
def test_a_runner_killed_mid_trial_leaves_the_study_consistent_and_another_takes_its_trial(penguins_pipeline,
                                                                                          tmp_path):
    """SIGKILL a runner while it trains; the study's completed trials stay, its trial is run again, once."""
    import optuna
    from optuna.trial import TrialState

    run = penguins_pipeline
    raw = yaml.safe_load((ROOT / "include" / "penguins.yaml").read_text())
    raw["tuning"] = {**SEARCH, "trials": 4, "epochs": 12}  # a trial of a few seconds: time to kill it
    storage = tune.default_storage(str(tmp_path))
    args = [run.shard.manifest_uri, run.adapt.state_uri, str(tmp_path / "tune"), storage]
    log = tmp_path / "runner.log"
    with log.open("w") as stderr:
        runner = subprocess.Popen(
            [sys.executable, "-c", RUNNER, json.dumps({"spec": raw, "args": args, "runner": 0, "plan": True})],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL, stderr=stderr,
            start_new_session=True)
    try:
        tune_args = tune.TuneArgs(parse_spec(raw), *args, heartbeat_s=1, grace_s=4, runner=1)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            # Only once the runner has made the study: optuna's storage creates its tables on opening, and
            # this process's opening them while the runner did made the runner fail (seen once, in CI).
            trials = _trials(storage) if "Trial 0 (runner 0)" in log.read_text() else []
            states = [t.state for t in trials]
            if TrialState.COMPLETE in states and states[-1] == TrialState.RUNNING and trials[-1].intermediate_values:
                break
            assert runner.poll() is None, f"the runner ended before it could be killed: {log.read_text()[-3000:]}"
            time.sleep(0.3)
        else:
            pytest.fail("the runner never had a trial running after a completed one")
        completed = {t.number: t.value for t in trials if t.state == TrialState.COMPLETE}
        killed = trials[-1].number
        os.killpg(runner.pid, signal.SIGKILL)
        runner.wait(timeout=30)
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
            runner.wait(timeout=30)

    result = tune.run_trials(tune_args)  # the retry, or the other runner

    trials = optuna.load_study(study_name=result.study_name, storage=storage).get_trials()
    by_number = {t.number: t for t in trials}
    assert {n: by_number[n].value for n in completed} == completed  # nothing completed is lost or changed
    assert by_number[killed].state == TrialState.FAIL and "error" not in by_number[killed].user_attrs
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE  # run again, once
    assert retries[0].params == by_number[killed].params
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 4 == result.finished
    assert retries[0].number in result.trials_run


def _trials(storage):
    import optuna

    if not os.path.exists(storage.removeprefix("sqlite:///")):
        return []
    names = optuna.study.get_all_study_names(storage)
    return optuna.load_study(study_name=names[0], storage=storage).get_trials() if names else []


def test_a_study_database_another_process_is_creating_is_opened_again(tmp_path, monkeypatch):
    """Opening a new study database creates its tables; two runners doing it at once made one fail with
    "table studies already exists" (SQLite, reproduced with two processes): the loser opens it again."""
    import optuna
    import sqlalchemy.exc

    real, calls = optuna.storages.RDBStorage, []

    def racing(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 1:
            raise sqlalchemy.exc.OperationalError("CREATE TABLE studies", {}, Exception("table studies already exists"))
        return real(*args, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    monkeypatch.setattr(tune.time, "sleep", lambda seconds: None)
    args = tune.TuneArgs(load_spec(ROOT / "include" / "housing.yaml"), "m", "s", "o",
                         f"sqlite:///{tmp_path / 'studies.sqlite3'}")
    assert isinstance(tune._storage(args), real) and len(calls) == 2
