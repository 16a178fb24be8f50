"""What every compressed layer shares: bias, activation, weight creation.

A compressed layer stands in for a ``Dense`` or ``Conv2D`` layer. Each
subclass exposes ``kernel``, the dense kernel its factors represent, in the
shape of the layer it replaces, and ``count_nonzero_params()``, the number of
parameters a sparse storage would keep (bias included). ``count_params()``
stays Keras's count of stored values (indices and masks included).

A layer built from a fit receives its starting values through
``initial_values`` (a dict of weight name -> array); ``build`` then creates
each weight with that value instead of its initializer. The dict is not part
of the config: a saved model restores the weights from its own file.

TFLite export (``keras_psm.export``) traces each layer's ``call``. The
converter folds constant sub-expressions, so a layer whose ``call``
multiplies its factors into one kernel would reach the file as one dense
weight. Such a layer has an ``export_form`` attribute, None in training;
export sets it on its own copy of the layer to an ``export.ExportForm``,
and ``call`` then applies the factors to the input one at a time (a layer
with sparse factors takes them from it as constants, with the function that
applies them). A layer whose ``call`` already applies its factors one at a
time needs nothing.
"""

import numpy as np

from keras_psm import ops
from keras_psm.backend import keras
from keras_psm.validation import check_choice, check_int

DATA_FORMATS = ("channels_last", "channels_first")


class CompressedLayer(keras.layers.Layer):
    """Base class: optional bias, activation and fitted starting values."""

    def __init__(self, activation=None, use_bias=True, initial_values=None, **kwargs):
        super().__init__(**kwargs)
        self.activation = keras.activations.get(activation)
        self.use_bias = bool(use_bias)
        self._initial_values = dict(initial_values or {})

    def _add_weight(self, name, shape, initializer, trainable=True, dtype=None):
        """``add_weight`` that starts from ``initial_values[name]`` when given."""
        shape = tuple(int(d) for d in shape)
        if name in self._initial_values:
            value = np.asarray(self._initial_values.pop(name))
            if value.shape != shape:
                raise ValueError(
                    f"layer {self.name!r}: initial value for {name!r} has shape "
                    f"{value.shape}, expected {shape}."
                )
            initializer = _ConstantArray(value)
        return self.add_weight(
            name=name, shape=shape, initializer=initializer, trainable=trainable, dtype=dtype,
        )

    def _add_bias(self, units):
        self.bias = (
            self._add_weight("bias", (units,), "zeros") if self.use_bias else None
        )

    def _finish(self, outputs, channel_axis=-1):
        """Add the bias along ``channel_axis`` and apply the activation."""
        if self.use_bias:
            bias = ops.cast(self.bias, outputs.dtype)
            if channel_axis == 1:
                bias = ops.reshape(bias, (1, -1) + (1,) * (len(outputs.shape) - 2))
            outputs = outputs + bias
        return self.activation(outputs) if self.activation is not None else outputs

    def count_nonzero_params(self):
        """Parameters a sparse storage keeps: nonzero weight values, bias included.

        Layers whose weights carry masks override this to count ``weight * mask``.
        """
        return sum(int(np.count_nonzero(w.numpy())) for w in self.weights)

    def get_prunable_weights(self):
        """Weights magnitude pruning may sparsify (tfmot's ``PrunableLayer`` interface).

        None by default: a factorized layer is already compressed. Layers
        whose weights carry masks override this.
        """
        return []

    def get_config(self):
        config = super().get_config()
        config.update(
            activation=keras.activations.serialize(self.activation)
            if self.activation is not None else None,
            use_bias=self.use_bias,
        )
        return config


