"""Which published version is production: a pointer beside the versions, and TF Serving's model config.

The export step publishes versions in the TF Serving layout; which one is production
is said explicitly, next to them::

    serving/<model_name>/<version>/   saved_model.pb, variables/, shardline.json, statistics.json (export)
    serving/<model_name>/production.json
        {"version", "run", "metrics", "promoted_at", "promoted_by", "reason", "forced", "canary",
         "previous", "history": [the earlier pointers, newest first]}
    serving/<model_name>/models.config
        TF Serving's model config: the production version (label ``stable``) and a canary
        (label ``canary``) if one is set, with ``model_version_policy { specific ... }``

``production.json`` is what Shardline follows (evaluate's champion, the drift
baseline, ``tfjobs.predict``, scoring, the run report); ``models.config`` is what a TF
Serving deployment is started with (``--model_config_file=.../models.config
--model_config_file_poll_wait_seconds=60``), so that it serves production rather than
the highest version: TF Serving's default policy would serve a newer version that was
rolled back from. Clients should ask for a label (``/v1/models/<name>/labels/stable:predict``):
when a canary is loaded too, a request without a version goes to the higher of the two.
Each file is written whole, in one request (``os.replace`` on a local store, one PUT
on S3). ``production.json`` is the commit point, written with a compare-and-swap
(:meth:`~tfjobs.storage.store.ObjectStore.write_conditional`: ``If-Match`` its ETag on S3,
a locked hash check on a local store): a promotion reads the pointer and its token,
computes the new pointer from it and writes it only if nobody wrote meanwhile, else reads
again and recomputes (:data:`MAX_ATTEMPTS`, then :class:`PromotionConflictError`). So
promotions, canaries and rollbacks running at once all land, each in the pointer or its
history. ``models.config`` is then rendered from the pointer as it is after the write,
and the pointer is read again: whoever changed it meanwhile, the last config written
matches the last pointer. Re-running a promotion that was killed in between finds its
version in production and rewrites ``models.config`` (:func:`sync_models_config`).

Promotion keeps the newest ``serving.keep_versions`` versions and deletes older ones,
oldest first; never the production version nor the canary.

    python -m tfjobs.promote --serving <store>/serving/housing --version 1795478400 [--canary] --by alice
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tfjobs import cli
from tfjobs.storage.store import PreconditionFailedError, join, json_bytes, read_json, read_json_if_exists, store_for

log = logging.getLogger(__name__)

PRODUCTION_FILE = "production.json"
MODELS_CONFIG_FILE = "models.config"
#: Earlier pointers kept in ``production.json``'s history (rollback's default target is the latest of them).
HISTORY_LENGTH = 20
STABLE, CANARY = "stable", "canary"
#: Tries of a promotion's compare-and-swap of production.json before it gives up.
MAX_ATTEMPTS = 30


class PromotionConflictError(RuntimeError):
    """production.json kept changing under a promotion (others promoted at once); nothing of it was written."""


@dataclass(frozen=True)
class Champion:
    """The version in production: its number, its directory and its ``shardline.json``."""

    version: int
    uri: str
    run: str
    metadata: dict = field(repr=False)


@dataclass(frozen=True)
class PromoteResult:
    version: int
    production_uri: str
    models_config_uri: str
    previous: int | None
    canary: int | None
    pruned: list[int]
    rewritten: bool


def now_text() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def run_of(model_uri: str) -> str:
    """The run key of a trained model's URI (``.../runs/<dataset>/<run>/train/training_model.keras``)."""
    parts = model_uri.rstrip("/").split("/")
    return parts[-3] if len(parts) >= 3 and parts[-2] == "train" else ""


def production(serving_uri: str) -> dict | None:
    """The production pointer, or None when no version was ever promoted."""
    return read_json_if_exists(join(serving_uri, PRODUCTION_FILE))


