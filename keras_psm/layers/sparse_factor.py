"""Layers whose kernel is a product of sparse factors (the PSM layers).

Each factor is ``weight * mask`` on a fixed support (PSM supplement A.3),
held compactly, as its supplement's footnote suggests: ``values_i`` (its
nonzero values, trainable, shape (nnz_i,)) and ``indices_i`` (the support, as
sorted flat positions ``row * n_cols + col``, int32, non-trainable, saved
with the model). Memory, ``.keras`` bytes and optimizer state are O(nnz),
and gradients exist only on the support, by construction. A layer built
with ``prunable=True`` also holds ``keep_i``, a 0/1 mask over the stored
values, so that magnitude pruning can remove entries during ``fit``.

For a kernel matrix of shape (in, out) the Q factors have shapes
(in, r), (r, r), ..., (r, out), with r = min(in, out) unless ``rank`` is set.
A Conv2D kernel (kh, kw, cin, cout) is the matrix (kh * kw * cin, cout).
"""

import functools
import typing

import numpy as np
import scipy.sparse as sps

from keras_psm import ops
from keras_psm.backend import register_serializable
from keras_psm.factorize.palm4msa import factor_shapes, palm4msa
from keras_psm.initializers import random_supports, sparse_factor_init
from keras_psm.layers.base import (
    CompressedLayer,
    ConvOptions,
    common_options,
    conv_options,
    fitted_values,
    matmul_last_axis,
)
from keras_psm.layers.sparse_matrix import SparseMatrix
from keras_psm.validation import check_bool, check_int

#: A multiply-add of a sparse product (``SparseMatrix``) costs about this many
#: multiply-adds of a dense ``matmul`` on CPU, forward and backward together: the
#: two break even between 0.3% and 1% density (``python benchmarks/footprint.py
#: --break-even``: factors from 512 x 512 to 4608 x 512 at 256 to 4096 rows, on
#: TensorFlow 2.21 and on JAX alike, docs/backends.md). A factor whose density is
#: below ``1 / SPARSE_SLOWDOWN`` is applied as a sparse product.
SPARSE_SLOWDOWN = 100.0


def compact_factor(factor, support):
    """``(values, indices)`` of ``factor`` on ``support``: the sorted flat positions
    ``row * n_cols + col`` of the support (int32) and the factor's entries there.

    ``factor`` and ``support`` may be NumPy arrays or SciPy sparse arrays (a
    butterfly fit's), which are never made dense.
    """
    if sps.issparse(support):
        rows, cols = sps.coo_array(support).nonzero()
    else:
        rows, cols = np.nonzero(np.asarray(support, dtype=bool))
    order = np.lexsort((cols, rows))
    rows, cols = rows[order], cols[order]
    if sps.issparse(factor):
        values = np.asarray(sps.csr_array(factor)[rows, cols]).ravel()
    else:
        values = np.asarray(factor)[rows, cols]
    indices = rows.astype(np.int64) * np.shape(support)[1] + cols
    return values.astype(np.float32), indices.astype(np.int32)


def multiply(inputs, factor):
    """``inputs @ factor`` for a dense ``factor`` or a ``SparseMatrix``."""
    if isinstance(factor, SparseMatrix):
        return factor.applied_to(inputs)
    return ops.matmul(inputs, factor)


def apply_in_sequence(inputs, factors):
    """``(((inputs @ F1) @ F2) ... @ FQ)``: the factors applied one at a time."""
    outputs = inputs
    for factor in factors:
        outputs = multiply(outputs, factor)
    return outputs


def multiplied(factors):
    """``F1 @ ... @ FQ`` as one dense matrix, multiplied from the narrower end.

    Each factor is dense or a ``SparseMatrix``: right to left, a sparse
    factor multiplies the block on its right (``SparseMatrix.times``); left
    to right, the block multiplies it (``multiply``). A single dense or
    sparse factor is returned as it is.
    """
    if len(factors) == 1:
        return factors[0]
    if factors[-1].shape[1] <= factors[0].shape[0]:    # (F1 (F2 (... FQ)))
        matrix = _as_dense(factors[-1])
        for factor in reversed(factors[:-1]):
            matrix = (factor.times(matrix) if isinstance(factor, SparseMatrix)
                      else ops.matmul(factor, matrix))
        return matrix
    return apply_in_sequence(_as_dense(factors[0]), factors[1:])


def _as_dense(factor):
    """A dense or ``SparseMatrix`` factor as a dense matrix."""
    return factor.to_dense() if isinstance(factor, SparseMatrix) else factor


