"""Hyperparameter search: trials fan out over runners that share one Optuna study.

The spec's ``tuning:`` block says which settings vary over which ranges
(:class:`tfjobs.spec.TuningSpec`), the objective (an eval-split metric), the number of
trials, how many runners work at once, the algorithm (random or TPE) and the pruner
(median or Hyperband early stopping of bad trials). A trial is an ordinary training
(:func:`tfjobs.train.train_model`) of ``tuning.epochs`` epochs with the trial's settings
applied to the spec, written under ``<run>/tune/trials/trial-NNNN/``.

The study lives in a relational database that every runner reaches (Optuna's
``RDBStorage``): PostgreSQL on a service, SQLite under a local store
(``<store>/tuning/studies.sqlite3``). That database is the only thing runners share:

- ``plan`` creates the study (or finds it: a re-run of the same run, inputs and search
  resumes it) and queues the spec's own settings as the first trial, so the search is
  never worse than the defaults on its objective;
- ``run`` (one per runner, on any machine) asks the study for the next trial, trains it,
  and tells the study the objective, until the study holds ``trials`` finished trials.
  Each running trial sends a heartbeat; a trial whose runner died (a killed process, a
  lost machine) goes stale after the grace period, is marked failed and queued again
  with the same settings, and whichever runner asks next runs it. A runner does not
  leave while trials run elsewhere: if one of them dies, its trial comes back;
- ``best`` reads the study, writes the report (``study.json`` with every trial,
  ``objective.png``: the objective against each searched setting, ``best.json``) and
  returns the best trial's settings for :mod:`tfjobs.train`.

Each trial's settings, objective and runner are in the log, in the study and in
TensorBoard's HParams view: ``tensorboard --logdir <run>/tune/trials``.

Settings the caller fixes (``hyperparameters`` and ``model_kind``, as
:class:`tfjobs.train.TrainArgs` takes them: the trigger form's explicit values) are held
in every trial and left out of the search.

    python -m tfjobs.tune plan --spec include/housing.yaml --shards <...>/manifest.json \\
        --state <...>/state.json --output <store>/runs/housing/<run>/tune
    python -m tfjobs.tune run --runner 0 ...      # as many at once as you like, anywhere
    python -m tfjobs.tune best ...
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import socket
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

from tfjobs import cli
from tfjobs.spec import PipelineSpec, SearchRange, load_spec, tunable_settings
from tfjobs.storage.store import join, read_json_if_exists, redact, staging_dir, store_for, write_json

log = logging.getLogger(__name__)

STUDY_FILE = "study.json"
BEST_FILE = "best.json"
PLOT_FILE = "objective.png"
TRIALS_DIR = "trials"
SQLITE_FILE = "studies.sqlite3"
#: A running trial records a heartbeat this often; one silent for GRACE_S is taken for dead and queued again.
HEARTBEAT_S = 10
GRACE_S = 30
MAX_RETRIES = 3  # times a trial whose runner died is queued again
WAIT_POLL_S = 5  # how often a runner with nothing to ask looks at the trials running elsewhere


@dataclass(frozen=True)
class TuneArgs:
    spec: PipelineSpec
    shards_manifest_uri: str
    state_uri: str
    output_uri: str  # the run's tune/ prefix
    storage: str  # the study database's SQLAlchemy URL (credentials stay out of logs and results)
    # Explicit settings of this run, as TrainArgs takes them: held in every trial and not searched.
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    model_kind: str = ""
    trials: int | None = None  # None: the spec's tuning.trials
    parallel: int | None = None  # None: the spec's tuning.parallel
    runner: int = 0
    attempt: int = 1  # the runner's try (Airflow's try_number): a retry draws other settings
    heartbeat_s: int = HEARTBEAT_S
    grace_s: int = GRACE_S

    @property
    def tuning(self):
        if self.spec.tuning is None:
            raise ValueError(f"Spec {self.spec.name!r} has no tuning block: add tuning: {{space: ...}} to tune it")
        return self.spec.tuning

    @property
    def budget(self) -> int:
        return int(self.trials or self.tuning.trials)

    @property
    def fixed(self) -> dict[str, Any]:
        """The explicit settings as spec setting names (epochs only sets the final training's length)."""
        fixed = {f"training.{name}": value for name, value in self.hyperparameters.items() if name != "epochs"}
        return {**fixed, "model.kind": self.model_kind} if self.model_kind else fixed

    @property
    def space(self) -> dict[str, SearchRange]:
        """The spec's search space without the fixed settings."""
        return {name: search for name, search in self.tuning.space.items() if name not in self.fixed}


@dataclass(frozen=True)
class StudyPlan:
    study_name: str
    storage: str  # redacted
    trials: int
    runners: list[int]
    resumed: bool
    queued_defaults: dict[str, Any]


@dataclass(frozen=True)
class RunnerResult:
    study_name: str
    runner: int
    trials_run: list[int]
    finished: int  # trials the study holds finished, all runners together
    seconds: float


@dataclass(frozen=True)
class TuningResult:
    study_name: str
    storage: str
    objective: str  # e.g. val_rmse
    direction: str
    best_trial: int
    best_value: float
    best_settings: dict[str, Any]
    best_trial_uri: str
    defaults_value: float | None  # the objective of the spec's own settings, when that trial completed
    trials: dict[str, int]  # complete, pruned, failed
    study_uri: str
    plot_uri: str
    tensorboard_uri: str


# -- the study -----------------------------------------------------------------------------------


def default_storage(store_root: str) -> str:
    """SQLite beside a local store (``<store>/tuning/studies.sqlite3``); a remote store needs a database URL."""
    local = store_for(store_root).local_path(store_root)
    if local is None:
        raise ValueError(
            f"{redact(store_root)} is not on this machine, so it cannot hold the study's SQLite file: give the "
            "URL of a database every runner reaches (postgresql+psycopg2://...)"
        )
    path = (local / "tuning" / SQLITE_FILE).resolve()
    return f"sqlite:///{path}"


def shown_storage(url: str) -> str:
    """The study database for logs and results: a SQLite file's path, another database's URL without credentials."""
    return url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else redact(url)


def study_name(args: TuneArgs) -> str:
    """``<dataset>-<hash>``: the same run, inputs, search and fixed settings find the same study again.

    The budget (trials, runners) is left out, so a re-run with more trials extends the study.
    """
    digest = hashlib.sha256()
    for uri in (args.shards_manifest_uri, args.state_uri):
        digest.update(store_for(uri).read_bytes(uri))
    search = args.tuning.model_dump(exclude={"trials", "parallel"})
    digest.update(json.dumps([args.output_uri, args.spec.fingerprint(), search, args.fixed], sort_keys=True,
                             default=str).encode())
    return f"{args.spec.name}-{digest.hexdigest()[:16]}"


def _storage(args: TuneArgs):
    import optuna

    url = args.storage
    if url.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(url.removeprefix("sqlite:///")), exist_ok=True)
        engine = {"connect_args": {"timeout": 120}}  # runners on one machine take turns writing
    else:
        engine = {"pool_pre_ping": True}
    import sqlalchemy.exc

    for attempt in range(3):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine, heartbeat_interval=args.heartbeat_s, grace_period=args.grace_s,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                        max_retry=MAX_RETRIES),
                )
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError) as err:
            # RDBStorage creates its tables on opening a new database; two processes opening it at once can
            # both try ("table studies already exists", "UNIQUE constraint failed: alembic_version", seen with
            # SQLite): the tables are there on the next try. Anything else fails again, and then for good.
            if attempt == 2:
                raise
            log.info("Opening the study database %s failed (%s); another process may be creating it: again",
                     shown_storage(url), str(err).splitlines()[0][:200])
            time.sleep(0.5)