def champion(serving_uri: str) -> Champion | None:
    """The version in production; before any ``production.json``, the highest one (what TF Serving served)."""
    from tfjobs.export import METADATA_FILE, published_versions

    versions = published_versions(serving_uri)
    pointer = production(serving_uri)
    if pointer is not None:
        version = int(pointer["version"])
        if version not in versions:
            raise FileNotFoundError(
                f"{join(serving_uri, PRODUCTION_FILE)} points at version {version}, which is not published under "
                f"{serving_uri} (versions: {list(versions)}): roll back to one of them (python -m tfjobs.rollback)")
    elif versions:
        version = max(versions)
    else:
        return None
    metadata = read_json_if_exists(join(versions[version], METADATA_FILE)) or {}
    run = (pointer or {}).get("run") or metadata.get("run") or run_of(metadata.get("trained_model", ""))
    return Champion(version, versions[version], run, metadata)


def models_config(model_name: str, base_path: str, stable: int, canary: int | None = None) -> str:
    """TF Serving's ``ModelServerConfig`` text: load exactly these versions, and label them."""
    versions = [stable] + ([canary] if canary and canary != stable else [])
    policy = " ".join(f"versions: {v}" for v in sorted(versions))
    labels = "".join(f'\n    version_labels {{ key: "{label}" value: {v} }}'
                     for label, v in ((STABLE, stable), (CANARY, canary)) if v and (label == STABLE or v != stable))
    return (
        "# Generated by Shardline (tfjobs.promote) from production.json: do not edit; promote or roll back instead.\n"
        "model_config_list {\n"
        "  config {\n"
        f'    name: "{model_name}"\n'
        f'    base_path: "{base_path}"\n'
        '    model_platform: "tensorflow"\n'
        f"    model_version_policy {{ specific {{ {policy} }} }}"
        f"{labels}\n"
        "  }\n"
        "}\n"
    )


def base_path(serving_uri: str) -> str:
    """Where TF Serving finds the versions: the serving prefix, absolute (``s3://`` works in TF Serving too)."""
    store = store_for(serving_uri)
    path = store.local_path(serving_uri)
    return str(path.resolve()) if path is not None else serving_uri.rstrip("/")


def config_for(serving_uri: str, pointer: dict) -> str:
    canary = (pointer.get("canary") or {}).get("version")
    return models_config(pointer["model_name"], base_path(serving_uri), pointer["version"], canary)


def update_pointer(serving_uri: str, change: Callable[[dict | None], dict | None]) -> tuple[dict | None, bool]:
    """Compare-and-swap ``production.json``: ``change(current)`` gives the new pointer (None: leave it).

    ``change`` runs again on the fresh pointer each time another writer got there
    first; it may raise to refuse. Then ``models.config`` is brought in line
    (:func:`sync_models_config`). Returns the pointer as this call left it, and
    whether it wrote it.
    """
    uri = join(serving_uri, PRODUCTION_FILE)
    store = store_for(uri)
    for attempt in range(MAX_ATTEMPTS):
        current = store.read_versioned(uri)
        old = json.loads(current[0]) if current is not None else None
        new = change(old)
        if new is None:
            sync_models_config(serving_uri, current)
            return old, False
        data = json_bytes(new)
        try:
            if current is None:
                token = store.write_conditional(uri, data, if_absent=True)
            else:
                token = store.write_conditional(uri, data, if_match=current[1])
        except PreconditionFailedError:
            log.info("%s changed while this promotion computed its update (try %d): reading it again", uri, attempt + 1)
            time.sleep(random.uniform(0, min(1.0, 0.02 * 2**attempt)))
            continue
        sync_models_config(serving_uri, (data, token))
        return new, True
    raise PromotionConflictError(
        f"{uri} changed {MAX_ATTEMPTS} times while this promotion tried to write it: other promotions or rollbacks "
        "of this model ran at the same time, and theirs landed. Nothing of this one was written; run it again.")


def sync_models_config(serving_uri: str, pointer: tuple[bytes, str] | None = None) -> None:
    """Write ``models.config`` from ``production.json``, until the pointer read after the write is the one it came from.

    ``pointer``: the pointer's bytes and version token as the caller just read or wrote
    them (else they are read). A promotion that commits later than ours writes its own
    config after its commit; one that read the pointer before ours may write its stale
    config after ours, but then finds the pointer changed and writes again. So the last
    config written is the last pointer's.
    """
    uri, config_uri = join(serving_uri, PRODUCTION_FILE), join(serving_uri, MODELS_CONFIG_FILE)
    store = store_for(uri)
    current = pointer if pointer is not None else store.read_versioned(uri)
    while current is not None:
        config = config_for(serving_uri, json.loads(current[0])).encode()
        written = store.read_versioned(config_uri)
        if written is None or written[0] != config:
            store.write_bytes(config_uri, config)
        after = store.read_versioned(uri)
        if after is not None and after[1] == current[1]:
            return
        current = after


