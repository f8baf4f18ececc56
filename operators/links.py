"""Extra links: from a task in the Airflow UI to what it produced on the store.

Each link reads one URI from the task's XCom result (``manifest_uri``,
``tensorboard_uri``, ``version_uri``, ...) and turns it into something a browser
opens:

- with ``[shardline] store_browser_url`` set (``AIRFLOW__SHARDLINE__STORE_BROWSER_URL``),
  the store root ``[shardline] store_uri`` is replaced by it, e.g. MinIO's console
  ``http://localhost:9001/browser/shardline`` for ``s3://shardline``;
- otherwise an ``s3://`` URI opens in the AWS S3 console, and a local path as a
  ``file://`` URI.

Airflow 3 computes the link on the worker right after the task ran and keeps it in
XCom, so the API server needs neither the store nor this code.
"""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path

import attrs
from airflow.sdk import BaseOperatorLink, conf

from operators.base import CONFIG_SECTION, configured_store_uri


def browser_url(uri: str) -> str:
    """A URL a browser opens for a store URI."""
    browser = conf.get(CONFIG_SECTION, "store_browser_url", fallback="") or ""
    root = (configured_store_uri() or "").rstrip("/")
    if browser and root and uri.startswith(root + "/"):
        return browser.rstrip("/") + "/" + urllib.parse.quote(uri[len(root) + 1 :])
    parsed = urllib.parse.urlsplit(uri)
    if parsed.scheme == "s3":
        return (f"https://s3.console.aws.amazon.com/s3/buckets/{parsed.netloc}"
                f"?prefix={urllib.parse.quote(parsed.path.lstrip('/'))}")
    if parsed.scheme in ("", "file"):
        return Path(urllib.parse.unquote(parsed.path)).resolve().as_uri()
    return uri


@attrs.define()
class StoreLink(BaseOperatorLink):
    """A link named ``name`` to the store URI under ``result_key`` in the task's XCom result."""

    name: str
    result_key: str

    @property
    def xcom_key(self) -> str:
        return "_link_" + re.sub(r"\W+", "_", self.name.lower())

    def get_link(self, operator, *, ti_key) -> str:
        from airflow.sdk.execution_time.xcom import XCom

        result = XCom.get_value(ti_key=ti_key, key="return_value")
        uri = result.get(self.result_key) if isinstance(result, dict) else None
        return browser_url(uri) if uri else ""
