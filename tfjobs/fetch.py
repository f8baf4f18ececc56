"""Fetch a dataset into ``raw/<dataset>/<partition>/`` as CSV with a manifest.

Sources (the spec's ``source.kind``):

- ``palmerpenguins``: the data the PyPI package ships (no network);
- ``sklearn``: a dataset bundled with scikit-learn (``iris``, ``wine``, ``diabetes``, ...);
- ``tfds``: a TensorFlow Datasets dataset, prepared in its ``data_dir``;
- ``csv``: a CSV at a local path, ``file://``, ``http(s)://`` or object-store URI;
- ``landing``: one CSV per day under a prefix, as upstream systems deliver data
  (``<prefix>/<partition>.csv`` by default).

The raw bytes are kept as delivered; the manifest records the row count, the
SHA-256 and where they came from. A re-fetch that yields the same bytes rewrites
nothing.

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
import contextlib
import contextvars
import csv
import datetime as dt
import logging
import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tfjobs import cli
from tfjobs.allowed_sources import AllowedSources
from tfjobs.deadlines import parse_duration, partition_deadline, utc_now, utc_text
from tfjobs.spec import PipelineSpec, SourceSpec, load_spec
from tfjobs.storage.store import join, local_copy, read_json_if_exists, redact, sha256_file, staging_dir, store_for, write_json

log = logging.getLogger(__name__)

DATA_FILE = "data.csv"
MANIFEST = "manifest.json"
HTTP_TIMEOUT_S = 60
# The allow-list of the fetch in progress, which every HTTP request it makes checks (see _open_http).
_ALLOWED: contextvars.ContextVar[AllowedSources | None] = contextvars.ContextVar("allowed_sources", default=None)


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
        allowed = allowed.including(spec.source.uri) if spec.source.kind in ("csv", "landing") else allowed
        if location:
            allowed.check(location.replace("{partition}", partition))
    with staging_dir() as tmp, _fetching_under(allowed):
        local = tmp / DATA_FILE
        if source.kind == "landing":
            description = _fetch_delivery(source, partition, local, deadline, poke_interval, auth)
        else:
            description = _fetch_source(source, local, auth)
        digest = sha256_file(local)
        manifest_uri = join(output_uri, MANIFEST)
        previous = read_json_if_exists(manifest_uri)
        if previous and previous.get("sha256") == digest:
            log.info("Raw data for %s at %s is unchanged (sha256 %s); nothing rewritten", spec.name, output_uri, digest)
            return _result(output_uri, previous, rewritten=False)
        rows, columns = _count_rows(local, description)
        store = store_for(output_uri)
        store.delete(manifest_uri)
        store.upload(local, join(output_uri, DATA_FILE))
        manifest = {
            "dataset": spec.name,
            "partition": partition,
            "source": description,
            "file": DATA_FILE,
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

    A landing pattern given for the run keeps the spec's deadline and poke interval.
    """
    if not source_uri:
        return spec.source
    if "{partition}" in source_uri:
        return SourceSpec(kind="landing", pattern=source_uri, deadline=spec.source.deadline,
                          poke_interval=spec.source.poke_interval)
    return SourceSpec(kind="csv", uri=source_uri)


def source_location(source: SourceSpec) -> str:
    """Where a csv or landing source's files are (``{partition}`` left in); empty for the others."""
    if source.kind == "landing":
        return join(source.uri, source.pattern) if source.uri else source.pattern
    return source.uri if source.kind == "csv" else ""


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


def _fetch_tfds(source: SourceSpec, target: Path) -> str:
    """A TFDS dataset's split as CSV; TFDS downloads it unless it is prepared in ``data_dir``.

    Class labels are written as their names (``Adelie``, not ``0``), as the spec's
    categorical features and class lists name them.
    """
    import tensorflow_datasets as tfds

    dataset, info = tfds.load(source.name, split=source.split, with_info=True, data_dir=source.uri or None)
    frame = tfds.as_dataframe(dataset, info)
    features = dict(info.features.items()) if isinstance(info.features, tfds.features.FeaturesDict) else {}
    for name in frame.columns:
        if isinstance(features.get(name), tfds.features.ClassLabel):
            frame[name] = [features[name].int2str(int(v)) for v in frame[name]]
    frame.to_csv(target, index=False)
    return f"tfds:{source.name}/{source.split}"


def _count_rows(path: Path, source: str) -> tuple[int, list[str]]:
    """The number of rows (blank lines aside, as pandas reads them) and the header of the fetched CSV.

    A file that is not UTF-8 CSV text, whose header names a column twice or whose rows do not have
    the header's number of fields fails naming the source and the line: pandas would fill a short row
    with empty values, and the pipeline would take a shifted row for a valid one.
    """
    line = 1  # where the row being read starts
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, strict=True)
            header = next(reader, None)
            if header is None:
                raise ValueError(f"The CSV from {source} is empty (no header row)")
            rows = 0
            line = reader.line_num + 1
            for row in reader:
                if row and len(row) != len(header):
                    raise ValueError(f"Line {line} of the CSV from {source} has {len(row)} fields, its header "
                                     f"{len(header)}. A value that holds a comma needs quotes; a quote needs its pair.")
                rows += bool(row)
                line = reader.line_num + 1
    except UnicodeDecodeError:
        raise ValueError(_not_text(path, source)) from None
    except csv.Error as err:
        hint = " (a quote opened there never closes)" if "end of data" in str(err) else ""
        raise ValueError(f"Cannot read the CSV from {source} at line {line}: {err}{hint}") from None
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise ValueError(f"The header of the CSV from {source} names {repeated} more than once: which column is meant "
                         f"is ambiguous. Rename or drop the repeated columns at the source.")
    return rows, header


def _not_text(path: Path, source: str) -> str:
    """Why a fetched file does not decode: compressed, or the line and byte that is not UTF-8."""
    with open(path, "rb") as f:
        if f.read(2) == b"\x1f\x8b":
            return f"The file from {source} is gzip-compressed, not CSV text: deliver it uncompressed"
        f.seek(0)
        for number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                return (f"The file from {source} is not UTF-8 text: line {number} has the byte "
                        f"0x{line[err.start]:02x} ({err.reason}); binary data, or text in another encoding")
    return f"The file from {source} is not UTF-8 text"


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
