"""Layers whose kernel is a product of sparse factors (the PSM layers).

Each factor is ``weight * mask`` (PSM supplement A.3): ``weight`` trainable,
``mask`` a non-trainable 0/1 weight saved with the model. Gradients outside
the mask are exactly zero, so the support never changes during ``fit``.

For a kernel matrix of shape (in, out) the Q factors have shapes
(in, r), (r, r), ..., (r, out), with r = min(in, out) unless ``rank`` is set.
A Conv2D kernel (kh, kw, cin, cout) is the matrix (kh * kw * cin, cout).
"""

import numpy as np

from keras_psm.backend import keras, register_serializable, tf
from keras_psm.factorize.palm4msa import palm4msa
from keras_psm.initializers import random_supports, sparse_factor_init
from keras_psm.layers.base import (
    DATA_FORMATS,
    CompressedLayer,
    common_options,
    conv_options,
    convolve,
    matmul_last_axis,
    normalize_tuple,
)
from keras_psm.validation import check_choice, check_int


def factor_shapes(n_rows, n_cols, n_factors, rank=None):
    """Shapes (in, r), (r, r), ..., (r, out) of Q factors of an (in, out) matrix."""
    if n_factors == 1:
        return [(n_rows, n_cols)]
    rank = min(n_rows, n_cols) if rank is None else rank
    return [(n_rows, rank)] + [(rank, rank)] * (n_factors - 2) + [(rank, n_cols)]


def apply_in_sequence(inputs, factors):
    """``(((inputs @ F1) @ F2) ... @ FQ)``: the factors applied one at a time."""
    outputs = inputs
    for factor in factors:
        outputs = tf.matmul(outputs, factor)
    return outputs


def chain_matmul(inputs, factors):
    """``inputs @ F1 @ ... @ FQ`` in the cheaper of two association orders.

    Applying the factors one at a time costs n * sum_i d_i d_{i+1} for n rows;
    multiplying them first costs the chain product plus n * d_0 * d_Q. The
    first wins below a break-even row count, decided when the graph runs if
    the batch size is not known when it is traced.
    """
    def one_at_a_time():
        return apply_in_sequence(inputs, factors)

    def product_first():
        kernel = factors[0]
        for factor in factors[1:]:
            kernel = tf.matmul(kernel, factor)
        return tf.matmul(inputs, kernel)

    dims = [int(f.shape[0]) for f in factors] + [int(factors[-1].shape[1])]
    per_row = sum(a * b for a, b in zip(dims[:-1], dims[1:]))
    dense_per_row = dims[0] * dims[-1]
    if len(factors) == 1 or per_row <= dense_per_row:
        return one_at_a_time()
    product_cost = sum(dims[0] * a * b for a, b in zip(dims[1:-1], dims[2:]))
    break_even = product_cost / (per_row - dense_per_row)
    n_rows = inputs.shape[0]
    if n_rows is not None:
        return one_at_a_time() if n_rows < break_even else product_first()
    return tf.cond(tf.cast(tf.shape(inputs)[0], tf.float64) < break_even,
                   one_at_a_time, product_first)


