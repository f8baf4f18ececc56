"""``text``: free text (a message, a review), tokenized by ``TextVectorization`` in the model.

===============================  ========================================  =====================================
spec options                     adapted in ``state.json``                 model input
===============================  ========================================  =====================================
``output_mode: int``             vocabulary, counts (and how many          ``sequence_length`` token ids, 0 for
(``sequence_length``,            documents are longer than                 padding: an ``Embedding``, then a masked
``embedding_dim``,               ``sequence_length``)                      mean and max, a mean, or a ``Conv1D``
``sequence_encoder``)                                                      and a masked max (``sequence_encoder``)
``output_mode: multi_hot``,      vocabulary, counts; for ``tf_idf`` the    a vector as wide as the vocabulary
``count`` or ``tf_idf``          IDF weights                               (+1, out of vocabulary)
===============================  ========================================  =====================================

Common options: ``max_tokens`` (the vocabulary's size, its special tokens included, as
Keras counts them), ``min_frequency``, ``ngrams`` (2: words and pairs of words) and
``standardize`` (``lower_and_strip_punctuation``, ``lower``, ``strip_punctuation`` or
``none``). The vocabulary is counted in one streaming pass over the training shards with
Keras's own tokenization (the layer's standardize, split and ngrams), most frequent first:
the same vocabulary and IDF weights as ``TextVectorization.adapt()`` (tested). The options
of the ``int`` family may be given with a bag mode (and are then unused), so that a run
can switch families from the trigger form.

Cleaning, in validate and in the model alike: surrounding whitespace is not part of a
message (stripped), NA tokens make it missing, and a missing message is the empty text
(``missing: quarantine`` sets the row aside instead). What is stored is the message as
written otherwise; the standardization (case, punctuation) is the model's, so that another
``standardize`` needs no new validation. Tokens are cut at whitespace, so runs of spaces,
tabs or line breaks inside a message tokenize as one space (the skew check sends such
variants). A message whose bytes are not valid in the source's encoding is quarantined by
the validate step with the reason.

Storage: the message as one string in an Example, or with ``storage: sequence_example`` a
document of sentences of tokens in a ``SequenceExample`` feature list
(:mod:`tfjobs.storage.sequence_examples`), read back as the tokens joined by spaces, which
tokenizes as the message does. Served as a string: the raw message; the tokenization runs
inside the exported model.
"""

from __future__ import annotations

import collections
import math
from typing import Literal

import numpy as np
import pydantic

from tfjobs.features.base import (
    Cleaned,
    Encoded,
    Feature,
    KindOptions,
    ServingInput,
    Statistics,
    as_text,
    strip_and_mark_missing,
    strip_and_mark_missing_tensor,
)
from tfjobs.storage.examples import Column

#: What a missing message is, stored and served.
MISSING_TEXT = ""
#: The form of the ``int`` mode's model input; :mod:`tfjobs.modeling.parts` makes it a vector.
TOKEN_SEQUENCE = "token_sequence"
#: Keras's special tokens: padding ("", int mode only) and out of vocabulary; never vocabulary entries.
SPECIAL_TOKENS = {b"", b"[UNK]"}
#: Text in a script an English-language vocabulary has not seen (Georgian), for the skew check.
UNSEEN_SCRIPT = "ეს შეტყობინება ქართულად არის დაწერილი"
LONG_MESSAGE_CHARACTERS = 5_000


