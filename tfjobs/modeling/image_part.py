"""The model part for image inputs: training-only augmentation, then a small CNN, then one vector.

An ``image`` feature (:mod:`tfjobs.features.image`) reaches the training model as
``[batch, height, width, channels]`` floats. :class:`ConvolutionalPart` makes it a
vector that :class:`tfjobs.modeling.layers.FeatureVector` puts beside the tabular
features, so every model kind (``mlp``, ``residual``, ``wide_deep``, ...) takes images:

1. augmentation: Keras ``RandomFlip``, ``RandomRotation`` and ``RandomZoom``, which act
   only when ``training=True``. Here, not in the preprocessing: the input pipeline
   caches preprocessed rows after the first epoch (and under JAX keeps them on the
   device), which would freeze one random draw; in the model a new one is drawn every
   step, and evaluation and serving never see one;
2. one 3x3 convolution (ReLU) per entry of ``filters``, each followed by 2x2
   max-pooling while the feature map is larger than 2x2 (an 8x8 digit keeps some
   pixels of position, a 224x224 photo is pooled down);
3. ``flatten`` (small images: where a stroke is matters) or ``average`` (global
   average pooling: large images, a short vector).

Written with stock, backend-agnostic Keras layers: it trains under JAX as well.
"""

from __future__ import annotations

import keras
from keras import layers

from tfjobs.features.image import FORM
from tfjobs.modeling.parts import register_part

serializable = keras.saving.register_keras_serializable(package="shardline")


@serializable
class ConvolutionalPart(layers.Layer):
    """``[batch, h, w, c]`` -> ``[batch, width]``: augmentation (training only), convolutions, pooling."""

    def __init__(self, shape, filters=(32, 64), pooling: str = "flatten", flip: str = "none", rotation: float = 0.0,
                 zoom: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.image_shape = tuple(int(d) for d in shape)
        if len(self.image_shape) != 3:
            raise ValueError(f"ConvolutionalPart takes images [height, width, channels], got shape {list(shape)}")
        if pooling not in ("flatten", "average"):
            raise ValueError(f"ConvolutionalPart pooling must be 'flatten' or 'average', got {pooling!r}")
        self.filters = tuple(int(f) for f in filters)
        self.pooling, self.flip, self.rotation, self.zoom = pooling, flip, float(rotation), float(zoom)
        self.augmentation = []
        if flip != "none":
            self.augmentation.append(layers.RandomFlip(flip, name="flip"))
        if self.rotation:
            self.augmentation.append(layers.RandomRotation(self.rotation, name="rotation"))
        if self.zoom:
            self.augmentation.append(layers.RandomZoom(self.zoom, name="zoom"))
        self.blocks = []
        height, width = self.image_shape[:2]
        for i, count in enumerate(self.filters):
            block = [layers.Conv2D(count, 3, padding="same", activation="relu", name=f"conv_{i}")]
            if height > 2 and width > 2:
                block.append(layers.MaxPooling2D(2, name=f"pool_{i}"))
                height, width = height // 2, width // 2
            self.blocks.append(block)
        self.output_map = (height, width, self.filters[-1])
        self.to_vector = layers.Flatten(name="flatten") if pooling == "flatten" else layers.GlobalAveragePooling2D(
            name="average")

    def build(self, input_shape=None):
        shape = (None, *self.image_shape)
        for layer in self.augmentation:
            layer.build(shape)
        for block in self.blocks:
            for layer in block:
                layer.build(shape)
                shape = layer.compute_output_shape(shape)
        self.to_vector.build(shape)

    def call(self, inputs, training=None):
        x = inputs
        for layer in self.augmentation:
            x = layer(x, training=training)
        for block in self.blocks:
            for layer in block:
                x = layer(x)
        return self.to_vector(x)

    def compute_output_shape(self, input_shape):
        height, width, channels = self.output_map
        return (input_shape[0], height * width * channels if self.pooling == "flatten" else channels)

    def get_config(self):
        config = {"shape": list(self.image_shape), "filters": list(self.filters), "pooling": self.pooling,
                  "flip": self.flip, "rotation": self.rotation, "zoom": self.zoom}
        base_config = super().get_config()
        return {**base_config, **config}


@register_part(FORM)
def image_part(name: str, config: dict) -> ConvolutionalPart:
    """The part for an image feature; ``config["part"]`` holds the feature's CNN and augmentation settings."""
    return ConvolutionalPart(config["shape"], name=f"cnn_{name}", **config.get("part", {}))
