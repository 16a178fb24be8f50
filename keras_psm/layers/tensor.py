"""Tensor-decomposition layers, the PSM paper's low-rank baselines (section 3.1).

- ``TuckerConv``: a Conv2D kernel as its Tucker-2 decomposition on the
  channel modes (Kim et al., 2016): a 1 x 1 convolution cin -> r1, the
  kh x kw convolution r1 -> r2 with the core, a 1 x 1 convolution r2 -> cout.
- ``TTDense``: a Dense kernel as a tensor-train matrix (Novikov et al.,
  2015). The input, reshaped to (i_1, ..., i_M), meets the cores one at a
  time, so the (in, units) matrix is never formed.
- ``TTConv2D``: a Conv2D kernel whose (kh kw cin, cout) matrix is a TT
  matrix with modes (kh kw, c_1, ..., c_{M-1}) x (1, f_1, ..., f_{M-1}), the
  tensorization of Garipov et al. (2016). The kernel is rebuilt from the
  cores at each call and passed to the ordinary convolution: the
  activations keep their size, whereas applying the cores to the input,
  as Garipov et al. do, multiplies them by the first TT rank (the memory
  problem of the PSM paper's supplement A.6).

Sizes that do not factor are padded: ``prod(input_factors)`` may exceed the
input size (the input gets zero features, TTDense) or ``prod(channel_factors)``
the input channels (the rebuilt kernel is cut, TTConv2D), and the extra
outputs are dropped.
"""

import math

import numpy as np

from keras_psm import ops
from keras_psm.backend import keras, register_serializable
from keras_psm.layers.base import fitted_values
from keras_psm.layers.lowrank import ConvFactorsLayer, DenseReplacement
from keras_psm.validation import check_int


@register_serializable
class TuckerConv(ConvFactorsLayer):
    """``Conv2D`` as 1 x 1 (cin -> r1), kh x kw (r1 -> r2), 1 x 1 (r2 -> filters).

    The kh x kw convolution keeps the original ``strides``, ``padding`` and
    ``dilation_rate``; the 1 x 1 convolutions have stride 1. The kernel is
    ``K[a, b, c, o] = sum_{s, t} core[a, b, s, t] U_in[c, s] U_out[o, t]``.

    Args:
        filters, kernel_size: of the replaced ``Conv2D``.
        ranks: (r1, r2), the Tucker ranks of the input and output channel modes.
        strides, padding, dilation_rate, data_format, activation, use_bias:
            as in ``Conv2D``.
    """

    def __init__(self, filters, kernel_size, ranks, **kwargs):
        super().__init__(filters, kernel_size, **kwargs)
        where = f"TuckerConv {self.name!r}"
        ranks = tuple(ranks) if isinstance(ranks, (list, tuple)) else (ranks,)
        if len(ranks) != 2:
            raise ValueError(f"{where}: `ranks` must be a pair (r1, r2), got {ranks!r}.")
        self.ranks = tuple(check_int(r, "ranks", minimum=1, where=where) for r in ranks)

    def build(self, input_shape):
        channels = self._input_channels(input_shape)
        r1, r2 = self.ranks
        self.input_kernel = self._add_weight("input_kernel", (1, 1, channels, r1),
                                             "glorot_uniform")
        self.core_kernel = self._add_weight("core_kernel", self.kernel_size + (r1, r2),
                                            "glorot_uniform")
        self.output_kernel = self._add_weight("output_kernel", (1, 1, r2, self.filters),
                                              "glorot_uniform")
        self._add_bias(self.filters)
        self.built = True

    def call(self, inputs):
        hidden = self._conv(self._to_channels_last(inputs), self.input_kernel, padding="valid")
        hidden = self._conv(hidden, self.core_kernel, self.strides, self.dilation_rate)
        outputs = self._conv(hidden, self.output_kernel, padding="valid")
        return self._from_channels_last(self._finish(outputs))

    @property
    def kernel(self):
        """The (kh, kw, cin, filters) kernel of the Tucker-2 decomposition."""
        return ops.einsum(
            "abst,cs,to->abco",
            ops.cast(self.core_kernel, "float32"),
            ops.cast(self.input_kernel[0, 0], "float32"),
            ops.cast(self.output_kernel[0, 0], "float32"),
        )

    def get_config(self):
        config = super().get_config()
        config.update(ranks=self.ranks)
        return config

    @classmethod
    def from_factors(cls, core, input_factor, output_factor, bias=None, **kwargs):
        """A layer from a fitted ``Tucker2(core, input_factor, output_factor)``."""
        kh, kw, r1, r2 = np.shape(core)
        kwargs.setdefault("use_bias", bias is not None)
        values = fitted_values(
            bias, input_kernel=np.asarray(input_factor)[None, None], core_kernel=core,
            output_kernel=np.asarray(output_factor).T[None, None],
        )
        return cls(filters=np.shape(output_factor)[0], kernel_size=(kh, kw), ranks=(r1, r2),
                   initial_values=values, **kwargs)


