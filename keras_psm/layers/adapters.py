"""Layers that let a compressed Dense or Conv2D stand in for other layers.

Every method fits a kernel matrix and builds a layer replacing a ``Dense``
(kernel (in, out)) or a ``Conv2D`` (kernel (kh, kw, cin, cout)). Other
layers whose kernel is such a matrix are presented to the methods as one of
these two (``stand_in``), and the layer the method builds is wrapped so that
it takes the original layer's inputs and gives its outputs (``wrapping``):

- ``EinsumDense`` whose equation contracts the trailing input axes
  (i_1..i_p) with the leading kernel axes and writes the trailing kernel
  axes (o_1..o_q) as the trailing output axes, e.g. ``"abc,cde->abde"`` and
  ``"abcd,cde->abe"`` (the projections of ``MultiHeadAttention``): the
  matrix (i_1 ... i_p, o_1 ... o_q). ``CompressedEinsumDense`` reshapes the
  input to (n, i_1 ... i_p), applies the Dense-like layer and reshapes to
  (..., o_1, ..., o_q).
- ``Conv1D``: the (k, cin, cout) kernel as the Conv2D kernel (1, k, cin,
  cout). ``CompressedConv1D`` adds a unit height axis, applies the
  Conv2D-like layer and removes it; causal padding is a left padding of
  ``dilation * (k - 1)`` steps followed by ``"valid"``.
- ``SeparableConv1D``/``SeparableConv2D`` (channels_last): the pointwise
  kernel as the Dense kernel (cin * depth_multiplier, filters).
  ``CompressedSeparableConv`` keeps the depthwise step as a
  ``DepthwiseConv1D``/``DepthwiseConv2D`` and applies the compressed
  Dense-like layer to the channel axis after it.

A wrapper counts, exports and prunes through the layer it wraps
(``wrapped_layers``: TFLite export gives that layer its ``export_form``);
its ``kernel`` has the original layer's kernel shape.
"""

import math

import numpy as np

from keras_psm import ops
from keras_psm.backend import keras, register_serializable
from keras_psm.layers.base import CompressedLayer


def as_layer(value):
    """A layer, or a layer deserialized from its ``keras.layers.serialize`` dict."""
    if isinstance(value, keras.layers.Layer):
        return value
    return keras.layers.deserialize(value)


def _replacement_options(layer):
    """Name, dtype policy and trainable flag of the layer a wrapper replaces."""
    return dict(name=layer.name, dtype=layer.dtype_policy, trainable=layer.trainable)


class _Wrapper(CompressedLayer):
    """Base class: holds ``layer`` (a compressed Dense- or Conv2D-like layer),
    which ``call`` applies."""

    def __init__(self, layer, **kwargs):
        super().__init__(**kwargs)
        self.layer = as_layer(layer)

    @property
    def wrapped_layers(self):
        return [self.layer]

    def count_nonzero_params(self):
        return self.layer.count_nonzero_params() + sum(
            int(np.count_nonzero(ops.convert_to_numpy(w))) for w in self._own_weights())

    def _own_weights(self):
        """Weights of this wrapper outside ``layer`` (none by default)."""
        return []

    def get_prunable_weights(self):
        return self.layer.get_prunable_weights()

    def get_config(self):
        config = super().get_config()
        for key in ("activation", "use_bias"):  # the wrapped layer holds them
            config.pop(key)
        config.update(layer=keras.layers.serialize(self.layer))
        return config


