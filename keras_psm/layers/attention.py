"""``MultiHeadAttention`` whose projections are compressed layers.

``CompressedMultiHeadAttention`` is a ``MultiHeadAttention`` subclass: its
``call`` is MultiHeadAttention's own (masks, ``use_causal_mask``,
``return_attention_scores``, dropout), and only the query, key, value and
output projections it builds are replaced by the layers given in
``projections`` (``CompressedEinsumDense`` wrappers of compressed Dense-like
layers). The replacements are part of its config, so a saved ``.keras``
model reloads with no ``custom_objects``. Projections not given stay the
``EinsumDense`` that MultiHeadAttention builds. TFLite export reaches the
replaced projections through ``wrapped_layers``.
"""

import numpy as np

from keras_psm.backend import LEGACY_KERAS, keras, register_serializable
from keras_psm.layers.adapters import as_layer

#: Projection role -> the MultiHeadAttention attribute holding its EinsumDense.
PROJECTIONS = {
    "query": "_query_dense",
    "key": "_key_dense",
    "value": "_value_dense",
    "output": "_output_dense",
}


class _Replacements:
    """The projections waiting for ``build``, kept out of Keras's layer tracking
    (they become tracked sublayers when they replace the built EinsumDense)."""

    def __init__(self, layers):
        self.layers = layers


@register_serializable
class CompressedMultiHeadAttention(keras.layers.MultiHeadAttention):
    """``MultiHeadAttention`` with some projections replaced.

    Args:
        num_heads, key_dim, **kwargs: as in ``MultiHeadAttention``.
        projections: ``{role: layer}`` for roles among ``"query"``, ``"key"``,
            ``"value"`` and ``"output"``; each layer (or its serialized
            config) maps the projection's input to its output, e.g. a
            ``CompressedEinsumDense``.
    """

    def __init__(self, num_heads, key_dim, projections=None, **kwargs):
        super().__init__(num_heads, key_dim, **kwargs)
        projections = dict(projections or {})
        unknown = sorted(set(projections) - set(PROJECTIONS))
        if unknown:
            raise ValueError(
                f"CompressedMultiHeadAttention {self.name!r}: unknown `projections` roles "
                f"{unknown}; allowed are {list(PROJECTIONS)}."
            )
        self._replacements = _Replacements(
            {role: as_layer(layer) for role, layer in projections.items()})

    def _use_replacements(self):
        """Put each replacement in place of the EinsumDense just built, and build it."""
        for role, layer in self._replacements.layers.items():
            attribute = PROJECTIONS[role]
            if not LEGACY_KERAS:  # tf_keras untracks a reassigned sublayer itself
                self._tracker.replace_tracked_value("layers", getattr(self, attribute), layer)
            setattr(self, attribute, layer)
            if not layer.built:
                layer.build(None)

    if LEGACY_KERAS:
        def _build_from_signature(self, query, value, key=None):
            from keras_psm.backend import tf  # tf_keras runs on TensorFlow

            super()._build_from_signature(query, value, key)
            with tf.init_scope():  # variables outside the traced graph, as tf_keras does
                self._use_replacements()
    else:
        def build(self, query_shape, value_shape, key_shape=None):
            super().build(query_shape, value_shape, key_shape)
            self._use_replacements()

    @property
    def wrapped_layers(self):
        """The replaced projections."""
        return list(self._replacements.layers.values())

    def count_nonzero_params(self):
        """Nonzero parameters: the replaced projections' own counts plus the
        nonzero values of the projections kept as EinsumDense."""
        replaced = self._replacements.layers
        kept = [getattr(self, attribute) for role, attribute in PROJECTIONS.items()
                if role not in replaced]
        return sum(layer.count_nonzero_params() for layer in replaced.values()) + sum(
            int(np.count_nonzero(w.numpy())) for layer in kept for w in layer.weights)

    def copy_kept_projections(self, source):
        """Give the projections kept as EinsumDense the weights of ``source``'s
        (a built MultiHeadAttention with the same configuration)."""
        for role, attribute in PROJECTIONS.items():
            if role not in self._replacements.layers:
                getattr(self, attribute).set_weights(getattr(source, attribute).get_weights())

    def get_config(self):
        config = super().get_config()
        config.update(projections={
            role: keras.layers.serialize(layer)
            for role, layer in self._replacements.layers.items()
        })
        return config

    @classmethod
    def replacing(cls, layer, projections):
        """The layer replacing MultiHeadAttention ``layer``, with ``projections``
        (``{role: layer}``) in place of its EinsumDense; call
        ``copy_kept_projections(layer)`` once it is built."""
        return cls.from_config({**layer.get_config(), "projections": projections})