def _sampler(args: TuneArgs):
    import optuna

    tuning = args.tuning
    # Each runner, and each of its tries, draws its own sequence: the same seed would repeat its draws.
    seed = (tuning.seed if tuning.seed is not None else args.spec.training.seed) + 1009 * args.runner + args.attempt
    if tuning.algorithm == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # constant_liar: trials running elsewhere count as bad guesses, so runners do not all draw one point.
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, args.budget // 3)),
                                          constant_liar=True)


def _pruner(args: TuneArgs):
    import optuna

    tuning = args.tuning
    if tuning.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=max(2, args.budget // 4), n_warmup_steps=1)
    if tuning.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=tuning.epochs, reduction_factor=3)
    return optuna.pruners.NopPruner()


def open_study(args: TuneArgs):
    """The study of this run and search, created if it does not exist yet."""
    import optuna

    _route_optuna_logs()
    return optuna.create_study(
        storage=_storage(args), study_name=study_name(args), direction=args.tuning.direction(args.spec.label.task),
        sampler=_sampler(args), pruner=_pruner(args), load_if_exists=True,
    )


def _route_optuna_logs() -> None:
    """Optuna's own lines (a trial finished, pruned, failed) through logging: into the task log."""
    import optuna

    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()


# -- the search space in Optuna's terms ------------------------------------------------------------


