"""Kronecker product decompositions of weight matrices (block-wise sparsity paper).

A matrix of shape (rows, cols) = (g_rows * b_rows, g_cols * b_cols) is seen
as a (g_rows, g_cols) grid of blocks of shape ``block_shape = (b_rows, b_cols)``.
A sum of Kronecker products ``sum_i C_i (x) B_i`` with C_i (g_rows, g_cols) and
B_i (b_rows, b_cols) puts ``sum_i C_i[p, q] B_i`` in block (p, q), so a zero
entry of every C_i is a zero block: this is how the paper's eq. 3,
``W = sum_i (S * A_i) (x) B_i``, makes W block-wise sparse when S is sparse.

Everything here is pure NumPy, in the orientation of the matrix given: the
layers pass a Keras kernel (in, out), so ``block_shape`` is (rows, cols) of a
block of that kernel, as in the paper's Table 1 (blocks (16, 2) of a 784 x 10
kernel).
"""

import dataclasses
import math

import numpy as np

from keras_psm.validation import check_finite_array, check_float, check_int


@dataclasses.dataclass
class KroneckerFactorization:
    """``matrix ~ sum_i grid_factors[i] (x) blocks[i]``.

    Attributes:
        grid_factors: (rank, g_rows, g_cols), the C_i.
        blocks: (rank, b_rows, b_cols), the B_i.
        singular_values: all singular values of the rearranged (masked) matrix
            (the Kronecker rank is the number of nonzero ones).
        relative_error: ``||matrix - approximation||_F / ||matrix||_F``.
    """

    grid_factors: np.ndarray
    blocks: np.ndarray
    singular_values: np.ndarray
    relative_error: float

    @property
    def product(self):
        """The approximation ``sum_i C_i (x) B_i``."""
        return kronecker_sum(self.grid_factors, self.blocks)


def grid_shape(shape, block_shape, where="grid_shape"):
    """(g_rows, g_cols): how many blocks tile ``shape``; both must divide exactly."""
    rows, cols = (check_int(n, name, minimum=1, where=where)
                  for n, name in zip(shape, ("rows", "cols")))
    b_rows, b_cols = (check_int(n, name, minimum=1, where=where)
                      for n, name in zip(block_shape, ("block rows", "block cols")))
    if rows % b_rows or cols % b_cols:
        raise ValueError(
            f"{where}: block shape {(b_rows, b_cols)} does not tile a matrix of shape "
            f"{(rows, cols)}; each block dimension must divide the matrix dimension "
            "(pad the matrix with `pad_to_blocks` first)."
        )
    return rows // b_rows, cols // b_cols