def _check_tt_structure(where, input_factors, output_factors, ranks):
    """Validate mode sizes and TT ranks (1, r_1, ..., r_{M-1}, 1); return them as tuples."""
    input_factors = tuple(check_int(f, "input_factors", minimum=1, where=where)
                          for f in input_factors)
    output_factors = tuple(check_int(f, "output_factors", minimum=1, where=where)
                           for f in output_factors)
    ranks = tuple(check_int(r, "ranks", minimum=1, where=where) for r in ranks)
    if not input_factors or len(input_factors) != len(output_factors):
        raise ValueError(
            f"{where}: `input_factors` {input_factors} and `output_factors` "
            f"{output_factors} must be non-empty and of the same length (one pair per core)."
        )
    if len(ranks) != len(input_factors) + 1 or ranks[0] != 1 or ranks[-1] != 1:
        raise ValueError(
            f"{where}: `ranks` must be (1, r_1, ..., r_{{M-1}}, 1) with M = "
            f"{len(input_factors)} cores, got {ranks}."
        )
    return input_factors, output_factors, ranks


def _tt_initializer(n_in, n_out, ranks):
    """Normal cores whose product has the Glorot variance 2 / (in + out).

    An entry of the product sums prod(r_1 .. r_{M-1}) products of M core
    entries, so each core gets std (2 / (in + out) / prod r)^(1 / (2 M)).
    """
    n_cores = len(ranks) - 1
    std = (2.0 / (n_in + n_out) / math.prod(ranks[1:-1])) ** (1.0 / (2 * n_cores))
    return keras.initializers.RandomNormal(stddev=std)


def tt_matrix_product(cores):
    """The full (prod i_k, prod j_k) matrix of TT cores (r_{k-1}, i_k, j_k, r_k)."""
    _, rows, cols, rank = cores[0].shape
    matrix = ops.reshape(cores[0], (rows, cols, rank))
    for core in cores[1:]:
        _, i, j, rank = core.shape
        matrix = ops.einsum("pqr,rijs->piqjs", matrix, core)
        rows, cols = rows * i, cols * j
        matrix = ops.reshape(matrix, (rows, cols, rank))
    return ops.reshape(matrix, (rows, cols))


def _add_tt_cores(layer, input_factors, output_factors, n_in, n_out):
    """Create the weights ``core_k`` (r_{k-1}, i_k, j_k, r_k) of ``layer``."""
    return [  # one initializer per core: tf_keras repeats an unseeded instance's values
        layer._add_weight(f"core_{k}", (layer.ranks[k], i, j, layer.ranks[k + 1]),
                          _tt_initializer(n_in, n_out, layer.ranks))
        for k, (i, j) in enumerate(zip(input_factors, output_factors))
    ]