def _encoded(value: Any) -> Any:
    """Optuna's choices are scalars: a list (hidden units) becomes its JSON text."""
    return json.dumps(value) if isinstance(value, (list, tuple, dict)) else value


def suggest(trial, space: dict[str, SearchRange], types: dict[str, str]) -> dict[str, Any]:
    """The trial's value of each setting, drawn by the study's sampler."""
    settings = {}
    for name, search in space.items():
        if search.choices is not None:
            value = trial.suggest_categorical(name, [_encoded(c) for c in search.choices])
            settings[name] = json.loads(value) if any(isinstance(c, (list, tuple, dict)) for c in search.choices) \
                else value
        elif types[name] == "int":
            settings[name] = trial.suggest_int(name, int(search.low), int(search.high), step=int(search.step or 1),
                                               log=search.log)
        else:
            settings[name] = trial.suggest_float(name, float(search.low), float(search.high), step=search.step,
                                                 log=search.log)
    return settings


def decoded(params: dict[str, Any], space: dict[str, SearchRange]) -> dict[str, Any]:
    """A trial's Optuna params as settings (JSON text back to lists)."""
    out = {}
    for name, value in params.items():
        search = space.get(name)
        structured = search is not None and search.choices is not None and any(
            isinstance(c, (list, tuple, dict)) for c in search.choices)
        out[name] = json.loads(value) if structured else value
    return out


def spec_value(spec: PipelineSpec, name: str) -> Any:
    """What the spec itself says for a setting (None if it leaves it to the code's default)."""
    section, _, key = name.partition(".")
    if section == "training":
        return spec.training.loss_for(spec.label.task) if key == "loss" else getattr(spec.training, key)
    if section == "model":
        if key in ("kind", "dropout"):
            return getattr(spec.model, key)
        return list(spec.model.hidden_units) if key == "hidden_units" else spec.model.options.get(key)
    feature, _, option = key.partition(".")
    return getattr(spec.feature(feature).options, option)


def _within(value: Any, search: SearchRange, kind: str) -> bool:
    if value is None:
        return False
    if search.choices is not None:
        return _encoded(value) in [_encoded(c) for c in search.choices]
    if kind == "int" and int(value) != value:
        return False
    return search.low <= value <= search.high


def spec_defaults(args: TuneArgs) -> dict[str, Any]:
    """The spec's own value of each searched setting that its range allows (queued as the first trial)."""
    types = tunable_settings(args.spec)
    values = {name: spec_value(args.spec, name) for name in args.space}
    return {name: _encoded(v) for name, v in values.items() if _within(v, args.space[name], types[name])}


# -- plan, run, best --------------------------------------------------------------------------------


