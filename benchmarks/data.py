"""Synthetic data for benchmarks: the California housing schema at any scale, with a fixed seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from tfjobs.spec import PipelineSpec, parse_spec

NUMERIC = ["longitude", "latitude", "housing_median_age", "total_rooms", "total_bedrooms", "population",
           "households", "median_income"]
OCEAN = ["<1H OCEAN", "INLAND", "NEAR OCEAN", "NEAR BAY", "ISLAND"]


def housing_spec(shards: dict[str, int] | None = None, extra_features: dict | None = None) -> PipelineSpec:
    return parse_spec(housing_spec_fields(shards, extra_features))


def housing_spec_fields(shards: dict[str, int] | None = None, extra_features: dict | None = None) -> dict:
    """The spec's fields, as a spec file holds them."""
    features = {name: {"kind": "numeric"} for name in NUMERIC}
    features["ocean_proximity"] = {"kind": "categorical", "encoding": "embedding", "embedding_dim": 4}
    features.update(extra_features or {})
    return {
        "name": "housing_synthetic",
        "source": {"kind": "csv", "uri": "synthetic"},
        "label": {"name": "median_house_value", "task": "regression", "scaling": "standardize"},
        "features": features,
        "shards": shards or {"train": 16, "eval": 2, "test": 2},
        "model": {"kind": "mlp", "hidden_units": [64, 32]},
    }


def housing_frame(rows: int, seed: int = 0) -> pd.DataFrame:
    """Rows shaped like the housing CSV (1% missing total_bedrooms), values from plausible ranges."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({
        "longitude": rng.uniform(-124.3, -114.3, rows),
        "latitude": rng.uniform(32.5, 42.0, rows),
        "housing_median_age": rng.integers(1, 52, rows).astype(float),
        "total_rooms": rng.gamma(2.0, 1300.0, rows).round(),
        "total_bedrooms": rng.gamma(2.0, 270.0, rows).round(),
        "population": rng.gamma(2.0, 710.0, rows).round(),
        "households": rng.gamma(2.0, 250.0, rows).round(),
        "median_income": rng.gamma(4.0, 0.97, rows).round(4),
        "ocean_proximity": rng.choice(OCEAN, rows, p=[0.44, 0.32, 0.13, 0.1, 0.01]),
    })
    frame.loc[rng.random(rows) < 0.01, "total_bedrooms"] = np.nan
    frame["median_house_value"] = (
        40_000 * frame["median_income"] + 1_000 * frame["housing_median_age"] + rng.normal(0, 30_000, rows)
    ).clip(15_000, 500_001).round()
    return frame.astype({c: np.float32 for c in NUMERIC + ["median_house_value"]})


def write_validated(frame: pd.DataFrame, spec: PipelineSpec, directory: Path) -> str:
    """``frame`` as the validate step's output (typed Parquet + report), ready for the shard step."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tfjobs.storage.store import sha256_file, write_json
    from tfjobs.validate import ROW_GROUP_ROWS, arrow_schema

    directory.mkdir(parents=True, exist_ok=True)
    frame = frame.fillna({"ocean_proximity": ""})
    # From NumPy arrays, NaN stays a float (a missing value the pipeline imputes), not an Arrow null.
    table = pa.table({name: frame[name].to_numpy() for name in spec.columns}, schema=arrow_schema(spec))
    # Row groups as the validate step writes them (one per chunk), so readers can stream.
    pq.write_table(table, directory / "data.parquet", row_group_size=ROW_GROUP_ROWS)
    write_json(str(directory / "report.json"), {
        "data_file": "data.parquet", "data_sha256": sha256_file(directory / "data.parquet"),
        "quarantine_file": "quarantine.csv", "rows_in": len(frame), "rows_valid": len(frame),
        "rows_quarantined": 0, "reasons": {},
    })
    return str(directory)
