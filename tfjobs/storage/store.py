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
import re
import shutil
import tempfile
import time
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
CLAIMS_DIR = ".claims"  # <parent>/.claims/<name>: who publishes <parent>/<name>, see ObjectStore.claim
#: A staging prefix or claim untouched for this long belongs to a publish that died (no publish copies for
#: hours): the next publish beside it removes it, with a partial directory its claim left (reclaim_abandoned).
ABANDONED_AFTER_S = 6 * 3600
_TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{32}\.tmp$")  # .<name>.<uuid>.tmp, see owned_temp


class ObjectStore(ABC):
    """Objects addressed by URI; "directories" are key prefixes."""

    @abstractmethod
    def exists(self, uri: str) -> bool: ...

    @abstractmethod
    def read_bytes(self, uri: str) -> bytes: ...

    @abstractmethod
    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write one object; readers see the old object or the new one, never a part."""

    def read_versioned(self, uri: str) -> tuple[bytes, str] | None:
        """The object and its version token (for :meth:`write_conditional`'s ``if_match``), or None if absent."""
        raise NotImplementedError(f"{type(self).__name__} has no conditional writes")

    def write_conditional(self, uri: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None) -> str:
        """Write one object only if it is absent (``if_absent``) or still the version ``if_match`` names.

        The check and the write are one atomic step against every other conditional
        writer; a lost condition raises :class:`PreconditionFailedError` and writes
        nothing. Returns the new version token. Exactly one condition must be given.
        """
        raise NotImplementedError(f"{type(self).__name__} has no conditional writes")

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
                    exclusive: bool = False, owner: str = "") -> None:
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

        ``exclusive``: for a new version that another run may publish meanwhile. ``uri`` is
        first claimed atomically (:meth:`claim`: a create-if-absent write of
        ``<parent>/.claims/<name>``, before any file is copied); :class:`AlreadyPublishedError`
        if another owner holds the claim or ``uri`` is already published (its markers are
        there). ``owner`` says what is published (export passes the weights' fingerprint):
        a publish by the same owner takes over its own claim, the leftover of a killed run,
        and replaces that run's partial files. Before the markers go in, the claim is read
        again; if another run of the same owner took it over meanwhile, this one stops
        (:class:`ClaimLostError`) and leaves ``uri`` to it. (The local store's rename is
        atomic and needs no claim.)
        """
        local_dir = Path(local_dir)
        files = _files_with_markers(local_dir, last)
        if staged or exclusive:
            self.reclaim_abandoned(uri.rstrip("/").rpartition("/")[0], last)
        before_markers: Callable[[], None] = lambda: None  # noqa: E731
        claimed = None
        if exclusive:
            token = self.claim(uri, owner)
            if any(self.exists(join(uri, marker)) for marker in last):
                self._release_claim(uri)
                raise AlreadyPublishedError(uri)
            before_markers = lambda: self._check_claim(uri, token)  # noqa: E731
            claimed = (uri, token)
        if not staged:
            with self._removed_on_failure(uri, claimed=claimed):
                self._replace_dir(uri, files, last, lambda rel: self.upload(local_dir / rel, join(uri, rel)),
                                  before_markers)
            if exclusive:
                self._release_claim(uri)
            return
        staging = staging_uri(uri)
        with self._removed_on_failure(staging):
            _run_concurrently(lambda rel: self.upload(local_dir / rel, join(staging, rel)), files)
        with self._removed_on_failure(uri, staging, claimed=claimed):
            self._replace_dir(
                uri, files, last,
                lambda rel: self.copy(join(staging, rel), join(uri, rel), size=(local_dir / rel).stat().st_size),
                before_markers,
            )
        if exclusive:
            self._release_claim(uri)
        try:
            self.delete(staging)
        except Exception as err:
            raise StagingCleanupError(
                f"{uri} is published and complete, but its staging copy {staging} could not be removed: {err}. "
                "Readers ignore it (its name is not an integer); delete it once the cause is fixed."
            ) from err

    def modified(self, prefix: str) -> dict[str, float]:
        """Each object under ``prefix`` and when it was last written (seconds since the epoch)."""
        raise NotImplementedError(f"{type(self).__name__} cannot tell when objects were written")

    def reclaim_abandoned(self, parent: str, markers: Sequence[str] = (),
                          older_than_s: float | None = None) -> list[str]:
        """Remove what killed publishes left under ``parent``; the prefixes removed.

        A publish that is killed leaves its staging prefix (``.staging-<name>-<id>``) and, if
        exclusive, its claim (``.claims/<name>``) with the directory half copied: an integer
        directory without ``saved_model.pb`` that TF Serving would try, and fail, to load. Its
        retry replaces them; without one, they stay. Once nothing under a staging prefix or
        a claim was written for ``older_than_s``, its publish is dead: the prefix goes, and
        so does a claimed directory that lacks any of ``markers`` (one that has them all was
        published, and only its claim is left; without ``markers`` nothing tells, and it stays).
        Failures here are logged, not raised: they must not stop the publish that found them.
        """
        removed = []
        older_than_s = ABANDONED_AFTER_S if older_than_s is None else older_than_s
        try:
            now = time.time()
            entries = self.modified(parent)
        except (NotImplementedError, FileNotFoundError):
            return removed
        except Exception as err:
            log.warning("Could not look for abandoned publishes under %s: %s", parent, err)
            return removed
        groups: dict[str, list[float]] = {}
        for uri, written in entries.items():
            rest = uri[len(parent.rstrip("/")) + 1 :]
            top = rest.split("/", 1)[0]
            if top.startswith(".staging-"):
                groups.setdefault(join(parent, top), []).append(written)
            elif top == CLAIMS_DIR and rest.count("/") == 1:
                groups.setdefault(uri, []).append(written)
        for prefix, times in sorted(groups.items()):
            if now - max(times) < older_than_s:
                continue
            try:
                if prefix.rpartition("/")[0].endswith(f"/{CLAIMS_DIR}"):
                    target = join(parent, prefix.rpartition("/")[2])
                    if markers and not all(self.exists(join(target, marker)) for marker in markers):
                        self.delete(target)
                        removed.append(target)
                self.delete(prefix)
                removed.append(prefix)
            except Exception as err:
                log.warning("Could not remove %s, left by a publish that died: %s", prefix, err)
        if removed:
            log.warning("Removed what publishes that died left (untouched for over %.0f s): %s", older_than_s, removed)
        return removed

    def _replace_dir(self, uri: str, files: list[str], last: Sequence[str], put: Callable[[str], None],
                     before_markers: Callable[[], None] = lambda: None) -> None:
        """Old markers out, the other files in (concurrently), stale objects out, the markers in."""
        existing = set(self.list(uri))
        old_markers = {join(uri, marker) for marker in last} & existing
        for marker in sorted(old_markers):
            self.delete(marker)
        _run_concurrently(put, [f for f in files if f not in last])
        for stale in sorted(existing - old_markers - {join(uri, f) for f in files}):
            self.delete(stale)
        before_markers()
        for rel in last:
            put(rel)

    def claim(self, uri: str, owner: str = "") -> str:
        """Claim ``uri`` for one publisher, atomically: its version token, or :class:`AlreadyPublishedError`.

        The claim is ``<parent>/.claims/<name>`` (:func:`claim_uri`), written only if absent
        (``If-None-Match: *`` on S3), so of publishers racing for ``uri`` exactly one gets it.
        Its name is not an integer: TF Serving's version scan and ``published_versions``
        skip it. A claim whose owner is ``owner`` (non-empty) is taken over with a
        compare-and-swap on its token, so a killed publish's retry goes on and two
        retries of it cannot both take it. The claim is deleted once ``uri`` is published
        (its markers keep others out from then on); a killed publish's claim stays, and
        keeps other owners off that name (``export`` picks another version).
        """
        target = claim_uri(uri)
        body = (json.dumps({"owner": owner, "uri": redact(uri), "claimed_at": time.time(), "pid": os.getpid(),
                            "nonce": uuid.uuid4().hex}, sort_keys=True) + "\n").encode()
        for _ in range(3):  # the claim may be deleted between our failed create and our read
            try:
                return self.write_conditional(target, body, if_absent=True)
            except PreconditionFailedError:
                pass
            current = self.read_versioned(target)
            if current is None:
                continue
            held = json.loads(current[0]).get("owner", "")
            if not owner or held != owner:
                raise AlreadyPublishedError(uri, f"{uri} is claimed by another publisher (owner {held[:16] or '?'}, "
                                                 f"in {target}); it was left as it is")
            try:
                token = self.write_conditional(target, body, if_match=current[1])
            except PreconditionFailedError as err:
                raise ClaimLostError(uri, f"{uri} is being published by another run of the same model (owner "
                                          f"{owner[:16]}), which took over {target} just now; this run stopped "
                                          "and left it to that one") from err
            log.info("Took over the claim %s left by an earlier publish of the same owner", target)
            return token
        raise ClaimLostError(uri, f"The claim {target} on {uri} kept changing under this publish; stopped")

    def _release_claim(self, uri: str) -> None:
        """Once ``uri`` is published (its markers decide from then on), its claim goes; a failure here is harmless."""
        try:
            self.delete(claim_uri(uri))
        except Exception as err:
            log.warning("%s is published, but its claim %s could not be removed (harmless): %s",
                        uri, claim_uri(uri), err)

    def _holds_claim(self, uri: str, token: str) -> bool:
        current = self.read_versioned(claim_uri(uri))
        return current is not None and current[1] == token

    def _check_claim(self, uri: str, token: str) -> None:
        if not self._holds_claim(uri, token):
            raise ClaimLostError(uri, f"{uri} was taken over by another run of the same model while this one copied "
                                      f"its files ({claim_uri(uri)} changed); this run stopped before its markers "
                                      "and left the directory to that run")

    @contextlib.contextmanager
    def _removed_on_failure(self, *uris: str, claimed: tuple[str, str] | None = None) -> Iterator[None]:
        """Delete ``uris`` if the block fails, and re-raise the block's error (not the cleanup's).

        ``claimed`` (uri, token): that directory is deleted only while this publish still holds its
        claim. Once another run of the same model has taken the claim over, whatever this one failed
        on, the directory is that run's, and it may be copying into it right now.
        """
        try:
            yield
        except BaseException:
            for uri in uris:
                try:
                    if claimed and uri == claimed[0] and not self._holds_claim(*claimed):
                        log.warning("%s was taken over by another run of the same model: left to it", uri)
                        continue
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
        write_file_atomically(self.path(uri), data)

    def read_versioned(self, uri: str) -> tuple[bytes, str] | None:
        """The file and the SHA-256 of its bytes (its version token)."""
        try:
            data = self.path(uri).read_bytes()
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest()

    def write_conditional(self, uri: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None) -> str:
        """Under an exclusive ``flock`` of the file's directory, which every conditional writer there takes.

        (The directory itself is locked, not a lock file beside the object: no extra name
        appears in listings.)

        ``if_absent`` links a complete temporary file into place (``os.link`` fails if the
        name exists, whoever wrote it); ``if_match`` compares the SHA-256 of the file's bytes
        and replaces it (``os.replace``) while still holding the lock.
        """
        _check_condition(uri, if_absent, if_match)
        target = self.path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        reclaim_temp_files_once(target.parent)
        lock_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            if if_match is not None:
                current = self.read_versioned(uri)
                if current is None or current[1] != if_match:
                    raise PreconditionFailedError(uri, "is absent" if current is None else "was changed")
                write_file_atomically(target, data)
            else:
                with owned_temp(target, lambda tmp: tmp.touch(exist_ok=False)) as tmp:
                    tmp.write_bytes(data)
                    try:
                        os.link(tmp, target)
                    except FileExistsError:
                        raise PreconditionFailedError(uri, "exists") from None
                    finally:
                        tmp.unlink()
        finally:
            os.close(lock_fd)
        return hashlib.sha256(data).hexdigest()

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
        reclaim_temp_files_once(target.parent)

        def create(tmp: Path) -> None:
            try:
                os.link(local_path, tmp)  # same filesystem: no copy (a staged file is not written again)
            except FileExistsError:
                raise
            except OSError:
                with open(tmp, "xb") as out, open(local_path, "rb") as src:
                    shutil.copyfileobj(src, out, _CHUNK)

        with owned_temp(target, create) as tmp:
            os.replace(tmp, target)

    def download(self, uri: str, local_path: str | Path) -> None:
        shutil.copyfile(self.path(uri), local_path)

    def copy(self, src_uri: str, dst_uri: str, size: int | None = None) -> None:
        self.upload(self.path(src_uri), dst_uri)

    def publish_dir(self, local_dir: str | Path, uri: str, last: Sequence[str] = (), *, staged: bool = True,
                    exclusive: bool = False, owner: str = "") -> None:
        """Copy into a hidden sibling, then rename into place: all or nothing, staged or not.

        TF Serving ignores directory names that are not integers, so a version being
        written under ``.<name>.<uuid>.tmp`` is never loaded half-way. ``exclusive``: the
        rename fails if another publisher's directory got there first (a directory cannot
        be renamed onto one that holds files), and that one is left as it is. No claim is
        needed (``owner`` is not used): a killed publish leaves only its hidden sibling,
        which the next process that writes in the directory reclaims.
        """
        _files_with_markers(local_dir, last)
        target = self.path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        reclaim_temp_files_once(target.parent)
        with owned_temp(target, lambda tmp: tmp.mkdir()) as staging:
            shutil.copytree(local_dir, staging, dirs_exist_ok=True)
            if not exclusive and target.exists():
                shutil.rmtree(target)
            try:
                os.rename(staging, target)
            except OSError as err:  # (owned_temp removes the staging copy)
                if exclusive and target.exists():
                    raise AlreadyPublishedError(uri) from err
                raise


class AlreadyPublishedError(FileExistsError):
    """An exclusive publish found its target taken (by another run, publishing at the same time)."""

    def __init__(self, uri: str, message: str = "") -> None:
        super().__init__(message or f"{uri} was published by another run meanwhile; it was left as it is")
        self.uri = uri


class ClaimLostError(AlreadyPublishedError):
    """Another run of the same owner took over an exclusive publish's claim: this one stopped, the other goes on."""