@register_serializable
class TTDense(DenseReplacement):
    """``Dense`` whose kernel is a TT matrix, applied core by core.

    The input (padded with zero features to ``prod(input_factors)``) is
    reshaped to (batch, i_1, ..., i_M); core k contracts mode i_k and rank
    r_{k-1} and appends mode j_k, leaving (batch, j_1, ..., j_M), of which the
    first ``units`` outputs are kept.

    Args:
        units: output size (<= prod(output_factors)).
        input_factors, output_factors: mode sizes (i_1..i_M), (j_1..j_M).
        ranks: TT ranks (1, r_1, ..., r_{M-1}, 1).
        activation, use_bias: as in ``Dense``.
    """

    def __init__(self, units, input_factors, output_factors, ranks, **kwargs):
        super().__init__(**kwargs)
        where = f"TTDense {self.name!r}"
        self.units = check_int(units, "units", minimum=1, where=where)
        self.input_factors, self.output_factors, self.ranks = _check_tt_structure(
            where, input_factors, output_factors, ranks)
        if math.prod(self.output_factors) < self.units:
            raise ValueError(
                f"{where}: `output_factors` {self.output_factors} multiply to "
                f"{math.prod(self.output_factors)}, fewer than `units` = {self.units}."
            )

    def build(self, input_shape):
        in_dim = input_shape[-1]
        if in_dim is None or int(in_dim) > math.prod(self.input_factors):
            raise ValueError(
                f"TTDense {self.name!r}: the last input dimension must be known and at "
                f"most prod(input_factors) = {math.prod(self.input_factors)}, got input "
                f"shape {tuple(input_shape)}."
            )
        self.in_dim = int(in_dim)
        self.cores = _add_tt_cores(self, self.input_factors, self.output_factors, self.in_dim,
                                   self.units)
        self._add_bias(self.units)
        self.built = True

    def _apply(self, inputs):
        padding = math.prod(self.input_factors) - self.in_dim
        if padding:
            inputs = ops.pad(inputs, [[0, 0], [0, padding]])
        rest, done = math.prod(self.input_factors), 1
        # state: (batch, i_k, i_{k+1} .. i_M, j_1 .. j_{k-1}, r_{k-1})
        state = ops.reshape(inputs, (-1, self.input_factors[0], rest // self.input_factors[0],
                                    1, 1))
        for k, core in enumerate(self.cores):
            rest //= self.input_factors[k]
            done *= self.output_factors[k]
            state = ops.einsum("niaor,rijs->naojs", state, ops.cast(core, inputs.dtype))
            following = self.input_factors[k + 1] if k + 1 < len(self.cores) else 1
            state = ops.reshape(state, (-1, following, rest // following, done,
                                       self.ranks[k + 1]))
        return ops.reshape(state, (-1, done))[:, : self.units]

    @property
    def kernel(self):
        """The (in, units) kernel (formed here for inspection only; ``call`` never does)."""
        matrix = tt_matrix_product([ops.cast(core, "float32") for core in self.cores])
        return matrix[: self.in_dim, : self.units]

    def get_config(self):
        config = super().get_config()
        config.update(units=self.units, input_factors=self.input_factors,
                      output_factors=self.output_factors, ranks=self.ranks)
        return config

    @classmethod
    def from_cores(cls, cores, units, bias=None, **kwargs):
        """A layer from fitted cores (``tt_matrix`` of the padded kernel)."""
        kwargs.setdefault("use_bias", bias is not None)
        return cls(
            units=units,
            input_factors=[np.shape(core)[1] for core in cores],
            output_factors=[np.shape(core)[2] for core in cores],
            ranks=[1] + [np.shape(core)[3] for core in cores],
            initial_values=fitted_values(bias, **{f"core_{k}": c for k, c in enumerate(cores)}),
            **kwargs,
        )


