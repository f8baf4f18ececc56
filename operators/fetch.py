from __future__ import annotations

import urllib.parse
from collections.abc import Sequence

from airflow.sdk import BaseHook, conf
from airflow.sdk.exceptions import AirflowFailException, AirflowNotFoundException, AirflowRescheduleException

from operators.base import CONFIG_SECTION, ShardlineOperator
from operators.links import StoreLink

ALLOWED_SOURCES_SETTING = f"[{CONFIG_SECTION}] allowed_source_prefixes (AIRFLOW__SHARDLINE__ALLOWED_SOURCE_PREFIXES)"


class FetchDatasetOperator(ShardlineOperator):
    """Fetch the spec's source into ``raw/<dataset>/<partition>/`` with a manifest.

    A delivery that is not there yet (a ``landing`` source, or ``{partition}`` in
    ``source_uri``) is waited for in Airflow's reschedule mode: the task looks for the
    file, gives its worker slot back until the next look (state ``up_for_reschedule``),
    and fails without retries once the deadline has passed, naming it.

    :param source_uri: fetch this CSV (path, ``file://``, ``http(s)://``, ``s3://``) instead of
        the spec's source (templated). ``{partition}`` in it becomes the partition, so that each
        run fetches its day's delivery from a landing prefix: ``s3://landing/penguins-{partition}.csv``;
        ``{store}`` becomes the store's root (``{store}/landing/penguins/{partition}.csv``).
        A URI with credentials (``user:password@``) is refused: use ``source_conn_id``. Only the
        store, the spec's own source and the prefixes in ``[shardline] allowed_source_prefixes``
        may be read (see :mod:`tfjobs.allowed_sources`); anything else fails before a byte is read.
    :param source_conn_id: an Airflow HTTP connection whose login and password authenticate to
        an http(s) source (Basic auth); they are sent to the connection's host only (templated).
    :param deadline: how long after the end of the partition's day (UTC) its delivery may come
        (``"6h"``), or an absolute UTC time (``"2026-11-26T06:00:00Z"``); empty for the spec's
        ``source.deadline`` (templated).
    :param poke_interval: how often to look for a delivery that is not there yet (``"5m"``);
        empty for the spec's ``source.poke_interval`` (templated).
    """

    template_fields: Sequence[str] = (
        *ShardlineOperator.template_fields, "source_uri", "source_conn_id", "deadline", "poke_interval",
    )
    output_stage = "raw"
    operator_extra_links = (StoreLink("Manifest", "manifest_uri"),)

    def __init__(
        self,
        *,
        source_uri: str = "",
        source_conn_id: str = "",
        deadline: str = "",
        poke_interval: str = "",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.source_uri = source_uri
        self.source_conn_id = source_conn_id
        self.deadline = deadline
        self.poke_interval = poke_interval

    def execute(self, context):
        from tfjobs.fetch import DeliveryPending, fetch_dataset

        spec = self.load_spec()
        layout = self.layout(context, spec)
        with self.failing_fast():
            try:
                result = fetch_dataset(
                    spec, layout.raw, partition=self.partition,
                    source_uri=self.source_uri.replace("{store}", layout.root.rstrip("/")),
                    deadline=self.deadline, poke_interval=self.poke_interval, auth=self.source_auth(),
                    allowed=allowed_sources(layout.root),
                )
            except DeliveryPending as pending:
                self.log.info("%s", pending)
                raise AirflowRescheduleException(reschedule_date=pending.next_poke) from None
        self.log.info("Fetched %d rows from %s to %s", result.rows, result.source, result.data_uri)
        return self.finish(context, result, manifest=result.manifest_uri, rows=result.rows)

    def source_auth(self):
        """Basic auth from ``source_conn_id``'s login and password, bound to the connection's host."""
        if not self.source_conn_id:
            return None
        from tfjobs.fetch import SourceAuth

        try:
            connection = BaseHook.get_connection(self.source_conn_id)
        except AirflowNotFoundException:
            raise AirflowFailException(
                f"{self.task_id}: source_conn_id {self.source_conn_id!r} is not an Airflow connection. Create an HTTP "
                "connection with the source's host, login and password (Admin -> Connections, or the environment "
                f"variable AIRFLOW_CONN_{self.source_conn_id.upper()})."
            ) from None
        if not connection.host:
            raise AirflowFailException(
                f"{self.task_id}: connection {self.source_conn_id!r} has no host. Set it to the server its credentials "
                "are for (e.g. https://landing.example.com): they are sent nowhere else."
            )
        # As the HTTP provider reads a connection: the host may carry the scheme, else `schema` does.
        base = connection.host if "://" in connection.host else f"{connection.schema or 'http'}://{connection.host}"
        parts = urllib.parse.urlsplit(base)
        if connection.port and parts.port is None:
            base = f"{parts.scheme}://{parts.hostname}:{connection.port}"
        return SourceAuth.basic(base, connection.login or "", connection.password or "")


def allowed_sources(store_root: str):
    """What a run may fetch: the store, the prefixes in ``[shardline] allowed_source_prefixes``
    (commas or whitespace between them) and, added by the fetch, the spec's own source."""
    from tfjobs.allowed_sources import AllowedSources

    configured = conf.get(CONFIG_SECTION, "allowed_source_prefixes", fallback="") or ""
    return AllowedSources.parse(configured, ALLOWED_SOURCES_SETTING, always=(store_root,))
