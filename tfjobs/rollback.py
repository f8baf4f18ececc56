"""Point production back at an earlier published version, in one step.

Rewrites ``production.json`` and TF Serving's ``models.config`` (:mod:`tfjobs.promote`);
no model file moves, so it takes a second on any store, and a TF Serving started with
that config loads the version at its next poll. By default the target is the version
that was production before the current one (the newest of ``production.json``'s
history that is still published); ``--to`` names one. If another promotion lands while
it runs, the rollback fails (:class:`ProductionChangedError`) rather than undo that
one. The rollback is recorded in the pointer (who, when, from which version, why), and
the version rolled back from stays published until pruning removes it: promoting it
again is one command too.

    python -m tfjobs.rollback --serving <store>/serving/housing [--to 1795478400] --by alice --reason "bad day"
"""

from __future__ import annotations

import argparse

from tfjobs import cli
from tfjobs.promote import PromoteResult, production, set_production


def rollback_target(serving_uri: str) -> int:
    """The newest earlier production version that is still published."""
    from tfjobs.export import published_versions

    pointer = production(serving_uri)
    if pointer is None:
        raise FileNotFoundError(f"{serving_uri} has no production.json: nothing was promoted, nothing to roll back")
    versions = published_versions(serving_uri)
    for entry in pointer.get("history", []):
        if entry["version"] != pointer["version"] and entry["version"] in versions:
            return entry["version"]
    raise ValueError(f"No earlier production version of {serving_uri} is still published (versions: {list(versions)}, "
                     f"production: {pointer['version']}): name one with --to")


def rollback(serving_uri: str, to: int | None = None, *, by: str = "", reason: str = "") -> PromoteResult:
    pointer = production(serving_uri)
    if pointer is None:
        raise FileNotFoundError(f"{serving_uri} has no production.json: nothing was promoted, nothing to roll back")
    target = to or rollback_target(serving_uri)
    why = f"rollback from version {pointer['version']}" + (f": {reason}" if reason else "")

    def still_rolling_back_the_same(current: dict | None) -> None:  # checked again on each try of the write
        if current is None or current["version"] != pointer["version"]:
            raise ProductionChangedError(
                f"Production of {serving_uri} changed from version {pointer['version']} to "
                f"{(current or {}).get('version')} while this rollback ran (another promotion or rollback landed "
                "first); nothing was rolled back. Check what serves now and roll back again if still needed.")

    return set_production(serving_uri, target, reason=why, by=by, check=still_rolling_back_the_same)


class ProductionChangedError(RuntimeError):
    """A rollback lost a race: production moved to another version between reading it and rolling it back."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tfjobs.rollback", description=__doc__.split("\n\n")[0])
    parser.add_argument("--serving", required=True, help="the model's serving prefix: <store>/serving/<model_name>")
    parser.add_argument("--to", type=int, default=None, help="the version to serve (default: the previous production)")
    parser.add_argument("--by", default="", help="who rolls back (default: this user)")
    parser.add_argument("--reason", default="", help="why, for the record")
    args = cli.parse(parser, argv)
    cli.print_result(rollback(args.serving, args.to, by=args.by, reason=args.reason))


if __name__ == "__main__":
    main()