def product_cost(shapes, row_costs):
    """Multiply-adds of ``multiplied`` on factors of ``shapes``: from the narrower
    end, factor i costs ``row_costs[i]`` per row (or column) of the other side."""
    (d0, _), (_, dq) = shapes[0], shapes[-1]
    if len(shapes) == 1:
        return 0
    return dq * sum(row_costs[:-1]) if dq <= d0 else d0 * sum(row_costs[1:])


class Plan(typing.NamedTuple):
    """One way to apply factors ``F_1 .. F_Q`` to ``n`` rows, costing
    ``fixed_cost + n * row_cost`` multiply-adds: ``F_1 .. F_split`` multiplied
    into one matrix and applied first, then ``F_split+1 .. F_Q`` one at a
    time, or as their product when ``rest_multiplied``."""

    split: int
    rest_multiplied: bool
    fixed_cost: float
    row_cost: float

    def cost(self, n_rows):
        return self.fixed_cost + n_rows * self.row_cost

    def groups(self, factors):
        """``factors`` (dense or sparse) grouped as this plan applies them."""
        first, rest = factors[:self.split], factors[self.split:]
        return [multiplied(first)] + ([multiplied(rest)] if self.rest_multiplied else rest)


def application_plans(shapes, row_costs):
    """The plans worth considering for factors of ``shapes``: each the cheapest for
    some number of rows ``n >= 1`` (the lower envelope of their costs in ``n``).

    ``row_costs[i]``: multiply-adds per row of factor i in the form it is
    applied (``rows * cols`` dense, ``nnz * SPARSE_SLOWDOWN`` sparse). A
    group of several factors is applied as its dense product.
    """
    plans = []
    for split in range(1, len(shapes) + 1):
        first = Plan(split, False, product_cost(shapes[:split], row_costs[:split]),
                     row_costs[0] if split == 1 else shapes[0][0] * shapes[split - 1][1])
        rest_shapes, rest_costs = shapes[split:], row_costs[split:]
        plans.append(first._replace(row_cost=first.row_cost + sum(rest_costs)))
        if len(rest_shapes) > 1:
            plans.append(Plan(split, True,
                              first.fixed_cost + product_cost(rest_shapes, rest_costs),
                              first.row_cost + rest_shapes[0][0] * rest_shapes[-1][1]))
    crossings = [(b.fixed_cost - a.fixed_cost) / (a.row_cost - b.row_cost)
                 for a in plans for b in plans if a.row_cost > b.row_cost]
    points = sorted({1.0} | {n for n in crossings if n > 1})
    samples = points + [(a + b) / 2 for a, b in zip(points, points[1:])] + [2 * points[-1]]
    kept = {min(plans, key=lambda plan: plan.cost(n)) for n in samples}
    kept.add(min(plans, key=lambda plan: (plan.row_cost, plan.fixed_cost)))
    return sorted(kept, key=lambda plan: -plan.row_cost)


def cheapest(plans, n_rows, apply):
    """``apply(plan)`` for the plan of least cost for ``n_rows`` rows: chosen now for
    an int (JAX and PyTorch always know the batch size), or when the graph runs
    (``ops.switch``) for a tensor (a TensorFlow graph of unknown batch size)."""
    if len(plans) == 1:
        return apply(plans[0])
    if isinstance(n_rows, int):
        return apply(min(plans, key=lambda plan: plan.cost(n_rows)))
    costs = (ops.convert_to_tensor([plan.fixed_cost for plan in plans], "float64")
             + ops.cast(n_rows, "float64")
             * ops.convert_to_tensor([plan.row_cost for plan in plans], "float64"))
    return ops.switch(ops.cast(ops.argmin(costs), "int32"),
                      [functools.partial(apply, plan) for plan in plans])


def _first_positions(shape, dtype=None, **kwargs):
    """Indices of a layer rebuilt before its saved weights load: 0 .. nnz-1."""
    return ops.arange(shape[0], dtype=dtype or "int32")


