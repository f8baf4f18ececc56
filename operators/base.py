"""What every Shardline operator shares: the spec, the store, the partition, the run."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from airflow.sdk import Asset, BaseOperator, conf
from airflow.sdk.exceptions import AirflowFailException, AirflowNotFoundException

from tfjobs.storage.layout import Layout, run_key
from tfjobs.spec import PipelineSpec, load_spec

# The run's logical date; a run triggered without one (Airflow 3 allows that) uses its run_after.
PARTITION_TEMPLATE = "{{ (dag_run.logical_date or dag_run.run_after) | ds }}"
CONFIG_SECTION = "shardline"


DEFAULT_STORE_CONN_ID = "shardline_store"


def configured_store_uri() -> str | None:
    """``[shardline] store_uri`` from Airflow's config (``AIRFLOW__SHARDLINE__STORE_URI``)."""
    return conf.get(CONFIG_SECTION, "store_uri", fallback=None) or None


def use_store_connection(store_uri: str, conn_id: str | None) -> None:
    """Route this process's S3 requests through the Amazon provider's hook for ``conn_id``.

    The connection (conn_type ``aws``) holds the credentials and, for MinIO, ``endpoint_url``
    in its extra; tfjobs only ever sees a boto3 client factory, never the credentials.
    ``config_kwargs`` in its extra are merged over the project's botocore defaults (retries,
    checksums, timeouts), nested dicts too, the connection's values winning: the hook takes
    one botocore config, so passing the project's alone would drop the connection's.
    """
    if not store_uri.startswith("s3://"):
        return
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    from tfjobs.storage import s3

    conn_id = conn_id or conf.get(CONFIG_SECTION, "store_conn_id", fallback=DEFAULT_STORE_CONN_ID)
    try:
        extra = S3Hook.get_connection(conn_id).extra_dejson
    except AirflowNotFoundException:
        extra = {}  # the hook then uses the AWS credential chain, with no config_kwargs
    try:
        config = s3.botocore_config(extra.get("config_kwargs"))
    except (TypeError, ValueError) as err:
        raise AirflowFailException(
            f"Airflow connection {conn_id!r}: config_kwargs in its extra are not botocore Config options ({err}); "
            "see https://botocore.amazonaws.com/v1/documentation/api/latest/reference/config.html"
        ) from err
    hook = S3Hook(aws_conn_id=conn_id, config=config)
    s3.configure(hook.get_conn, source=f"Airflow connection {conn_id!r}")


@functools.lru_cache(maxsize=64)
def _cached_spec(path: str, mtime: float) -> PipelineSpec:
    return load_spec(path)


def read_spec(path: str | os.PathLike) -> PipelineSpec:
    """The spec at ``path``, parsed once per file version (DAG files are parsed constantly)."""
    path = str(path)
    return _cached_spec(path, Path(path).stat().st_mtime)


