"""``image``: an encoded image file (PNG, JPEG, GIF, BMP), decoded and resized inside the model.

- ``height``, ``width``, ``channels``: the model input, ``[height, width, channels]`` floats.
  Encoder: decode, Keras ``Resizing``, ``Rescaling`` to [0, 1]. Adapted (``state.json``):
  the sizes, channel counts and file formats seen.
- ``crop: 0.875``: ``Resizing`` to ``height / crop`` first, then ``CenterCrop(height, width)``.
- ``keep_aspect_ratio: true``: ``Resizing(crop_to_aspect_ratio=True)``, no distortion.
- ``normalize: true``: then ``Normalization`` per channel; adapted: each channel's mean and variance.
- ``augmentation: {flip, rotation, zoom}``, ``filters``, ``pooling``: read by the model part
  (a small CNN), not by the encoder.

A record stores the file's bytes as delivered (a ``bytes`` column), not decoded
pixels: shards stay small, and the exported model takes what a client has, the
encoded file. Decoding (any of the formats TensorFlow's ``decode_image`` reads, to
``channels`` channels: colour made grey or grey made colour), resizing, cropping
and rescaling run in the preprocessing layer, so the tf.data pipeline and the
served model do the same thing to every image, whatever its size.

Augmentation is not preprocessing: it is random, must change every epoch and must
never reach serving. It belongs to the model part that turns the image into a vector
(:mod:`tfjobs.modeling.image_part`), whose Keras augmentation layers act only when
``training=True``; the preprocessed rows the input pipeline caches after the first
epoch are the unaugmented ones.

The validate step decodes each image once with the decoder the model runs; a value
that does not decode (a truncated PNG, a text file) is quarantined with the
decoder's reason, so training never meets one. A missing image (an empty value) is
an all-black image, unless the spec quarantines it.

Served as ``bytes``: a TF Serving REST client sends ``{"b64": "<base64 of the file>"}``.
Through ``serving_raw``, and in a CSV, an image is its base64 text.
"""

from __future__ import annotations

import base64
import binascii
import collections
import re
from typing import Literal

import numpy as np
import pydantic

from tfjobs.features.base import (
    WHITESPACE,
    Cleaned,
    Encoded,
    Feature,
    KindOptions,
    RunningMoments,
    ServingInput,
    Statistics,
    as_text,
    strip_and_mark_missing_tensor,
)
from tfjobs.storage.examples import Column

