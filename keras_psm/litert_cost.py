"""What LiteRT spends applying a constant weight, to choose an export form.

TensorFlow's converter (``Optimize.EXPERIMENTAL_SPARSITY``) stores a
constant weight with at least 30% zeros in TFLite's sparse encoding. A fully
connected op then runs on the sparse weight itself when the weight is
"1x4 block sparse": its (out, in) layout, cut into blocks of 4 consecutive
inputs, leaves out more than 0.9 times as many of its entries, relatively,
as it has zeros. Every other sparse weight, and every convolution weight, is
densified when the file is loaded (a ``DENSIFY`` op) and costs what a dense
weight costs. (TensorFlow 2.21, ``dense_to_sparse_pass.cc``; LiteRT 2.3.)

The converter cuts the input axis into ``in // 4`` whole blocks: when ``in``
is not a multiple of 4 the last ``in % 4`` inputs are in no block. It counts
them as zeros when it decides, and it leaves them out of the encoding, so
LiteRT computes ``x[:, :4 * (in // 4)] @ W[:4 * (in // 4)]``: wrong numbers.
Small weights (``in`` of 5 to 7) are picked for blocks even at 70% density,
since 1 to 3 of every 5 to 7 entries count as zeros. ``drops_inputs`` says
which weights this happens to; export applies them another way.

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
    """Nonzero whole 1x4 blocks of the (in, out) ``matrix`` in TFLite's (out, in)
    layout; the last ``in % 4`` inputs are in none."""
    n_in, n_out = matrix.shape
    whole = matrix[: n_in // BLOCK * BLOCK] != 0
    return int(np.count_nonzero(whole.reshape(-1, BLOCK, n_out).any(axis=1)))


def _runtime_blocks(matrix):
    """Nonzero 1x4 blocks of the weight if the converter stores it in blocks
    for a fully connected op, else None. The entries outside the stored
    blocks count as zeros, as the converter counts them."""
    # In float32, as the converter computes it: a ratio of exactly 0.9 passes.
    zeros = np.float32((matrix.size - np.count_nonzero(matrix)) / matrix.size)
    if zeros < MIN_ZERO_FRACTION:
        return None
    nonzero_blocks = _nonzero_blocks(matrix)
    left_out = np.float32((matrix.size - nonzero_blocks * BLOCK) / matrix.size)
    return nonzero_blocks if left_out / zeros > np.float32(BLOCK_OVER_RANDOM_RATIO) else None


def drops_inputs(matrix):
    """Whether a fully connected op with the (in, out) weight ``matrix``
    computes wrong numbers in LiteRT: the converter stores the weight in 1x4
    blocks and ``in`` is not a multiple of 4, so its last ``in % 4`` rows are
    lost (see the module docstring)."""
    matrix = np.asarray(matrix)
    return matrix.shape[0] % BLOCK != 0 and _runtime_blocks(matrix) is not None


def runs_sparse(matrix):
    """Whether a fully connected op with the (in, out) weight ``matrix`` runs
    on TFLite's sparse encoding (correctly) instead of densifying it."""
    matrix = np.asarray(matrix)
    return _runtime_blocks(matrix) is not None and not drops_inputs(matrix)


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
    if blocks is None or drops_inputs(matrix):
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
    if not (fully_connected and runs_sparse(matrix)):
        return float(matrix.size)
    return SPARSE_BLOCK_COST * BLOCK * _runtime_blocks(matrix)
