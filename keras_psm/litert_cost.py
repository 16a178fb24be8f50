"""What LiteRT spends applying a constant weight, to choose an export form.

TensorFlow's converter (``Optimize.EXPERIMENTAL_SPARSITY``) stores a
constant weight with at least 30% zeros in TFLite's sparse encoding. A fully
connected op then runs on the sparse weight itself when the weight is
"1x4 block sparse": its (out, in) layout, cut into blocks of 4 consecutive
inputs, has more than 0.9 times as many all-zero blocks, relatively, as it
has zeros. Every other sparse weight, and every convolution weight, is
densified when the file is loaded (a ``DENSIFY`` op) and costs what a dense
weight costs. (TensorFlow 2.21, ``dense_to_sparse.cc``; LiteRT 2.3.)

``cost_per_row`` turns that into multiply-adds per row of the input, in
units of the dense kernel's multiply-add: LiteRT's sparse kernel computes
each nonzero 1x4 block in full, about ``SPARSE_BLOCK_COST`` times slower per
multiply-add than its dense (XNNPACK) kernel.
"""

import numpy as np

#: The converter keeps a weight dense below this fraction of zeros.
MIN_ZERO_FRACTION = 0.3
#: All-zero 1x4 blocks / zeros (as fractions) above which a fully connected
#: op keeps its weight sparse.
BLOCK_OVER_RANDOM_RATIO = 0.9
#: Cost of one multiply-add in LiteRT's sparse 1x4 kernel, in dense ones
#: (measured on x86: about 3 for one input row, 8 for 64 rows or more).
SPARSE_BLOCK_COST = 8.0

BLOCK = 4


def _nonzero_blocks(matrix):
    """Nonzero 1x4 blocks of the (in, out) ``matrix`` in TFLite's (out, in) layout."""
    n_in, n_out = matrix.shape
    padded = np.zeros((-(-n_in // BLOCK) * BLOCK, n_out), dtype=bool)
    padded[:n_in] = matrix != 0
    return int(np.count_nonzero(padded.reshape(-1, BLOCK, n_out).any(axis=1)))


def _runtime_blocks(matrix):
    """Nonzero 1x4 blocks of the weight if a fully connected op runs on its
    sparse encoding, else None."""
    zeros = 1.0 - np.count_nonzero(matrix) / matrix.size
    if zeros < MIN_ZERO_FRACTION:
        return None
    nonzero_blocks = _nonzero_blocks(matrix)
    zero_blocks = 1.0 - nonzero_blocks / (-(-matrix.shape[0] // BLOCK) * matrix.shape[1])
    return nonzero_blocks if zero_blocks / zeros > BLOCK_OVER_RANDOM_RATIO else None


def runs_sparse(matrix):
    """Whether a fully connected op with the (in, out) weight ``matrix`` runs
    on TFLite's sparse encoding instead of densifying it."""
    return _runtime_blocks(np.asarray(matrix)) is not None


def _index_bytes(size):
    """Bytes of one index into a dimension of ``size`` in TFLite's sparse encoding."""
    return 1 if size <= 256 else 2 if size <= 65536 else 4


def blocks_take_more_bytes(matrix):
    """Whether a fully connected op would store the (in, out) weight ``matrix`` in
    1x4 blocks (``runs_sparse``) in more bytes than the plain sparse encoding
    the converter gives a convolution weight.

    The blocks cost 4 values and an index each, the plain encoding one value
    and one index per nonzero (float32 values; indices of the input axis, or
    of its blocks). Below about 3% density the blocks of a random support
    hold about one nonzero each: 3 to 4 times the bytes.
    """
    matrix = np.asarray(matrix)
    blocks = _runtime_blocks(matrix)
    if blocks is None:
        return False
    n_in = matrix.shape[0]
    block_bytes = blocks * (4 * BLOCK + _index_bytes(-(-n_in // BLOCK)))
    return np.count_nonzero(matrix) * (4 + _index_bytes(n_in)) < block_bytes


def cost_per_row(matrix, fully_connected=True):
    """Dense-equivalent multiply-adds LiteRT spends per input row on ``matrix``.

    A fully connected op whose weight ``runs_sparse`` costs
    ``SPARSE_BLOCK_COST * 4 * (nonzero 1x4 blocks)``; any other op (a
    convolution: ``fully_connected=False``) costs the dense ``in * out``.
    """
    matrix = np.asarray(matrix)
    blocks = _runtime_blocks(matrix) if fully_connected else None
    return float(matrix.size) if blocks is None else SPARSE_BLOCK_COST * BLOCK * blocks