@register_serializable
class TTConv2D(ConvFactorsLayer):
    """``Conv2D`` whose kernel is rebuilt from TT cores at every call.

    The (kh kw cin', filters') matrix, cin' = prod(channel_factors) and
    filters' = prod(filter_factors), is a TT matrix with row modes
    (kh kw, c_1, ..., c_{M-1}) and column modes (1, f_1, ..., f_{M-1}); its
    first cin input channels and ``filters`` outputs form the kernel given to
    the ordinary convolution.

    Args:
        filters, kernel_size: of the replaced ``Conv2D``.
        channel_factors, filter_factors: (c_1..c_{M-1}), (f_1..f_{M-1}).
        ranks: TT ranks (1, r_1, ..., r_{M-1}, 1).
        strides, padding, dilation_rate, data_format, activation, use_bias:
            as in ``Conv2D``.

    In the copy that TFLite export traces, ``keras_psm.export`` sets
    ``export_form`` (None in training): ``call`` then applies the cores to
    the input (``_cores_applied``), so that the file keeps them.
    """

    export_form = None

    def __init__(self, filters, kernel_size, channel_factors, filter_factors, ranks, **kwargs):
        super().__init__(filters, kernel_size, **kwargs)
        where = f"TTConv2D {self.name!r}"
        window = self.kernel_size[0] * self.kernel_size[1]
        row_modes, column_modes, self.ranks = _check_tt_structure(
            where, [window] + list(channel_factors), [1] + list(filter_factors), ranks)
        self.channel_factors, self.filter_factors = row_modes[1:], column_modes[1:]
        if math.prod(self.filter_factors) < self.filters:
            raise ValueError(
                f"{where}: `filter_factors` {self.filter_factors} multiply to "
                f"{math.prod(self.filter_factors)}, fewer than `filters` = {self.filters}."
            )

    def build(self, input_shape):
        channels = self._input_channels(input_shape)
        if channels > math.prod(self.channel_factors):
            raise ValueError(
                f"TTConv2D {self.name!r}: {channels} input channels exceed "
                f"prod(channel_factors) = {math.prod(self.channel_factors)}."
            )
        self.in_channels = channels
        window = self.kernel_size[0] * self.kernel_size[1]
        self.cores = _add_tt_cores(self, (window,) + self.channel_factors,
                                   (1,) + self.filter_factors, window * channels, self.filters)
        self._add_bias(self.filters)
        self.built = True

    def _kernel(self, dtype):
        matrix = tt_matrix_product([ops.cast(core, dtype) for core in self.cores])
        window = self.kernel_size[0] * self.kernel_size[1]
        padded = ops.reshape(matrix, (window, math.prod(self.channel_factors), -1))
        return ops.reshape(padded[:, : self.in_channels, : self.filters],
                          self.kernel_size + (self.in_channels, self.filters))

    def call(self, inputs):
        if self.export_form is not None:
            return self._cores_applied(inputs)
        kernel = self._kernel(self.compute_dtype)
        outputs = self._conv(self._to_channels_last(inputs), kernel, self.strides,
                             self.dilation_rate)
        return self._from_channels_last(self._finish(outputs))

    def _cores_applied(self, inputs):
        """The forward with the cores applied to the input (Garipov et al., 2016).

        Core k (r_k, c_k, f_k, r_{k+1}), from the last to the second, contracts
        channel mode c_k at every pixel, leaving (pixels, f_1 ... f_M, r_1); the
        first core, the window one, is then a (kh, kw, r_1, 1) convolution of
        each output mode.
        """
        x = self._to_channels_last(inputs)
        batch, height, width = ops.shape(x)[0], x.shape[1], x.shape[2]
        padded_channels = math.prod(self.channel_factors)
        if padded_channels > self.in_channels:
            x = ops.pad(x, [[0, 0], [0, 0], [0, 0], [0, padded_channels - self.in_channels]])
        state = ops.reshape(x, (-1, 1, 1))  # (pixels * c_1 ... c_M, f-modes so far, r_{M+1})
        for core, channels in zip(self.cores[:0:-1], self.channel_factors[::-1]):
            core = ops.cast(core, x.dtype)
            state = ops.reshape(state, (-1, channels) + tuple(state.shape[1:]))
            state = ops.einsum("pcfs,rcgs->pgfr", state, core)
            state = ops.reshape(state, (-1, state.shape[1] * state.shape[2], state.shape[3]))
        n_outputs, rank = state.shape[1], state.shape[2]
        state = ops.reshape(state, (batch, height, width, n_outputs, rank))
        state = ops.reshape(ops.transpose(state, (0, 3, 1, 2, 4)), (-1, height, width, rank))
        window_kernel = ops.reshape(ops.cast(self.cores[0], x.dtype), self.kernel_size + (rank, 1))
        outputs = self._conv(state, window_kernel, self.strides, self.dilation_rate)
        outputs = ops.reshape(outputs, (batch, n_outputs) + tuple(outputs.shape[1:3]))
        outputs = ops.transpose(outputs, (0, 2, 3, 1))[..., :self.filters]
        return self._from_channels_last(self._finish(outputs))

    @property
    def kernel(self):
        """The (kh, kw, cin, filters) kernel rebuilt from the cores."""
        return self._kernel("float32")

    def get_config(self):
        config = super().get_config()
        config.update(channel_factors=self.channel_factors, filter_factors=self.filter_factors,
                      ranks=self.ranks)
        return config

    @classmethod
    def from_cores(cls, cores, filters, kernel_size, bias=None, **kwargs):
        """A layer from fitted cores of the padded (kh kw cin', filters') matrix."""
        kwargs.setdefault("use_bias", bias is not None)
        return cls(
            filters=filters, kernel_size=kernel_size,
            channel_factors=[np.shape(core)[1] for core in cores[1:]],
            filter_factors=[np.shape(core)[2] for core in cores[1:]],
            ranks=[1] + [np.shape(core)[3] for core in cores],
            initial_values=fitted_values(bias, **{f"core_{k}": c for k, c in enumerate(cores)}),
            **kwargs,
        )