def set_production(
    serving_uri: str,
    version: int,
    *,
    reason: str,
    by: str = "",
    run: str = "",
    metrics: dict | None = None,
    forced: dict | None = None,
    canary: bool = False,
    keep_versions: int | None = None,
    model_name: str = "",
    check: Callable[[dict | None], None] | None = None,
) -> PromoteResult:
    """Point production (or, with ``canary``, the canary label) at a published ``version``; prune old versions.

    A compare-and-swap of ``production.json`` (:func:`update_pointer`): the new pointer
    is computed from the current one again whenever another promotion wrote first, so
    none is lost. ``check(current_pointer)`` runs on each try and may raise to refuse
    (``promote_evaluated``: never over a newer day's version).
    """
    from tfjobs.export import METADATA_FILE, SAVED_MODEL_MARKER, published_versions

    versions = published_versions(serving_uri)
    if version not in versions:
        raise FileNotFoundError(f"Version {version} is not published under {serving_uri}; versions: {list(versions)}")
    metadata = read_json_if_exists(join(versions[version], METADATA_FILE)) or {}
    production_uri, config_uri = join(serving_uri, PRODUCTION_FILE), join(serving_uri, MODELS_CONFIG_FILE)
    entry = {
        "version": version,
        "run": run or metadata.get("run") or run_of(metadata.get("trained_model", "")),
        "metrics": metrics if metrics is not None else metadata.get("test_metrics", {}),
        "promoted_at": now_text(),
        "promoted_by": by or getpass.getuser(),
        "reason": reason,
        "forced": forced,
    }

    marker = join(versions[version], SAVED_MODEL_MARKER)

    def change(old: dict | None) -> dict | None:
        if check is not None:
            check(old)
        if not store_for(marker).exists(marker):  # pruned by a concurrent promotion since we listed the versions
            raise FileNotFoundError(f"Version {version} under {serving_uri} was deleted (pruned by another promotion) "
                                    "while this one promoted it; production was not changed")
        if canary:
            if old is None:
                raise ValueError(
                    f"{serving_uri} has no production version yet: promote {version} before adding a canary")
            if old.get("canary", {}) and old["canary"].get("version") == version:
                return None
            return {**old, "canary": entry}
        if old is not None and old["version"] == version and not (old.get("canary") or {}).get("version") == version:
            log.info("Version %d is already production at %s; nothing rewritten", version, production_uri)
            return None
        history = [] if old is None else [_summary(old)] + old.get("history", [])
        kept_canary = (old or {}).get("canary")
        if kept_canary and kept_canary.get("version") == version:
            kept_canary = None  # the canary became production
        return {"model_name": model_name or metadata.get("model_name") or serving_uri.rstrip("/").rsplit("/", 1)[-1],
                **entry, "canary": kept_canary, "previous": old["version"] if old else None,
                "history": history[:HISTORY_LENGTH]}

    pointer, written = update_pointer(serving_uri, change)
    if not written:
        canary_version = (pointer.get("canary") or {}).get("version")
        if canary:
            return PromoteResult(pointer["version"], production_uri, config_uri, None, canary_version, [], False)
        return PromoteResult(version, production_uri, config_uri, pointer.get("previous"), canary_version, [], False)
    log.info("%s of %s is now version %d: %s", "Canary" if canary else "Production", serving_uri, version, reason)
    pruned = prune(serving_uri, keep_versions) if keep_versions else []
    canary_version = (pointer.get("canary") or {}).get("version")
    return PromoteResult(pointer["version"], production_uri, config_uri, pointer.get("previous"), canary_version,
                         pruned, True)


class NotPromoted(Exception):
    """The evaluation did not bless the model, or production is a newer day's version: production stays."""


