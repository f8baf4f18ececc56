"""Where each step's output lives on the store.

::

    <root>/raw/<dataset>/<partition>/            data.csv, manifest.json
    <root>/validated/<dataset>/<partition>/      data.parquet, quarantine.csv, report.json
    <root>/shards/<dataset>/<partition>/         <split>/part-00000-of-000NN.tfrecord.gz, manifest.json
    <root>/preprocessing/<dataset>/<partition>/  state.json
    <root>/runs/<dataset>/<run>/                 model.keras, checkpoints/, tensorboard/, metrics.json ...
    <root>/statistics/<dataset>/<partition>/     statistics.json (per-feature profiles, drift against production)
    <root>/serving/<model_name>/<version>/       saved_model.pb, variables/, assets/ (TF Serving layout)
    <root>/serving/<model_name>/production.json  which version is production; models.config for TF Serving
    <root>/predictions/<dataset>/<partition>/    predictions.parquet, manifest.json (the scoring DAG)

Data steps are keyed by the partition (the run's logical date), so every run of
the same day shares them; model steps are keyed by the run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tfjobs.storage.store import join

_PARTITION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]*$")


@dataclass(frozen=True)
class Layout:
    root: str
    dataset: str
    partition: str
    run: str = ""
    model_name: str = ""

    def __post_init__(self):
        for field_name in ("dataset", "partition") + (("run",) if self.run else ()):
            value = getattr(self, field_name)
            if not _PARTITION.match(value):
                raise ValueError(
                    f"{field_name} {value!r} cannot be a path segment: use letters, digits, '.', '_', '=' or '-'"
                )

    def _data(self, stage: str) -> str:
        return join(self.root, stage, self.dataset, self.partition)

    @property
    def raw(self) -> str:
        return self._data("raw")

    @property
    def validated(self) -> str:
        return self._data("validated")

    @property
    def shards(self) -> str:
        return self._data("shards")

    @property
    def preprocessing(self) -> str:
        return self._data("preprocessing")

    @property
    def statistics(self) -> str:
        return self._data("statistics")

    @property
    def predictions(self) -> str:
        return self._data("predictions")

    @property
    def run_dir(self) -> str:
        if not self.run:
            raise ValueError("This layout has no run: pass run= to Layout")
        return join(self.root, "runs", self.dataset, self.run)

    @property
    def serving(self) -> str:
        return join(self.root, "serving", self.model_name or self.dataset)


def run_key(text: str) -> str:
    """A path segment made from a run id or timestamp ('2026-11-25T00:00:00+00:00' -> '2026-11-25T000000')."""
    text = text.split("+")[0].replace(":", "")
    return re.sub(r"[^A-Za-z0-9._=-]", "_", text)
