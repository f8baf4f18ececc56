"""Feature crosses: the spec's ``crosses:`` list, each ``HashedCrossing`` over the indices of a few features.

::

    features:
      latitude: {kind: numeric, transform: discretize, bins: 10}
      longitude: {kind: numeric, transform: discretize, bins: 10}
    crosses:
      - {features: [latitude, longitude], num_bins: 64, encoding: embedding, embedding_dim: 4}

A cross takes the encoded index of each of its features (a discretized number's bin,
a category's vocabulary index or hash bin), so only features whose encoder gives one
index per row can be crossed; the combination is hashed into ``num_bins`` bins
(``keras.layers.HashedCrossing``) and reaches the model as one more index, one-hot or
embedded. A cross adapts nothing of its own: its inputs' adapted bins and vocabularies
decide it. Its name is its features joined by ``_x_``.
"""

from __future__ import annotations

from typing import Literal

import pydantic

from tfjobs.features.base import Encoded, Feature


class Cross(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    features: tuple[str, ...] = pydantic.Field(min_length=2, description="the features to cross (each gives an index)")
    num_bins: int = pydantic.Field(ge=2, le=1 << 24, description="hash the combinations into this many bins")
    encoding: Literal["one_hot", "embedding"] = "one_hot"
    embedding_dim: int = pydantic.Field(8, ge=1, le=1024)

    @property
    def name(self) -> str:
        return "_x_".join(self.features)

    def check(self, features: dict[str, Feature]) -> None:
        """Every crossed feature exists and gives one index per row."""
        for name in self.features:
            if name not in features:
                raise ValueError(f"cross {self.name!r} names {name!r}, which is not a feature")
            if not features[name].gives_index:
                raise ValueError(
                    f"cross {self.name!r} needs an index from {name!r}, whose {features[name].kind} encoding gives "
                    "none: cross discretized numbers and single-valued categories"
                )
        if len(set(self.features)) != len(self.features):
            raise ValueError(f"cross {self.name!r} names a feature twice")

    def encoded(self) -> Encoded:
        return Encoded("index", self.num_bins, self.encoding, self.embedding_dim)

    def crossing_layer(self):
        from keras import layers

        return layers.HashedCrossing(self.num_bins, name=f"cross_{self.name}")
