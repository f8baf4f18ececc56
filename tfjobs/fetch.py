"""Fetch a dataset into ``raw/<dataset>/<partition>/`` (CSV, or Parquet for binary columns) with a manifest.

Sources (the spec's ``source.kind``):

- ``palmerpenguins``: the data the PyPI package ships (no network);
- ``sklearn``: a dataset bundled with scikit-learn (``iris``, ``wine``, ``diabetes``, ...);
- ``tfds``: a TensorFlow Datasets dataset, prepared in its ``data_dir``, written to Parquet:
  images as their encoded files (never decoded), class labels as their names; one split
  or slice (``train[:90%]``), or one per Shardline split (``source.splits``);
- ``csv``: a CSV at a local path, ``file://``, ``http(s)://`` or object-store URI;
- ``landing``: one CSV per day under a prefix, as upstream systems deliver data
  (``<prefix>/<partition>.csv`` by default);
- ``image_folder``: a local directory or ``s3://`` prefix with one sub-folder of images
  per class (:mod:`tfjobs.storage.image_folder`), streamed to Parquet: each file's path,
  its bytes (the spec's binary feature) and its folder's name (the label).

Tabular deliveries keep their bytes as delivered (``data.csv``); sources with a binary
column write ``data.parquet`` (:mod:`tfjobs.storage.raw_files`). The manifest records
the format, the row count, the SHA-256 and where the data came from. A re-fetch that
yields the same bytes rewrites nothing.
Rows of a delivered file are counted as the spec's source lays them out
(delimiter, quoting, header or ``column_names``, encoding: tab-separated files
without a header come as they are); a zip archive is replaced by its
``source.archive_member``.

A landing delivery may be late. Until its deadline (``source.deadline`` after the
end of the partition's day, or an absolute UTC time given for the run) a missing
file raises :class:`DeliveryPending`, which says when to look again; after it,
:class:`SourceNotFoundError` names the deadline. Looking only checks that the file
exists (the object store's ``exists``, an HTTP ``HEAD``); the command line waits in
process, Airflow's fetch operator gives its worker slot back between looks.

Credentials never travel in a URI (they would end up in the run's configuration and
logs): a URI with ``user:password@`` is refused. HTTP credentials come as a
:class:`SourceAuth`, bound to one origin; a redirect to another origin drops them.

Given an :class:`~tfjobs.allowed_sources.AllowedSources` (Airflow's fetch always
gives one; the command line with ``--allow-source``), a fetch reads only under its
prefixes and the spec's own source: the source is checked once ``{partition}`` is
filled in and before anything is read, and every HTTP request, redirects included,
goes to allowed prefixes and public addresses only.

    python -m tfjobs.fetch --spec include/penguins.yaml --output .demo/store/raw/penguins/2026-11-25
"""

from __future__ import annotations

import argparse
import base64
import codecs
import contextlib
import contextvars
import csv
import dataclasses
import datetime as dt
import difflib
import logging
import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tfjobs import cli
from tfjobs.allowed_sources import AllowedSources
from tfjobs.deadlines import parse_duration, partition_deadline, utc_now, utc_text
from tfjobs.spec import FILE_LAYOUT_FIELDS, PipelineSpec, SourceSpec, load_spec
from tfjobs.storage.raw_files import RAW_FILES, parquet_rows, raw_format, write_parquet
from tfjobs.storage.store import join, local_copy, read_json_if_exists, redact, sha256_file, staging_dir, store_for, write_json

log = logging.getLogger(__name__)

DATA_FILE = RAW_FILES["csv"]
MANIFEST = "manifest.json"
HTTP_TIMEOUT_S = 60
# The allow-list of the fetch in progress, which every HTTP request it makes checks (see _open_http).
_ALLOWED: contextvars.ContextVar[AllowedSources | None] = contextvars.ContextVar("allowed_sources", default=None)
#: Sources whose rows may hold binary values (encoded images): written to Parquet.
PARQUET_SOURCES = ("tfds", "image_folder")
#: TFDS batches written as one Parquet row group.
TFDS_BATCH = 1024