class PreconditionFailedError(RuntimeError):
    """A conditional write lost: the object was created or changed by another writer meanwhile; nothing was written."""

    def __init__(self, uri: str, condition: str) -> None:
        super().__init__(f"{uri} {condition} (another writer got there first); this write was not made")
        self.uri = uri
        self.condition = condition


def _check_condition(uri: str, if_absent: bool, if_match: str | None) -> None:
    if if_absent == (if_match is not None):
        raise ValueError(f"A conditional write of {uri} needs exactly one of if_absent=True or if_match=<token>")


def claim_uri(uri: str) -> str:
    """Where the claim on ``uri`` lives: ``<parent>/.claims/<name>`` (not an integer, so no TF Serving version)."""
    parent, _, name = uri.rstrip("/").rpartition("/")
    return f"{parent}/{CLAIMS_DIR}/{name}"


@contextlib.contextmanager
def owned_temp(target: Path, create: Callable[[Path], None]) -> Iterator[Path]:
    """A fresh ``.<name>.<uuid>.tmp`` beside ``target``, made by ``create``, that this process owns for the block.

    The owner holds an exclusive ``flock`` on the temporary file (or directory) itself
    until the block ends, after its rename into place; the kernel drops the lock when the
    owner dies, however it dies (SIGKILL included), and pid reuse cannot fake it. So
    :func:`reclaim_temp_files` deletes exactly the temporaries whose lock nobody holds:
    those of killed writers, never a live one's. A reclaimer may take the lock in the
    instant between ``create`` and our ``flock`` and delete the name; we then see that it
    no longer names our file and start again under a new name. A temporary still there
    when the block ends (it failed before its rename) is removed.
    """
    while True:
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        create(tmp)
        try:
            fd = os.open(tmp, os.O_RDONLY)
        except FileNotFoundError:  # reclaimed already
            continue
        fcntl.flock(fd, fcntl.LOCK_EX)
        if still_linked(fd, tmp):
            break
        os.close(fd)
    try:
        yield tmp
    finally:
        try:
            if still_linked(fd, tmp):  # the block failed before its rename: nothing to keep
                shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        finally:
            os.close(fd)