def plan_study(args: TuneArgs) -> StudyPlan:
    """Create (or resume) the study and queue the spec's own settings as its first trial."""
    if not args.space:
        raise ValueError(f"This run sets every searched setting itself ({sorted(args.fixed)}): nothing is left to "
                         "search. Leave one of them empty, or switch tuning off")
    study = open_study(args)
    resumed = bool(study.get_trials(deepcopy=False))
    defaults = spec_defaults(args)
    if not resumed:
        study.set_user_attr("spec", args.spec.name)
        study.set_user_attr("output_uri", args.output_uri)
        study.set_user_attr("fixed", args.fixed)
        study.enqueue_trial(defaults, user_attrs={"spec_defaults": True})
    study.set_user_attr("trials", args.budget)
    parallel = int(args.parallel or args.tuning.parallel)
    finished = _counts(study)["finished"]
    log.info("%s study %s in %s: %d of %d trials finished, %d runners; searching %s%s",
             "Resuming" if resumed else "Created", study.study_name, shown_storage(args.storage), finished, args.budget,
             parallel, sorted(args.space), f", holding {args.fixed}" if args.fixed else "")
    return StudyPlan(study.study_name, shown_storage(args.storage), args.budget, list(range(parallel)), resumed,
                     {} if resumed else defaults)


def _counts(study) -> dict[str, int]:
    """Trials by where they stand in the budget: finished, running, waiting (queued)."""
    from optuna.trial import TrialState

    counts = {"finished": 0, "running": 0, "waiting": 0}
    for trial in study.get_trials(deepcopy=False):
        if trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
                trial.state == TrialState.FAIL and "error" in trial.user_attrs):
            counts["finished"] += 1  # a trial its settings failed is spent; one whose runner died is queued again
        elif trial.state == TrialState.RUNNING:
            counts["running"] += 1
        elif trial.state == TrialState.WAITING:
            counts["waiting"] += 1
    return counts


def _fail_stale_trials(study) -> None:
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def run_trials(args: TuneArgs) -> RunnerResult:
    """Run trials of the study until it holds ``trials`` finished ones (whichever runner ran them)."""
    started = time.perf_counter()
    study = open_study(args)
    ran: list[int] = []
    objective = _objective(args, ran)
    while True:
        _fail_stale_trials(study)
        counts = _counts(study)
        if counts["finished"] >= args.budget:
            break
        if counts["waiting"] or counts["finished"] + counts["running"] < args.budget:
            study.optimize(objective, n_trials=1, catch=(Exception,))
            continue
        # The rest of the budget runs elsewhere. Stay: if a runner dies, its trial is queued again.
        log.info("Runner %d: %d of %d trials finished, %d running elsewhere; waiting for them",
                 args.runner, counts["finished"], args.budget, counts["running"])
        time.sleep(WAIT_POLL_S)
    finished = _counts(study)["finished"]
    log.info("Runner %d ran trials %s; the study holds %d finished trials", args.runner, ran, finished)
    return RunnerResult(study.study_name, args.runner, ran, finished, round(time.perf_counter() - started, 1))


def _objective(args: TuneArgs, ran: list[int]):
    tuning, types = args.tuning, tunable_settings(args.spec)
    metric = f"val_{tuning.objective.metric}"

    def objective(trial) -> float:
        import optuna

        ran.append(trial.number)
        started = time.perf_counter()
        try:
            return run_trial(trial)
        except optuna.TrialPruned:
            raise
        except Exception as err:
            # Marked as spent by its settings: a trial whose runner died carries no error and is queued again.
            trial.set_user_attr("error", f"{type(err).__name__}: {err}"[:2000])
            log.warning("Trial %d failed after %.1fs: %s: %s", trial.number, time.perf_counter() - started,
                        type(err).__name__, err)
            raise

    def run_trial(trial) -> float:
        import keras
        import optuna

        from tfjobs.train import TrainArgs, train_model

        for key, value in {"runner": args.runner, "attempt": args.attempt, "host": socket.gethostname(),
                           "pid": os.getpid()}.items():
            trial.set_user_attr(key, value)
        settings = suggest(trial, args.space, types)
        output_uri = join(args.output_uri, TRIALS_DIR, f"trial-{trial.number:04d}")
        frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
        retry_of = frozen.system_attrs.get("failed_trial")
        log.info("Trial %d (runner %d%s): %s", trial.number, args.runner,
                 f", again for trial {retry_of} whose runner died" if retry_of is not None else "", _shown(settings))
        report = _report_epochs(trial, metric)
        started = time.perf_counter()
        keras.backend.clear_session()  # one runner trains many models: start each from a clean slate
        result = train_model(TrainArgs(
            spec=args.spec, shards_manifest_uri=args.shards_manifest_uri, state_uri=args.state_uri,
            output_uri=output_uri, hyperparameters={**args.hyperparameters, "epochs": tuning.epochs},
            model_kind=args.model_kind, force=True, tuned_settings=settings, callbacks=(report,),
        ))
        value = float(result.metrics[metric])
        if not math.isfinite(value):
            raise ValueError(f"{metric} is {value}: these settings diverge")
        seconds = round(time.perf_counter() - started, 1)
        for key, attr in {"seconds": seconds, "epochs_run": result.epochs_run, "output_uri": output_uri,
                          "settings": settings}.items():
            trial.set_user_attr(key, attr)
        write_hparams(output_uri, trial.number, settings, metric, value)
        if report.pruned_at:
            log.info("Trial %d pruned after epoch %d: %s %.4f, worse than the others there (%.1fs)",
                     trial.number, report.pruned_at, metric, report.last, seconds)
            raise optuna.TrialPruned(f"after epoch {report.pruned_at}")
        log.info("Trial %d: %s -> %s %.4f (%d epochs, %.1fs)", trial.number, _shown(settings), metric, value,
                 result.epochs_run, seconds)
        return value

    return objective