class TextOptions(KindOptions):
    output_mode: Literal["int", "multi_hot", "count", "tf_idf"] = pydantic.Field(
        "int", description="int: the token ids in order, for an embedding; multi_hot, count or tf_idf: a bag of words "
        "vector as wide as the vocabulary")
    max_tokens: int = pydantic.Field(
        20_000, ge=3, le=1 << 22, description="the vocabulary's size, special tokens included (int: padding and "
        "out-of-vocabulary; the bags: out-of-vocabulary): the most frequent tokens are kept")
    min_frequency: int = pydantic.Field(
        1, ge=1, description="tokens seen fewer times in training are out of vocabulary")
    ngrams: int = pydantic.Field(1, ge=1, le=5, description="tokens are runs of up to this many words (2: words and "
                                 "pairs of words)")
    standardize: Literal["lower_and_strip_punctuation", "lower", "strip_punctuation", "none"] = pydantic.Field(
        "lower_and_strip_punctuation", description="what the model does to a message before cutting it into words "
        "(ASCII case and punctuation, as Keras's TextVectorization)")
    sequence_length: int = pydantic.Field(
        64, ge=1, le=4096, description="int: token ids per message; longer messages are cut, shorter ones padded "
        "(the padding is masked)")
    embedding_dim: int = pydantic.Field(32, ge=1, le=1024, description="int: the width of a token's embedding")
    sequence_encoder: Literal["mean_max", "mean", "conv"] = pydantic.Field(
        "mean_max", description="int: how the embedded tokens become one vector: their masked mean and max side by "
        "side, the mean alone, or a Conv1D over them and a masked max")
    storage: Literal["example", "sequence_example"] = pydantic.Field(
        "example", description="example: the message as one string in a tf.train.Example; sequence_example: a "
        "document of sentences of tokens in a tf.train.SequenceExample feature list")


class TokenStatistics(Statistics):
    """Per token: occurrences and documents it occurs in (mergeable by adding); documents, their lengths."""

    def __init__(self, feature: Text):
        self.feature = feature
        self.counts: collections.Counter = collections.Counter()
        self.document_counts: collections.Counter = collections.Counter()
        self.documents = self.empty = self.tokens = self.longest = self.longer_than_sequence = 0
        self._tokenizer = None

    def update(self, values) -> None:
        if self._tokenizer is None:
            self._tokenizer = self.feature.vectorizer()
        tokens = self.feature.tokenize(values, self._tokenizer)
        flat, lengths = tokens.flat_values.numpy(), tokens.row_lengths().numpy()
        self.documents += len(lengths)
        self.empty += int((lengths == 0).sum())
        self.tokens += int(lengths.sum())
        self.longest = max(self.longest, int(lengths.max(initial=0)))
        self.longer_than_sequence += int((lengths > self.feature.options.sequence_length).sum())
        if not len(flat):
            return
        import pandas as pd

        codes, uniques = pd.factorize(flat)
        counts = np.bincount(codes, minlength=len(uniques))
        # Each (document, token) pair once: the documents each token occurs in.
        pairs = np.unique(np.repeat(np.arange(len(lengths)), lengths) * len(uniques) + codes)
        document_counts = np.bincount(pairs % len(uniques), minlength=len(uniques))
        for token, count, documents in zip(uniques.tolist(), counts.tolist(), document_counts.tolist()):
            self.counts[token] += count
            self.document_counts[token] += documents

    def merge(self, other: TokenStatistics) -> None:
        self.counts.update(other.counts)
        self.document_counts.update(other.document_counts)
        self.documents += other.documents
        self.empty += other.empty
        self.tokens += other.tokens
        self.longest = max(self.longest, other.longest)
        self.longer_than_sequence += other.longer_than_sequence

    def result(self) -> dict:
        options = self.feature.options
        # Keras's order: most frequent first, ties by the token's bytes in reverse (TextVectorization.adapt()).
        ranked = sorted(((c, t) for t, c in self.counts.items() if t not in SPECIAL_TOKENS), reverse=True)
        kept = [(t, c) for c, t in ranked if c >= options.min_frequency][: options.max_tokens - self.feature.reserved]
        if not kept:
            raise ValueError(f"Feature {self.feature.name!r} has no tokens in the train split (min_frequency "
                             f"{options.min_frequency}): cannot adapt it")
        vocabulary = {t for t, _ in kept}
        left_out = [c for c, t in ranked if t not in vocabulary]
        state = {
            "vocabulary": [t.decode() for t, _ in kept],
            "counts": [c for _, c in kept],
            "documents": self.documents,
            "empty_documents": self.empty,
            "tokens_per_document": {"mean": self.tokens / max(self.documents, 1), "max": self.longest},
            "out_of_vocabulary": {"min_frequency": options.min_frequency, "max_tokens": options.max_tokens,
                                  "tokens": len(left_out), "occurrences": sum(left_out)},
        }
        if options.output_mode == "tf_idf":
            # Keras's inverse document frequency, log(1 + documents / (1 + documents with the token)).
            state["idf_weights"] = [math.log(1 + self.documents / (1 + self.document_counts[t])) for t, _ in kept]
        if options.output_mode == "int":
            state["longer_than_sequence_length"] = self.longer_than_sequence
        return state