class ConvOptions:
    """Mixin for layers replacing a ``Conv2D``: its options, validated and stored.

    ``filters``, ``kernel_size``, ``strides``, ``padding``, ``dilation_rate``
    and ``data_format`` behave as in ``Conv2D``. Put it before the layer base
    class: ``class MyConv(ConvOptions, CompressedLayer)``.
    """

    def __init__(self, filters, kernel_size, strides=1, padding="valid", dilation_rate=1,
                 data_format=None, **kwargs):
        super().__init__(**kwargs)
        where = f"{type(self).__name__} {self.name!r}"
        self.filters = check_int(filters, "filters", minimum=1, where=where)
        self.kernel_size = normalize_tuple(kernel_size, "kernel_size", where)
        self.strides = normalize_tuple(strides, "strides", where)
        self.dilation_rate = normalize_tuple(dilation_rate, "dilation_rate", where)
        self.padding = check_choice(str(padding).lower(), "padding", ("valid", "same"), where=where)
        self.data_format = check_choice(
            data_format or keras.backend.image_data_format(), "data_format", DATA_FORMATS,
            where=where,
        )

    @property
    def _channel_axis(self):
        return 1 if self.data_format == "channels_first" else -1

    def _input_channels(self, input_shape):
        """The number of input channels, which must be known to build."""
        channels = input_shape[self._channel_axis]
        if channels is None:
            raise ValueError(
                f"{type(self).__name__} {self.name!r}: the channel dimension must be "
                f"known, got input shape {tuple(input_shape)}."
            )
        return int(channels)

    def _to_channels_last(self, inputs):
        """Inputs in the compute dtype, transposed to NHWC if channels_first."""
        inputs = ops.cast(inputs, self.compute_dtype)
        if self.data_format == "channels_first":
            inputs = ops.transpose(inputs, (0, 2, 3, 1))
        return inputs

    def _from_channels_last(self, outputs):
        if self.data_format == "channels_first":
            outputs = ops.transpose(outputs, (0, 3, 1, 2))
        return outputs

    def _conv(self, inputs, kernel, strides=(1, 1), dilation_rate=(1, 1), padding=None):
        """NHWC convolution with this layer's padding (or ``padding``)."""
        return convolve(inputs, kernel, strides, padding or self.padding, dilation_rate,
                        "channels_last")

    def compute_output_shape(self, input_shape):
        return keras.layers.Conv2D(
            self.filters, self.kernel_size, strides=self.strides, padding=self.padding,
            dilation_rate=self.dilation_rate, data_format=self.data_format,
        ).compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            filters=self.filters, kernel_size=self.kernel_size, strides=self.strides,
            padding=self.padding, dilation_rate=self.dilation_rate, data_format=self.data_format,
        )
        return config


def fitted_values(bias=None, **arrays):
    """``initial_values`` from fitted arrays (float32), bias included when given."""
    values = {name: np.asarray(array, dtype=np.float32) for name, array in arrays.items()}
    if bias is not None:
        values["bias"] = np.asarray(bias, dtype=np.float32)
    return values


class _ConstantArray:
    """Initializer returning a fixed array (fitted values); never serialized."""

    def __init__(self, value):
        self.value = value

    def __call__(self, shape, dtype=None, **kwargs):
        return ops.convert_to_tensor(self.value, dtype=dtype or "float32")


def matmul_last_axis(inputs, compute):
    """Apply ``compute`` (a 2-D (n, in) -> (n, out) map) to the last axis.

    Like ``Dense``, inputs of any rank >= 2 are accepted: (batch, tokens,
    features) is flattened to (batch * tokens, features) and back.
    """
    if len(inputs.shape) == 2:
        return compute(inputs)
    flat = ops.reshape(inputs, (-1, inputs.shape[-1]))
    outputs = compute(flat)
    # Static sizes where known (tf_keras builds functional models from them),
    # tensors for the others.
    return ops.reshape(outputs, ops.shape(inputs)[:-1] + (outputs.shape[-1],))


def convolve(inputs, kernel, strides, padding, dilation_rate, data_format):
    """``ops.conv`` with Keras arguments; channels_first via transposes.

    TensorFlow's CPU kernels only run NHWC, so channels_first inputs are
    transposed to NHWC and the result back.
    """
    if data_format == "channels_first":
        inputs = ops.transpose(inputs, (0, 2, 3, 1))
    outputs = ops.conv(inputs, ops.cast(kernel, inputs.dtype), strides=strides,
                       padding=padding, data_format="channels_last",
                       dilation_rate=dilation_rate)
    if data_format == "channels_first":
        outputs = ops.transpose(outputs, (0, 3, 1, 2))
    return outputs


def normalize_tuple(value, name, where, length=2):
    """An int or a tuple of ``length`` positive ints, as a tuple."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (int(value),) * length
    value = tuple(value)
    if len(value) != length or not all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in value
    ):
        raise ValueError(
            f"{where}: `{name}` must be a positive int or a tuple of {length} "
            f"positive ints, got {value!r}."
        )
    return tuple(int(v) for v in value)


def conv_options(layer):
    """The convolution options of a Keras ``Conv2D`` layer, as keyword args."""
    return dict(
        strides=tuple(layer.strides),
        padding=layer.padding,
        dilation_rate=tuple(layer.dilation_rate),
        data_format=layer.data_format,
    )


def common_options(layer):
    """Name, dtype policy, activation and bias flag of a layer being replaced."""
    return dict(
        name=layer.name,
        dtype=layer.dtype_policy,
        trainable=layer.trainable,
        activation=layer.activation,
        use_bias=layer.use_bias,
    )
