"""Hyperparameter tuning as mapped tasks: plan the study, fan trial runners out over the GPU workers, pick the best.

::

    adapt -> tune_plan -> tune (one mapped task per runner, on the gpu queue) -> tune_best -> train

``tune_plan`` creates (or resumes) the Optuna study and returns one entry per runner:
``TuneOperator.partial(...).expand(runner=tune_plan.output)`` maps the runners at run time,
none when tuning is off (the mapped task is skipped, ``tune_best`` says so and train runs on
the spec's settings). ``train`` reads the best settings from ``tune_best``'s XCom.

Where the study lives: the database of the Airflow connection ``[shardline] tuning_conn_id``
(``AIRFLOW__SHARDLINE__TUNING_CONN_ID``; a PostgreSQL or MySQL connection every worker
reaches), else SQLite under a local store. Results name the connection, never its URL's password.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseHook, Param, conf
from airflow.sdk.exceptions import AirflowFailException, AirflowNotFoundException

from operators.base import CONFIG_SECTION, ShardlineOperator
from operators.links import StoreLink
from operators.params import training_params
from operators.train import DEFAULT_EPOCH_TIMEOUT, gpu_queue
from tfjobs.deadlines import parse_duration
from tfjobs.spec import PipelineSpec
from tfjobs.storage.store import join

#: The trigger form's training Params and the spec settings they set. In a DAG that can tune they
#: start empty: empty is "the spec's value, or the tuned one"; a value typed in wins over both.
PARAM_SETTINGS = {
    "epochs": "training.epochs",
    "batch_size": "training.batch_size",
    "learning_rate": "training.learning_rate",
    "early_stopping_patience": "training.early_stopping_patience",
    "loss": "training.loss",
    "loop": "training.loop",
    "model": "model.kind",
}
#: TrainModelOperator's overrides in a DAG that can tune: an empty Param renders as '' (not set).
OPTIONAL_HYPERPARAMETERS = {name: "{{ params.%s or '' }}" % name for name in PARAM_SETTINGS if name != "model"}
OPTIONAL_MODEL_KIND = "{{ params.model or '' }}"
#: A runner's retry resumes the study, so it need not wait long: the trial its killed try left
#: behind is queued again by whichever runner looks after the heartbeat's grace period.
RUNNER_RETRY_DELAY = datetime.timedelta(seconds=30)
STUDY_SETUP_TIMEOUT = datetime.timedelta(minutes=30)


def tuning_params(spec: PipelineSpec, *, tuning: bool = False) -> dict[str, Param]:
    """The trigger form of a DAG that can tune: the training Params made optional, and the switch.

    ``tuning`` is the switch's default: off for a daily run, on for a DAG that always tunes.
    """
    params = training_params(spec)
    for name, setting in PARAM_SETTINGS.items():
        params[name] = _optional(params[name], spec, setting)
    searched = ", ".join(sorted(spec.tuning.space)) if spec.tuning else "nothing: the spec has no tuning block"
    params["tuning"] = Param(
        tuning, type="boolean", title="Tune", section="Tuning",
        description=f"Search the spec's tuning space before training ({searched}); train then uses the best "
        "trial's settings, under any training value set above.",
    )
    params["tuning_trials"] = Param(
        None, type=["null", "integer"], minimum=1, maximum=10_000, title="Trials", section="Tuning",
        description=f"Trials in the search; empty for the spec's ({spec.tuning.trials if spec.tuning else '-'}). "
        "A re-run with more trials extends the same study.",
    )
    params["tuning_parallel"] = Param(
        None, type=["null", "integer"], minimum=1, maximum=256, title="Parallel trial runners", section="Tuning",
        description=f"Trial runners at once, each a task on the GPU queue; empty for the spec's "
        f"({spec.tuning.parallel if spec.tuning else '-'}).",
    )
    return params


def _optional(param: Param, spec: PipelineSpec, setting: str) -> Param:
    """The same Param, empty by default; its description says what empty means."""
    schema = dict(param.schema)
    kind = schema.pop("type")
    description = schema.pop("description", "")
    title = schema.pop("title", None)
    own = spec.model.kind if setting == "model.kind" else (
        spec.training.loss_for(spec.label.task) if setting == "training.loss" else
        getattr(spec.training, setting.split(".", 1)[1]))
    empty = f"the spec's ({own})" + (", or the tuned value when tuning" if spec.tuning and setting in
                                      spec.tuning.space else "")
    if "enum" in schema:
        schema["enum"] = [None, *schema["enum"]]
        schema["values_display"] = {None: f"Empty: {empty}", **schema.get("values_display", {})}
    return Param(None, type=["null", kind], title=title, description=f"{description} Empty: {empty}.", **schema)


def tuning_storage(store_uri: str) -> tuple[str, str]:
    """The study database's SQLAlchemy URL, and how to name it in logs and results."""
    from tfjobs.tune import default_storage

    conn_id = conf.get(CONFIG_SECTION, "tuning_conn_id", fallback="") or ""
    if not conn_id:
        try:
            url = default_storage(store_uri)
        except ValueError as err:
            raise AirflowFailException(
                f"{err}. Set [{CONFIG_SECTION}] tuning_conn_id (AIRFLOW__SHARDLINE__TUNING_CONN_ID) to a PostgreSQL "
                "connection that every worker reaches."
            ) from None
        return url, url.removeprefix("sqlite:///")
    try:
        connection = BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        raise AirflowFailException(
            f"[{CONFIG_SECTION}] tuning_conn_id names {conn_id!r}, which is not an Airflow connection. Create it "
            f"(environment: AIRFLOW_CONN_{conn_id.upper()}=postgresql://user:password@host:5432/database)."
        ) from None
    return sqlalchemy_url(connection), f"connection {conn_id}"


