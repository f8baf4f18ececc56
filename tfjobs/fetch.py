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

    python -m tfjobs.fetch --spec include/penguins.yaml --output .demo/store/raw/penguins/2026-11-25
"""

from __future__ import annotations

import argparse
import base64
import csv
import logging
import shutil
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tfjobs import cli
from tfjobs.spec import PipelineSpec, SourceSpec, load_spec
from tfjobs.storage.store import join, local_copy, read_json_if_exists, redact, sha256_file, staging_dir, store_for, write_json

log = logging.getLogger(__name__)

DATA_FILE = "data.csv"
MANIFEST = "manifest.json"
HTTP_TIMEOUT_S = 60


class SourceNotFoundError(FileNotFoundError):
    """The source has no data for the partition asked for."""


@dataclass(frozen=True)
class FetchResult:
    data_uri: str
    manifest_uri: str
    rows: int
    sha256: str
    source: str
    rewritten: bool


def fetch_dataset(spec: PipelineSpec, output_uri: str, partition: str = "", source_uri: str = "") -> FetchResult:
    """Fetch the spec's source (or ``source_uri``, a CSV) into ``output_uri``.

    ``{partition}`` in ``source_uri`` becomes the partition, which reads one file per
    day from a landing prefix: ``s3://landing/housing/{partition}.csv``.
    """
    source = spec.source
    if source_uri:
        if "{partition}" in source_uri:
            source = SourceSpec(kind="landing", pattern=source_uri)
        else:
            source = SourceSpec(kind="csv", uri=source_uri)
    with staging_dir() as tmp:
        local = tmp / DATA_FILE
        description = _fetch_source(source, partition, local)
        digest = sha256_file(local)
        manifest_uri = join(output_uri, MANIFEST)
        previous = read_json_if_exists(manifest_uri)
        if previous and previous.get("sha256") == digest:
            log.info("Raw data for %s at %s is unchanged (sha256 %s); nothing rewritten", spec.name, output_uri, digest)
            return _result(output_uri, previous, rewritten=False)
        rows, columns = _count_rows(local)
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


def _result(output_uri: str, manifest: dict, rewritten: bool) -> FetchResult:
    return FetchResult(
        data_uri=join(output_uri, manifest["file"]),
        manifest_uri=join(output_uri, MANIFEST),
        rows=manifest["rows"],
        sha256=manifest["sha256"],
        source=manifest["source"],
        rewritten=rewritten,
    )


def _fetch_source(source: SourceSpec, partition: str, target: Path) -> str:
    """Write the source's CSV bytes to ``target``; return a credential-free description."""
    if source.kind == "palmerpenguins":
        import palmerpenguins

        palmerpenguins.load_penguins().to_csv(target, index=False)
        return f"palmerpenguins=={_version('palmerpenguins')}"
    if source.kind == "sklearn":
        return _fetch_sklearn(source.name, target)
    if source.kind == "tfds":
        return _fetch_tfds(source, target)
    if source.kind == "landing":
        if not partition:
            raise ValueError("A landing source needs a partition (the run's logical date)")
        uri = source.pattern.replace("{partition}", partition)
        uri = join(source.uri, uri) if source.uri else uri
        try:
            return _copy_uri(uri, target)
        except FileNotFoundError:
            raise SourceNotFoundError(f"No delivery for partition {partition}: expected {redact(uri)}") from None
    return _copy_uri(source.uri, target)


def _copy_uri(uri: str, target: Path) -> str:
    scheme = urllib.parse.urlsplit(uri).scheme
    if scheme in ("http", "https"):
        request = _http_request(uri)
        try:
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response, open(target, "wb") as out:
                shutil.copyfileobj(response, out)
        except OSError as err:  # URLError and HTTPError are OSErrors
            raise OSError(f"Could not download {redact(uri)}: {err}") from None
        return redact(uri)
    with local_copy(uri) as path:
        shutil.copyfile(path, target)
    return redact(uri)


def _http_request(uri: str) -> urllib.request.Request:
    """A GET for ``uri``; user and password in the URI become a Basic auth header."""
    parsed = urllib.parse.urlsplit(uri)
    headers = {"User-Agent": "shardline"}
    if parsed.username is not None:
        credentials = f"{urllib.parse.unquote(parsed.username)}:{urllib.parse.unquote(parsed.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(credentials.encode()).decode()
        parsed = parsed._replace(netloc=parsed.netloc.rpartition("@")[2])
    return urllib.request.Request(urllib.parse.urlunsplit(parsed), headers=headers)


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


def _count_rows(path: Path) -> tuple[int, list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"The fetched CSV is empty (no header row): {path.name}")
        rows = sum(1 for _ in reader)
    return rows, header


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
    args = cli.parse(parser, argv)
    result = fetch_dataset(load_spec(args.spec), args.output, partition=args.partition, source_uri=args.source)
    cli.print_result(result)


if __name__ == "__main__":
    main()