def _report_epochs(trial, metric: str):
    """A Keras callback that reports the eval metric to the study after each epoch and stops a pruned trial.

    It stops training rather than raising, so the pruned trial's outputs (its TensorBoard
    curves) are kept; the objective then tells the study that the trial was pruned.
    """
    import keras

    class ReportToStudy(keras.callbacks.Callback):
        pruned_at = 0
        last = math.nan

        def on_epoch_end(self, epoch, logs=None):
            value = (logs or {}).get(metric)
            if value is None or not math.isfinite(value):
                return
            self.last = float(value)
            trial.report(self.last, epoch + 1)
            if trial.should_prune():
                self.pruned_at = epoch + 1
                self.model.stop_training = True

    return ReportToStudy()


def _shown(settings: dict[str, Any]) -> str:
    return " ".join(f"{name}={_short(value)}" for name, value in settings.items())


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else json.dumps(value) if isinstance(value, list) else str(value)


def write_hparams(trial_uri: str, number: int, settings: dict[str, Any], metric: str, value: float) -> None:
    """TensorBoard's HParams view of a trial: its settings and objective, beside its training curves."""
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hp

    store = store_for(trial_uri)
    with staging_dir() as tmp:
        writer = tf.summary.create_file_writer(str(tmp))
        with writer.as_default():
            hp.hparams({name: v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
                        for name, v in settings.items()}, trial_id=f"trial-{number:04d}")
            tf.summary.scalar(f"objective_{metric}", value, step=0)
        writer.close()
        for path in tmp.iterdir():
            store.upload(path, join(trial_uri, "tensorboard", path.name))


