"""Run the benchmarks: ``python -m benchmarks [--quick] [name ...]`` (``make bench``)."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import time

from benchmarks.harness import machine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("names", nargs="*", help="run only these benchmarks (e.g. shard input)")
    parser.add_argument("--quick", action="store_true", help="smaller data, for a smoke run")
    args = parser.parse_args(argv)
    import benchmarks

    modules = sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__) if m.name.startswith("bench_"))
    if args.names:
        modules = [m for m in modules if m.removeprefix("bench_") in args.names]
    print(f"Shardline benchmarks on {machine()}")
    failed = 0
    for name in modules:
        started = time.perf_counter()
        print(f"\n== {name} ==", flush=True)
        for target in importlib.import_module(f"benchmarks.{name}").run(quick=args.quick):
            print(target.line(), flush=True)
            failed += not target.passed
        print(f"({time.perf_counter() - started:.0f} s)")
    print(f"\n{failed} target(s) failed" if failed else "\nall targets passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
