"""``KroneckerDense``: a Dense layer trained as a block-wise sparse matrix.

The block-wise sparsity paper's eq. 3, in Keras orientation: the kernel
(in, units) is

    kernel = sum_{i=1..r} (S * A_i) (x) B_i

with S and A_i of shape (g_in, g_out), the grid of blocks, and B_i of shape
``block_shape = (b_in, b_out)``, one block; in = g_in b_in and
units = g_out b_out. Block (p, q) of the kernel is
``S[p, q] sum_i A_i[p, q] B_i``, so a zero of S is a zero block. The paper
writes W (m x n) acting as ``W x``; that W is this kernel transposed, with
its (m1, n1, m2, n2) = (g_out, g_in, b_out, b_in). ``block_shape`` is the
block of the (in, units) kernel, as in the paper's Table 1 (blocks (16, 2) of
the 784 x 10 MNIST kernel). Sizes that blocks do not tile are padded: the
input gets zero features and the extra outputs are dropped.

The layer trains S, A_i and B_i, r (g + b) + g values, and never forms the
kernel: the input, reshaped to (N, g_in, b_in), meets the B_i and then the
S * A_i (appendix A.1.3), or the other way round when that is cheaper, so a
step costs what Proposition 2 counts. ``l1`` adds ``l1 * ||S||_1`` to the
loss (eq. 4), which drives whole blocks to zero; ``sparsify(threshold)``
then zeroes the small entries of S for good through the non-trainable 0/1
``s_mask``. With ``compute="materialized"`` the layer multiplies by the
block-sparse kernel instead (inference).
"""

import numpy as np

from keras_psm import ops
from keras_psm.backend import keras, register_serializable
from keras_psm.factorize.kronecker import padded_shape
from keras_psm.layers.base import CompressedLayer, matmul_last_axis, normalize_tuple
from keras_psm.validation import check_choice, check_float, check_int

COMPUTE_MODES = ("factored", "materialized")


