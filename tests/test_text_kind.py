"""The ``text`` kind: its vocabulary and IDF are what TextVectorization.adapt() learns, its model part masks
padding, and a tab-separated delivery of messages runs validate -> export stored as SequenceExamples."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_spec
from tfjobs.features.preprocessing import FeaturePreprocessor
from tfjobs.modeling.layers import FeatureVector, TokenSequenceEncoder

MESSAGES = [
    "Free entry in 2 a wkly comp to win FA Cup final tkts!",
    "Ok lar... Joking wif u oni...",
    "WINNER!! As a valued network customer you have been selected",
    "I'm gonna be home soon and i don't want to talk about this stuff anymore tonight, k?",
    "free free FREE entry. call now",
    "ok ok lar",
    "",
]


def text_feature(**options):
    return tiny_spec(features={"message": {"kind": "text", **options}}).feature("message")


def adapted(feature, batches):
    """The feature's state over ``batches`` of texts, each batch's statistics merged into the first."""
    statistics = [feature.statistics() for _ in batches]
    for running, batch in zip(statistics, batches):
        running.update(np.array(batch, dtype=object))
    for other in statistics[1:]:
        statistics[0].merge(other)
    return {"kind": "text", "options": feature.options.model_dump(exclude_defaults=True), **statistics[0].result()}


@pytest.mark.parametrize("options", [
    {"output_mode": "tf_idf", "ngrams": 2, "max_tokens": 20},
    {"output_mode": "int", "standardize": "lower", "sequence_length": 8},
    {"output_mode": "count", "standardize": "none"},
])
def test_the_streamed_vocabulary_and_idf_are_textvectorizations_own(options):
    feature = text_feature(**options)
    state = adapted(feature, [MESSAGES[:3], MESSAGES[3:]])  # two batches, merged
    keras_layer = feature.vectorizer()
    keras_layer.adapt(tf.constant(MESSAGES))
    special = 2 if options["output_mode"] == "int" else 1
    assert state["vocabulary"] == keras_layer.get_vocabulary()[special:]  # same tokens, same order (ties too)
    ours = feature.vectorizer(state)
    np.testing.assert_allclose(np.asarray(ours(tf.constant(MESSAGES))), np.asarray(keras_layer(tf.constant(MESSAGES))),
                               rtol=1e-6)  # tf_idf: the same IDF weights, the out-of-vocabulary one included
    assert state["documents"] == len(MESSAGES) and state["empty_documents"] == 1


def test_int_mode_pads_with_zeros_cuts_long_messages_and_looks_up_unseen_words_as_out_of_vocabulary():
    feature = text_feature(sequence_length=6)
    state = adapted(feature, [MESSAGES])
    assert state["longer_than_sequence_length"] == 3 and state["tokens_per_document"]["max"] == 17
    edges = feature.edge_values(state)
    assert edges[0] == "" and len(edges[1]) == 5_000 and not set(edges[2].split()) & set(state["vocabulary"])
    ids = feature.encode(feature.clean_tensor(tf.constant(["  ok LAR  ", *edges]), [""]),
                         feature.encoder_layers(state), state).numpy()
    ok, lar = (state["vocabulary"].index(w) + 2 for w in ("ok", "lar"))  # 0: padding, 1: out of vocabulary
    assert ids.shape == (4, 6) and ids[0].tolist() == [ok, lar, 0, 0, 0, 0]
    assert ids[1].tolist() == [0] * 6  # the empty message
    assert (ids[2] > 1).all()  # 5,000 characters of vocabulary words: cut to 6 known tokens
    assert ids[3].tolist() == [1] * 5 + [0]  # five words of an unseen script
    assert feature.encoded(state).shape == (6,) and feature.encoded(state).size == len(state["vocabulary"]) + 2


def test_text_variants_tokenize_like_the_message():
    feature = text_feature(output_mode="multi_hot")
    state = adapted(feature, [MESSAGES])
    texts = ["ok lar. Joking wif u", "free entry", "", "win FA Cup", "call now ok"]
    variants = feature.text_variants([t.encode() for t in texts], ["", "NA"])
    assert variants != texts and any("\t" in v or "  " in v for v in variants)
    layer = feature.vectorizer(state)
    clean = lambda values: layer(feature.clean_tensor(tf.constant(values), ["", "NA"])).numpy()  # noqa: E731
    np.testing.assert_array_equal(clean(variants), clean(texts))


@pytest.mark.parametrize("encoder", TokenSequenceEncoder.ENCODERS)
def test_the_token_sequence_part_masks_padding(encoder):
    layer = TokenSequenceEncoder(10, 4, encoder)
    ids = np.array([[3, 5, 0, 0, 0], [3, 5, 0, 0, 0], [0, 0, 0, 0, 0], [7, 0, 0, 0, 0]])
    out = np.asarray(layer(ids))
    assert out.shape == (4, layer.width) == (4, 8 if encoder == "mean_max" else 4)
    np.testing.assert_array_equal(out[2], 0.0)  # no token: zeros, not NaN
    table = np.asarray(layer.embedding.embeddings)
    if encoder != "conv":
        np.testing.assert_allclose(out[0, :4], table[[3, 5]].mean(axis=0), rtol=1e-6)  # padding does not dilute it
        np.testing.assert_allclose(out[3, :4], table[7], rtol=1e-6)
    if encoder == "mean_max":
        np.testing.assert_allclose(out[0, 4:], table[[3, 5]].max(axis=0), rtol=1e-6)
    # Padding is not a token: more of it changes nothing.
    longer = np.asarray(layer(np.pad(ids, ((0, 0), (0, 3)))))
    np.testing.assert_allclose(longer, out, rtol=1e-5, atol=1e-6)
    clone = TokenSequenceEncoder.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()


def test_every_model_part_is_registered_for_a_feature_vector():
    config = {"form": "token_sequence", "size": 12, "encoding": "mean_max", "embedding_dim": 3, "shape": [5],
              "dtype": "int64"}
    layer = FeatureVector(0, {}, parts={"message": config})
    out = np.asarray(layer({"message": np.array([[2, 3, 0, 0, 0]])}))
    assert out.shape == (1, 6) == (1, layer.width)


SPAM = ["free", "win", "prize", "txt", "claim", "£1000", "urgent!", "call"]
HAM = ["ok", "lar", "home", "soon", "dinner", "love", "tonight", "see", "you", "later", "the", "at"]


def deliver(path, rows: int = 400):
    """A tab-separated delivery without header, as the SMS collection comes: label, message."""
    rng = np.random.default_rng(11)
    lines = []
    for i in range(rows):
        spam = i % 4 == 0
        words = list(rng.choice(HAM, rng.integers(3, 12)))
        if spam:
            words[rng.integers(len(words))] = "Free"
            words += list(rng.choice(SPAM, 2))
        sentences = [" ".join(words[:3]) + ".", " ".join(words[3:]) + rng.choice(["!", "?", ""])]
        lines.append(("spam" if spam else "ham") + "\t" + '"' * (i % 7 == 0) + "  ".join(sentences) + "\n")
    data = "".join(lines).encode()
    path.write_bytes(data + b"ham\tcaf\xe9 later\n")  # one message that is not UTF-8: quarantined
    return rows + 1


def test_a_tab_separated_delivery_of_messages_stored_as_sequence_examples_runs_to_export(tmp_path):
    from tfjobs.adapt import adapt_preprocessing
    from tfjobs.evaluate import evaluate_model
    from tfjobs.export import ExportArgs, export_model
    from tfjobs.fetch import fetch_dataset
    from tfjobs.shard import shard_dataset
    from tfjobs.storage.layout import Layout
    from tfjobs.storage.store import read_json
    from tfjobs.train import TrainArgs, train_model
    from tfjobs.validate import validate_dataset

    rows = deliver(tmp_path / "sms.tsv")
    spec = tiny_spec(
        source={"kind": "csv", "uri": "unused", "delimiter": "\t", "quoting": "none", "header": False,
                "column_names": ["label", "message"]},
        label={"name": "label", "task": "classification", "classes": ["ham", "spam"]},
        features={"message": {"kind": "text", "storage": "sequence_example", "sequence_length": 16,
                              "embedding_dim": 8}},
        na_values=[""], training={"epochs": 4, "batch_size": 16, "learning_rate": 0.02},
    )
    layout = Layout(str(tmp_path / "store"), spec.name, "2026-11-25", run="r1", model_name="sms")
    assert fetch_dataset(spec, layout.raw, source_uri=str(tmp_path / "sms.tsv")).rows == rows
    validated = validate_dataset(spec, layout.raw, layout.validated)
    assert validated.reasons == {"message: is not valid utf-8": 1} and validated.rows_valid == rows - 1
    shards = shard_dataset(spec, layout.validated, layout.shards)
    manifest = read_json(shards.manifest_uri)
    assert manifest["record_format"] == "sequence_example"
    assert manifest["columns"][0] == {"name": "message", "dtype": "string", "document": True}

    # TensorFlow's own reader parses the shards: the label in the context, the message as sentences of tokens.
    test_file = str(tmp_path / "store" / "shards" / spec.name / "2026-11-25"
                    / manifest["splits"]["test"]["shards"][0]["file"])
    records = tf.constant([r.numpy() for r in tf.data.TFRecordDataset(test_file, compression_type="GZIP")])
    context, documents, _ = tf.io.parse_sequence_example(
        records, context_features={"label": tf.io.FixedLenFeature([], tf.string)},
        sequence_features={"message": tf.io.RaggedFeature(tf.string, row_splits_dtype=tf.int64)})
    assert documents["message"].shape.rank == 3 and len(context["label"]) == manifest["splits"]["test"]["records"]
    sentences = documents["message"].to_list()
    assert all(1 <= len(doc) <= 2 and all(tokens for tokens in doc) for doc in sentences)
    assert all(doc[0][-1].endswith(b".") for doc in sentences if len(doc) == 2)

    adapted_ = adapt_preprocessing(spec, shards.manifest_uri, layout.preprocessing)
    state = read_json(adapted_.state_uri)["features"]["message"]
    assert {"free", "lar", "£1000", "urgent"} <= set(state["vocabulary"])  # standardized: lower case, no "!"
    trained = train_model(TrainArgs(spec, shards.manifest_uri, adapted_.state_uri, layout.run_dir + "/train"))
    evaluation = evaluate_model(spec, trained.model_uri, adapted_.state_uri, shards.manifest_uri,
                                layout.run_dir + "/evaluate")
    assert evaluation.metrics["accuracy"] > 0.95 and evaluation.metrics["recall_spam"] > 0.9
    exported = export_model(ExportArgs(spec, trained.model_uri, adapted_.state_uri, shards.manifest_uri,
                                       evaluation.metrics_uri, layout.serving, 1764028800))
    # The skew check passed in a fresh process: raw strings (empty, 5,000 characters, an unseen script)
    # and the same messages with whitespace varied, through serving_default and serving_raw.
    assert exported.max_skew < 1e-5
    signature = json.loads((tmp_path / "store" / "serving" / "sms" / "1764028800" / "shardline.json").read_text())
    assert signature["signature"]["inputs"]["message"]["dtype"] == "string"


def test_the_preprocessor_serializes_a_text_feature(tmp_path):
    feature = text_feature(output_mode="tf_idf")
    state = {"na_values": [""], "features": {"message": adapted(feature, [MESSAGES])},
             "label": {"name": "kind", "task": "classification", "classes": ["a", "b"]}}
    preprocessor = FeaturePreprocessor(state)
    inputs = {"message": keras.Input(shape=(), dtype="string", name="message")}
    model = keras.Model(inputs, preprocessor(inputs)["message"])
    model.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras")
    texts = {"message": tf.constant(["free entry now", "", " ok  lar "])}
    np.testing.assert_allclose(np.asarray(reloaded(texts)), np.asarray(model(texts)), rtol=1e-6)
