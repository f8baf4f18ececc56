"""The object store on S3 (AWS, MinIO or any S3 endpoint), with boto3.

URIs are ``s3://bucket/prefix/...``. Credentials and the endpoint come from:

- under Airflow, the operators' connection (conn_type ``aws``, ``endpoint_url`` in its
  extra for MinIO): the operator hands a client factory to :func:`configure`;
- otherwise the standard AWS environment and config files (``AWS_ACCESS_KEY_ID``,
  ``AWS_PROFILE``, ``AWS_ENDPOINT_URL``, ...) or the jobs' ``--s3-endpoint-url`` option.

Transfers go through boto3's transfer manager (multipart, concurrent); copies run
on the server (``CopyObject``, or ``UploadPartCopy`` parts above the multipart
threshold); botocore retries throttling and server errors in ``standard`` mode with
a generous attempt budget; reads ask S3 to verify its checksums
(``ChecksumMode=ENABLED``). An Airflow connection's ``config_kwargs`` are merged over
these defaults (:func:`botocore_config`).

Errors are re-raised as :class:`ObjectStoreError` from the botocore error: the
message has S3's error code and message, the URI, and where the credentials came
from, never the credentials themselves. ``DeleteObjects`` answers HTTP 200 even when
some keys were not deleted; those keys are retried when the error is transient and
reported otherwise.
"""

from __future__ import annotations

import copy
import hashlib
import os
import random
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tfjobs.storage.store import ObjectStore, PreconditionFailedError, _check_condition, register_backend

MAX_ATTEMPTS = 10
MULTIPART_THRESHOLD = 16 << 20
MAX_CONCURRENCY = 8
ENDPOINT_ENV = "SHARDLINE_S3_ENDPOINT_URL"


class ObjectStoreError(RuntimeError):
    """An object store request failed; the message names the bucket and where the credentials came from."""


class ObjectStoreAccessError(ObjectStoreError, PermissionError):
    """No credentials, wrong credentials, no permission or no such bucket: retrying will not help."""


#: Retries for throttling (503 SlowDown), 5xx and dropped connections; checksums on.
BOTOCORE_DEFAULTS: dict[str, Any] = {
    "retries": {"mode": "standard", "max_attempts": MAX_ATTEMPTS},
    "max_pool_connections": 32,
    "connect_timeout": 10,
    "read_timeout": 60,
    "request_checksum_calculation": "when_supported",
    "response_checksum_validation": "when_supported",
}
#: Per-key ``DeleteObjects`` errors worth another try.
TRANSIENT_DELETE_ERRORS = frozenset({"InternalError", "SlowDown", "ServiceUnavailable", "RequestTimeout"})
#: A conditional write lost: 412 PreconditionFailed, or 409 while another conditional write of the key is in flight.
CONDITION_ERRORS = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})
ACCESS_ERRORS = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "ExpiredToken"})


def botocore_config(config_kwargs: Mapping[str, Any] | None = None):
    """The project's botocore defaults with ``config_kwargs`` merged over them, key by key.

    ``config_kwargs`` are an Airflow aws connection's (its extra), the keyword
    arguments of ``botocore.config.Config``. Their values win; nested dicts merge,
    so ``{"retries": {"max_attempts": 3}}`` keeps ``mode: standard`` and
    ``{"s3": {"addressing_style": "path"}}`` adds to whatever ``s3`` holds.
    ``"signature_version": "unsigned"`` means anonymous requests, as in the provider.
    """
    from botocore import UNSIGNED
    from botocore.config import Config

    if config_kwargs is not None and not isinstance(config_kwargs, Mapping):
        raise TypeError(f"config_kwargs must be a JSON object of botocore Config options, got {config_kwargs!r}")
    kwargs = _merged(BOTOCORE_DEFAULTS, config_kwargs or {})
    if kwargs.get("signature_version") == "unsigned":
        kwargs["signature_version"] = UNSIGNED
    return Config(**kwargs)