class _SparseFactors(CompressedLayer):
    """Holds Q masked factors of an (in, out) matrix; subclasses apply them."""

    def __init__(self, n_factors=3, sparsity=14, rank=None, seed=None, **kwargs):
        super().__init__(**kwargs)
        where = f"{type(self).__name__} {self.name!r}"
        self.n_factors = check_int(n_factors, "n_factors", minimum=1, where=where)
        self.sparsity = check_int(sparsity, "sparsity", minimum=1, where=where)
        self.rank = check_int(rank, "rank", minimum=1, where=where, allow_none=True)
        self.seed = check_int(seed, "seed", minimum=0, where=where, allow_none=True)

    def _build_factors(self, n_rows, n_cols):
        """Create ``factor_i`` (trainable) and ``mask_i`` (0/1) for i = 0..Q-1.

        Without fitted values the supports are random (``splincol`` of a
        Gaussian) and the weights sparse He / Xavier (supplement A.3).
        """
        shapes = factor_shapes(n_rows, n_cols, self.n_factors, self.rank)
        if not any(name.startswith("mask_") for name in self._initial_values):
            rng = np.random.default_rng(self.seed)
            supports = random_supports(shapes, self.sparsity, rng)
            weights = sparse_factor_init(supports, rng)
            for index, (support, weight) in enumerate(zip(supports, weights)):
                self._initial_values.setdefault(f"mask_{index}", support)
                self._initial_values.setdefault(f"factor_{index}", weight)
        self.factor_weights, self.masks = [], []
        for index, shape in enumerate(shapes):
            self.factor_weights.append(self._add_weight(f"factor_{index}", shape, "zeros"))
            self.masks.append(self._add_weight(f"mask_{index}", shape, "ones", trainable=False))

    def _factors(self, dtype):
        return [
            tf.cast(weight, dtype) * tf.cast(mask, dtype)
            for weight, mask in zip(self.factor_weights, self.masks)
        ]

    def _product(self, dtype):
        """The product of the factors as one (in, out) matrix."""
        factors = self._factors(dtype)
        matrix = factors[0]
        for factor in factors[1:]:
            matrix = tf.matmul(matrix, factor)
        return matrix

    @property
    def factors(self):
        """The effective factors ``weight * mask``, in the compute dtype."""
        return self._factors(self.compute_dtype)

    def count_nonzero_params(self):
        """Nonzeros of all supports plus the bias."""
        count = sum(int(np.count_nonzero(mask.numpy())) for mask in self.masks)
        return count + (int(self.bias.shape[0]) if self.use_bias else 0)

    def get_prunable_weights(self):
        """The factor weights (tfmot's ``PrunableLayer`` interface): pruning
        them by magnitude keeps each factor inside its support."""
        return list(self.factor_weights)

    def get_config(self):
        config = super().get_config()
        config.update(
            n_factors=self.n_factors, sparsity=self.sparsity, rank=self.rank, seed=self.seed,
        )
        return config

    @staticmethod
    def _fitted_values(factors, supports, bias):
        """``initial_values`` for fitted factors (support = nonzeros if not given)."""
        factors = [np.asarray(f, dtype=np.float32) for f in factors]
        if supports is None:
            supports = [f != 0 for f in factors]
        values = {}
        for index, (factor, support) in enumerate(zip(factors, supports)):
            values[f"factor_{index}"] = factor
            values[f"mask_{index}"] = np.asarray(support, dtype=np.float32)
        if bias is not None:
            values["bias"] = np.asarray(bias, dtype=np.float32)
        return values


@register_serializable
class SparseFactorDense(_SparseFactors):
    """``Dense`` whose kernel is a product of Q sparse factors.

    ``outputs = activation(inputs @ (F_1 ... F_Q) + bias)``, computed as
    ``inputs @ F_1 @ ... @ F_Q`` in the cheaper association order. Accepts
    inputs of any rank >= 2, like ``Dense``.

    Args:
        units: output size.
        n_factors: Q, the number of sparse factors.
        sparsity: K, nonzeros per row and column of each factor when the
            support is drawn at random (a fitted layer keeps its own).
        rank: inner size r of the factors; min(in, units) by default.
        seed: seed of the random support and weights.
        activation, use_bias: as in ``Dense``.
    """

    def __init__(self, units, n_factors=3, sparsity=14, rank=None, seed=None, **kwargs):
        super().__init__(n_factors=n_factors, sparsity=sparsity, rank=rank, seed=seed, **kwargs)
        self.units = check_int(units, "units", minimum=1, where=f"SparseFactorDense {self.name!r}")

    def build(self, input_shape):
        in_dim = input_shape[-1]
        if in_dim is None:
            raise ValueError(
                f"SparseFactorDense {self.name!r}: the last input dimension must be "
                f"known, got input shape {tuple(input_shape)}."
            )
        self._build_factors(int(in_dim), self.units)
        self._add_bias(self.units)
        self.built = True

    def call(self, inputs):
        inputs = tf.cast(inputs, self.compute_dtype)
        outputs = matmul_last_axis(inputs, lambda x: chain_matmul(x, self.factors))
        return self._finish(outputs)

    def export_call(self, inputs):
        """The forward TFLite export traces (``keras_psm.export``): the factors
        applied to the input one at a time, so that the converter keeps them
        as separate sparse constants instead of folding their product."""
        inputs = tf.cast(inputs, self.compute_dtype)
        outputs = matmul_last_axis(inputs, lambda x: apply_in_sequence(x, self.factors))
        return self._finish(outputs)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    @property
    def kernel(self):
        """The (in, units) kernel ``F_1 @ ... @ F_Q``."""
        return self._product("float32")

    def get_config(self):
        config = super().get_config()
        config.update(units=self.units)
        return config

    @classmethod
    def from_factors(cls, factors, supports=None, bias=None, **kwargs):
        """A layer starting from fitted ``factors`` (lambda folded in).

        ``supports`` default to the nonzeros of the factors; ``kwargs`` are
        the other constructor arguments (``activation``, ``name``, ...).
        """
        factors = list(factors)
        kwargs.setdefault("use_bias", bias is not None)
        return cls(
            units=np.shape(factors[-1])[1],
            n_factors=len(factors),
            rank=np.shape(factors[0])[1] if len(factors) > 1 else None,
            initial_values=cls._fitted_values(factors, supports, bias),
            **kwargs,
        )

    @classmethod
    def from_layer(cls, layer, n_factors=3, sparsity=14, **palm_options):
        """Fit a trained ``Dense`` with palm4MSA and return its replacement."""
        kernel, *bias = layer.get_weights()
        fit = palm4msa(kernel, n_factors, sparsity, **palm_options)
        return cls.from_factors(
            fit.factors, fit.supports, bias[0] if bias else None,
            sparsity=sparsity, **common_options(layer),
        )


