"""Predict with an exported model, loaded from the store like TF Serving would.

Instances are raw rows, a JSON list of objects as in TF Serving's REST ``instances``
format; ``null`` or an absent key means missing (NaN for numbers, ``""`` for
categories, ``-1`` for integer ids).

    python -m tfjobs.predict --serving .demo/store/serving/penguins --instances include/penguins_request.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from tfjobs import cli
from tfjobs.export import published_versions
from tfjobs.spec import MISSING_INTEGER, MISSING_STRING
from tfjobs.storage.store import local_dir_copy


def instances_to_columns(instances: list[dict[str, Any]], signature) -> dict[str, np.ndarray]:
    """Row dicts -> one array per signature input, missing values filled the Shardline way."""
    import tensorflow as tf

    missing = {tf.float32: math.nan, tf.string: MISSING_STRING, tf.int64: MISSING_INTEGER}
    columns = {}
    for name, spec in signature.structured_input_signature[1].items():
        values = [row.get(name) for row in instances]
        filled = [missing[spec.dtype] if v is None else v for v in values]
        columns[name] = np.array(filled, dtype=object if spec.dtype == tf.string else spec.dtype.as_numpy_dtype)
    unknown = {key for row in instances for key in row} - set(columns)
    if unknown:
        raise ValueError(f"Instances have keys the model does not take: {sorted(unknown)}; it takes {sorted(columns)}")
    return columns


def predict(serving_uri: str, instances: list[dict[str, Any]], version: int | None = None) -> dict[str, Any]:
    import tensorflow as tf

    versions = published_versions(serving_uri)
    if not versions:
        raise FileNotFoundError(f"No published version under {serving_uri}")
    version = version or max(versions)
    if version not in versions:
        raise FileNotFoundError(f"Version {version} is not published under {serving_uri}; versions: {list(versions)}")
    with local_dir_copy(versions[version]) as model_dir:
        serve = tf.saved_model.load(str(model_dir)).signatures["serving_default"]
        columns = instances_to_columns(instances, serve)
        outputs = serve(**{name: tf.constant(values) for name, values in columns.items()})
    predictions = []
    for i in range(len(instances)):
        row = {}
        for key, tensor in outputs.items():
            value = tensor[i].numpy()
            row[key] = value.decode() if isinstance(value, bytes) else value.tolist()
        predictions.append(row)
    return {"model": serving_uri, "version": version, "predictions": predictions}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tfjobs.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("--serving", required=True, help="the model's serving prefix: <store>/serving/<model_name>")
    parser.add_argument("--instances", required=True, help="JSON file: a list of raw rows (or {'instances': [...]})")
    parser.add_argument("--version", type=int, default=None, help="version to load (default: the newest)")
    args = cli.parse(parser, argv)
    instances = json.loads(Path(args.instances).read_text())
    if isinstance(instances, dict):
        instances = instances["instances"]
    cli.print_result(predict(args.serving, instances, args.version))


if __name__ == "__main__":
    main()
