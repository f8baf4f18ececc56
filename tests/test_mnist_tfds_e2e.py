"""MNIST through the TFDS source, fetch -> export, under TFDS's own mock: offline, nothing downloaded.

``include/mnist.yaml`` as ``dags/mnist.py`` runs it, but for two epochs and without its
accuracy bound (the mock's images are random noise with random labels). The fetch reads
``train[:90%]``, ``train[90%:]`` and ``test`` as Shardline's three splits; the exported
model passes the skew check on encoded bytes and base64 text.
"""

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import ROOT

pytestmark = pytest.mark.slow
EXAMPLES = 96  # per TFDS split: the mock ignores slicing, so each slice gives this many


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    import socket

    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.download import download_manager

    from tfjobs.adapt import adapt_preprocessing
    from tfjobs.evaluate import evaluate_model
    from tfjobs.export import ExportArgs, export_model
    from tfjobs.fetch import fetch_dataset
    from tfjobs.shard import shard_dataset
    from tfjobs.spec import parse_spec
    from tfjobs.storage.layout import Layout
    from tfjobs.train import TrainArgs, train_model
    from tfjobs.validate import validate_dataset

    tmp = tmp_path_factory.mktemp("mnist")
    raw = yaml.safe_load((ROOT / "include" / "mnist.yaml").read_text())
    raw["training"].update(epochs=2)
    raw.pop("evaluation")
    spec = parse_spec(raw)
    layout = Layout(str(tmp / "store"), spec.name, "2026-11-25", run="r1")

    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(download_manager.DownloadManager, "download", refuse)
        patch.setattr(socket.socket, "connect", refuse)
        with tfds.testing.mock_data(num_examples=EXAMPLES, data_dir=str(tmp / "tfds")):
            fetched = fetch_dataset(spec, layout.raw)
    validated = validate_dataset(spec, layout.raw, layout.validated)
    shards = shard_dataset(spec, layout.validated, layout.shards)
    adapted = adapt_preprocessing(spec, shards.manifest_uri, layout.preprocessing)
    trained = train_model(TrainArgs(spec, shards.manifest_uri, adapted.state_uri, layout.run_dir + "/train"))
    evaluated = evaluate_model(spec, trained.model_uri, adapted.state_uri, shards.manifest_uri,
                               layout.run_dir + "/evaluate")
    exported = export_model(ExportArgs(spec, trained.model_uri, adapted.state_uri, shards.manifest_uri,
                                       evaluated.metrics_uri, layout.serving, 1764028800))
    return fetched, validated, shards, adapted, exported


def test_the_slices_fill_the_three_splits_and_the_images_stay_encoded(pipeline):
    fetched, validated, shards, _, _ = pipeline
    assert fetched.source == "tfds:mnist/train=train[:90%]+eval=train[90%:]+test=test"
    frame = pd.read_parquet(fetched.data_uri)
    assert frame["_split"].value_counts().to_dict() == {"train": EXAMPLES, "eval": EXAMPLES, "test": EXAMPLES}
    assert all(image[:4] == b"\x89PNG" for image in frame["image"])
    assert validated.rows_quarantined == 0
    assert shards.records == {"train": EXAMPLES, "eval": EXAMPLES, "test": EXAMPLES}


def test_adapt_records_the_sizes_and_the_export_passes_the_skew_check(pipeline):
    _, _, _, adapted, exported = pipeline
    state = json.loads(open(adapted.state_uri).read())["features"]["image"]
    assert state["sizes"] == {"28x28": EXAMPLES} and state["channels_seen"] == {"1": EXAMPLES}
    assert exported.rewritten and exported.max_skew <= 1e-5
    assert np.isfinite(exported.max_skew)
