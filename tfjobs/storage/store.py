"""One object-store interface for every job: the local filesystem now, S3 next.

Every job reads and writes through :func:`store_for`, which picks the backend from
the URI's scheme (a plain path or ``file://`` is the local filesystem). Nothing
outside this module joins paths or opens files on the store: that is what lets the
same job run against a laptop directory or a bucket.

TensorFlow reads and writes local files only (TF 2.21 has no ``s3://`` support),
so the interface is built around moving whole files: jobs write into a local
staging directory and :meth:`ObjectStore.publish_dir` puts the result on the store;
they read through :func:`local_copy`.

Completion protocol: a job writes its outputs first and its manifest last; readers
treat an output without a manifest as absent. A re-run deletes the old manifest
before it rewrites anything, so a half-written output is never taken for a
finished one, on either backend.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import urllib.parse
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


class ObjectStore(ABC):
    """Objects addressed by URI; "directories" are key prefixes."""

    @abstractmethod
    def exists(self, uri: str) -> bool: ...

    @abstractmethod
    def read_bytes(self, uri: str) -> bytes: ...

    @abstractmethod
    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write one object; readers see the old object or the new one, never a part."""

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """URIs of every object under ``prefix`` (recursively), sorted."""

    @abstractmethod
    def delete(self, prefix: str) -> None:
        """Delete the object at ``prefix`` or every object under it."""

    @abstractmethod
    def upload(self, local_path: str | Path, uri: str) -> None: ...

    @abstractmethod
    def download(self, uri: str, local_path: str | Path) -> None: ...

    def local_path(self, uri: str) -> Path | None:
        """The object's path on this machine, if the store is the local filesystem."""
        return None

    def download_sha256(self, uri: str, local_path: str | Path, size: int) -> str:
        """Download an object of known ``size``; return the SHA-256 of what was written."""
        self.download(uri, local_path)
        return sha256_file(local_path)

    def publish_dir(self, local_dir: str | Path, uri: str, last: Sequence[str] = ()) -> None:
        """Make ``uri`` hold exactly a local directory's files, the files named in ``last`` put last.

        Files named in ``last`` (relative paths) are the markers readers wait for,
        such as a manifest or TF Serving's ``saved_model.pb``: old markers go first,
        new ones come last, so readers never see a marker over a mix of old and new.
        """
        local_dir = Path(local_dir)
        files = _files_with_markers(local_dir, last)
        existing = set(self.list(uri))
        for marker in last:
            if join(uri, marker) in existing:
                self.delete(join(uri, marker))
        for rel in [f for f in files if f not in last]:
            self.upload(local_dir / rel, join(uri, rel))
        for stale in sorted(existing - {join(uri, f) for f in files}):
            self.delete(stale)
        for rel in last:
            self.upload(local_dir / rel, join(uri, rel))


class LocalStore(ObjectStore):
    """The local filesystem: plain paths and ``file://`` URIs."""

    def path(self, uri: str) -> Path:
        parsed = urllib.parse.urlsplit(uri)
        if parsed.scheme == "file":
            return Path(urllib.parse.unquote(parsed.path))
        if parsed.scheme:
            raise ValueError(f"LocalStore cannot open {uri!r}: not a local path or file:// URI")
        return Path(uri)

    def local_path(self, uri: str) -> Path:
        return self.path(uri)

    def exists(self, uri: str) -> bool:
        return self.path(uri).exists()

    def read_bytes(self, uri: str) -> bytes:
        return self.path(uri).read_bytes()

    def write_bytes(self, uri: str, data: bytes) -> None:
        target = self.path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)

    def list(self, prefix: str) -> list[str]:
        root = self.path(prefix)
        if root.is_file():
            return [prefix]
        if not root.is_dir():
            return []
        return sorted(join(prefix, p.relative_to(root).as_posix()) for p in root.rglob("*") if p.is_file())

    def delete(self, prefix: str) -> None:
        target = self.path(prefix)
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()

    def upload(self, local_path: str | Path, uri: str) -> None:
        target = self.path(uri)
        if Path(local_path).resolve() == target.resolve():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        try:
            os.link(local_path, tmp)  # same filesystem: no copy (a staged file is not written again)
        except OSError:
            shutil.copyfile(local_path, tmp)
        os.replace(tmp, target)

    def download(self, uri: str, local_path: str | Path) -> None:
        shutil.copyfile(self.path(uri), local_path)

    def publish_dir(self, local_dir: str | Path, uri: str, last: Sequence[str] = ()) -> None:
        """Copy into a hidden sibling, then rename into place: all or nothing.

        TF Serving ignores directory names that are not integers, so a version being
        written under ``.<name>.tmp`` is never loaded half-way.
        """
        _files_with_markers(local_dir, last)
        target = self.path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        shutil.copytree(local_dir, staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)