class SourceNotFoundError(FileNotFoundError):
    """The source has no data for the partition asked for (for a delivery: not by its deadline)."""


class DeliveryPending(Exception):
    """The partition's delivery is not there yet, and its deadline has not passed: look again at ``next_poke``."""

    def __init__(self, partition: str, uri: str, deadline: dt.datetime, next_poke: dt.datetime) -> None:
        super().__init__(
            f"No delivery for {partition} yet at {uri}; looking again at {utc_text(next_poke)}, "
            f"giving up at {utc_text(deadline)}"
        )
        self.partition = partition
        self.uri = uri
        self.deadline = deadline
        self.next_poke = next_poke


@dataclass(frozen=True)
class SourceAuth:
    """HTTP headers that authenticate to the source (e.g. Basic auth), sent to ``origin`` only.

    A source at another origin is refused, and a redirect to another origin drops
    them. ``origin`` is ``scheme://host:port``; the headers never show in a repr.
    """

    origin: str
    headers: Mapping[str, str] = field(repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "origin", origin_of(self.origin))

    @classmethod
    def basic(cls, origin: str, user: str, password: str) -> SourceAuth:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        return cls(origin, {"Authorization": f"Basic {token}"})


@dataclass(frozen=True)
class FetchResult:
    data_uri: str
    manifest_uri: str
    rows: int
    sha256: str
    source: str
    rewritten: bool


def fetch_dataset(
    spec: PipelineSpec,
    output_uri: str,
    partition: str = "",
    source_uri: str = "",
    *,
    deadline: str = "",
    poke_interval: str = "",
    auth: SourceAuth | None = None,
    allowed: AllowedSources | None = None,
) -> FetchResult:
    """Fetch the spec's source (or ``source_uri``, a CSV) into ``output_uri``.

    ``{partition}`` in ``source_uri`` becomes the partition, which reads one file per
    day from a landing prefix: ``s3://landing/housing/{partition}.csv``. A delivery
    that is not there yet raises :class:`DeliveryPending` until ``deadline`` (default:
    the spec's ``source.deadline``), then :class:`SourceNotFoundError`. With ``allowed``,
    a source outside its prefixes and the spec's own source raises
    :class:`~tfjobs.allowed_sources.SourceNotAllowedError` before anything is read.
    """
    source = source_for(spec, source_uri)
    location = source_location(source)
    _refuse_credentials_in(location)
    if auth is not None:
        _check_auth_origin(auth, location)
    if allowed is not None:
        allowed = allowed.including(spec.source.uri) if spec.source.kind in ("csv", "landing", "image_folder") else allowed
        if location:
            allowed.check(location.replace("{partition}", partition))
    with staging_dir() as tmp, _fetching_under(allowed):
        local = tmp / DATA_FILE
        if source.kind == "landing":
            description = _fetch_delivery(source, partition, local, deadline, poke_interval, auth)
        elif source.kind in PARQUET_SOURCES:
            local = tmp / RAW_FILES["parquet"]
            description = _fetch_to_parquet(spec, source, local)
        else:
            description = _fetch_source(source, local, auth)
        description = _unpack(source, local, description)
        digest = sha256_file(local)
        manifest_uri = join(output_uri, MANIFEST)
        previous = read_json_if_exists(manifest_uri)
        if previous and previous.get("sha256") == digest:
            log.info("Raw data for %s at %s is unchanged (sha256 %s); nothing rewritten", spec.name, output_uri, digest)
            return _result(output_uri, previous, rewritten=False)
        rows, columns = _count_rows(local, source, description)
        store = store_for(output_uri)
        store.delete(manifest_uri)
        store.upload(local, join(output_uri, local.name))
        manifest = {
            "dataset": spec.name,
            "partition": partition,
            "source": description,
            "format": raw_format(local),
            "file": local.name,
            "rows": rows,
            "columns": columns,
            "bytes": local.stat().st_size,
            "sha256": digest,
        }
        write_json(manifest_uri, manifest)
    log.info("Fetched %d rows of %s from %s into %s", rows, spec.name, description, output_uri)
    return _result(output_uri, manifest, rewritten=True)