def _merged(defaults: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Copies all the way down: botocore rewrites ``retries`` in place, which must not reach the defaults."""
    merged = copy.deepcopy(dict(defaults))
    for key, value in overrides.items():
        if isinstance(merged.get(key), Mapping) and isinstance(value, Mapping):
            value = _merged(merged[key], value)
        merged[key] = copy.deepcopy(value)
    return merged


def _environment_client():
    import boto3

    return boto3.session.Session().client(
        "s3", endpoint_url=os.environ.get(ENDPOINT_ENV) or None, config=botocore_config()
    )


_factory: Callable[[], Any] = _environment_client
_source = "the AWS environment (AWS_* variables, ~/.aws)"
_client = None
_lock = threading.Lock()


def configure(client_factory: Callable[[], Any] | None = None, source: str = "", endpoint_url: str = "") -> None:
    """Use ``client_factory`` (e.g. an Airflow hook's ``get_conn``) for every S3 request in this process.

    ``source`` says where the credentials come from (``"Airflow connection 'x'"``), for errors.
    Without a factory, clients come from the AWS environment, at ``endpoint_url`` if given.
    """
    global _factory, _source, _client
    with _lock:
        if client_factory is None:
            if endpoint_url:
                os.environ[ENDPOINT_ENV] = endpoint_url
            _factory, _source = _environment_client, source or "the AWS environment (AWS_* variables, ~/.aws)"
        else:
            _factory, _source = client_factory, source or "the configured client"
        _client = None


def client():
    """The process's S3 client (boto3 clients are thread-safe)."""
    global _client
    with _lock:
        if _client is None:
            _client = _factory()
        return _client


def split_uri(uri: str) -> tuple[str, str]:
    parsed = urllib.parse.urlsplit(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"Not an S3 URI: {uri!r} (expected s3://bucket/key)")
    return parsed.netloc, parsed.path.lstrip("/")


def _transfer_config():
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, max_concurrency=MAX_CONCURRENCY, use_threads=True)


def _botocore_cause(err: BaseException) -> BaseException:
    """The botocore error under boto3's transfer wrappers (S3UploadFailedError and the like)."""
    seen = err
    while seen is not None:
        if type(seen).__module__.startswith("botocore"):
            return seen
        seen = seen.__cause__ or seen.__context__
    return err


def _explain(err: BaseException, action: str, uri: str) -> ObjectStoreError:
    """A message a user can act on: what S3 said, which bucket, which credentials, what to fix.

    Raise it ``from err``: the botocore error stays attached as the cause.
    """
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    err = _botocore_cause(err)
    bucket = split_uri(uri)[0]
    if isinstance(err, NoCredentialsError):
        return ObjectStoreAccessError(f"Cannot {action} {uri}: no AWS credentials found in {_source} ({err})")
    if isinstance(err, EndpointConnectionError):
        return ObjectStoreError(f"Cannot {action} {uri}: the S3 endpoint is unreachable ({err}); check the "
                                f"endpoint in {_source}")
    if isinstance(err, ClientError):
        error = err.response.get("Error", {})
        code = error.get("Code") or "an error"
        answer = f"S3 answered {code}: {error['Message']}" if error.get("Message") else f"S3 answered {code}"
        if code == "NoSuchBucket":
            return ObjectStoreAccessError(
                f"Cannot {action} {uri}: bucket {bucket!r} does not exist ({answer}; credentials from {_source})"
            )
        if code in ACCESS_ERRORS:
            return ObjectStoreAccessError(
                f"Cannot {action} {uri}: access to bucket {bucket!r} denied ({answer}); "
                f"check the credentials in {_source}"
            )
        return ObjectStoreError(f"Cannot {action} {uri}: {answer} (bucket {bucket!r}, credentials from {_source})")
    return ObjectStoreError(f"Cannot {action} {uri}: {type(err).__name__}: {err} (credentials from {_source})")


def _undeleted(errors: list[dict], bucket: str, prefix: str) -> ObjectStoreError:
    """What ``DeleteObjects`` could not delete, key by key (it answers HTTP 200 all the same)."""
    shown = "; ".join(f"s3://{bucket}/{e.get('Key')}: {e.get('Code')}: {e.get('Message')}" for e in errors[:5])
    more = f" and {len(errors) - 5} more" if len(errors) > 5 else ""
    if all(e.get("Code") in ACCESS_ERRORS for e in errors):
        return ObjectStoreAccessError(
            f"Cannot delete {prefix}: S3 refused {shown}{more}; the credentials in {_source} need "
            "s3:DeleteObject on these keys (a bucket policy or object lock may deny it)"
        )
    return ObjectStoreError(f"Cannot delete {prefix}: S3 did not delete {shown}{more} (credentials from {_source})")


def _missing(err: BaseException) -> bool:
    from botocore.exceptions import ClientError

    err = _botocore_cause(err)
    return isinstance(err, ClientError) and err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")


class S3Store(ObjectStore):
    """Objects in S3 buckets; "directories" are key prefixes."""

    def exists(self, uri: str) -> bool:
        bucket, key = split_uri(uri)
        try:
            client().head_object(Bucket=bucket, Key=key)
            return True
        except Exception as err:
            if _missing(err):
                return False
            raise _explain(err, "check", uri) from err

    def read_bytes(self, uri: str) -> bytes:
        found = self.read_versioned(uri)
        if found is None:
            raise FileNotFoundError(f"{uri} does not exist")
        return found[0]

    def write_bytes(self, uri: str, data: bytes) -> None:
        bucket, key = split_uri(uri)
        try:
            client().put_object(Bucket=bucket, Key=key, Body=data)
        except Exception as err:
            raise _explain(err, "write", uri) from err

    def read_versioned(self, uri: str) -> tuple[bytes, str] | None:
        """The object and its ETag."""
        bucket, key = split_uri(uri)
        try:
            response = client().get_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
            return response["Body"].read(), response["ETag"]
        except Exception as err:
            if _missing(err):
                return None
            raise _explain(err, "read", uri) from err

    def write_conditional(self, uri: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None) -> str:
        """One ``PutObject`` with ``If-None-Match: *`` or ``If-Match: <ETag>``: S3 checks and writes atomically.

        botocore retries a PUT whose answer was lost; the retry then fails its own condition
        although the first try won. So a lost condition is reported only if the object does
        not hold exactly ``data`` now (callers put a nonce or a timestamp in what they write).
        """
        from botocore.exceptions import ClientError

        _check_condition(uri, if_absent, if_match)
        bucket, key = split_uri(uri)
        condition = {"IfNoneMatch": "*"} if if_absent else {"IfMatch": if_match}
        try:
            return client().put_object(Bucket=bucket, Key=key, Body=data, **condition)["ETag"]
        except Exception as err:
            cause = _botocore_cause(err)
            code = cause.response.get("Error", {}).get("Code") if isinstance(cause, ClientError) else None
            if code not in CONDITION_ERRORS and not (if_match is not None and _missing(err)):
                raise _explain(err, "write", uri) from err
            current = self.read_versioned(uri)
            if current is not None and current[0] == data:
                return current[1]
            state = "exists" if if_absent else ("is absent" if current is None else "was changed")
            raise PreconditionFailedError(uri, f"{state} (S3 answered {code or 'NoSuchKey'})") from err

    def list(self, prefix: str) -> list[str]:
        uris = sorted(self._listed(prefix))
        if not uris and split_uri(prefix)[1].rstrip("/") and self.exists(prefix):
            return [prefix]
        return uris

    def modified(self, prefix: str) -> dict[str, float]:
        return self._listed(prefix)

    def _listed(self, prefix: str) -> dict[str, float]:
        """Every object under ``prefix/`` and when it was last modified (Unix seconds)."""
        bucket, key = split_uri(prefix)
        key = key.rstrip("/")
        try:
            paginator = client().get_paginator("list_objects_v2")
            return {f"s3://{bucket}/{item['Key']}": item["LastModified"].timestamp()
                    for page in paginator.paginate(Bucket=bucket, Prefix=f"{key}/" if key else "")
                    for item in page.get("Contents", [])}
        except Exception as err:
            raise _explain(err, "list", prefix) from err

    def delete(self, prefix: str) -> None:
        bucket, _ = split_uri(prefix)
        keys = [split_uri(u)[1] for u in self.list(prefix)]
        for start in range(0, len(keys), 1000):
            self._delete_keys(bucket, keys[start : start + 1000], prefix)

    def _delete_keys(self, bucket: str, keys: list[str], prefix: str) -> None:
        """One ``DeleteObjects`` request, then again for the keys that failed transiently."""
        for attempt in range(MAX_ATTEMPTS):
            try:
                response = client().delete_objects(
                    Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True}
                )
            except Exception as err:
                raise _explain(err, "delete", prefix) from err
            errors = response.get("Errors", [])
            if not errors:
                return
            if any(e.get("Code") not in TRANSIENT_DELETE_ERRORS for e in errors):
                break
            keys = [e["Key"] for e in errors]
            time.sleep(random.uniform(0, min(20.0, 0.5 * 2**attempt)))  # botocore's backoff: full jitter
        raise _undeleted(errors, bucket, prefix)

    def upload(self, local_path: str | Path, uri: str) -> None:
        bucket, key = split_uri(uri)
        try:
            client().upload_file(str(local_path), bucket, key, Config=_transfer_config())
        except Exception as err:
            raise _explain(err, "upload to", uri) from err

    def download(self, uri: str, local_path: str | Path) -> None:
        bucket, key = split_uri(uri)
        try:
            client().download_file(
                bucket, key, str(local_path), ExtraArgs={"ChecksumMode": "ENABLED"}, Config=_transfer_config()
            )
        except Exception as err:
            if _missing(err):
                raise FileNotFoundError(f"{uri} does not exist") from err
            raise _explain(err, "download", uri) from err

    def download_sha256(self, uri: str, local_path: str | Path, size: int) -> str:
        """Below the multipart threshold, one streamed GET hashed on the way (no HEAD, no second read)."""
        if size >= MULTIPART_THRESHOLD:
            return super().download_sha256(uri, local_path, size)
        bucket, key = split_uri(uri)
        digest = hashlib.sha256()
        try:
            body = client().get_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")["Body"]
            with open(local_path, "wb") as out:
                for chunk in body.iter_chunks(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
        except Exception as err:
            if _missing(err):
                raise FileNotFoundError(f"{uri} does not exist") from err
            raise _explain(err, "download", uri) from err
        return digest.hexdigest()

    def copy(self, src_uri: str, dst_uri: str, size: int | None = None) -> None:
        """A server-side copy: one ``CopyObject`` below the multipart threshold, else ``UploadPartCopy`` parts."""
        src_bucket, src_key = split_uri(src_uri)
        bucket, key = split_uri(dst_uri)
        source = {"Bucket": src_bucket, "Key": src_key}
        try:
            if size is not None and size < MULTIPART_THRESHOLD:
                client().copy_object(CopySource=source, Bucket=bucket, Key=key)
            else:
                client().copy(source, bucket, key, Config=_transfer_config())
        except Exception as err:
            if _missing(err):
                raise FileNotFoundError(f"{src_uri} does not exist") from err
            raise _explain(err, f"copy {src_uri} to", dst_uri) from err


register_backend("s3", S3Store)
