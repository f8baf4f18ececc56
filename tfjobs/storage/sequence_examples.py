"""``tf.train.SequenceExample`` records: text stored as documents of sentences of tokens, encoded in bulk.

A column stored as a document (a :class:`~tfjobs.storage.examples.Column` with ``document=True``:
a text feature with ``storage: sequence_example``) is cut into tokens at ASCII whitespace (where
``tf.strings.split`` cuts) and into sentences after each token that ends in ``.``, ``!`` or ``?``.
A row with a document becomes one ``SequenceExample``:

    SequenceExample = 0x0A len Features          context: the row's other columns (an Example's bytes)
                      0x12 len FeatureLists
    FeatureLists    = (0x0A len MapEntry)*       one entry per document column
    MapEntry        = 0x0A len key 0x12 len FeatureList
    FeatureList     = (0x0A len Feature)*        one Feature per sentence
    Feature         = 0x0A len BytesList
    BytesList       = (0x0A len token)*

An Example is ``0x0A len Features``, so the context is what
:func:`~tfjobs.storage.examples.encode_padded` writes, as it is. The documents are built a level
at a time for every row of a batch at once, with NumPy: the tokens are found in the rows' bytes,
given their tags and lengths, grouped into sentences, given the headers of the two fields that
wrap a sentence, grouped into documents, and put after the context with the headers of the map
entry. Each level copies the bytes once; there is no Python call per token or per row, but one
CRC32C per record in the framing.

Reading: :func:`parse_sequence_examples` parses a batch with ``tf.io.parse_sequence_example`` (a
document is a ragged ``[rows, sentences, tokens]`` tensor) and gives each document back as text,
its tokens joined by single spaces: the stored text with its whitespace runs made single spaces,
which a tokenizer that splits at whitespace cannot tell from the original. So every step reads the
same raw values from either record format, and the served model takes the raw string.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from tfjobs.storage.examples import Column, _varint_bytes, _varint_piece, encode_padded, tf_dtype

EXAMPLE = "example"
SEQUENCE_EXAMPLE = "sequence_example"
#: Where tokens end: ASCII whitespace, what ``tf.strings.split`` splits at.
WHITESPACE = b" \t\n\r\x0b\x0c"
#: A token that ends in one of these ends its sentence.
SENTENCE_ENDS = b".!?"

_IS_WHITESPACE = np.zeros(256, bool)
_IS_WHITESPACE[list(WHITESPACE)] = True
_ENDS_SENTENCE = np.zeros(256, bool)
_ENDS_SENTENCE[list(SENTENCE_ENDS)] = True


def record_format(columns: Sequence[Column]) -> str:
    """``sequence_example`` when a column is stored as a document, else ``example``."""
    return SEQUENCE_EXAMPLE if any(c.document for c in columns) else EXAMPLE


@dataclass(frozen=True)
class Pieces:
    """Byte strings back to back: piece i is the ``lengths[i]`` bytes of ``data`` after the pieces before it."""

    data: np.ndarray  # uint8
    lengths: np.ndarray  # int64

    @property
    def starts(self) -> np.ndarray:
        return np.cumsum(self.lengths) - self.lengths

    def tolist(self) -> list[bytes]:
        buffer = self.data.tobytes()
        return [buffer[s : s + n] for s, n in zip(self.starts.tolist(), self.lengths.tolist())]


def encode_sequence_examples(columns: Sequence[Column], values: Mapping[str, np.ndarray]) -> Pieces:
    """Every row's serialized ``SequenceExample``: the document columns as feature lists, the others as context."""
    context = [c for c in columns if not c.document]
    documents = [c for c in columns if c.document]
    if not context or not documents:
        raise ValueError("A SequenceExample needs a column stored as a document and one that is not (the label)")
    rows = encode_padded(context, values)
    entries = [piece for c in documents for piece in feature_list_entry(c.name, values[c.name])]
    feature_lists = sum(piece.lengths for piece in entries)
    return concat(Pieces(rows.compact(), rows.lengths), *field_header(0x12, feature_lists), *entries)


def encode_framed_sequence_examples(columns: Sequence[Column], values: Mapping[str, np.ndarray]):
    """Every row's ``SequenceExample`` in TFRecord framing: (the framed records back to back, each one's length)."""
    framed = frame(encode_sequence_examples(columns, values))
    return framed.data, framed.lengths


def feature_list_entry(name: str, texts) -> tuple[Pieces, ...]:
    """Each text's entry in a ``FeatureLists`` map, ``0x0A len (0x0A len name 0x12 len FeatureList)``, in pieces:
    the entry's header, then its feature list."""
    tokens, tokens_per_sentence, sentences_per_text = split_documents(texts)
    bytes_lists = group(concat(*field_header(0x0A, tokens.lengths), tokens), tokens_per_sentence)
    # FeatureList{feature: 1} of Feature{bytes_list: 1}: two field headers before each BytesList.
    feature = field_header(0x0A, bytes_lists.lengths)
    sentences = concat(*field_header(0x0A, sum(piece.lengths for piece in feature) + bytes_lists.lengths),
                       *feature, bytes_lists)
    feature_lists = group(sentences, sentences_per_text)
    key = name.encode()
    key_field = constant(b"\x0a" + _varint_bytes(len(key)) + key, len(sentences_per_text))
    value_field = field_header(0x12, feature_lists.lengths)
    entry = key_field.lengths + sum(piece.lengths for piece in value_field) + feature_lists.lengths
    return (*field_header(0x0A, entry), key_field, *value_field, feature_lists)


