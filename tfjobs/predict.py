"""Predict with an exported model, loaded from the store like TF Serving would.

Instances are raw rows, a JSON list of objects as in TF Serving's REST ``instances``
format. Rows of typed values (numbers as JSON numbers) go to the ``serving_default``
signature; when a row has ``null``, an absent key or text for a number (``" 3.5"``,
``"NA"``), every row goes to ``serving_raw`` as CSV text (``null`` and an absent key
are an empty cell), which the model parses and cleans as the validate step does.
Binary values (an image file) are sent as TF Serving's REST API takes them,
``{"b64": "<base64>"}``; as CSV text they are that base64 text.
The version is production's (``production.json``, :mod:`tfjobs.promote`) unless one is
asked for; a store from before production pointers serves its newest version.

    python -m tfjobs.predict --serving .demo/store/serving/penguins --instances include/penguins_request.json
"""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path
from typing import Any

import numpy as np

from tfjobs import cli
from tfjobs.export import RAW_SIGNATURE, published_versions
from tfjobs.storage.store import local_dir_copy


def instances_to_columns(instances: list[dict[str, Any]], signature) -> tuple[str, dict[str, np.ndarray]]:
    """Row dicts -> (the signature to call, one array per input)."""
    import tensorflow as tf

    inputs = signature.structured_input_signature[1]
    unknown = {key for row in instances for key in row} - set(inputs)
    if unknown:
        raise ValueError(f"Instances have keys the model does not take: {sorted(unknown)}; it takes {sorted(inputs)}")

    def typed(value, spec) -> bool:
        if value is None:
            return False
        return isinstance(value, (str, dict)) == (spec.dtype == tf.string)

    if all(typed(row.get(name), spec) for row in instances for name, spec in inputs.items()):
        return "serving_default", {
            name: np.array([_binary(row[name]) if isinstance(row[name], dict) else row[name] for row in instances],
                           dtype=object if spec.dtype == tf.string else spec.dtype.as_numpy_dtype)
            for name, spec in inputs.items()
        }
    return RAW_SIGNATURE, {
        name: np.array([_text(row.get(name)) for row in instances], dtype=object)
        for name in inputs
    }


def _binary(value: dict) -> bytes:
    """TF Serving's REST encoding of binary data, ``{"b64": "..."}``, decoded."""
    if set(value) != {"b64"}:
        raise ValueError(f'A JSON object value must be {{"b64": "<base64>"}} (binary data), got keys {sorted(value)}')
    return base64.b64decode(value["b64"])


def _text(value) -> str:
    """A value as the text of a CSV cell: ``null`` empty; binary data its base64 text."""
    if value is None:
        return ""
    if isinstance(value, dict):
        _binary(value)  # checked
        return value["b64"]
    return str(value)


def predict(serving_uri: str, instances: list[dict[str, Any]], version: int | None = None) -> dict[str, Any]:
    import tensorflow as tf

    from tfjobs.promote import champion

    versions = published_versions(serving_uri)
    if not versions:
        raise FileNotFoundError(f"No published version under {serving_uri}")
    version = version or champion(serving_uri).version  # production.json's, as TF Serving's models.config
    if version not in versions:
        raise FileNotFoundError(f"Version {version} is not published under {serving_uri}; versions: {list(versions)}")
    with local_dir_copy(versions[version]) as model_dir:
        signatures = tf.saved_model.load(str(model_dir)).signatures
        signature, columns = instances_to_columns(instances, signatures["serving_default"])
        outputs = signatures[signature](**{name: tf.constant(values) for name, values in columns.items()})
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
    parser.add_argument("--version", type=int, default=None,
                        help="version to load (default: production's, from production.json; else the newest)")
    args = cli.parse(parser, argv)
    instances = json.loads(Path(args.instances).read_text())
    if isinstance(instances, dict):
        instances = instances["instances"]
    cli.print_result(predict(args.serving, instances, args.version))


if __name__ == "__main__":
    main()