@register_serializable
class CompressedEinsumDense(_Wrapper):
    """An ``EinsumDense`` whose kernel, as the (prod(input_dims),
    prod(output_dims)) matrix, is held by a compressed Dense-like ``layer``.

    ``outputs[..., o] = layer(inputs[..., i].reshape(n, -1))`` reshaped to
    (..., *output_dims); bias and activation are the wrapped layer's.

    Args:
        layer: the Dense-like layer (or its serialized config).
        input_dims: the trailing input axes the kernel contracts.
        output_dims: the trailing output axes the kernel writes.
    """

    def __init__(self, layer, input_dims, output_dims, **kwargs):
        super().__init__(layer, **kwargs)
        self.input_dims = tuple(int(d) for d in input_dims)
        self.output_dims = tuple(int(d) for d in output_dims)

    def build(self, input_shape=None):
        if input_shape is not None:
            trailing = tuple(input_shape[len(input_shape) - len(self.input_dims):])
            if trailing != self.input_dims:
                raise ValueError(
                    f"CompressedEinsumDense {self.name!r}: the input's trailing axes must be "
                    f"{self.input_dims}, got input shape {tuple(input_shape)}."
                )
        if not self.layer.built:
            self.layer.build((None, math.prod(self.input_dims)))
        self.built = True

    def call(self, inputs):
        leading = ops.shape(inputs)[:len(inputs.shape) - len(self.input_dims)]
        outputs = self.layer(ops.reshape(inputs, (-1, math.prod(self.input_dims))))
        return ops.reshape(outputs, tuple(leading) + tuple(self.output_dims))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:len(input_shape) - len(self.input_dims)]) + self.output_dims

    @property
    def kernel(self):
        """The EinsumDense kernel, shape ``input_dims + output_dims``."""
        return ops.reshape(self.layer.kernel, self.input_dims + self.output_dims)

    @property
    def bias(self):
        """The bias over ``output_dims``, or None."""
        if not self.layer.use_bias:
            return None
        return ops.reshape(self.layer.bias, self.output_dims)

    def get_config(self):
        config = super().get_config()
        config.update(input_dims=self.input_dims, output_dims=self.output_dims)
        return config

    @staticmethod
    def matrix_dims(layer):
        """``(input_dims, output_dims)`` of an EinsumDense in matrix form, else None."""
        equation = layer.equation.replace(" ", "")
        inputs, rest = equation.split(",")
        kernel, outputs = rest.split("->")
        inputs, outputs = inputs.replace("...", ""), outputs.replace("...", "")
        contracted = [axis for axis in kernel if axis in inputs]
        n_in = len(contracted)
        free = kernel[n_in:]
        batch_in, batch_out = inputs[:len(inputs) - n_in], outputs[:len(outputs) - len(free)]
        if (
            "".join(contracted) != kernel[:n_in] or inputs[len(batch_in):] != kernel[:n_in]
            or outputs[len(batch_out):] != free or batch_in != batch_out
            or set(batch_in) & set(kernel) or not n_in or not free
            or set(layer.bias_axes or "") - set(free)
        ):
            return None
        shape = tuple(int(d) for d in layer.kernel.shape)
        return shape[:n_in], shape[n_in:]

    @classmethod
    def stand_in(cls, layer):
        """A built ``Dense`` holding ``layer``'s kernel matrix, bias and activation.

        A bias over some of the output axes is broadcast to all of them, which
        computes the same outputs.
        """
        input_dims, output_dims = cls.matrix_dims(layer)
        dense = keras.layers.Dense(
            math.prod(output_dims), activation=layer.activation,
            use_bias=layer.bias is not None, **_replacement_options(layer),
        )
        dense.build((None, math.prod(input_dims)))
        weights = [ops.convert_to_numpy(layer.kernel).reshape(dense.kernel.shape)]
        if layer.bias is not None:
            bias = ops.convert_to_numpy(layer.bias)
            weights.append(np.broadcast_to(bias, output_dims).reshape(-1))
        dense.set_weights(weights)
        return dense

    @classmethod
    def wrapping(cls, layer, replacement):
        """The wrapper standing in for EinsumDense ``layer``, holding ``replacement``."""
        input_dims, output_dims = cls.matrix_dims(layer)
        return cls(replacement, input_dims, output_dims, **_replacement_options(layer))


@register_serializable
class CompressedConv1D(_Wrapper):
    """A ``Conv1D`` computed by a Conv2D-like ``layer`` with kernel (1, k, cin, cout).

    The input gets a unit height axis, ``causal`` padding becomes a left
    padding of ``dilation * (k - 1)`` steps (the wrapped layer then uses
    ``"valid"``), and the height axis is removed from the output.

    Args:
        layer: the Conv2D-like layer (or its serialized config), with
            ``kernel_size``, ``strides`` and ``dilation_rate`` of the form (1, n).
        causal: whether the Conv1D had ``padding="causal"``.
    """

    def __init__(self, layer, causal=False, **kwargs):
        super().__init__(layer, **kwargs)
        self.causal = bool(causal)

    @property
    def _height_axis(self):
        return 2 if self.layer.data_format == "channels_first" else 1

    @property
    def _left_padding(self):
        return self.layer.dilation_rate[1] * (self.layer.kernel_size[1] - 1) if self.causal else 0

    def build(self, input_shape):
        if not self.layer.built:
            self.layer.build(self._as_2d_shape(input_shape))
        self.built = True

    def _as_2d_shape(self, input_shape):
        shape = list(input_shape)
        shape.insert(self._height_axis, 1)
        return tuple(shape)

    def call(self, inputs):
        outputs = ops.expand_dims(inputs, self._height_axis)
        if self._left_padding:
            paddings = [[0, 0]] * 4
            paddings[self._height_axis + 1] = [self._left_padding, 0]
            outputs = ops.pad(outputs, paddings)
        return ops.squeeze(self.layer(outputs), self._height_axis)

    def compute_output_shape(self, input_shape):
        return keras.layers.Conv1D(
            self.layer.filters, self.layer.kernel_size[1], strides=self.layer.strides[1],
            padding="causal" if self.causal else self.layer.padding,
            dilation_rate=self.layer.dilation_rate[1], data_format=self.layer.data_format,
        ).compute_output_shape(input_shape)

    @property
    def kernel(self):
        """The Conv1D kernel (k, cin, cout)."""
        return self.layer.kernel[0]

    def get_config(self):
        config = super().get_config()
        config.update(causal=self.causal)
        return config

    @classmethod
    def stand_in(cls, layer):
        """A built ``Conv2D`` with kernel (1, k, cin, cout) computing ``layer``
        (a Conv1D) on inputs with a unit height axis (after the causal padding)."""
        causal = layer.padding == "causal"
        conv = keras.layers.Conv2D(
            layer.filters, (1, layer.kernel_size[0]), strides=(1, layer.strides[0]),
            padding="valid" if causal else layer.padding,
            dilation_rate=(1, layer.dilation_rate[0]), data_format=layer.data_format,
            activation=layer.activation, use_bias=layer.use_bias, **_replacement_options(layer),
        )
        kernel = ops.convert_to_numpy(layer.kernel)
        channels = kernel.shape[1]
        conv.build((None, channels, 1, None) if layer.data_format == "channels_first"
                   else (None, 1, None, channels))
        conv.set_weights([kernel[None]] + [ops.convert_to_numpy(w) for w in layer.weights[1:]])
        return conv

    @classmethod
    def wrapping(cls, layer, replacement):
        """The wrapper standing in for Conv1D ``layer``, holding ``replacement``."""
        return cls(replacement, causal=layer.padding == "causal", **_replacement_options(layer))