def sqlalchemy_url(connection) -> str:
    """An Airflow connection (postgres, mysql, sqlite) as the URL SQLAlchemy and Optuna take."""
    import urllib.parse

    drivers = {"postgres": "postgresql+psycopg2", "postgresql": "postgresql+psycopg2", "mysql": "mysql+pymysql",
               "sqlite": "sqlite"}
    if connection.conn_type not in drivers:
        raise AirflowFailException(
            f"Connection {connection.conn_id!r} is a {connection.conn_type!r} connection; a study needs a "
            f"database: one of {sorted(drivers)}"
        )
    if connection.conn_type == "sqlite":
        return f"sqlite:///{connection.host}"
    auth = ""
    if connection.login:
        auth = urllib.parse.quote(connection.login, safe="")
        if connection.password:
            auth += ":" + urllib.parse.quote(connection.password, safe="")
        auth += "@"
    port = f":{connection.port}" if connection.port else ""
    return f"{drivers[connection.conn_type]}://{auth}{connection.host}{port}/{connection.schema or ''}"


class TuningOperator(ShardlineOperator):
    """What the tuning steps share: the study's arguments from the spec, the run and the explicit Params.

    :param enabled: whether this run tunes, e.g. ``"{{ params.tuning }}"`` (templated).
    :param hyperparameters: the run's explicit training settings, held in every trial (templated).
    :param model_kind: the run's explicit model kind, held in every trial (templated).
    :param trials: trials in the study; empty for the spec's (templated).
    :param parallel: trial runners; empty for the spec's (templated).
    """

    template_fields: Sequence[str] = (
        *ShardlineOperator.template_fields, "enabled", "hyperparameters", "model_kind", "trials", "parallel",
    )
    template_fields_renderers = {"hyperparameters": "json"}

    def __init__(
        self,
        *,
        enabled: bool | str = True,
        hyperparameters: dict[str, Any] | None = None,
        model_kind: str = "",
        trials: int | str | None = None,
        parallel: int | str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.enabled = enabled
        self.hyperparameters = hyperparameters or {}
        self.model_kind = model_kind
        self.trials = trials
        self.parallel = parallel

    @property
    def tunes(self) -> bool:
        return str(self.enabled).lower() in ("true", "1", "yes")

    def tune_args(self, context, **extra):
        from tfjobs.tune import TuneArgs

        spec = self.load_spec()
        if spec.tuning is None:
            raise AirflowFailException(f"{self.task_id}: spec {self.spec} has no tuning block to search")
        layout = self.layout(context, spec)
        storage, self.storage_name = tuning_storage(layout.root)
        return TuneArgs(
            spec=spec,
            shards_manifest_uri=join(layout.shards, "manifest.json"),
            state_uri=join(layout.preprocessing, "state.json"),
            output_uri=join(layout.run_dir, "tune"),
            storage=storage,
            hyperparameters={k: v for k, v in self.hyperparameters.items() if v not in ("", None)},
            model_kind=self.model_kind or "",
            trials=_count(self.trials),
            parallel=_count(self.parallel),
            **extra,
        )


def _count(value) -> int | None:
    return int(value) if value not in (None, "", "None") else None


class TunePlanOperator(TuningOperator):
    """Create or resume the run's study and return the trial runners to map: ``[0, 1, ...]``, ``[]`` if not tuning."""

    def execute(self, context):
        from tfjobs.tune import plan_study

        if not self.tunes:
            self.log.info("Tuning is off for this run: no trial runners; train uses the spec's settings")
            return []
        with self.failing_fast():
            plan = plan_study(self.tune_args(context))
        self.log.info("%s study %s (%s): %d trials over %d runners%s", "Resuming" if plan.resumed else "Created",
                      plan.study_name, self.storage_name, plan.trials, len(plan.runners),
                      f"; first trial: the spec's own {plan.queued_defaults}" if plan.queued_defaults else "")
        return plan.runners


class TuneOperator(TuningOperator):
    """One trial runner: trains trials of the run's study until it holds all of them (map one per runner).

    Runs on ``[shardline] gpu_queue`` like training. Killed mid-trial, its trial is queued again
    once its heartbeat is stale and its retry (after ``RUNNER_RETRY_DELAY``) rejoins the study.

    :param runner: this runner's number (mapped from ``TunePlanOperator``'s result).
    :param epoch_timeout: the most one trial epoch may take (templated); the runner's time limit
        is 30 minutes plus this times the epochs of its share of the trials, plus one trial.
    """

    template_fields: Sequence[str] = (*TuningOperator.template_fields, "epoch_timeout")
    default_execution_timeout = None  # derived from the budget once the Params are rendered
    ui_color = "#f9c784"

    def __init__(self, *, runner: int = 0, queue: str | None = None, epoch_timeout: str = DEFAULT_EPOCH_TIMEOUT,
                 **kwargs) -> None:
        kwargs.setdefault("retry_delay", RUNNER_RETRY_DELAY)
        super().__init__(queue=queue or gpu_queue(), **kwargs)
        self.derives_execution_timeout = self.execution_timeout is None
        self.runner = runner
        self.epoch_timeout = epoch_timeout

    def render_template_fields(self, context, jinja_env=None) -> None:
        super().render_template_fields(context, jinja_env)
        if self.derives_execution_timeout:
            tuning = self.load_spec().tuning
            trials = _count(self.trials) or (tuning.trials if tuning else 1)
            runners = _count(self.parallel) or (tuning.parallel if tuning else 1)
            epochs = (tuning.epochs if tuning else 1) * (-(-trials // runners) + 1)
            try:
                self.execution_timeout = STUDY_SETUP_TIMEOUT + epochs * parse_duration(self.epoch_timeout)
            except ValueError as err:
                raise AirflowFailException(f"{self.task_id}: epoch_timeout {self.epoch_timeout!r}: {err}") from None

    def execute(self, context):
        from tfjobs.tune import run_trials

        args = self.tune_args(context, runner=int(self.runner), attempt=int(context["ti"].try_number or 1))
        with self.failing_fast():
            result = run_trials(args)
        self.log.info("Runner %d ran trials %s in %.0fs; study %s holds %d finished trials", result.runner,
                      result.trials_run, result.seconds, result.study_name, result.finished)
        return self.finish(context, result)


class PickBestTrialOperator(TuningOperator):
    """Pick the study's best trial; write the report (table, plot) and return the best settings for train.

    Runs whether or not the runners ran (``none_failed``): a run that does not tune returns
    ``{"tuned": False}`` and train uses the spec's settings.
    """

    output_stage = "runs"
    operator_extra_links = (
        StoreLink("Tuning report", "study_uri"),
        StoreLink("Objective plot", "plot_uri"),
        StoreLink("Trials in TensorBoard (HParams)", "tensorboard_uri"),
    )

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("trigger_rule", "none_failed")
        super().__init__(**kwargs)

    def execute(self, context):
        from tfjobs.tune import pick_best

        if not self.tunes:
            self.log.info("Tuning is off for this run: train uses the spec's settings and the run's Params")
            return {"tuned": False}
        with self.failing_fast():
            result = pick_best(self.tune_args(context))
        self.log.info("Best of %s trials: %d, %s %.4f (the spec's own: %s) with %s; report %s",
                      result.trials, result.best_trial, result.objective, result.best_value,
                      "-" if result.defaults_value is None else f"{result.defaults_value:.4f}",
                      result.best_settings, result.study_uri)
        payload = self.finish(
            context, result, study=result.study_name, storage=self.storage_name, best_trial=result.best_trial,
            objective=result.objective, best_value=result.best_value, best_settings=result.best_settings,
        )
        return {"tuned": True, **payload, "storage": self.storage_name}


def tuning_steps(**kwargs) -> tuple:
    """``tune_plan``, the mapped ``tune`` runners and ``tune_best``, wired to the trigger form's Params
    (``kwargs``: more arguments for all three, e.g. the run's ``feature_options``)."""
    study = {
        **kwargs,
        "enabled": "{{ params.tuning }}",
        "hyperparameters": dict(OPTIONAL_HYPERPARAMETERS),
        "model_kind": OPTIONAL_MODEL_KIND,
        "trials": "{{ params.tuning_trials or '' }}",
        "parallel": "{{ params.tuning_parallel or '' }}",
    }
    plan = TunePlanOperator(task_id="tune_plan", **study)
    # The scheduler reads queue and retry_delay from partial(): a mapped task's __init__ runs only on the worker.
    runners = TuneOperator.partial(
        task_id="tune", queue=gpu_queue(), retry_delay=RUNNER_RETRY_DELAY, epoch_timeout="{{ params.epoch_timeout }}",
        **study,
    ).expand(runner=plan.output)
    best = PickBestTrialOperator(task_id="tune_best", **study)
    return plan, runners, best

