"""One object-store interface for every job: the local filesystem now, S3 next.

Every job reads and writes through :func:`store_for`, which picks the backend from
the URI's scheme (a plain path or ``file://`` is the local filesystem). Nothing
outside this module joins paths or opens files on the store: that is what lets the
same job run against a laptop directory or a bucket.

TensorFlow reads and writes local files only (TF 2.21 has no ``s3://`` support),
so the interface is built around moving whole files: jobs write into a local
staging directory (:func:`staging_dir`; one left by a killed job is reclaimed by the
next) and :meth:`ObjectStore.publish_dir` puts the result on the store; they read
through :func:`local_copy`.

A directory that appears on the store before it is complete is read by whoever
watches the parent: TF Serving loads any child whose name is an integer, without
waiting for ``saved_model.pb``. So ``publish_dir`` uploads under a hidden sibling
prefix first and only then moves the files into place: a rename on the local
filesystem, server-side copies on S3.

Completion protocol: a job writes its outputs first and its manifest last; readers
treat an output without a manifest as absent. A re-run deletes the old manifest
before it rewrites anything, so a half-written output is never taken for a
finished one, on either backend.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import urllib.parse
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
PUBLISH_CONCURRENCY = 8
STAGING_PREFIX = "shardline-"  # local staging directories: <temp folder>/shardline-<random>, see StagingDir
_LOCK_SUFFIX = ".lock"


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

    @abstractmethod
    def copy(self, src_uri: str, dst_uri: str, size: int | None = None) -> None:
        """Copy one object within the store (``size``, when known, saves asking the store)."""

    def publish_dir(self, local_dir: str | Path, uri: str, last: Sequence[str] = (), *, staged: bool = True,
                    exclusive: bool = False) -> None:
        """Make ``uri`` hold exactly a local directory's files, the files named in ``last`` put last.

        Files named in ``last`` (relative paths) are the markers readers wait for,
        such as a manifest or TF Serving's ``saved_model.pb``: old markers go first,
        new ones come last, so readers never see a marker over a mix of old and new.

        ``staged`` (the default) uploads everything under a hidden sibling prefix
        (:func:`staging_uri`) and then copies it into ``uri`` on the store's side,
        so ``uri`` is being written only while the copies run, not while the files
        upload. That is what a TF Serving version directory needs. ``staged=False``
        uploads straight into ``uri``: for outputs whose readers wait for the marker
        and nothing else, at half the requests.

        On failure ``uri`` is removed (a partial directory must not be taken for a
        version) and so is the staging prefix.

        ``exclusive``: raise :class:`AlreadyPublishedError` if ``uri`` is already published (its
        markers are there), for a new version that another run may publish meanwhile; the
        leftovers of a killed publish are replaced. Here it is checked before the copies, not
        atomically with them (the local store's rename is atomic).
        """
        local_dir = Path(local_dir)
        files = _files_with_markers(local_dir, last)
        if exclusive and any(self.exists(join(uri, marker)) for marker in last):
            raise AlreadyPublishedError(uri)
        if not staged:
            with self._removed_on_failure(uri):
                self._replace_dir(uri, files, last, lambda rel: self.upload(local_dir / rel, join(uri, rel)))
            return
        staging = staging_uri(uri)
        with self._removed_on_failure(staging):
            _run_concurrently(lambda rel: self.upload(local_dir / rel, join(staging, rel)), files)
        with self._removed_on_failure(uri, staging):
            self._replace_dir(
                uri, files, last,
                lambda rel: self.copy(join(staging, rel), join(uri, rel), size=(local_dir / rel).stat().st_size),
            )
        try:
            self.delete(staging)
        except Exception as err:
            raise StagingCleanupError(
                f"{uri} is published and complete, but its staging copy {staging} could not be removed: {err}. "
                "Readers ignore it (its name is not an integer); delete it once the cause is fixed."
            ) from err

    def _replace_dir(self, uri: str, files: list[str], last: Sequence[str], put: Callable[[str], None]) -> None:
        """Old markers out, the other files in (concurrently), stale objects out, the markers in."""
        existing = set(self.list(uri))
        old_markers = {join(uri, marker) for marker in last} & existing
        for marker in sorted(old_markers):
            self.delete(marker)
        _run_concurrently(put, [f for f in files if f not in last])
        for stale in sorted(existing - old_markers - {join(uri, f) for f in files}):
            self.delete(stale)
        for rel in last:
            put(rel)

    @contextlib.contextmanager
    def _removed_on_failure(self, *uris: str) -> Iterator[None]:
        """Delete ``uris`` if the block fails, and re-raise the block's error (not the cleanup's)."""
        try:
            yield
        except BaseException:
            for uri in uris:
                try:
                    self.delete(uri)
                except Exception as cleanup:
                    log.warning("Could not remove %s after a failed publish: %s", uri, cleanup)
            raise


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

    def copy(self, src_uri: str, dst_uri: str, size: int | None = None) -> None:
        self.upload(self.path(src_uri), dst_uri)

    def publish_dir(self, local_dir: str | Path, uri: str, last: Sequence[str] = (), *, staged: bool = True,
                    exclusive: bool = False) -> None:
        """Copy into a hidden sibling, then rename into place: all or nothing, staged or not.

        TF Serving ignores directory names that are not integers, so a version being
        written under ``.<name>.<uuid>.tmp`` is never loaded half-way. ``exclusive``: the
        rename fails if another publisher's directory got there first (a directory cannot
        be renamed onto one that holds files), and that one is left as it is.
        """
        _files_with_markers(local_dir, last)
        target = self.path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        shutil.copytree(local_dir, staging)
        if not exclusive and target.exists():
            shutil.rmtree(target)
        try:
            os.rename(staging, target)
        except OSError as err:
            shutil.rmtree(staging, ignore_errors=True)
            if exclusive and target.exists():
                raise AlreadyPublishedError(uri) from err
            raise


class AlreadyPublishedError(FileExistsError):
    """An exclusive publish found its target taken (by another run, publishing at the same time)."""

    def __init__(self, uri: str) -> None:
        super().__init__(f"{uri} was published by another run meanwhile; it was left as it is")
        self.uri = uri


class StagingCleanupError(RuntimeError):
    """A directory was published, but the staging prefix it was copied from could not be deleted."""


def staging_uri(uri: str) -> str:
    """A fresh sibling of ``uri`` for staging it: ``<parent>/.staging-<name>-<uuid>``.

    The name starts with a dot and is not a number, so TF Serving (which takes any
    child that parses as an int64 for a version) and ``published_versions`` skip it.
    """
    parent, _, name = uri.rstrip("/").rpartition("/")
    return f"{parent}/.staging-{name}-{uuid.uuid4().hex[:16]}"


def _run_concurrently(action: Callable[[str], None], items: Iterable[str]) -> None:
    """``action`` on every item, a few at a time; the first error is raised once none is running."""
    with ThreadPoolExecutor(max_workers=PUBLISH_CONCURRENCY, thread_name_prefix="shardline-publish") as pool:
        futures = [pool.submit(action, item) for item in items]
        try:
            for future in futures:
                future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise


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
    with staging_dir() as tmp:
        target = tmp / basename(uri)
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
    with staging_dir() as tmp:
        for uri in store.list(prefix):
            target = tmp / uri[len(prefix.rstrip("/")) + 1 :]
            target.parent.mkdir(parents=True, exist_ok=True)
            store.download(uri, target)
        yield tmp


@contextlib.contextmanager
def staging_dir(prefix: str = STAGING_PREFIX) -> Iterator[Path]:
    """A scratch directory on local disk, removed afterwards (or by the next one, if its owner is killed)."""
    staging = StagingDir(prefix)
    try:
        yield staging.path
    finally:
        staging.cleanup()


class StagingDir:
    """A scratch directory in the temp folder that outlives no process using it.

    A job killed with SIGKILL (the OOM killer, a pre-empted node) runs no cleanup, and its
    directory (tens of MiB of shards) would stay in the temp folder for good. So each
    directory ``shardline-<random>`` comes with a sibling ``shardline-<random>.lock`` that its
    owner holds a shared ``flock`` on for the directory's life; the kernel drops the lock
    when the owner dies, however it dies, and pid reuse cannot fake it. Creating a staging
    directory first reclaims every one whose lock nobody holds (:func:`reclaim_staging_dirs`).
    Other processes that write into the directory (the shard step's workers) hold the
    lock too (:func:`holding_staging_dir`), so it is not reclaimed under them.
    The lock sits beside the directory, not in it: a staged directory is published whole.
    """

    def __init__(self, prefix: str = STAGING_PREFIX, root: str | Path | None = None) -> None:
        root = Path(root or tempfile.gettempdir())
        reclaim_staging_dirs(root)
        while True:
            fd, lock_path = tempfile.mkstemp(prefix=prefix, suffix=_LOCK_SUFFIX, dir=root)
            fcntl.flock(fd, fcntl.LOCK_SH)
            path = Path(lock_path[: -len(_LOCK_SUFFIX)])
            # Between mkstemp and flock, a reclaimer may have taken the unheld lock and unlinked it.
            if _still_linked(fd, lock_path):
                with contextlib.suppress(FileExistsError):
                    path.mkdir(mode=0o700)
                    break
                os.unlink(lock_path)
            os.close(fd)
        self.path, self._lock_path, self._fd = path, Path(lock_path), fd

    def cleanup(self) -> None:
        if self._fd < 0:
            return
        shutil.rmtree(self.path, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            self._lock_path.unlink()
        os.close(self._fd)
        self._fd = -1


def reclaim_staging_dirs(root: str | Path | None = None) -> list[Path]:
    """Remove the staging directories under ``root`` (the temp folder) whose owners are gone.

    Only directories with a ``.lock`` sibling are candidates (other ``shardline-*`` folders,
    and those of a live process, are left alone). Returns the directories removed.
    """
    removed = []
    for lock_path in sorted(Path(root or tempfile.gettempdir()).glob(f"{STAGING_PREFIX}*{_LOCK_SUFFIX}")):
        try:
            fd = os.open(lock_path, os.O_RDONLY)
        except OSError:  # gone meanwhile, or another user's
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not _still_linked(fd, lock_path):  # another reclaimer was first
                continue
            path = lock_path.with_name(lock_path.name[: -len(_LOCK_SUFFIX)])
            shutil.rmtree(path, ignore_errors=True)
            lock_path.unlink()
            removed.append(path)
            log.info("Removed the staging directory %s: the process that made it is gone", path)
        except BlockingIOError:  # held: its owner is alive
            pass
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def holding_staging_dir(path: str | Path) -> Iterator[Path]:
    """Hold the lock of the staging directory ``path`` (made by another process) while the block writes into it."""
    lock_path = f"{Path(path)}{_LOCK_SUFFIX}"
    fd = os.open(lock_path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        if not _still_linked(fd, lock_path):
            raise FileNotFoundError(f"The staging directory {path} was reclaimed: the process that made it is gone")
        yield Path(path)
    finally:
        os.close(fd)


def _still_linked(fd: int, path: str | Path) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