def pick_best(args: TuneArgs) -> TuningResult:
    """The best finished trial; the study's report (every trial, the plot) written under the tune prefix."""
    from optuna.trial import TrialState

    study = open_study(args)
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        errors = sorted({t.user_attrs["error"] for t in trials if "error" in t.user_attrs})
        raise ValueError(f"No trial of study {study.study_name} completed ({len(trials)} trials): "
                         f"{'; '.join(errors[:3]) or 'none has run yet: run the trial runners first'}")
    best = study.best_trial
    metric = f"val_{args.tuning.objective.metric}"
    rows = [_row(t, args.space) for t in trials]
    defaults = next((t for t in complete if t.user_attrs.get("spec_defaults")), None)
    counts = {state: sum(t.state == getattr(TrialState, state.upper()) for t in trials)
              for state in ("complete", "pruned", "fail")}
    report = {
        "study": study.study_name,
        "storage": shown_storage(args.storage),
        "objective": metric,
        "direction": args.tuning.direction(args.spec.label.task),
        "algorithm": args.tuning.algorithm,
        "pruner": args.tuning.pruner,
        "trials_planned": args.budget,
        "counts": counts,
        "space": {name: search.model_dump(exclude_none=True) for name, search in args.space.items()},
        "fixed": args.fixed,
        "best_trial": best.number,
        "defaults_trial": defaults.number if defaults else None,
        "trials": rows,
    }
    best_settings = decoded(best.params, args.space)
    best_uri = best.user_attrs.get("output_uri", "")
    study_uri, plot_uri = join(args.output_uri, STUDY_FILE), join(args.output_uri, PLOT_FILE)
    with staging_dir() as tmp:
        plot_objective(report, tmp / PLOT_FILE)
        store_for(plot_uri).upload(tmp / PLOT_FILE, plot_uri)
    write_json(study_uri, report)
    write_json(join(args.output_uri, BEST_FILE), {"study": study.study_name, "trial": best.number,
                                                   "objective": metric, "value": best.value,
                                                   "settings": best_settings, "trial_uri": best_uri})
    for line in trials_table(report):
        log.info("%s", line)
    log.info("Best: trial %d, %s %.4f: %s (the spec's own settings: %s)", best.number, metric, best.value,
             _shown(best_settings), f"{defaults.value:.4f}" if defaults else "not a finished trial")
    return TuningResult(
        study_name=study.study_name, storage=shown_storage(args.storage), objective=metric,
        direction=report["direction"], best_trial=best.number, best_value=float(best.value),
        best_settings=best_settings, best_trial_uri=best_uri,
        defaults_value=float(defaults.value) if defaults else None,
        trials={"complete": counts["complete"], "pruned": counts["pruned"], "failed": counts["fail"]},
        study_uri=study_uri, plot_uri=plot_uri, tensorboard_uri=join(args.output_uri, TRIALS_DIR),
    )


def _row(trial, space: dict[str, SearchRange]) -> dict[str, Any]:
    attrs = trial.user_attrs
    return {
        "trial": trial.number,
        "state": trial.state.name.lower(),
        "value": trial.value if trial.value is not None else (
            list(trial.intermediate_values.values())[-1] if trial.intermediate_values else None),
        "settings": decoded(trial.params, space),
        "epochs": attrs.get("epochs_run", max(trial.intermediate_values, default=0)),
        "runner": attrs.get("runner"),
        "attempt": attrs.get("attempt"),
        "host": attrs.get("host"),
        "seconds": attrs.get("seconds"),
        "spec_defaults": bool(attrs.get("spec_defaults")),
        "retry_of": trial.system_attrs.get("failed_trial"),
        "error": attrs.get("error"),
    }