@register_serializable
class CompressedSeparableConv(_Wrapper):
    """A ``SeparableConv1D`` or ``SeparableConv2D`` (channels_last): its
    depthwise step as a ``DepthwiseConv1D``/``DepthwiseConv2D``, then its
    pointwise kernel, a matrix (cin * depth_multiplier, filters) over the
    channel axis, held by a compressed Dense-like ``layer``.

    Args:
        layer: the Dense-like layer (or its serialized config), holding the
            bias and activation.
        depthwise: the depthwise layer (or its serialized config), with the
            separable layer's kernel size, strides, padding, dilation and
            depth multiplier and no bias.
    """

    def __init__(self, layer, depthwise, **kwargs):
        super().__init__(layer, **kwargs)
        self.depthwise = as_layer(depthwise)

    @property
    def wrapped_layers(self):
        return [self.depthwise, self.layer]

    def _own_weights(self):
        return self.depthwise.weights

    def build(self, input_shape):
        if not self.depthwise.built:
            self.depthwise.build(input_shape)
        if not self.layer.built:
            self.layer.build(self.depthwise.compute_output_shape(input_shape))
        self.built = True

    def call(self, inputs):
        return self.layer(self.depthwise(inputs))

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(self.depthwise.compute_output_shape(input_shape))

    @property
    def kernel(self):
        """The pointwise kernel (1, [1,] cin * depth_multiplier, filters)."""
        ones = (1,) * len(self.depthwise.kernel_size)
        return ops.reshape(self.layer.kernel, ones + tuple(self.layer.kernel.shape))

    def get_config(self):
        config = super().get_config()
        config.update(depthwise=keras.layers.serialize(self.depthwise))
        return config

    @staticmethod
    def _depthwise_class(layer):
        if isinstance(layer, keras.layers.SeparableConv1D):
            return keras.layers.DepthwiseConv1D
        return keras.layers.DepthwiseConv2D

    @classmethod
    def stand_in(cls, layer):
        """A built ``Dense`` holding ``layer``'s pointwise kernel as the matrix
        (cin * depth_multiplier, filters), its bias and activation."""
        pointwise = ops.convert_to_numpy(layer.pointwise_kernel)
        dense = keras.layers.Dense(
            layer.filters, activation=layer.activation, use_bias=layer.use_bias,
            **_replacement_options(layer),
        )
        dense.build((None, pointwise.shape[-2]))
        dense.set_weights([pointwise.reshape(dense.kernel.shape)]
                          + ([ops.convert_to_numpy(layer.bias)] if layer.use_bias else []))
        return dense

    @classmethod
    def wrapping(cls, layer, replacement):
        """The wrapper standing in for separable ``layer``: a copy of its
        depthwise kernel, then ``replacement``."""
        kernel = ops.convert_to_numpy(layer.depthwise_kernel)
        depthwise = cls._depthwise_class(layer)(
            layer.kernel_size, strides=layer.strides, padding=layer.padding,
            depth_multiplier=layer.depth_multiplier, data_format=layer.data_format,
            dilation_rate=layer.dilation_rate, use_bias=False,
            name=f"{layer.name}_depthwise", dtype=layer.dtype_policy,
        )
        depthwise.build((None,) * (kernel.ndim - 1) + (kernel.shape[-2],))
        depthwise.set_weights([kernel])
        return cls(replacement, depthwise, **_replacement_options(layer))