class KroneckerGeometry:
    """How blocks of ``block_shape`` tile an (n_in, n_out) kernel (padded if needed)."""

    def __init__(self, n_in, n_out, block_shape):
        self.n_in, self.n_out = int(n_in), int(n_out)
        self.block_shape = tuple(block_shape)
        self.padded_in, self.padded_out = padded_shape((n_in, n_out), block_shape)
        b_in, b_out = self.block_shape
        self.grid_shape = (self.padded_in // b_in, self.padded_out // b_out)
        g_in, g_out = self.grid_shape
        # Multiply-adds per input row and rank term of each contraction order; on a tie
        # the grid goes first (its first product is one wide matrix product).
        self.blocks_first = g_in * b_out * (b_in + g_out) < b_in * g_out * (g_in + b_out)

    def random_factors(self, rank, rng, n_terms=None):
        """A_i, B_i ~ N(0, s^2) with ``t s^4 = 2 / (in + out)``: Glorot variance with S = 1.

        ``n_terms`` (t, default ``rank``) counts every Kronecker term summed
        into the kernel, so that the sum has the Glorot variance.
        """
        std = (2.0 / (self.n_in + self.n_out) / (n_terms or rank)) ** 0.25
        return (rng.standard_normal((rank,) + self.grid_shape) * std,
                rng.standard_normal((rank,) + self.block_shape) * std)

    def apply(self, inputs, grid_factors, blocks):
        """``inputs @ kernel`` for 2-D inputs, with two contractions and no kernel.

        ``grid_factors`` (r, g_in, g_out) are the S * A_i, ``blocks`` (r, b_in, b_out)
        the B_i. The sum over i is folded into the second matrix product.
        """
        rank = int(blocks.shape[0])
        (g_in, g_out), (b_in, b_out) = self.grid_shape, self.block_shape
        if self.padded_in > self.n_in:
            inputs = ops.pad(inputs, [[0, 0], [0, self.padded_in - self.n_in]])
        if self.blocks_first:
            # t[n, p, i, c] = sum_a x[n, p, a] B_i[a, c]
            stacked_blocks = ops.reshape(ops.transpose(blocks, (1, 0, 2)), (b_in, rank * b_out))
            t = ops.matmul(ops.reshape(inputs, (-1, b_in)), stacked_blocks)
            t = ops.transpose(ops.reshape(t, (-1, g_in, rank, b_out)), (0, 3, 2, 1))
            # y[n, c, q] = sum_{i, p} t[n, p, i, c] C_i[p, q]
            outputs = ops.matmul(ops.reshape(t, (-1, rank * g_in)),
                                ops.reshape(grid_factors, (rank * g_in, g_out)))
            outputs = ops.transpose(ops.reshape(outputs, (-1, b_out, g_out)), (0, 2, 1))
        else:
            # t[n, a, i, q] = sum_p x[n, p, a] C_i[p, q]
            t = ops.transpose(ops.reshape(inputs, (-1, g_in, b_in)), (0, 2, 1))
            stacked_grid = ops.reshape(ops.transpose(grid_factors, (1, 0, 2)), (g_in, rank * g_out))
            t = ops.matmul(ops.reshape(t, (-1, g_in)), stacked_grid)
            t = ops.transpose(ops.reshape(t, (-1, b_in, rank, g_out)), (0, 3, 2, 1))
            # y[n, q, c] = sum_{i, a} t[n, a, i, q] B_i[a, c]
            outputs = ops.matmul(ops.reshape(t, (-1, rank * b_in)),
                                ops.reshape(blocks, (rank * b_in, b_out)))
        outputs = ops.reshape(outputs, (-1, self.padded_out))
        return outputs[:, :self.n_out] if self.padded_out > self.n_out else outputs

    def kernel(self, grid_factors, blocks):
        """The (n_in, n_out) kernel ``sum_i C_i (x) B_i``, cropped from the padded grid."""
        tiled = ops.einsum("ipq,iac->paqc", grid_factors, blocks)
        return ops.reshape(tiled, (self.padded_in, self.padded_out))[:self.n_in, :self.n_out]


def l1_norm(tensor):
    return ops.sum(ops.abs(ops.cast(tensor, "float32")))


def layer_input_size(layer, input_shape):
    """The last input dimension, which must be known."""
    if input_shape[-1] is None:
        raise ValueError(
            f"{type(layer).__name__} {layer.name!r}: the last input dimension must be "
            f"known, got input shape {tuple(input_shape)}."
        )
    return int(input_shape[-1])


@register_serializable
class KroneckerDense(CompressedLayer):
    """``Dense`` whose kernel is ``sum_i (S * A_i) (x) B_i`` (block-wise sparsity paper, eq. 3).

    ``outputs = activation(inputs @ kernel + bias)``, computed without forming
    the kernel. Accepts inputs of any rank >= 2, like ``Dense``.

    Args:
        units: output size.
        block_shape: (b_in, b_out), the block of the (in, units) kernel that a
            zero of S removes; an int means a square block.
        rank: r, the number of Kronecker terms.
        l1: strength of the penalty ``l1 * ||S||_1`` added to the loss (eq. 4).
            It lives in the non-trainable weight ``l1_strength``, which a
            callback (``PenaltySchedule``) may change between steps.
        compute: ``"factored"`` (two small contractions, for training) or
            ``"materialized"`` (multiply by the block-sparse kernel).
        seed: seed of the random A_i, B_i (S starts at ones).
        activation, use_bias: as in ``Dense``.

    In the copy that TFLite export traces, ``keras_psm.export`` sets
    ``export_form`` (None in training): ``call`` then always computes the
    factored form (``compute="materialized"`` would reach the file as one
    dense kernel) and adds no penalty.
    """

    export_form = None

    def __init__(self, units, block_shape, rank=2, l1=0.0, compute="factored", seed=None,
                 **kwargs):
        super().__init__(**kwargs)
        where = f"KroneckerDense {self.name!r}"
        self.units = check_int(units, "units", minimum=1, where=where)
        self.block_shape = normalize_tuple(block_shape, "block_shape", where)
        self.rank = check_int(rank, "rank", minimum=1, where=where)
        self.l1 = check_float(l1, "l1", minimum=0.0, where=where)
        self.compute = check_choice(compute, "compute", COMPUTE_MODES, where=where)
        self.seed = check_int(seed, "seed", minimum=0, where=where, allow_none=True)

    def build(self, input_shape):
        self.geometry = KroneckerGeometry(layer_input_size(self, input_shape), self.units,
                                          self.block_shape)
        grid = self.geometry.grid_shape
        if "a" not in self._initial_values:
            a, b = self.geometry.random_factors(self.rank, np.random.default_rng(self.seed))
            self._initial_values.setdefault("a", a)
            self._initial_values.setdefault("b", b)
        self.s = self._add_weight("s", grid, "ones")
        self.s_mask = self._add_weight("s_mask", grid, "ones", trainable=False)
        self.a = self._add_weight("a", (self.rank,) + grid, "zeros")
        self.b = self._add_weight("b", (self.rank,) + self.block_shape, "zeros")
        self._add_bias(self.units)
        self.l1_strength = self.add_weight(
            name="l1_strength", shape=(), trainable=False,
            initializer=keras.initializers.Constant(self.l1),
        )
        self.built = True

    def _effective_s(self, dtype):
        return ops.cast(self.s, dtype) * ops.cast(self.s_mask, dtype)

    def _grid_factors(self, dtype):
        """The stack of S * A_i, (r, g_in, g_out)."""
        return self._effective_s(dtype)[None] * ops.cast(self.a, dtype)

    def call(self, inputs):
        inputs = ops.cast(inputs, self.compute_dtype)
        dtype = self.compute_dtype
        if self.compute == "materialized" and self.export_form is None:
            kernel = self.geometry.kernel(self._grid_factors(dtype), ops.cast(self.b, dtype))
            outputs = matmul_last_axis(inputs, lambda x: ops.matmul(x, kernel))
        else:
            grid_factors, blocks = self._grid_factors(dtype), ops.cast(self.b, dtype)
            outputs = matmul_last_axis(
                inputs, lambda x: self.geometry.apply(x, grid_factors, blocks))
        if self.export_form is None:
            self.add_loss(self.l1_strength * l1_norm(self._effective_s("float32")))
        return self._finish(outputs)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    @property
    def kernel(self):
        """The (in, units) block-sparse kernel ``sum_i (S * A_i) (x) B_i``."""
        return self.geometry.kernel(self._grid_factors("float32"), ops.cast(self.b, "float32"))

    @property
    def block_sparsity(self):
        """Fraction of the blocks (entries of S * s_mask) that are exactly zero."""
        return float(np.mean(ops.convert_to_numpy(self._effective_s("float32")) == 0))

    def sparsify(self, threshold):
        """Zero for good the blocks whose ``|S|`` is at most ``threshold``.

        ``s_mask`` loses those entries (their gradient is zero from then on)
        and S is set to zero there. Returns the block sparsity.
        """
        threshold = check_float(threshold, "threshold", minimum=0.0,
                                where=f"KroneckerDense {self.name!r}.sparsify")
        s, mask = ops.convert_to_numpy(self.s), ops.convert_to_numpy(self.s_mask)
        keep = (np.abs(s) > threshold) & (mask != 0)
        self.s_mask.assign(keep.astype(mask.dtype))
        self.s.assign(np.where(keep, s, 0.0).astype(s.dtype))
        return self.block_sparsity

    def set_penalty(self, l1):
        """Set the current strength of the l1 penalty on S."""
        self.l1_strength.assign(check_float(l1, "l1", minimum=0.0,
                                            where=f"KroneckerDense {self.name!r}"))

    def count_nonzero_params(self):
        """Nonzeros of the r products S * A_i and of the B_i, plus the bias."""
        count = int(np.count_nonzero(ops.convert_to_numpy(self._grid_factors("float32"))))
        count += int(np.count_nonzero(ops.convert_to_numpy(self.b)))
        return count + (self.units if self.use_bias else 0)

    def get_config(self):
        config = super().get_config()
        config.update(units=self.units, block_shape=self.block_shape, rank=self.rank,
                      l1=self.l1, compute=self.compute, seed=self.seed)
        return config

    @classmethod
    def from_factors(cls, units, grid_factors, blocks, s=None, s_mask=None, bias=None,
                     **kwargs):
        """A layer starting from fitted A_i (r, g_in, g_out) and B_i (r, b_in, b_out).

        ``s`` defaults to ones and ``s_mask`` to the nonzeros of ``s``; the
        grid is the padded one when ``block_shape`` does not tile (in, units).
        ``kwargs`` are the other constructor arguments.
        """
        grid_factors = np.asarray(grid_factors, dtype=np.float32)
        blocks = np.asarray(blocks, dtype=np.float32)
        s = np.ones(grid_factors.shape[1:], np.float32) if s is None else np.asarray(s, np.float32)
        values = dict(a=grid_factors, b=blocks, s=s,
                      s_mask=(s != 0).astype(np.float32) if s_mask is None
                      else np.asarray(s_mask, np.float32))
        if bias is not None:
            values["bias"] = np.asarray(bias, dtype=np.float32)
        kwargs.setdefault("use_bias", bias is not None)
        return cls(units=units, block_shape=blocks.shape[1:], rank=blocks.shape[0],
                   initial_values=values, **kwargs)