def trials_table(report: dict[str, Any]) -> list[str]:
    """Every trial on one line: number, state, objective, runner, then each searched setting."""
    names = list(report["space"])
    header = ["trial", "state", report["objective"], "epochs", "runner", "seconds", *names]
    lines = [header]
    for row in report["trials"]:
        mark = (" *" if row["trial"] == report["best_trial"] else " ") + ("d" if row["spec_defaults"] else "")
        value = row["value"]
        lines.append([f"{row['trial']}{mark}", row["state"] + (f" (retry of {row['retry_of']})"
                                                               if row["retry_of"] is not None else ""),
                      f"{value:.4f}" if isinstance(value, float) else "-", str(row["epochs"] or "-"),
                      str(row["runner"] if row["runner"] is not None else "-"),
                      f"{row['seconds']:.1f}" if row["seconds"] else "-",
                      *[_short(row["settings"][n]) if n in row["settings"] else "-" for n in names]])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    text = ["  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]
    return [*text, "(* best, d the spec's own settings)"]


def plot_objective(report: dict[str, Any], path) -> None:
    """The objective against each searched setting, one panel each; the best trial and the spec's own marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    names = list(report["space"])
    rows = [r for r in report["trials"] if r["state"] in ("complete", "pruned") and r["value"] is not None]
    columns = min(3, len(names))
    fig, axes = plt.subplots(-(-len(names) // columns), columns, figsize=(4.5 * columns, 3.4 * -(-len(names) //
                                                                                                columns)),
                             squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names):
        search = report["space"][name]
        choices = [_encoded(c) for c in search.get("choices", [])]
        for state, marker in (("complete", "o"), ("pruned", "x")):
            points = [r for r in rows if r["state"] == state and name in r["settings"]]
            xs = [choices.index(_encoded(r["settings"][name])) if choices else r["settings"][name] for r in points]
            ax.scatter(xs, [r["value"] for r in points], marker=marker, alpha=0.75,
                       label=state if state == "complete" else f"{state} (last epoch)")
        for r in rows:
            x = (choices.index(_encoded(r["settings"][name])) if choices else r["settings"][name]) \
                if name in r["settings"] else None
            if x is not None and r["spec_defaults"]:
                ax.scatter([x], [r["value"]], s=110, marker="s", facecolors="none", edgecolors="black",
                           label="spec's own settings")
            if x is not None and r["trial"] == report["best_trial"]:
                ax.scatter([x], [r["value"]], s=200, facecolors="none", edgecolors="red", label="best")
        if choices:
            ax.set_xticks(range(len(choices)), [str(c) for c in choices], rotation=20, fontsize=8)
            ax.set_xlim(-0.5, len(choices) - 0.5)
        elif search.get("log"):
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(name)
        ax.set_ylabel(report["objective"])
    handles, labels = axes.flat[0].get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    fig.legend(unique.values(), unique.keys(), loc="upper right", fontsize=8)
    fig.suptitle(f"{report['study']}: {report['objective']} ({report['direction']}) of "
                 f"{len(rows)} trials, {report['algorithm']}")
    fig.tight_layout(rect=(0, 0, 0.9, 0.95))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def tuning_lines(run_dir: str) -> list[str]:
    """What the run report shows of a search: the counts, the best trial, where to look, the table."""
    report = read_json_if_exists(join(run_dir, "tune", STUDY_FILE))
    if not report:
        return []
    best = next(r for r in report["trials"] if r["trial"] == report["best_trial"])
    counts = report["counts"]
    tune_dir = join(run_dir, "tune")
    lines = [
        f"  {'tuning':<14} {join(tune_dir, STUDY_FILE)}",
        f"  {'':<14} {sum(counts.values())} trials ({counts['complete']} complete, {counts['pruned']} pruned, "
        f"{counts['fail']} failed), {report['algorithm']}, pruner {report['pruner']}; best trial {best['trial']}: "
        f"{report['objective']} {best['value']:.4f} with {_shown(best['settings'])}",
        f"  {'':<14} plot {join(tune_dir, PLOT_FILE)}; tensorboard --logdir {join(tune_dir, TRIALS_DIR)} (HParams)",
    ]
    return lines + [f"  {'':<14} {line}" for line in trials_table(report)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tfjobs.tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("plan", "run", "best"), help="create the study, run trials, or pick the best")
    parser.add_argument("--spec", required=True, help="pipeline spec YAML with a tuning block")
    parser.add_argument("--shards", required=True, help="URI of the shard set's manifest.json")
    parser.add_argument("--state", required=True, help="URI of the adapted preprocessing state.json")
    parser.add_argument("--output", required=True, help="the run's tune/ prefix URI")
    parser.add_argument("--storage", default="", help="SQLAlchemy URL of the study database (default: SQLite "
                        "under the local store that holds --output); or the environment's SHARDLINE_TUNING_STORAGE")
    parser.add_argument("--runner", type=int, default=0, help="this runner's number (run)")
    parser.add_argument("--trials", type=int, default=None, help="trials in the study (default: the spec's)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="hold a training setting in every trial (not searched)")
    parser.add_argument("--model", default="", help="hold the model kind in every trial")
    args = cli.parse(parser, argv)
    from tfjobs.train import parse_settings

    storage = args.storage or os.environ.get("SHARDLINE_TUNING_STORAGE", "")
    if not storage:
        store_root = args.output.rstrip("/").rsplit("/runs/", 1)[0]
        storage = default_storage(store_root)
    tune_args = TuneArgs(
        spec=load_spec(args.spec), shards_manifest_uri=args.shards, state_uri=args.state, output_uri=args.output,
        storage=storage, hyperparameters=parse_settings(args.set), model_kind=args.model, trials=args.trials,
        runner=args.runner,
    )
    step = {"plan": plan_study, "run": run_trials, "best": pick_best}[args.step]
    with contextlib.suppress(BrokenPipeError):
        cli.print_result(step(tune_args))


if __name__ == "__main__":
    main()