@register_serializable
class SparseFactorConv2D(_SparseFactors):
    """``Conv2D`` whose kernel matrix (kh * kw * cin, filters) is a product of Q
    sparse factors.

    The kernel is rebuilt from the product and passed to the ordinary
    convolution (PSM supplement A.3); ``strides``, ``padding``,
    ``dilation_rate`` and ``data_format`` behave as in ``Conv2D``.
    """

    def __init__(self, filters, kernel_size, n_factors=3, sparsity=14, rank=None, seed=None,
                 strides=1, padding="valid", dilation_rate=1, data_format=None, **kwargs):
        super().__init__(n_factors=n_factors, sparsity=sparsity, rank=rank, seed=seed, **kwargs)
        where = f"SparseFactorConv2D {self.name!r}"
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

    def build(self, input_shape):
        channels = input_shape[self._channel_axis]
        if channels is None:
            raise ValueError(
                f"SparseFactorConv2D {self.name!r}: the channel dimension must be "
                f"known, got input shape {tuple(input_shape)}."
            )
        self.in_channels = int(channels)
        kh, kw = self.kernel_size
        self._build_factors(kh * kw * self.in_channels, self.filters)
        self._add_bias(self.filters)
        self.built = True

    @property
    def kernel(self):
        """The (kh, kw, cin, filters) kernel rebuilt from the factors."""
        return tf.reshape(self._product("float32"), self.kernel_size + (self.in_channels, self.filters))

    def call(self, inputs):
        inputs = tf.cast(inputs, self.compute_dtype)
        kernel = tf.reshape(self._product(self.compute_dtype), self.kernel_size + (self.in_channels, self.filters))
        outputs = convolve(inputs, kernel, self.strides, self.padding, self.dilation_rate,
                           self.data_format)
        return self._finish(outputs, self._channel_axis)

    def export_call(self, inputs):
        """The forward TFLite export traces (``keras_psm.export``): a convolution
        by the first factor reshaped to (kh, kw, cin, r), then the other factors
        applied to the channels one at a time (fully connected ops), so that
        the converter keeps every factor as its own sparse constant."""
        inputs = tf.cast(inputs, self.compute_dtype)
        first, *rest = self.factors
        kernel = tf.reshape(first, self.kernel_size + (self.in_channels, -1))
        outputs = convolve(inputs, kernel, self.strides, self.padding, self.dilation_rate,
                           self.data_format)
        if rest:
            channels_first = self.data_format == "channels_first"
            if channels_first:
                outputs = tf.transpose(outputs, (0, 2, 3, 1))
            outputs = matmul_last_axis(outputs, lambda x: apply_in_sequence(x, rest))
            if channels_first:
                outputs = tf.transpose(outputs, (0, 3, 1, 2))
        return self._finish(outputs, self._channel_axis)

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

    @classmethod
    def from_factors(cls, factors, kernel_size, supports=None, bias=None, **kwargs):
        """A layer starting from fitted factors of the (kh * kw * cin, filters) matrix."""
        factors = list(factors)
        kwargs.setdefault("use_bias", bias is not None)
        return cls(
            filters=np.shape(factors[-1])[1],
            kernel_size=kernel_size,
            n_factors=len(factors),
            rank=np.shape(factors[0])[1] if len(factors) > 1 else None,
            initial_values=cls._fitted_values(factors, supports, bias),
            **kwargs,
        )

    @classmethod
    def from_layer(cls, layer, n_factors=3, sparsity=14, **palm_options):
        """Fit a trained ``Conv2D`` with palm4MSA and return its replacement."""
        kernel, *bias = layer.get_weights()
        fit = palm4msa(kernel.reshape(-1, kernel.shape[-1]), n_factors, sparsity, **palm_options)
        return cls.from_factors(
            fit.factors, kernel.shape[:2], fit.supports, bias[0] if bias else None,
            sparsity=sparsity, **conv_options(layer), **common_options(layer),
        )