def promote_evaluated(serving_uri: str, version: int, evaluation: dict, *, run: str, by: str,
                      keep_versions: int | None = None, model_name: str = "") -> PromoteResult:
    """Promote a run's published ``version`` as its evaluation (``metrics.json``) decided.

    A backfilled or re-run older day never displaces a newer day's production version
    (versions are ordered by day), unless the promotion was forced; ``python -m
    tfjobs.promote`` moves production to any version by hand.
    """
    if not evaluation["blessed"]:
        raise NotPromoted(f"Not promoted: {evaluation.get('reason') or '; '.join(evaluation['failures'])}")

    def not_over_a_newer_day(pointer: dict | None) -> None:  # checked on every try: a newer day may land meanwhile
        if pointer is not None and pointer["version"] > version and not evaluation.get("forced"):
            raise NotPromoted(
                f"Not promoted: production version {pointer['version']} is a newer day's than {version} (a backfill "
                f"or a re-run of an older day). Promote it by hand if it should serve: python -m tfjobs.promote "
                f"--serving {serving_uri} --version {version}")

    return set_production(
        serving_uri, version, reason=evaluation.get("reason", "blessed"), by=by, run=run,
        metrics={k: v for k, v in evaluation["metrics"].items() if isinstance(v, float)},
        forced=evaluation.get("forced"), keep_versions=keep_versions, model_name=model_name,
        check=not_over_a_newer_day,
    )


def _summary(pointer: dict) -> dict:
    return {k: pointer.get(k) for k in ("version", "run", "promoted_at", "promoted_by", "reason", "forced")}


def prune(serving_uri: str, keep_versions: int) -> list[int]:
    """Delete the oldest versions beyond ``keep_versions``, never production's or the canary's; the deleted ones.

    The pointer is read again before each deletion, so a version promoted by another run
    meanwhile is kept; a promotion re-checks that its version is still published on each
    try of its write. (What is left: a promotion landing between that read and the delete.)
    """
    from tfjobs.export import SAVED_MODEL_MARKER, published_versions

    versions = published_versions(serving_uri)
    excess = len(versions) - keep_versions
    pruned = []
    store = store_for(serving_uri)
    for version, uri in versions.items():  # oldest first
        if excess <= 0:
            break
        pointer = production(serving_uri) or {}
        if version in (pointer.get("version"), (pointer.get("canary") or {}).get("version")):
            continue
        # saved_model.pb first: a half-deleted directory is then no version, for TF Serving nor for Shardline.
        store.delete(join(uri, SAVED_MODEL_MARKER))
        store.delete(uri)
        pruned.append(version)
        excess -= 1
    if pruned:
        log.info("Pruned versions %s of %s (keeping %d)", pruned, serving_uri, keep_versions)
    return pruned


def check_consistent(serving_uri: str) -> dict:
    """``production.json`` and ``models.config`` agree and point at published versions; the pointer, or an error."""
    from tfjobs.export import published_versions

    pointer = read_json(join(serving_uri, PRODUCTION_FILE))
    config = store_for(serving_uri).read_bytes(join(serving_uri, MODELS_CONFIG_FILE)).decode()
    canary = (pointer.get("canary") or {}).get("version")
    expected = models_config(pointer["model_name"], base_path(serving_uri), pointer["version"], canary)
    if config != expected:
        raise ValueError(f"{join(serving_uri, MODELS_CONFIG_FILE)} does not match {PRODUCTION_FILE}: promote or "
                         "roll back again to rewrite both")
    missing = {pointer["version"], canary} - {None} - set(published_versions(serving_uri))
    if missing:
        raise ValueError(f"{PRODUCTION_FILE} names versions {sorted(missing)} that are not published")
    return pointer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tfjobs.promote", description=__doc__.split("\n\n")[0])
    parser.add_argument("--serving", required=True, help="the model's serving prefix: <store>/serving/<model_name>")
    parser.add_argument("--version", required=True, type=int, help="the published version to promote")
    parser.add_argument("--canary", action="store_true", help="label it canary, beside production, instead")
    parser.add_argument("--by", default="", help="who promotes it (default: this user)")
    parser.add_argument("--reason", default="promoted by hand", help="why, for the record")
    parser.add_argument("--keep-versions", type=int, default=0, help="then prune to this many versions (0: do not)")
    args = cli.parse(parser, argv)
    cli.print_result(set_production(args.serving, args.version, reason=args.reason, by=args.by, canary=args.canary,
                                    keep_versions=args.keep_versions or None))


if __name__ == "__main__":
    main()