def split_documents(texts) -> tuple[Pieces, np.ndarray, np.ndarray]:
    """Every text's tokens, in order; how many tokens each sentence has; how many sentences each text has."""
    encoded = [t.encode() if isinstance(t, str) else bytes(t) for t in np.asarray(texts, dtype=object)]
    lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
    data = np.frombuffer(b" ".join(encoded), np.uint8)  # a space between texts: no token spans two
    text_starts = np.cumsum(lengths + 1) - (lengths + 1)
    word = ~_IS_WHITESPACE[data]
    edges = np.diff(np.concatenate([[False], word, [False]]).astype(np.int8))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    tokens = Pieces(data[word], ends - starts)  # every token's bytes, back to back: the bytes not whitespace
    text_of_token = np.searchsorted(text_starts, starts, side="right") - 1
    after_sentence_end = np.concatenate([[True], _ENDS_SENTENCE[data[ends[:-1] - 1]]])
    first_of_text = np.concatenate([[True], text_of_token[1:] != text_of_token[:-1]])
    sentence_starts = np.flatnonzero((after_sentence_end | first_of_text)[: len(starts)])
    tokens_per_sentence = np.diff(np.append(sentence_starts, len(starts)))
    sentences_per_text = np.bincount(text_of_token[sentence_starts], minlength=len(encoded))
    return tokens, tokens_per_sentence, sentences_per_text


# -- building protobuf fields for every row at once ----------------------------------------------


def constant(value: bytes, count: int) -> Pieces:
    """``count`` pieces of the same bytes."""
    return Pieces(np.tile(np.frombuffer(value, np.uint8), count), np.full(count, len(value), np.int64))


def varints(values: np.ndarray) -> Pieces:
    """Each value as a protobuf base-128 varint."""
    piece = _varint_piece(np.asarray(values, np.int64))
    lengths = np.full(len(values), piece.width, np.int64) if piece.lengths is None else piece.lengths
    return Pieces(piece.data[np.arange(piece.width) < lengths[:, None]], lengths)


def field_header(tag: int, lengths: np.ndarray) -> tuple[Pieces, Pieces]:
    """What precedes each length-delimited protobuf field of ``lengths`` bytes: its tag, and the length as a varint."""
    return constant(bytes([tag]), len(lengths)), varints(lengths)


def group(pieces: Pieces, counts: np.ndarray) -> Pieces:
    """Consecutive pieces joined: the first ``counts[0]`` make the first piece, and so on (0 makes an empty one)."""
    ends = np.concatenate([[0], np.cumsum(pieces.lengths)])
    last = np.cumsum(counts)
    return Pieces(pieces.data, ends[last] - ends[last - counts])


def concat(*columns: Pieces) -> Pieces:
    """Piece i of the result is piece i of each of ``columns``, one after the other.

    The column with the most bytes (the payload) is copied through a mask of where the others
    are not; only the others (field headers, mostly) need an index per byte.
    """
    lengths = sum(c.lengths for c in columns)
    out = np.empty(int(lengths.sum()), np.uint8)
    payload = max(range(len(columns)), key=lambda i: len(columns[i].data))
    elsewhere = np.zeros(len(out), bool)
    at = np.cumsum(lengths) - lengths
    for i, column in enumerate(columns):
        if i != payload:
            where = np.arange(len(column.data)) + np.repeat(at - column.starts, column.lengths)
            out[where] = column.data
            elsewhere[where] = True
        at = at + column.lengths
    out[~elsewhere] = columns[payload].data
    return Pieces(out, lengths)


def frame(records: Pieces) -> Pieces:
    """Each record in TFRecord framing: length, its masked CRC32C, the record, the record's masked CRC32C."""
    from tfjobs.storage.tfrecord import masked_crc32c

    lengths = records.lengths
    buffer = records.data.tobytes()
    crcs = np.array([masked_crc32c(buffer[s : s + n]) for s, n in zip(records.starts.tolist(), lengths.tolist())],
                    np.uint32)
    # Records of one length share the length's CRC.
    unique, inverse = np.unique(lengths, return_inverse=True)
    length_crcs = np.array([masked_crc32c(int(n).to_bytes(8, "little")) for n in unique], np.uint32)[inverse]
    header = np.concatenate([lengths.astype("<u8").view(np.uint8).reshape(-1, 8),
                             length_crcs.astype("<u4").view(np.uint8).reshape(-1, 4)], axis=1)
    n = len(lengths)
    return concat(Pieces(header.ravel(), np.full(n, 12, np.int64)), records,
                  Pieces(crcs.astype("<u4").view(np.uint8), np.full(n, 4, np.int64)))


# -- reading --------------------------------------------------------------------------------------


def parse_sequence_examples(records, columns: Sequence[Column]) -> dict:
    """A batch of serialized records -> one 1-D tensor per column; a document as its text (tokens joined by spaces)."""
    import tensorflow as tf

    context = {c.name: tf.io.FixedLenFeature([], tf_dtype(c.dtype)) for c in columns if not c.document}
    sequences = {c.name: tf.io.RaggedFeature(tf.string, row_splits_dtype=tf.int64) for c in columns if c.document}
    parsed, documents, _ = tf.io.parse_sequence_example(records, context_features=context,
                                                        sequence_features=sequences)
    return {c.name: document_text(documents[c.name]) if c.document else parsed[c.name] for c in columns}


def document_text(documents):
    """Ragged ``[rows, sentences, tokens]`` -> ``[rows]``: each document's tokens joined by single spaces."""
    import tensorflow as tf

    sentences = tf.strings.reduce_join(documents, axis=-1, separator=" ")
    return tf.strings.reduce_join(sentences, axis=-1, separator=" ")