class _SparseFactors(CompressedLayer):
    """Holds Q compact sparse factors of an (in, out) matrix; subclasses apply them.

    ``export_form`` is None in training. In the copy that TFLite export
    traces, ``keras_psm.export`` sets it to an ``ExportForm``, and ``call``
    applies the constant factors it supplies (``export_form.factors(dtype)``)
    with its ``apply(inputs, factors)``, each factor its own op.
    ``first_factor_convolves`` says how ``call`` uses the factors: in a
    convolution the first one is the convolution kernel.
    """

    export_form = None
    first_factor_convolves = False

    def __init__(self, n_factors=3, sparsity=14, rank=None, seed=None, nonzeros=None,
                 prunable=False, **kwargs):
        super().__init__(**kwargs)
        where = f"{type(self).__name__} {self.name!r}"
        self.n_factors = check_int(n_factors, "n_factors", minimum=1, where=where)
        self.sparsity = check_int(sparsity, "sparsity", minimum=1, where=where)
        self.rank = check_int(rank, "rank", minimum=1, where=where, allow_none=True)
        self.seed = check_int(seed, "seed", minimum=0, where=where, allow_none=True)
        self.prunable = check_bool(prunable, "prunable", where=where)
        if nonzeros is not None:
            nonzeros = [check_int(n, "nonzeros", minimum=0, where=where) for n in nonzeros]
            if len(nonzeros) != self.n_factors:
                raise ValueError(f"{where}: `nonzeros` must list one count per factor "
                                 f"({self.n_factors}), got {nonzeros}.")
        self.nonzeros = nonzeros

    def _build_factors(self, n_rows, n_cols):
        """Create ``values_i``, ``indices_i`` (and ``keep_i`` if prunable), i = 0..Q-1.

        Without fitted values or ``nonzeros`` the supports are random
        (``splincol`` of a Gaussian) and the values sparse He / Xavier
        (supplement A.3). With ``nonzeros`` only (a saved layer being
        rebuilt), the variables get their sizes and wait for the saved weights.
        """
        where = f"{type(self).__name__} {self.name!r}"
        self.factor_shapes = factor_shapes((n_rows, n_cols), self.n_factors, self.rank)
        if max(rows * cols for rows, cols in self.factor_shapes) >= 2 ** 31:
            raise ValueError(f"{where}: factors of shapes {self.factor_shapes} have more "
                             "entries than int32 flat indices address (2**31).")
        fitted = any(name.startswith("indices_") for name in self._initial_values)
        if not fitted and self.nonzeros is None:
            rng = np.random.default_rng(self.seed)
            supports = random_supports(self.factor_shapes, self.sparsity, rng)
            weights = sparse_factor_init(supports, rng)
            for index, (weight, support) in enumerate(zip(weights, supports)):
                values, indices = compact_factor(weight, support)
                self._initial_values[f"values_{index}"] = values
                self._initial_values[f"indices_{index}"] = indices
            fitted = True
        if fitted:
            self.nonzeros = [len(self._initial_values[f"indices_{index}"])
                             for index in range(self.n_factors)]
        for (rows, cols), count in zip(self.factor_shapes, self.nonzeros):
            if count > rows * cols:
                raise ValueError(f"{where}: `nonzeros` {self.nonzeros} exceed the entries "
                                 f"of factors of shapes {self.factor_shapes}.")
        self.values, self.indices, self.keeps = [], [], []
        for index, count in enumerate(self.nonzeros):
            self.values.append(self._add_weight(f"values_{index}", (count,), "zeros"))
            self.indices.append(self._add_weight(f"indices_{index}", (count,), _first_positions,
                                                 trainable=False, dtype="int32"))
            if self.prunable:
                self.keeps.append(self._add_weight(f"keep_{index}", (count,), "ones",
                                                   trainable=False))

    def _sparse_matrix(self, index, values):
        """Factor ``index`` with ``values`` on its support, as a ``SparseMatrix``."""
        flat = ops.cast(self.indices[index], "int32")
        n_cols = self.factor_shapes[index][1]
        return SparseMatrix(flat // n_cols, flat % n_cols, values, self.factor_shapes[index])

    def _kept_values(self, index, dtype):
        values = ops.cast(self.values[index], dtype)
        if self.prunable:
            values = values * ops.cast(self.keeps[index], dtype)
        return values

    def _dense_factor(self, index, dtype):
        """Factor ``index`` as a dense matrix: its values scattered on its support."""
        return self._sparse_matrix(index, self._kept_values(index, dtype)).to_dense()

    def _is_sparse(self, index):
        """Whether ``call`` applies factor ``index`` as a sparse product (cost rule)."""
        rows, cols = self.factor_shapes[index]
        return self.nonzeros[index] * SPARSE_SLOWDOWN < rows * cols

    def _applied_sparse(self, conv_first=False):
        """Per factor, whether ``call`` applies it as a sparse product (the cost rule;
        a convolution's first factor is always dense)."""
        return [self._is_sparse(index) and not (conv_first and index == 0)
                for index in range(self.n_factors)]

    def _operands(self, dtype, conv_first=False):
        """Each factor in the form ``call`` applies it: dense, or a ``SparseMatrix``."""
        return [self._sparse_matrix(index, self._kept_values(index, dtype)) if sparse
                else self._dense_factor(index, dtype)
                for index, sparse in enumerate(self._applied_sparse(conv_first))]

    def _plans(self, conv_first=False):
        """The ``application_plans`` of this layer's factors, in their ``call`` forms."""
        sparse = self._applied_sparse(conv_first)
        costs = [self.nonzeros[index] * SPARSE_SLOWDOWN if sparse[index] else rows * cols
                 for index, (rows, cols) in enumerate(self.factor_shapes)]
        return application_plans(self.factor_shapes, costs)

    def _factors(self, dtype):
        return [self._dense_factor(index, dtype) for index in range(self.n_factors)]

    def _product(self, dtype):
        """The product of the factors as one dense (in, out) matrix (``multiplied``)."""
        return _as_dense(multiplied(self._operands(dtype)))

    @property
    def factors(self):
        """The effective dense factors ``weight * mask``, in the compute dtype."""
        return self._factors(self.compute_dtype)

    @property
    def masks(self):
        """The dense 0/1 supports (float32), pruned entries removed."""
        masks = []
        for index in range(self.n_factors):
            kept = (ops.cast(self.keeps[index], "float32") if self.prunable
                    else ops.ones(self.indices[index].shape, "float32"))
            masks.append(self._sparse_matrix(index, kept).to_dense())
        return masks

    def count_nonzero_params(self):
        """Entries of all supports (pruned ones excluded) plus the bias."""
        if self.prunable:
            count = sum(int(np.count_nonzero(keep.numpy())) for keep in self.keeps)
        else:
            count = sum(self.nonzeros)
        return count + (int(self.bias.shape[0]) if self.use_bias else 0)

    def get_prunable_weights(self):
        """The stored values (tfmot's ``PrunableLayer`` interface): pruning
        them by magnitude keeps each factor inside its support."""
        return list(self.values)

    def keeping(self, keeps):
        """A new layer, same config and weights, holding only the stored entries
        ``keeps`` selects (one boolean array over ``values_i`` per factor).

        Removed entries leave the storage: the new layer's support is smaller.
        """
        if len(keeps) != self.n_factors:
            raise ValueError(f"{type(self).__name__} {self.name!r}: `keeps` must hold one "
                             f"array per factor ({self.n_factors}), got {len(keeps)}.")
        initial_values = {} if self.bias is None else {"bias": self.bias.numpy()}
        for index, keep in enumerate(keeps):
            keep = np.asarray(keep, dtype=bool)
            if self.prunable:
                keep = keep & (self.keeps[index].numpy() > 0)
            initial_values[f"values_{index}"] = self.values[index].numpy()[keep]
            initial_values[f"indices_{index}"] = self.indices[index].numpy()[keep]
        layer = type(self).from_config(dict(self.get_config(), nonzeros=None))
        layer._initial_values.update(initial_values)
        return layer

    def get_config(self):
        config = super().get_config()
        config.update(
            n_factors=self.n_factors, sparsity=self.sparsity, rank=self.rank, seed=self.seed,
            nonzeros=None if self.nonzeros is None else list(self.nonzeros),
            prunable=self.prunable,
        )
        return config

    @classmethod
    def _from_factors(cls, factors, supports, bias, **kwargs):
        """A layer starting from fitted factors (supports: their nonzeros by default)."""
        factors = [f if sps.issparse(f) else np.asarray(f, dtype=np.float32) for f in factors]
        if supports is None:
            supports = [f != 0 for f in factors]
        kwargs.setdefault("use_bias", bias is not None)
        initial_values = fitted_values(bias)
        for index, (factor, support) in enumerate(zip(factors, supports)):
            values, indices = compact_factor(factor, support)
            initial_values[f"values_{index}"] = values
            initial_values[f"indices_{index}"] = indices
        return cls(
            n_factors=len(factors),
            rank=factors[0].shape[1] if len(factors) > 1 else None,
            initial_values=initial_values,
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
    """``Dense`` whose kernel is a product of Q compact sparse factors.

    ``outputs = activation(inputs @ (F_1 ... F_Q) + bias)``. Each factor is
    applied dense (its values scattered into the matrix) or as a sparse
    product, whichever is cheaper (``SPARSE_SLOWDOWN``); the factors are
    grouped by the ``Plan`` of fewest multiply-adds for the number of rows
    (one at a time, the product first, or the product of the first ones
    then the rest). Accepts inputs of any rank >= 2, like ``Dense``.

    Args:
        units: output size.
        n_factors: Q, the number of sparse factors.
        sparsity: K, nonzeros per row and column of each factor when the
            support is drawn at random (a fitted layer keeps its own).
        rank: inner size r of the factors; min(in, units) by default.
        seed: seed of the random support and weights.
        nonzeros: the support size of each factor; set by a built layer in
            its config, so that a saved layer is rebuilt with its sizes.
        prunable: also hold a 0/1 mask over the stored values, which
            magnitude pruning during ``fit`` updates (``keras_psm.pruning``).
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
        inputs = ops.cast(inputs, self.compute_dtype)
        if self.export_form is not None:
            factors = self.export_form.factors(self.compute_dtype)
            return self._finish(matmul_last_axis(
                inputs, lambda x: self.export_form.apply(x, factors)))
        operands, plans = self._operands(self.compute_dtype), self._plans()

        def compute(x):
            n_rows = ops.shape(x)[0]
            return cheapest(plans, n_rows,
                            lambda plan: apply_in_sequence(x, plan.groups(operands)))

        return self._finish(matmul_last_axis(inputs, compute))

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
    compact sparse factors.

    ``call`` runs a convolution by the product of the first factors
    reshaped to (kh, kw, cin, r), then the other factors as matrix products
    over the (batch * H * W, channels) outputs, one at a time (each dense or
    sparse by ``SPARSE_SLOWDOWN``) or as their product: the ``Plan`` of fewest
    multiply-adds for the number of output pixels. With every factor in the
    convolution this is the PSM supplement's form (A.3). ``strides``,
    ``padding``, ``dilation_rate`` and ``data_format`` behave as in ``Conv2D``.
    """

    first_factor_convolves = True

    def build(self, input_shape):
        self.in_channels = self._input_channels(input_shape)
        kh, kw = self.kernel_size
        self._build_factors(kh * kw * self.in_channels, self.filters)
        self._add_bias(self.filters)
        self.built = True

    def _as_conv_kernel(self, matrix):
        """A (kh * kw * cin, r) matrix as a (kh, kw, cin, r) convolution kernel."""
        return ops.reshape(matrix, self.kernel_size + (self.in_channels, -1))

    def _conv_kernel(self, dtype):
        return self._as_conv_kernel(self._product(dtype))

    @property
    def kernel(self):
        """The (kh, kw, cin, filters) kernel rebuilt from the factors."""
        return self._conv_kernel("float32")

    def _first_then_rest(self, inputs, first, rest, apply=apply_in_sequence):
        """Convolution by the dense ``first`` matrix, then ``rest`` on the channels
        (``apply``: ``apply_in_sequence``, or ``export_form.apply`` for an export)."""
        outputs = self._conv(inputs, self._as_conv_kernel(first), self.strides, self.dilation_rate)
        if rest:
            outputs = matmul_last_axis(outputs, lambda x: apply(x, rest))
        return outputs

    def call(self, inputs):
        inputs = self._to_channels_last(inputs)
        if self.export_form is not None:
            first, *rest = self.export_form.factors(self.compute_dtype)
            outputs = self._first_then_rest(inputs, first, rest, self.export_form.apply)
            return self._from_channels_last(self._finish(outputs))
        operands = self._operands(self.compute_dtype, conv_first=True)

        def apply(plan):
            first, *rest = plan.groups(operands)
            return self._first_then_rest(inputs, first, rest)

        outputs = cheapest(self._plans(conv_first=True), self._output_pixels(inputs), apply)
        return self._from_channels_last(self._finish(outputs))

    def _output_pixels(self, inputs):
        """batch * H_out * W_out of the NHWC ``inputs``: an int, or a tensor."""
        sizes = ops.shape(inputs)[:3]
        count = sizes[0]
        for axis in (1, 2):
            size, stride = sizes[axis], self.strides[axis - 1]
            if self.padding == "valid":
                size = size - (self.kernel_size[axis - 1] - 1) * self.dilation_rate[axis - 1]
            count = count * ((size + stride - 1) // stride)
        return count

    @classmethod
    def from_factors(cls, factors, kernel_size, supports=None, bias=None, **kwargs):
        """A layer starting from fitted factors of the (kh * kw * cin, filters) matrix."""
        return cls._from_factors(factors, supports, bias, filters=np.shape(factors[-1])[1],
                                 kernel_size=kernel_size, **kwargs)