#: The model input form of this kind; :mod:`tfjobs.modeling.image_part` registers the part for it.
FORM = "image"
#: Images decoded at a time for the per-channel moments (adapt's batches are 8,192 rows; photos are big).
PIXEL_BATCH = 256
#: How many of the most common image sizes ``state.json`` lists (the rest are counted together).
LISTED_SIZES = 10
#: Why a text value was rejected: a CSV (or serving_raw) gives an image as the file's base64.
NOT_BASE64 = "is neither an image file's bytes nor its base64 text"
#: File formats by their first bytes, for the adapted state's counts.
MAGIC = {b"\x89PNG": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF8": "GIF", b"BM": "BMP", b"RIFF": "WEBP"}


class Augmentation(pydantic.BaseModel):
    """Random changes to training images (the model part's Keras layers; never at evaluation or serving)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    flip: Literal["none", "horizontal", "vertical", "horizontal_and_vertical"] = pydantic.Field(
        "none", description="mirror images at random (not for digits or text: a flipped 2 is no 2)")
    rotation: float = pydantic.Field(
        0.0, ge=0.0, le=0.5, description="rotate by up to this fraction of a full turn either way (0.05: 18 degrees)")
    zoom: float = pydantic.Field(0.0, ge=0.0, lt=1.0, description="zoom in or out by up to this fraction")


class ImageOptions(KindOptions):
    height: int = pydantic.Field(..., ge=1, le=4096, description="the model's input height, in pixels")
    width: int = pydantic.Field(..., ge=1, le=4096, description="the model's input width, in pixels")
    channels: Literal[1, 3] = pydantic.Field(3, description="1: grey (colour images are converted); 3: RGB")
    crop: float = pydantic.Field(
        1.0, gt=0.0, le=1.0, description="keep this central fraction: resize to height/crop x width/crop, then "
        "crop the centre height x width (0.875: resize to 256, keep 224)")
    keep_aspect_ratio: bool = pydantic.Field(
        False, description="resize without distorting: crop the longer side to the target's aspect ratio first")
    normalize: bool = pydantic.Field(
        False, description="standardize each channel by its training mean and variance (after rescaling to [0, 1])")
    augmentation: Augmentation = pydantic.Field(
        default_factory=Augmentation, description="random flips, rotations and zooms while training")
    filters: tuple[int, ...] = pydantic.Field(
        (32, 64), min_length=1, max_length=8,
        description="the model part's CNN: one 3x3 convolution (ReLU) per entry, each followed by 2x2 max-pooling "
        "while the feature map is larger than 2x2")
    pooling: Literal["flatten", "average"] = pydantic.Field(
        "flatten", description="how the last feature map becomes a vector: flatten (keeps where things are; small "
        "images) or average (global average pooling; large images)")

    @pydantic.field_validator("filters")
    @classmethod
    def _positive_filters(cls, filters):
        if any(f < 1 or f > 4096 for f in filters):
            raise ValueError(f"filters must be between 1 and 4096, got {list(filters)}")
        return filters


class ImageStatistics(Statistics):
    """Images seen, missing; each size, channel count and file format seen; per-channel moments when normalizing."""

    def __init__(self, feature: Image):
        self.feature = feature
        self.count = self.missing = 0
        self.sizes: collections.Counter = collections.Counter()
        self.channels: collections.Counter = collections.Counter()
        self.formats: collections.Counter = collections.Counter()
        self.moments = [RunningMoments() for _ in range(feature.options.channels)] if feature.options.normalize else []
        self.geometry = feature.geometry_layers() if feature.options.normalize else None

    def update(self, values) -> None:
        values = [bytes(v) for v in np.asarray(values, dtype=object).tolist()]
        present = [v for v in values if v]
        self.missing += len(values) - len(present)
        self.count += len(present)
        if not present:
            return
        for data in present:
            self.formats[next((name for magic, name in MAGIC.items() if data.startswith(magic)), "other")] += 1
        for height, width, channels in self.feature.decoded_shapes(present).tolist():
            self.sizes[f"{height}x{width}"] += 1
            self.channels[str(channels)] += 1
        for start in range(0, len(present) if self.moments else 0, PIXEL_BATCH):
            pixels = np.asarray(self.feature.pixels(present[start : start + PIXEL_BATCH], self.geometry), np.float64)
            for channel, moments in enumerate(self.moments):
                moments.update(pixels[..., channel].ravel())

    def merge(self, other: ImageStatistics) -> None:
        self.count += other.count
        self.missing += other.missing
        self.sizes.update(other.sizes)
        self.channels.update(other.channels)
        self.formats.update(other.formats)
        for mine, theirs in zip(self.moments, other.moments):
            mine.merge(theirs)

    def result(self) -> dict:
        if self.count == 0:
            raise ValueError(f"Feature {self.feature.name!r} has no images in the train split: cannot adapt it")
        common = self.sizes.most_common(LISTED_SIZES)
        heights = [int(size.split("x")[0]) for size in self.sizes]
        widths = [int(size.split("x")[1]) for size in self.sizes]
        state = {
            "count": self.count,
            "missing": self.missing,
            "sizes": dict(common),
            "other_sizes": self.count - sum(n for _, n in common),
            "height": {"min": min(heights), "max": max(heights)},
            "width": {"min": min(widths), "max": max(widths)},
            "channels_seen": dict(sorted(self.channels.items())),
            "formats": dict(self.formats.most_common()),
        }
        if self.moments:
            state["mean"] = [m.mean for m in self.moments]
            state["variance"] = [m.variance for m in self.moments]
        return state


class Image(Feature):
    kind = "image"
    summary = "an encoded image file (PNG, JPEG, GIF, BMP); decoded, resized and rescaled inside the model"
    Options = ImageOptions

    def column(self) -> Column:
        return Column(self.name, "bytes")

    def serving(self) -> ServingInput:
        return ServingInput("bytes", 'the image file\'s bytes: in REST JSON {"b64": "<base64 of the file>"}; '
                                     '"" when missing')

    @property
    def target_shape(self) -> tuple[int, int, int]:
        return self.options.height, self.options.width, self.options.channels

    @property
    def resized_size(self) -> tuple[int, int]:
        """The size images are resized to before the central crop."""
        crop = self.options.crop
        return round(self.options.height / crop), round(self.options.width / crop)

    # -- cleaning: validate decodes every image once, with the model's decoder ------------------------
    def clean(self, raw, na_values) -> Cleaned:
        """Raw values -> the file's bytes; missing ones empty; those that do not decode rejected with the reason.

        A binary-safe raw file (Parquet) gives ``bytes``; a CSV gives text, the file's base64.
        """
        na = set(na_values)
        values = np.empty(len(raw), dtype=object)
        missing = np.zeros(len(raw), bool)
        problems: dict[str, list[int]] = collections.defaultdict(list)
        for i, value in enumerate(raw.tolist()):
            values[i], problem = _file_bytes(value, na)
            if not problem and values[i]:
                problem = decode_problem(values[i])
                problem = problem and f"cannot be decoded as an image ({problem})"
            if problem:
                problems[problem].append(i)
            elif not values[i]:
                missing[i] = True
        cleaned = Cleaned(values, missing)
        for reason, rows in sorted(problems.items()):
            mask = np.zeros(len(raw), bool)
            mask[rows] = True
            cleaned.rejected.append((mask, reason))
        return cleaned

    def parse_text(self, text, na_values):
        """Base64 text (standard or URL-safe alphabet, padded or not) -> the file's bytes; an NA token -> empty."""
        import tensorflow as tf

        values, missing = strip_and_mark_missing_tensor(text, na_values)
        url_safe = tf.strings.regex_replace(tf.strings.regex_replace(values, r"\+", "-"), "/", "_")
        return tf.where(missing, tf.constant(b""), tf.io.decode_base64(tf.where(missing, "", url_safe)))

    def text_variants(self, values, na_values) -> list[str]:
        values = [bytes(v) for v in values]
        return as_text([base64.b64encode(v).decode() for v in values], [not v for v in values], na_values)

    # -- adapt and encode ------------------------------------------------------------------------------
    def statistics(self) -> ImageStatistics:
        return ImageStatistics(self)

    def encoded(self, state: dict) -> Encoded:
        options = self.options
        # dict(), not model_dump(): this runs inside tf.data's traced preprocessing, where AutoGraph would
        # try (and fail, noisily) to convert pydantic's method.
        part = {"filters": list(options.filters), "pooling": options.pooling, **dict(options.augmentation)}
        return Encoded(FORM, shape=self.target_shape, dtype="float32", part=part)

    def geometry_layers(self) -> list:
        """Resize (to the pre-crop size), crop to the target, rescale to [0, 1]: what needs no adapted state."""
        from keras import layers

        height, width = self.resized_size
        out = [layers.Resizing(height, width, crop_to_aspect_ratio=self.options.keep_aspect_ratio,
                               name=f"resize_{self.name}")]
        if (height, width) != (self.options.height, self.options.width):
            out.append(layers.CenterCrop(self.options.height, self.options.width, name=f"crop_{self.name}"))
        out.append(layers.Rescaling(1.0 / 255, name=f"rescale_{self.name}"))
        return out

    def encoder_layers(self, state: dict) -> list:
        out = self.geometry_layers()
        if self.options.normalize:
            from keras import layers

            normalization = layers.Normalization(axis=-1, mean=state["mean"], variance=state["variance"],
                                                 name=f"normalize_{self.name}")
            # Built now, eagerly: built lazily inside a tf.data map, its constants would belong to that graph.
            normalization.build((None, *self.target_shape))
            out.append(normalization)
        return out

    def encode(self, values, encoder_layers: list, state: dict):
        return self.pixels(values, encoder_layers)

    def pixels(self, values, encoder_layers: list):
        """Encoded files ``[batch]`` -> float32 ``[batch, height, width, channels]``, through ``encoder_layers``.

        Each image is decoded and resized on its own (they differ in size); the crop,
        rescaling and normalization then run on the batch. An empty value is black.
        """
        import tensorflow as tf

        resize, rest = encoder_layers[0], encoder_layers[1:]
        height, width = self.resized_size
        channels = self.options.channels

        @tf.autograph.experimental.do_not_convert  # plain TensorFlow ops: nothing for AutoGraph to convert
        def decode_and_resize(data):
            return tf.cond(tf.strings.length(data) > 0,
                           lambda: resize(tf.cast(self.decode(data), tf.float32)),
                           lambda: tf.zeros([height, width, channels], tf.float32))

        images = tf.map_fn(decode_and_resize, tf.convert_to_tensor(values, tf.string),
                           fn_output_signature=tf.TensorSpec([height, width, channels], tf.float32))
        for layer in rest:
            images = layer(images)
        return images

    def decode(self, data):
        """One file -> uint8 ``[h, w, channels]``: TensorFlow's decoder, then grey or colour as the spec says."""
        import tensorflow as tf

        image = tf.io.decode_image(data, channels=0, expand_animations=False)  # as stored: 1, 2, 3 or 4 channels
        stored = tf.shape(image)[-1]
        if self.options.channels == 3:
            image = tf.cond(stored >= 3, lambda: image[..., :3], lambda: tf.tile(image[..., :1], [1, 1, 3]))
        else:
            image = tf.cond(stored >= 3, lambda: tf.image.rgb_to_grayscale(image[..., :3]), lambda: image[..., :1])
        image.set_shape([None, None, self.options.channels])
        return image

    def decoded_shapes(self, values) -> np.ndarray:
        """``[n, 3]``: each file's height, width and channels as stored."""
        import tensorflow as tf

        @tf.autograph.experimental.do_not_convert
        def shape(data):
            return tf.shape(tf.io.decode_image(data, channels=0, expand_animations=False))

        shapes = tf.map_fn(shape, tf.constant(values, tf.string), fn_output_signature=tf.TensorSpec([3], tf.int32))
        return shapes.numpy()

    def edge_values(self, state: dict) -> list:
        """Missing, another size than training's, a JPEG, the other channel count, and a PNG with alpha."""
        import tensorflow as tf

        height, width, channels = self.target_shape

        def picture(h: int, w: int, c: int) -> np.ndarray:
            rows, columns = np.mgrid[0:h, 0:w]
            return np.stack([(rows * 37 + columns * 11 + k * 50) % 256 for k in range(c)], axis=-1).astype(np.uint8)

        return [
            b"",
            tf.io.encode_png(picture(2 * height + 3, width + 5, channels)).numpy(),
            tf.io.encode_jpeg(picture(height, width, channels), quality=90).numpy(),
            tf.io.encode_png(picture(height, width, 4 - channels if channels == 3 else 3)).numpy(),
            tf.io.encode_png(picture(height + 1, width, 4)).numpy(),
        ]

    def state_summary(self, state: dict) -> str:
        sizes = ", ".join(f"{size} ({n})" for size, n in list(state["sizes"].items())[:3])
        more = f" and {len(state['sizes']) - 3 + bool(state['other_sizes'])} more" if len(state["sizes"]) > 3 else ""
        formats = ", ".join(f"{name} {n}" for name, n in state["formats"].items())
        return f"{state['count']} images, sizes {sizes}{more}; {formats}"


def _file_bytes(value, na_values: set[str]) -> tuple[bytes, str]:
    """A raw value as the file's bytes (empty when missing), and what is wrong with it if it is not one."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), ""
    if not isinstance(value, str):  # None (a null in Parquet), NaN
        return b"", ""
    text = value.strip(WHITESPACE)
    if text in na_values:
        return b"", ""
    standard = text.translate(_URL_SAFE_TO_STANDARD)  # either alphabet, padded or not, as parse_text takes it
    try:
        return base64.b64decode(standard + "=" * (-len(standard) % 4), validate=True), ""
    except (binascii.Error, ValueError):
        return b"", NOT_BASE64


_URL_SAFE_TO_STANDARD = str.maketrans("-_", "+/")


def decode_problem(data: bytes) -> str:
    """Why TensorFlow's ``decode_image`` (the model's decoder) cannot decode ``data``; empty if it can."""
    import tensorflow as tf

    try:
        tf.io.decode_image(data, channels=0, expand_animations=False)
    except tf.errors.InvalidArgumentError as err:
        return _op_message(err.message)
    return ""


def _op_message(message: str) -> str:
    """The decoder's own words, without TensorFlow's function-node prefix and op suffix."""
    message = re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", message.strip())
    return re.sub(r"\s*\[Op:\w+\]$", "", message).strip()
