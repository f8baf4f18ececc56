"""How benchmarks report: every target is a ratio against an anchor measured in the same run.

Absolute times on shared machines are noisy; a ratio of two things measured side
by side, on the same data, in the same process, holds. Each ``bench_*.py`` module
has a ``run(quick: bool) -> list[Target]``; ``python -m benchmarks`` runs them all
and prints one line per target with its ratio and PASS or FAIL.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    name: str
    measured: float
    anchor: float
    unit: str
    anchor_name: str
    goal: float  # the ratio measured / anchor must be >= goal (or <= goal when lower_is_better)
    lower_is_better: bool = False
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.measured / self.anchor if self.anchor else float("inf")

    @property
    def passed(self) -> bool:
        return self.ratio <= self.goal if self.lower_is_better else self.ratio >= self.goal

    def line(self) -> str:
        relation = "<=" if self.lower_is_better else ">="
        verdict = "PASS" if self.passed else "FAIL"
        text = (
            f"{verdict}  {self.name}: {self.measured:,.4g} {self.unit} vs {self.anchor_name} "
            f"{self.anchor:,.4g} {self.unit} = {self.ratio:.3g}x (target {relation} {self.goal:g}x)"
        )
        return text + (f"  [{self.note}]" if self.note else "")


def best_of(fn: Callable[[], object], repeat: int = 3) -> float:
    """The fastest of ``repeat`` runs of ``fn``, in seconds (the least disturbed by other load)."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def fit_epoch_seconds(model, epochs: int, **fit_args) -> list[float]:
    """How long each epoch of one ``model.fit(epochs=epochs, **fit_args)`` took, from Keras' own epoch callbacks.

    Timing epochs, not the call, keeps ``fit()``'s per-call setup out of its steps. An epoch
    ends when its metrics are read, so work a backend dispatched ahead (JAX) is inside it.
    """
    import keras

    times = []

    class EpochClock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            for value in (logs or {}).values():
                float(value)  # waits for the epoch's last step
            times.append(time.perf_counter() - self.started)

    model.fit(epochs=epochs, verbose=0, callbacks=[EpochClock()], **fit_args)
    return times


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.platform()}"
