"""Layers whose kernel is a product of sparse factors (the PSM layers).

Each factor is ``weight * mask`` (PSM supplement A.3): ``weight`` trainable,
``mask`` a non-trainable 0/1 weight saved with the model. Gradients outside
the mask are exactly zero, so the support never changes during ``fit``.

For a kernel matrix of shape (in, out) the Q factors have shapes
(in, r), (r, r), ..., (r, out), with r = min(in, out) unless ``rank`` is set.
A Conv2D kernel (kh, kw, cin, cout) is the matrix (kh * kw * cin, cout).
"""

import functools

import numpy as np

from keras_psm.backend import register_serializable, tf
from keras_psm.factorize.palm4msa import factor_shapes, palm4msa
from keras_psm.initializers import random_supports, sparse_factor_init
from keras_psm.litert_cost import cost_per_row
from keras_psm.layers.base import (
    CompressedLayer,
    ConvOptions,
    common_options,
    conv_options,
    fitted_values,
    matmul_last_axis,
)
from keras_psm.validation import check_int


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
    """Holds Q masked factors of an (in, out) matrix; subclasses apply them.

    ``export_form`` says how ``export_call`` applies them: ``"sequence"``
    (one op per factor, each factor its own sparse constant in the file) or
    ``"product"`` (one op with the product kernel); ``keras_psm.export``
    sets it on its export copy.
    """

    export_form = "sequence"

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
        shapes = factor_shapes((n_rows, n_cols), self.n_factors, self.rank)
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

    def cheaper_export_form(self):
        """``"sequence"``, or ``"product"`` where LiteRT runs the product faster.

        Compares the multiply-adds per output row ``litert_cost`` predicts for
        the factors applied one at a time and for their product. In a
        Conv2D layer the first factor and the product are convolution
        kernels, which LiteRT always runs dense.
        """
        factors = [np.asarray(f) for f in self._factors("float32")]
        convolution = isinstance(self, ConvOptions)
        sequence = sum(cost_per_row(factor, fully_connected=not (convolution and index == 0))
                       for index, factor in enumerate(factors))
        product = cost_per_row(functools.reduce(np.matmul, factors),
                               fully_connected=not convolution)
        return "sequence" if sequence <= product else "product"

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

    @classmethod
    def _from_factors(cls, factors, supports, bias, **kwargs):
        """A layer starting from fitted factors (supports: their nonzeros by default)."""
        factors = [np.asarray(f, dtype=np.float32) for f in factors]
        if supports is None:
            supports = [f != 0 for f in factors]
        kwargs.setdefault("use_bias", bias is not None)
        values = {}
        for index, (factor, support) in enumerate(zip(factors, supports)):
            values[f"factor_{index}"] = factor
            values[f"mask_{index}"] = support
        return cls(
            n_factors=len(factors),
            rank=factors[0].shape[1] if len(factors) > 1 else None,
            initial_values=fitted_values(bias, **values),
            **kwargs,
        )

    @classmethod
    def replacing(cls, layer, factors, supports=None, **kwargs):
        """A layer with ``factors`` standing in for the trained Dense/Conv2D
        ``layer``: same name, dtype policy, activation, bias and conv options."""
        options = common_options(layer)
        if issubclass(cls, ConvOptions):
            options.update(conv_options(layer), kernel_size=layer.kernel_size)
        bias = layer.get_weights()[1] if layer.use_bias else None
        return cls.from_factors(factors, supports=supports, bias=bias, **options, **kwargs)

    @classmethod
    def from_layer(cls, layer, n_factors=3, sparsity=14, **palm_options):
        """Fit a trained Dense/Conv2D kernel with palm4MSA; return its replacement."""
        kernel = layer.get_weights()[0]
        fit = palm4msa(kernel.reshape(-1, kernel.shape[-1]), n_factors, sparsity, **palm_options)
        return cls.replacing(layer, fit.factors, fit.supports, sparsity=sparsity)


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
        """The forward TFLite export traces (``keras_psm.export``). In the
        ``"sequence"`` form the factors are applied to the input one at a
        time, so that the converter keeps them as separate sparse constants
        instead of folding their product; in the ``"product"`` form the
        input meets the product kernel."""
        inputs = tf.cast(inputs, self.compute_dtype)
        if self.export_form == "product":
            kernel = self._product(self.compute_dtype)
            outputs = matmul_last_axis(inputs, lambda x: tf.matmul(x, kernel))
        else:
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
        return cls._from_factors(factors, supports, bias, units=np.shape(factors[-1])[1],
                                 **kwargs)


@register_serializable
class SparseFactorConv2D(ConvOptions, _SparseFactors):
    """``Conv2D`` whose kernel matrix (kh * kw * cin, filters) is a product of Q
    sparse factors.

    The kernel is rebuilt from the product and passed to the ordinary
    convolution (PSM supplement A.3); ``strides``, ``padding``,
    ``dilation_rate`` and ``data_format`` behave as in ``Conv2D``.
    """

    def build(self, input_shape):
        self.in_channels = self._input_channels(input_shape)
        kh, kw = self.kernel_size
        self._build_factors(kh * kw * self.in_channels, self.filters)
        self._add_bias(self.filters)
        self.built = True

    def _conv_kernel(self, dtype):
        return tf.reshape(self._product(dtype), self.kernel_size + (self.in_channels, self.filters))

    @property
    def kernel(self):
        """The (kh, kw, cin, filters) kernel rebuilt from the factors."""
        return self._conv_kernel("float32")

    def call(self, inputs):
        outputs = self._conv(self._to_channels_last(inputs), self._conv_kernel(self.compute_dtype),
                             self.strides, self.dilation_rate)
        return self._from_channels_last(self._finish(outputs))

    def export_call(self, inputs):
        """The forward TFLite export traces (``keras_psm.export``). In the
        ``"sequence"`` form: a convolution by the first factor reshaped to
        (kh, kw, cin, r), then the other factors applied to the channels one
        at a time (fully connected ops), so that the converter keeps every
        factor as its own sparse constant. In the ``"product"`` form: one
        convolution by the product kernel, as in ``call`` (which the export
        copy replaces by this method)."""
        if self.export_form == "product":
            return SparseFactorConv2D.call(self, inputs)
        first, *rest = self.factors
        kernel = tf.reshape(first, self.kernel_size + (self.in_channels, -1))
        outputs = self._conv(self._to_channels_last(inputs), kernel, self.strides,
                             self.dilation_rate)
        if rest:
            outputs = matmul_last_axis(outputs, lambda x: apply_in_sequence(x, rest))
        return self._from_channels_last(self._finish(outputs))

    @classmethod
    def from_factors(cls, factors, kernel_size, supports=None, bias=None, **kwargs):
        """A layer starting from fitted factors of the (kh * kw * cin, filters) matrix."""
        return cls._from_factors(factors, supports, bias, filters=np.shape(factors[-1])[1],
                                 kernel_size=kernel_size, **kwargs)