def padded_shape(shape, block_shape):
    """The smallest shape >= ``shape`` that ``block_shape`` tiles."""
    return tuple(-(-int(n) // int(b)) * int(b) for n, b in zip(shape, block_shape))


def pad_to_blocks(matrix, block_shape):
    """``matrix`` padded with zero rows and columns to ``padded_shape``."""
    matrix = np.asarray(matrix)
    rows, cols = padded_shape(matrix.shape, block_shape)
    return np.pad(matrix, ((0, rows - matrix.shape[0]), (0, cols - matrix.shape[1])))


def rearrange(matrix, block_shape):
    """Van Loan-Pitsianis rearrangement R(matrix), shape (g_rows * g_cols, b_rows * b_cols).

    Row ``p * g_cols + q`` is block (p, q) flattened row-major, so that
    ``R(C (x) B) = vec(C) vec(B)^T`` (row-major vec): a sum of r Kronecker
    products is a rank-r matrix after rearrangement (Van Loan, 2000).
    """
    matrix = np.asarray(matrix)
    g_rows, g_cols = grid_shape(matrix.shape, block_shape, where="rearrange")
    b_rows, b_cols = block_shape
    blocks = matrix.reshape(g_rows, b_rows, g_cols, b_cols).transpose(0, 2, 1, 3)
    return blocks.reshape(g_rows * g_cols, b_rows * b_cols)


def kronecker_sum(grid_factors, blocks):
    """``sum_i C_i (x) B_i`` for stacks C (r, g_rows, g_cols) and B (r, b_rows, b_cols)."""
    grid_factors, blocks = np.asarray(grid_factors), np.asarray(blocks)
    _, g_rows, g_cols = grid_factors.shape
    _, b_rows, b_cols = blocks.shape
    tiled = np.einsum("ipq,iac->paqc", grid_factors, blocks)
    return tiled.reshape(g_rows * b_rows, g_cols * b_cols)


def kronecker_rank_bound(shape, block_shape):
    """min(g_rows g_cols, b_rows b_cols): no matrix of ``shape`` needs more terms."""
    g_rows, g_cols = grid_shape(shape, block_shape, where="kronecker_rank_bound")
    return min(g_rows * g_cols, block_shape[0] * block_shape[1])


def nearest_kronecker_sum(matrix, block_shape, rank, mask=None):
    """The nearest (Frobenius) sum of ``rank`` Kronecker products to ``matrix``.

    Truncated SVD of the rearranged matrix, ``R(matrix) ~ sum_i s_i u_i v_i^T``
    (Van Loan & Pitsianis; the paper's eq. 2): C_i = sqrt(s_i) u_i and
    B_i = sqrt(s_i) v_i, reshaped. Exact when ``rank`` reaches the Kronecker
    rank of ``matrix``; ``rank`` may not exceed ``kronecker_rank_bound``.

    ``mask``, a 0/1 grid (g_rows, g_cols), forces the blocks where it is 0 to
    zero: their rows of R are dropped before the SVD, which gives the nearest
    sum among those with these zero blocks (C_i is zero there).
    """
    where = "nearest_kronecker_sum"
    matrix = check_finite_array(matrix, "matrix", where=where)
    g_rows, g_cols = grid_shape(matrix.shape, block_shape, where=where)
    b_rows, b_cols = block_shape
    rank = check_int(rank, "rank", minimum=1,
                     maximum=kronecker_rank_bound(matrix.shape, block_shape), where=where)
    rearranged = rearrange(matrix, block_shape)
    if mask is not None:
        mask = np.asarray(mask, dtype=np.float64)
        if mask.shape != (g_rows, g_cols):
            raise ValueError(f"{where}: `mask` must have the grid shape {(g_rows, g_cols)}, "
                             f"got {mask.shape}.")
        rearranged = rearranged * (mask.reshape(-1, 1) != 0)
    left, singular_values, right = np.linalg.svd(rearranged, full_matrices=False)
    scale = np.sqrt(singular_values[:rank])
    grid_factors = (left[:, :rank] * scale).T.reshape(rank, g_rows, g_cols)
    if mask is not None:
        grid_factors = grid_factors * (mask != 0)
    blocks = (right[:rank].T * scale).T.reshape(rank, b_rows, b_cols)
    norm = np.linalg.norm(matrix)
    residual = np.linalg.norm(matrix - kronecker_sum(grid_factors, blocks))
    return KroneckerFactorization(
        grid_factors=grid_factors, blocks=blocks, singular_values=singular_values,
        relative_error=float(residual / norm) if norm > 0 else 0.0,
    )


def block_norms(matrix, block_shape):
    """Frobenius norm of every block, shape (g_rows, g_cols)."""
    return np.linalg.norm(rearrange(matrix, block_shape), axis=1).reshape(
        grid_shape(np.shape(matrix), block_shape, where="block_norms"))


def block_mask(matrix, block_shape, block_sparsity):
    """0/1 grid mask (g_rows, g_cols) keeping the blocks of largest norm.

    ``round(block_sparsity * n_blocks)`` blocks, those of smallest Frobenius
    norm, get 0 (ties broken by position); all others 1.
    """
    block_sparsity = check_float(block_sparsity, "block_sparsity", minimum=0.0, maximum=1.0,
                                 where="block_mask")
    norms = block_norms(matrix, block_shape)
    n_zero = int(round(block_sparsity * norms.size))
    mask = np.ones(norms.size)
    mask[np.argsort(norms, axis=None, kind="stable")[:n_zero]] = 0.0
    return mask.reshape(norms.shape)


def kronecker_param_count(shape, block_shape, rank=1):
    """Training parameters of eq. 3: S plus r pairs (A_i, B_i): ``(r + 1) g + r b``.

    With ``rank=1`` this is the objective of the paper's eq. 5,
    ``2 m1 n1 + m2 n2``. Blocks that do not tile ``shape`` count on the padded grid.
    """
    g_rows, g_cols = grid_shape(padded_shape(shape, block_shape), block_shape,
                                where="kronecker_param_count")
    grid, block = g_rows * g_cols, block_shape[0] * block_shape[1]
    return (rank + 1) * grid + rank * block


def divisors(n):
    """The positive divisors of ``n``, increasing."""
    n = check_int(n, "n", minimum=1, where="divisors")
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def fewest_params_block_shape(shape, rank=1):
    """The block shape that minimizes ``kronecker_param_count`` (the paper's eq. 5).

    Exhaustive over the divisors of each dimension (the integer program eq. 5
    leaves to branch and bound is this small). The continuous optimum of
    eq. 5 is ``m1 n1 = sqrt(mn / 2)``; for rank r it is ``sqrt(r mn / (r + 1))``.
    Among equal counts the squarest block wins, then the one with more rows.
    """
    rows, cols = (check_int(n, name, minimum=1, where="fewest_params_block_shape")
                  for n, name in zip(shape, ("rows", "cols")))
    rank = check_int(rank, "rank", minimum=1, where="fewest_params_block_shape")

    def cost(block):
        return (kronecker_param_count((rows, cols), block, rank),
                abs(math.log(block[0] / block[1])), -block[0])

    return min(((b_rows, b_cols) for b_rows in divisors(rows) for b_cols in divisors(cols)),
               key=cost)


def _contraction_flops(rows, n_in, n_out):
    """Forward, weight-gradient and input-gradient FLOPs of (rows, n_in) @ (n_in, n_out)."""
    return rows * n_out * (2 * n_in - 1), n_in * n_out * (2 * rows - 1), \
        rows * n_in * (2 * n_out - 1)


def dense_training_flops(n_in, n_out, n_samples):
    """(forward, backward) FLOPs of a dense linear least-squares step (appendix A.1.1-A.1.2).

    Forward ``N m (2n - 1)`` plus the loss ``3 N m - 1``; backward ``N m``
    (dJ/dO) plus ``m n (2N - 1)`` (dJ/dW), with n = n_in, m = n_out, N = n_samples.
    """
    n, m, big_n = n_in, n_out, n_samples
    return big_n * m * (2 * n - 1) + 3 * big_n * m - 1, big_n * m + m * n * (2 * big_n - 1)


def kronecker_training_flops(n_in, n_out, block_shape, rank, n_samples, blocks_first=True):
    """(forward, backward) FLOPs of a least-squares step with eq. 3 (Proposition 2).

    The step costs of appendix A.1.3-A.1.4, in Keras orientation: the kernel
    (n_in, n_out) has grid (g_in, g_out) and blocks (b_in, b_out); the
    paper's (m1, n1, m2, n2) are (g_out, g_in, b_out, b_in). Per rank term
    the input meets B_i over N g_in rows, then S * A_i over N b_out rows
    (``blocks_first``, the paper's order), or S * A_i over N b_in rows first,
    then B_i over N g_out rows. Counted: both contractions, S * A_i, the sum
    over ranks and the loss; backward: dJ/dO, the gradients of both factors,
    of S and A_i, and of the intermediate product (not of the input).
    Eq. 18 prints ``2 N m1 n1 n2`` where its own step costs (eq. 16) give
    ``2 N m2 n1 n2``; this follows the step costs. Sizes that blocks do not
    tile count on the padded grid.
    """
    n_in, n_out = padded_shape((n_in, n_out), block_shape)
    g_in, g_out = n_in // block_shape[0], n_out // block_shape[1]
    b_in, b_out = block_shape
    big_n, r, grid = n_samples, rank, g_in * g_out
    if blocks_first:
        first = (big_n * g_in, b_in, b_out)
        second = (big_n * b_out, g_in, g_out)
    else:
        first = (big_n * b_in, g_in, g_out)
        second = (big_n * g_out, b_in, b_out)
    first_forward, first_weight_grad, _ = _contraction_flops(*first)
    second_forward, second_weight_grad, second_input_grad = _contraction_flops(*second)
    forward = (r * (first_forward + grid + second_forward) + (r - 1) * big_n * n_out
               + 3 * big_n * n_out - 1)
    backward = (big_n * n_out + r * second_weight_grad + (2 * r - 1) * grid + r * grid
                + r * second_input_grad + r * first_weight_grad)
    return forward, backward


__all__ = [
    "KroneckerFactorization",
    "block_mask",
    "block_norms",
    "dense_training_flops",
    "divisors",
    "fewest_params_block_shape",
    "grid_shape",
    "kronecker_param_count",
    "kronecker_rank_bound",
    "kronecker_sum",
    "kronecker_training_flops",
    "nearest_kronecker_sum",
    "pad_to_blocks",
    "padded_shape",
    "rearrange",
]