def _files_with_markers(local_dir: str | Path, last: Sequence[str]) -> list[str]:
    """Relative paths of every file under ``local_dir``; each marker in ``last`` must be one."""
    local_dir = Path(local_dir)
    files = sorted(p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*") if p.is_file())
    missing = set(last) - set(files)
    if missing:
        raise FileNotFoundError(f"{sorted(missing)} not found in {local_dir}: refusing to publish it")
    return files


def join(uri: str, *parts: str) -> str:
    """Join URI path segments with single slashes."""
    out = uri.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def basename(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


def redact(uri: str) -> str:
    """A URI fit for logs and manifests: no user, password, query or fragment."""
    parsed = urllib.parse.urlsplit(uri)
    netloc = parsed.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit((parsed.scheme, netloc, parsed.path, "", ""))


_BACKENDS: dict[str, type[ObjectStore]] = {"": LocalStore, "file": LocalStore}


def register_backend(scheme: str, backend: type[ObjectStore]) -> None:
    _BACKENDS[scheme] = backend


def store_for(uri: str) -> ObjectStore:
    """The store that serves ``uri``, chosen by its scheme."""
    scheme = urllib.parse.urlsplit(uri).scheme
    if len(scheme) == 1:  # a Windows drive letter, not a scheme
        scheme = ""
    if scheme == "s3" and scheme not in _BACKENDS:
        import tfjobs.storage.s3  # noqa: F401  (registers the backend; boto3 is only imported for S3 URIs)
    try:
        return _BACKENDS[scheme]()
    except KeyError:
        raise ValueError(
            f"No object store for {redact(uri)!r}: supported schemes are {sorted(s for s in _BACKENDS if s)} "
            "and plain paths"
        ) from None


def read_json(uri: str) -> Any:
    return json.loads(store_for(uri).read_bytes(uri))


def write_json(uri: str, obj: Any) -> None:
    store_for(uri).write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json_if_exists(uri: str) -> Any | None:
    store = store_for(uri)
    return json.loads(store.read_bytes(uri)) if store.exists(uri) else None


@contextlib.contextmanager
def local_copy(uri: str) -> Iterator[Path]:
    """A local path holding the object at ``uri`` for the duration of the block."""
    store = store_for(uri)
    path = store.local_path(uri)
    if path is not None:
        if not path.exists():
            raise FileNotFoundError(f"{uri} does not exist")
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="shardline-") as tmp:
        target = Path(tmp) / basename(uri)
        store.download(uri, target)
        yield target


@contextlib.contextmanager
def local_dir_copy(prefix: str) -> Iterator[Path]:
    """A local directory holding every object under ``prefix``."""
    store = store_for(prefix)
    path = store.local_path(prefix)
    if path is not None:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="shardline-") as tmp:
        for uri in store.list(prefix):
            target = Path(tmp) / uri[len(prefix.rstrip("/")) + 1 :]
            target.parent.mkdir(parents=True, exist_ok=True)
            store.download(uri, target)
        yield Path(tmp)


@contextlib.contextmanager
def staging_dir() -> Iterator[Path]:
    """A scratch directory on local disk, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="shardline-") as tmp:
        yield Path(tmp)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