def write_file_atomically(target: Path, data: bytes) -> None:
    """``target`` holds all of ``data`` or its old content, never part: an owned temporary, then a rename.

    Temporaries that killed writers left in the directory go first (:func:`reclaim_temp_files`).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    reclaim_temp_files_once(target.parent)
    with owned_temp(target, lambda tmp: tmp.touch(exist_ok=False)) as tmp:
        tmp.write_bytes(data)
        os.replace(tmp, target)


_RECLAIMED: set[tuple[int, str]] = set()


def reclaim_temp_files_once(directory: Path) -> None:
    """:func:`reclaim_temp_files` at this process's first write into ``directory``, not at every write.

    A scan per write made writing a folder of N files (an image class, a shard set) cost N²
    directory entries: 2,000 files took 1.4 s instead of 0.4 s on the dev VM. What a writer
    killed later leaves there goes at the next process's first write.
    """
    key = (os.getpid(), os.fspath(directory))
    if key not in _RECLAIMED:
        reclaim_temp_files(directory)
        _RECLAIMED.add(key)


def reclaim_temp_files(directory: str | Path) -> list[Path]:
    """Delete the ``.<name>.<uuid>.tmp`` files and directories in ``directory`` left by killed writers.

    A temporary counts as left behind when no process holds its ``flock``
    (:func:`owned_temp`); a live writer's is kept. A process's first local write into a
    directory runs this there first (:func:`reclaim_temp_files_once`), so leftovers go at
    the next process that writes there. Returns what was deleted.
    """
    removed = []
    try:
        entries = [e for e in os.scandir(directory) if _TEMP_NAME.match(e.name)]
    except FileNotFoundError:
        return removed
    for entry in entries:
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:  # gone meanwhile, a link, or another user's
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not still_linked(fd, entry.path):  # renamed into place, or another reclaimer was first
                continue
            if os.path.isdir(entry.path):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
            log.info("Removed %s: the write that made it was killed", entry.path)
        except BlockingIOError:  # held: its writer is alive
            pass
        finally:
            os.close(fd)
    return removed


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


def json_bytes(obj: Any) -> bytes:
    """How the store holds JSON: indented, keys sorted, a final newline (the same object, the same bytes)."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def write_json(uri: str, obj: Any) -> None:
    store_for(uri).write_bytes(uri, json_bytes(obj))


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
            if still_linked(fd, lock_path):
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
            if not still_linked(fd, lock_path):  # another reclaimer was first
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
        if not still_linked(fd, lock_path):
            raise FileNotFoundError(f"The staging directory {path} was reclaimed: the process that made it is gone")
        yield Path(path)
    finally:
        os.close(fd)


def still_linked(fd: int, path: str | Path) -> bool:
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