def fetch_when_delivered(
    spec: PipelineSpec,
    output_uri: str,
    partition: str = "",
    source_uri: str = "",
    *,
    deadline: str = "",
    poke_interval: str = "",
    auth: SourceAuth | None = None,
    allowed: AllowedSources | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> FetchResult:
    """:func:`fetch_dataset`, waiting in this process for a late delivery until its deadline."""
    while True:
        try:
            return fetch_dataset(spec, output_uri, partition, source_uri,
                                 deadline=deadline, poke_interval=poke_interval, auth=auth, allowed=allowed)
        except DeliveryPending as pending:
            log.info("%s", pending)
            sleep(max(0.0, (pending.next_poke - utc_now()).total_seconds()))


def source_for(spec: PipelineSpec, source_uri: str = "") -> SourceSpec:
    """The source to fetch: the spec's, or ``source_uri`` (a landing pattern if it holds ``{partition}``).

    A source given for the run is laid out as the spec's (delimiter, header, encoding, ...: the
    same data from elsewhere); a landing pattern keeps the spec's deadline and poke interval.
    """
    if not source_uri:
        return spec.source
    if spec.source.kind == "image_folder":  # another folder laid out as the spec's
        return dataclasses.replace(spec.source, uri=source_uri)
    layout = {name: getattr(spec.source, name) for name in FILE_LAYOUT_FIELDS}
    if "{partition}" in source_uri:
        return SourceSpec(kind="landing", pattern=source_uri, deadline=spec.source.deadline,
                          poke_interval=spec.source.poke_interval, **layout)
    return SourceSpec(kind="csv", uri=source_uri, **layout)


def source_location(source: SourceSpec) -> str:
    """Where a csv, landing or image folder source's files are (``{partition}`` left in); empty for the others."""
    if source.kind == "landing":
        return join(source.uri, source.pattern) if source.uri else source.pattern
    return source.uri if source.kind in ("csv", "image_folder") else ""


def delivery_uri(source: SourceSpec, partition: str) -> str:
    """The file of one partition's delivery."""
    if not partition:
        raise ValueError("A landing source needs a partition (the run's logical date)")
    return source_location(source).replace("{partition}", partition)


def delivery_exists(uri: str, auth: SourceAuth | None = None) -> bool:
    """Whether the file is there, without reading it: the store's ``exists``, or an HTTP ``HEAD``."""
    if urllib.parse.urlsplit(uri).scheme in ("http", "https"):
        return _http_exists(uri, auth)
    return store_for(uri).exists(uri)


def origin_of(url: str) -> str:
    """``scheme://host:port`` of a URL, with the scheme's default port filled in."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return f"{parts.scheme}://{parts.hostname or ''}:{port}"


def _fetch_delivery(source: SourceSpec, partition: str, target: Path, deadline: str, poke_interval: str,
                    auth: SourceAuth | None) -> str:
    uri = delivery_uri(source, partition)
    if not delivery_exists(uri, auth):
        due = partition_deadline(partition, deadline or source.deadline)
        now = utc_now()
        if now >= due:
            raise SourceNotFoundError(
                f"No delivery for {partition} by {utc_text(due)}: expected {redact(uri)}. Deliver the file and run "
                "the fetch again, or give the run a later deadline (source.deadline in the spec, or the run's "
                "delivery deadline)."
            )
        next_poke = min(now + parse_duration(poke_interval or source.poke_interval), due)
        raise DeliveryPending(partition, redact(uri), due, next_poke)
    try:
        return _copy_uri(uri, target, auth)
    except FileNotFoundError:
        raise SourceNotFoundError(f"The delivery for {partition} went away while it was read: {redact(uri)}") from None


def _result(output_uri: str, manifest: dict, rewritten: bool) -> FetchResult:
    return FetchResult(
        data_uri=join(output_uri, manifest["file"]),
        manifest_uri=join(output_uri, MANIFEST),
        rows=manifest["rows"],
        sha256=manifest["sha256"],
        source=manifest["source"],
        rewritten=rewritten,
    )


def _fetch_source(source: SourceSpec, target: Path, auth: SourceAuth | None) -> str:
    """Write the source's CSV bytes to ``target``; return a credential-free description."""
    if source.kind == "palmerpenguins":
        import palmerpenguins

        palmerpenguins.load_penguins().to_csv(target, index=False)
        return f"palmerpenguins=={_version('palmerpenguins')}"
    if source.kind == "sklearn":
        return _fetch_sklearn(source.name, target)
    if source.kind == "tfds":
        return _fetch_tfds(source, target)
    return _copy_uri(source.uri, target, auth)


def _copy_uri(uri: str, target: Path, auth: SourceAuth | None) -> str:
    if urllib.parse.urlsplit(uri).scheme in ("http", "https"):
        try:
            with _open_http(uri, auth) as response, open(target, "wb") as out:
                shutil.copyfileobj(response, out)
        except OSError as err:  # URLError and HTTPError are OSErrors
            # A 404 or 410 fails the task for good: unlike a 5xx or a dropped connection, a retry cannot help.
            gone = isinstance(err, urllib.error.HTTPError) and err.code in (404, 410)
            raise (SourceNotFoundError if gone else OSError)(f"Could not download {redact(uri)}: {err}") from None
        return redact(uri)
    with local_copy(uri) as path:
        shutil.copyfile(path, target)
    return redact(uri)


def _refuse_credentials_in(uri: str) -> None:
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme and "@" in parts.netloc:
        raise ValueError(
            f"The source URI {redact(uri)} carries credentials (user:password@): they would be stored with the run "
            "and shown in its logs. Take them out of the URI and give them separately: under Airflow, the id of an "
            "HTTP connection that holds them as source_conn_id; on the command line, --basic-auth-env."
        )


def _check_auth_origin(auth: SourceAuth, location: str) -> None:
    if urllib.parse.urlsplit(location).scheme not in ("http", "https"):
        raise ValueError(f"HTTP credentials were given for a source that is not http(s): {redact(location) or 'the spec'}")
    if origin_of(location) != auth.origin:
        raise ValueError(
            f"The source {redact(location)} is not at {auth.origin}, the only origin its credentials are for; "
            "point the source there, or use credentials (a connection) for its own server."
        )


class _CredentialsStayWithTheirOrigin(urllib.request.HTTPRedirectHandler):
    """Follow redirects, dropping the credential headers on the way to another origin (a HEAD stays a HEAD).

    urllib's own handler copies every header to wherever the server redirects.
    """

    def __init__(self, credential_headers: Iterable[str]) -> None:
        # Request.add_header stores names capitalized ("X-api-key"); remove_header needs them so.
        self.credential_headers = {"Authorization", *(name.capitalize() for name in credential_headers)}

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        redirected = super().redirect_request(req, fp, code, msg, headers, newurl)
        if redirected is None:
            return None
        if origin_of(redirected.full_url) != origin_of(req.full_url):
            for name in self.credential_headers:
                redirected.remove_header(name)
        if req.get_method() == "HEAD":
            redirected.method = "HEAD"
        return redirected


@contextlib.contextmanager
def _fetching_under(allowed: AllowedSources | None):
    token = _ALLOWED.set(allowed)
    try:
        yield
    finally:
        _ALLOWED.reset(token)


def _open_http(uri: str, auth: SourceAuth | None, method: str = "GET", headers: Mapping[str, str] | None = None):
    request = urllib.request.Request(uri, method=method, headers={"User-Agent": "shardline", **(headers or {})})
    credentials = auth.headers if auth is not None and origin_of(uri) == auth.origin else {}
    for name, value in credentials.items():
        request.add_header(name, value)
    allowed = _ALLOWED.get()
    checks = allowed.url_handlers() if allowed is not None else []
    opener = urllib.request.build_opener(_CredentialsStayWithTheirOrigin(credentials), *checks)
    return opener.open(request, timeout=HTTP_TIMEOUT_S)


def _http_exists(uri: str, auth: SourceAuth | None) -> bool:
    """``HEAD``; a server that does not do ``HEAD`` gets a ``GET`` of the first byte."""
    for method, headers in (("HEAD", None), ("GET", {"Range": "bytes=0-0"})):
        try:
            with _open_http(uri, auth, method, headers):
                return True
        except urllib.error.HTTPError as err:
            if err.code in (404, 410):
                return False
            if err.code in (401, 403):
                raise PermissionError(
                    f"{redact(uri)} answered HTTP {err.code} {err.reason}: check the source's credentials"
                ) from None
            if err.code not in (405, 501):
                raise OSError(f"Could not check {redact(uri)}: HTTP {err.code} {err.reason}") from None
        except OSError as err:
            raise OSError(f"Could not check {redact(uri)}: {err}") from None
    raise OSError(f"Could not check {redact(uri)}: it answers neither HEAD nor GET")


def _fetch_sklearn(name: str, target: Path) -> str:
    import sklearn.datasets

    loader = getattr(sklearn.datasets, f"load_{name}", None)
    if loader is None:
        bundled = sorted(n[5:] for n in dir(sklearn.datasets) if n.startswith("load_") and n != "load_files")
        raise ValueError(f"scikit-learn has no bundled dataset {name!r}; bundled datasets: {bundled}")
    frame = loader(as_frame=True).frame
    frame.to_csv(target, index=False)
    return f"scikit-learn=={_version('scikit-learn')}:{name}"


def _fetch_to_parquet(spec: PipelineSpec, source: SourceSpec, target: Path) -> str:
    """Write the source's rows to a Parquet file at ``target``, batch by batch; return a description."""
    if source.kind == "image_folder":
        from tfjobs.storage.image_folder import ImageFolder, batch_schema

        image = _binary_feature(spec)
        folder = ImageFolder.list(source.uri)
        schema = batch_schema(image, spec.label.name)
        write_parquet(folder.batches(image, spec.label.name), target, schema)
        counts = ", ".join(f"{name} {count}" for name, count in folder.classes.items())
        log.info("Image folder %s: %d files in %d classes (%s)", redact(source.uri), len(folder.files),
                 len(folder.classes), counts)
        return redact(source.uri)
    return _fetch_tfds(spec, source, target)


def _binary_feature(spec: PipelineSpec) -> str:
    """The one feature of the spec stored as bytes: where an image folder's files go."""
    names = spec.binary_features
    if len(names) != 1:
        raise ValueError(
            f"An image_folder source fills one binary feature (an image) with its files and the label with their "
            f"folder names; spec {spec.name!r} has {len(names)} binary features {names}"
        )
    return names[0]


def _fetch_tfds(spec: PipelineSpec, source: SourceSpec, target: Path) -> str:
    """TFDS split(s) to Parquet, streamed in batches; TFDS downloads the dataset unless it is in ``data_dir``.

    Images are written as the encoded files TFDS stores (``SkipDecoding``: never decoded
    here), class labels as their names (``Adelie``, not ``0``), as the spec's classes
    and categorical features name them. With ``source.splits``, each Shardline split is
    read from its TFDS split or slice (``train[:90%]``), and every row carries its split
    in the spec's ``split.column``.
    """
    import pyarrow as pa
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(source.name, data_dir=source.uri or None)
    except tfds.core.registered.DatasetNotFoundError:
        close = difflib.get_close_matches(source.name.split("/")[0], tfds.list_builders(), n=3)
        guess = f"; did you mean {' or '.join(map(repr, close))}?" if close else "."
        raise ValueError(
            f"TensorFlow Datasets {_version('tensorflow-datasets')} has no dataset {source.name!r}{guess} "
            "The catalog: https://www.tensorflow.org/datasets/catalog/overview"
        ) from None
    builder.download_and_prepare()
    columns = _tfds_columns(tfds, builder.info)
    decoders = {name: tfds.decode.SkipDecoding() for name, feature in builder.info.features.items()
                if isinstance(feature, tfds.features.Image)}
    splits = dict(source.splits) or {"": source.split}
    fields = [(name, column.type) for name, column in columns.items()]
    schema = pa.schema(fields + ([(spec.split.column, pa.string())] if source.splits else []))

    def record_batches():
        for split, expression in splits.items():
            try:
                dataset = builder.as_dataset(split=expression, decoders=decoders)
            except ValueError as err:  # an unknown split, a malformed slice
                raise ValueError(f"tfds:{source.name}: cannot read split {expression!r}: {err}") from None
            dataset = dataset.map(lambda example: {name: example[name] for name in columns}).batch(TFDS_BATCH)
            for batch in tfds.as_numpy(dataset):
                arrays = [column.convert(batch[name]) for name, column in columns.items()]
                if split:
                    arrays.append(pa.array([split] * len(arrays[0]), pa.string()))
                yield pa.record_batch(arrays, schema=schema)

    write_parquet(record_batches(), target, schema)
    expressions = "+".join(f"{split}={expression}" for split, expression in splits.items()) if source.splits else ""
    return f"tfds:{source.name}/{expressions or source.split}"


@dataclasses.dataclass(frozen=True)
class _TfdsColumn:
    type: object  # a pyarrow type
    convert: Callable  # a batch of the feature's NumPy values -> a pyarrow array


def _tfds_columns(tfds, info) -> dict[str, _TfdsColumn]:
    """The columns a TFDS dataset's top-level features make: images as bytes, class labels as names, scalars
    as they are. Features of other shapes (nested, sequences, arrays) have no column and are left out."""
    import numpy as np
    import pyarrow as pa

    columns = {}
    for name, feature in info.features.items():
        if isinstance(feature, tfds.features.Image):
            columns[name] = _TfdsColumn(pa.binary(), lambda values: pa.array(values.tolist(), pa.binary()))
        elif isinstance(feature, tfds.features.ClassLabel):
            columns[name] = _TfdsColumn(pa.string(), lambda values, f=feature: pa.array(
                [f.int2str(int(v)) for v in values], pa.string()))
        elif isinstance(feature, tfds.features.Tensor) and feature.shape == () and feature.np_dtype == np.object_:
            columns[name] = _TfdsColumn(pa.string(), lambda values: pa.array(
                [v.decode("utf-8", "replace") for v in values.tolist()], pa.string()))
        elif isinstance(feature, tfds.features.Tensor) and feature.shape == ():
            columns[name] = _TfdsColumn(pa.from_numpy_dtype(feature.np_dtype), pa.array)
        else:
            log.info("TFDS feature %r (%s) has no column: only images, labels, text and scalars are fetched",
                     name, type(feature).__name__)
    return columns


def _unpack(source: SourceSpec, path: Path, description: str) -> str:
    """Replace a zip archive at ``path`` by the source's ``archive_member`` in it; a plain file stays as it is."""
    if not source.archive_member or not zipfile.is_zipfile(path):
        return description
    with zipfile.ZipFile(path) as archive:
        if source.archive_member not in archive.namelist():
            raise ValueError(f"{description} is a zip archive without {source.archive_member!r} "
                             f"(source.archive_member); it holds {archive.namelist()}")
        data = archive.read(source.archive_member)
    path.write_bytes(data)
    return f"{description}!{source.archive_member}"


def _count_rows(path: Path, source: SourceSpec, description: str) -> tuple[int, list[str]]:
    """Rows (blank lines are none, as for the validate step's reader) and the columns, as the source lays
    them out (delimiter, quoting, header or ``column_names``, encoding).

    Bytes that do not decode in the source's encoding are counted like any others: their row is the
    validate step's to quarantine. A file that is not text at all (compressed, binary), whose header
    names a column twice or whose rows do not have the header's number of fields fails naming the source
    and the line: pandas would fill a short row with empty values, and the pipeline would take a shifted
    row for a valid one.
    """
    if raw_format(path) == "parquet":
        return parquet_rows(path)
    _refuse_binary(path, description)
    # utf-8-sig: a byte-order mark is not part of the first column's name.
    encoding = "utf-8-sig" if codecs.lookup(source.encoding).name == "utf-8" else source.encoding
    line = 1  # where the row being read starts
    try:
        with open(path, newline="", encoding=encoding, errors="surrogateescape") as f:
            reader = csv.reader(f, strict=True, **source.csv_dialect())
            header = next(reader, None) if source.header else None
            if source.header and header is None:
                raise ValueError(f"The CSV from {description} is empty (no header row)")
            columns = source.columns_of(header)
            rows = 0
            line = reader.line_num + 1
            for row in reader:
                if row and len(row) != len(columns):
                    raise ValueError(
                        f"Line {line} of the CSV from {description} has {len(row)} fields, "
                        f"{'its header' if source.header else 'source.column_names'} {len(columns)}. A value that "
                        f"holds the delimiter ({source.delimiter!r}) needs quotes; a quote needs its pair.")
                rows += bool(row)
                line = reader.line_num + 1
    except csv.Error as err:
        hint = " (a quote opened there never closes)" if "end of data" in str(err) else ""
        raise ValueError(f"Cannot read the CSV from {description} at line {line}: {err}{hint}") from None
    repeated = sorted({name for name in columns if columns.count(name) > 1})
    if repeated:
        raise ValueError(f"The header of the CSV from {description} names {repeated} more than once: which column "
                         f"is meant is ambiguous. Rename or drop the repeated columns at the source.")
    return rows, columns


def _refuse_binary(path: Path, description: str) -> None:
    """Fail when the fetched file is not text: gzip-compressed, or binary (a NUL byte in its first 64 KiB)."""
    with open(path, "rb") as f:
        start = f.read(1 << 16)
    if start[:2] == b"\x1f\x8b":
        raise ValueError(f"The file from {description} is gzip-compressed, not CSV text: deliver it uncompressed")
    if b"\0" in start:
        at = start.index(b"\0")
        line = start[:at].count(b"\n") + 1
        raise ValueError(f"The file from {description} is binary, not CSV text: line {line} has a NUL byte")


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tfjobs.fetch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help="pipeline spec YAML")
    parser.add_argument("--output", required=True, help="output prefix URI, e.g. <store>/raw/<dataset>/<partition>")
    parser.add_argument("--partition", default="", help="the partition (logical date) to fetch")
    parser.add_argument("--source", default="",
                        help="fetch this CSV URI instead of the spec's source; {partition} in it becomes --partition")
    parser.add_argument("--deadline", default="",
                        help="wait for a late delivery until this long after the end of the partition's day (6h) "
                        "or until this UTC time (2026-11-26T06:00:00Z); default: the spec's source.deadline")
    parser.add_argument("--poke-interval", default="", help="how often to look for it meanwhile (default: the spec's)")
    parser.add_argument("--basic-auth-env", default="", metavar="NAME",
                        help="environment variable holding user:password for HTTP Basic auth to the source")
    parser.add_argument("--allow-source", action="append", default=[], metavar="PREFIX",
                        help="read only under this prefix (a path or URI; repeatable) and the spec's own source; "
                        "private and loopback HTTP hosts only where a prefix names them")
    args = cli.parse(parser, argv)
    spec = load_spec(args.spec)
    auth = None
    if args.basic_auth_env:
        user, _, password = os.environ[args.basic_auth_env].partition(":")
        auth = SourceAuth.basic(origin_of(source_location(source_for(spec, args.source))), user, password)
    allowed = AllowedSources(tuple(args.allow_source), "--allow-source") if args.allow_source else None
    result = fetch_when_delivered(spec, args.output, args.partition, args.source,
                                  deadline=args.deadline, poke_interval=args.poke_interval, auth=auth, allowed=allowed)
    cli.print_result(result)


if __name__ == "__main__":
    main()