class Text(Feature):
    kind = "text"
    summary = "free text, tokenized in the model (TextVectorization): token ids for an embedding, or a bag of words"
    Options = TextOptions

    @property
    def int_mode(self) -> bool:
        return self.options.output_mode == "int"

    @property
    def reserved(self) -> int:
        """Indices that are not vocabulary entries: padding and out of vocabulary (int), out of vocabulary (bags)."""
        return 2 if self.int_mode else 1

    def column(self) -> Column:
        return Column(self.name, "string", document=self.options.storage == "sequence_example")

    def serving(self) -> ServingInput:
        return ServingInput("string", "a JSON string, the message as written; \"\" when there is none")

    # -- cleaning: the same rules in pandas (validate) and in TensorFlow (the model) -------------------
    def clean(self, raw, na_values) -> Cleaned:
        values, missing = strip_and_mark_missing(raw, na_values)
        return Cleaned(values.where(~missing, MISSING_TEXT).to_numpy(dtype=object), missing)

    def clean_tensor(self, values, na_values):
        import tensorflow as tf

        values, missing = strip_and_mark_missing_tensor(values, na_values)
        return tf.where(missing, MISSING_TEXT, values)

    # -- adapt and encode ------------------------------------------------------------------------------
    def vectorizer(self, state: dict | None = None):
        """Keras's ``TextVectorization`` for these options; with the adapted ``state``, its vocabulary (and IDF)."""
        from keras import layers

        options = self.options
        arguments = {
            "max_tokens": options.max_tokens,
            "standardize": None if options.standardize == "none" else options.standardize,
            "split": "whitespace",
            "ngrams": options.ngrams if options.ngrams > 1 else None,
            "output_mode": options.output_mode,
            "output_sequence_length": options.sequence_length if self.int_mode else None,
            "name": f"vectorize_{self.name}",
        }
        if state is None:  # to tokenize (its adapt() learns what the state holds: the tests compare them)
            return layers.TextVectorization(**arguments)
        return layers.TextVectorization(**arguments, vocabulary=state["vocabulary"],
                                        idf_weights=state.get("idf_weights"))

    def tokenize(self, values, vectorizer):
        """Texts -> ragged tokens, as ``vectorizer`` cuts them before its lookup (standardize, split, ngrams)."""
        import tensorflow as tf

        return vectorizer._preprocess(tf.constant(values, tf.string))

    def statistics(self) -> Statistics:
        return TokenStatistics(self)

    def encoder_layers(self, state: dict) -> list:
        return [self.vectorizer(state)]

    def encoded(self, state: dict) -> Encoded:
        size = len(state["vocabulary"]) + self.reserved
        if not self.int_mode:
            return Encoded("vector", size)
        return Encoded(TOKEN_SEQUENCE, size, self.options.sequence_encoder, self.options.embedding_dim,
                       shape=(self.options.sequence_length,), dtype="int64")

    def encode(self, values, encoder_layers: list, state: dict):
        import tensorflow as tf

        return tf.cast(encoder_layers[0](values), tf.int64 if self.int_mode else tf.float32)

    # -- the skew check ----------------------------------------------------------------------------------
    def text_variants(self, values, na_values) -> list[str]:
        values = [v.decode() if isinstance(v, bytes) else v for v in values]
        # Whitespace inside a message varies too (doubled spaces, a tab): tokens are cut at whitespace runs.
        spaces = [" ", " ", "  ", "\t", " \n "]
        varied = [v.replace(" ", spaces[i % len(spaces)]) for i, v in enumerate(values)]
        return as_text(varied, [v == MISSING_TEXT for v in values], na_values)

    def edge_values(self, state: dict) -> list:
        """The empty message, one of 5,000 characters of vocabulary words, one in a script the vocabulary never saw."""
        words = " ".join(state["vocabulary"][:200])
        long = (words + " ") * (LONG_MESSAGE_CHARACTERS // (len(words) + 1) + 1)
        return [MISSING_TEXT, long[:LONG_MESSAGE_CHARACTERS], UNSEEN_SCRIPT]