class ShardlineOperator(BaseOperator):
    """Base for the pipeline's operators.

    :param spec: path of the pipeline spec YAML (``include/<dataset>.yaml``).
    :param store_uri: root of the object store: a path, ``file://`` or ``s3://bucket/prefix``
        (templated). Defaults to ``[shardline] store_uri`` in Airflow's config.
    :param partition: the data partition, by default the run's logical date (templated).
    :param store_conn_id: the Airflow connection (conn_type ``aws``) for an ``s3://`` store.
        Defaults to ``[shardline] store_conn_id``, else ``shardline_store``.
    :param dataset: the dataset's name on the store, by default the spec's name. The scoring DAG
        keeps its deliveries apart from the training data's with ``<name>_scoring``
        (``raw/penguins_scoring/<partition>/``, ...).
    :param feature_options: options that override the spec's features for this run, e.g.
        ``{"message": {"output_mode": "{{ params.message_output_mode }}"}}`` (templated); every step
        of a run must get the same (``training_pipeline`` passes them to all).

    Every step has an ``execution_timeout`` (Airflow stops a try that runs longer):
    ``default_execution_timeout`` unless the task or the DAG's ``default_args`` set one.
    """

    template_fields: Sequence[str] = ("store_uri", "partition", "store_conn_id", "feature_options")
    template_fields_renderers = {"feature_options": "json"}
    #: The layout property this operator writes, declared as an Airflow Asset (None: no asset).
    output_stage: str | None = None
    #: How long one try of the step may run. An hour is ample for this project's data (the
    #: whole housing pipeline runs in about a minute); a hung read or upload is stopped.
    default_execution_timeout: datetime.timedelta | None = datetime.timedelta(hours=1)
    ui_color = "#fde9c8"

    def __init__(
        self,
        *,
        spec: str | os.PathLike,
        store_uri: str | None = None,
        partition: str = PARTITION_TEMPLATE,
        store_conn_id: str | None = None,
        feature_options: dict[str, dict[str, Any]] | None = None,
        execution_timeout: datetime.timedelta | None = None,
        dataset: str | None = None,
        **kwargs: Any,
    ) -> None:
        if self.output_stage and "outlets" not in kwargs:
            kwargs["outlets"] = self._stage_assets(spec, store_uri, dataset)
        # A parameter of this __init__, so that Airflow fills it from the DAG's default_args first.
        super().__init__(execution_timeout=execution_timeout or self.default_execution_timeout, **kwargs)
        self.spec = str(spec)
        self.store_uri = store_uri
        self.partition = partition
        self.store_conn_id = store_conn_id
        self.dataset = dataset
        self.feature_options = feature_options or {}

    def _stage_assets(self, spec_path, store_uri: str | None, dataset: str | None = None) -> list[Asset]:
        """The asset this step updates, e.g. ``<store>/shards/penguins`` (none if no store is set)."""
        root = store_uri or configured_store_uri()
        if not root or "{{" in root:
            return []
        name = dataset or read_spec(spec_path).name
        uri = "/".join([_asset_uri(root), self.output_stage, name])
        return [Asset(name=f"{name}.{self.output_stage}", uri=uri, group="shardline")]

    def load_spec(self) -> PipelineSpec:
        """The spec, with this run's ``feature_options`` over its features' options."""
        try:
            return read_spec(self.spec).with_feature_options(self.feature_options)
        except (OSError, ValueError) as err:
            raise AirflowFailException(f"{self.task_id}: cannot read spec {self.spec}: {err}") from None

    def layout(self, context, spec: PipelineSpec) -> Layout:
        root = self.store_uri or configured_store_uri()
        if not root:
            raise AirflowFailException(
                f"{self.task_id}: no object store configured. Pass store_uri= to the operator or set "
                f"[{CONFIG_SECTION}] store_uri (environment: AIRFLOW__SHARDLINE__STORE_URI), "
                "e.g. s3://my-bucket/shardline or /data/shardline."
            )
        use_store_connection(root, self.store_conn_id)
        dag_run = context["dag_run"]
        logical = dag_run.logical_date or dag_run.run_after
        return Layout(
            root=root,
            dataset=self.dataset or spec.name,
            partition=self.partition,
            run=run_key(logical.isoformat()),
            model_name=spec.model_name,
        )

    @staticmethod
    def version(context) -> int:
        """The serving version this run proposes: its logical date in Unix seconds."""
        dag_run = context["dag_run"]
        return int((dag_run.logical_date or dag_run.run_after).timestamp())

    @contextlib.contextmanager
    def failing_fast(self):
        """Bad input, a missing upstream output or denied storage access fails the task without
        retries: retrying cannot fix them (transient storage errors are retried inside tfjobs)."""
        try:
            yield
        except (ValueError, FileNotFoundError, PermissionError) as err:
            raise AirflowFailException(f"{type(err).__name__}: {err}") from err

    def finish(self, context, result: Any, **asset_extra: Any) -> dict[str, Any]:
        """Record the result on this step's asset event and return it for XCom."""
        payload = dataclasses.asdict(result) if dataclasses.is_dataclass(result) else dict(result)
        for asset in self.outlets:
            if isinstance(asset, Asset):
                context["outlet_events"][asset].extra = {"partition": self.partition, **asset_extra}
        return payload


def production_asset(spec_path: str | os.PathLike, store_uri: str | None = None) -> Asset | None:
    """The asset of a model's production pointer, ``<store>/serving/<model>/production.json``: the promote and
    rollback steps update it, and a scoring DAG scheduled on it re-scores with the new model."""
    root = store_uri or configured_store_uri()
    if not root or "{{" in root:
        return None
    spec = read_spec(spec_path)
    return Asset(name=f"{spec.model_name}.production", uri=f"{_asset_uri(root)}/serving/{spec.model_name}/production.json",
                 group="shardline")


def forced_by(context) -> dict[str, str]:
    """Who and when: the run's triggering user (else its type, e.g. a scheduled run), now, and the run's id."""
    dag_run = context["dag_run"]
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    return {"by": getattr(dag_run, "triggering_user_name", None) or f"{getattr(dag_run, 'run_type', 'a')} run",
            "at": now.isoformat(), "run_id": getattr(dag_run, "run_id", "")}


def _asset_uri(root: str) -> str:
    if "://" in root:
        return root.rstrip("/")
    return Path(root).resolve().as_uri()
