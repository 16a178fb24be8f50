"""palm4MSA's factor update from Gram matrices, without the dense ``in x out`` residual.

The gradient of ``||W - lambda L S R||_F^2 / 2`` in ``S`` is

    lambda L^T (lambda L S R - W) R^T  =  lambda^2 (L^T L) S (R R^T) - lambda L^T W R^T

so one update needs ``L^T W R^T`` (products of the sparse chains with ``W``),
the Gram matrices ``L^T L`` and ``R R^T`` (``r x r``) and ``S`` itself, never
the product ``L S R``. ``L^T L`` may also be applied as the sparse chain
``L^T (L .)`` (``gram_chain_times``): ``2 nnz(L)`` multiply-adds per column
instead of ``r^2``. The error of the last update of an iteration
(``S = S_1``, ``L = I``) follows from traces:

    ||W - lambda X||^2 = ||W||^2 - 2 lambda <W, X> + lambda^2 ||X||^2,
    <W, X> = <W R^T, S_1>,   ||X||^2 = <S_1^T S_1, R R^T>.

``StoredMatrix`` keeps ``W`` once and serves both update orders: the
left-to-right order works on ``W^T``, whose products it forms from ``W`` in
row blocks instead of copying ``W^T`` (only the residual form, taken below
``GRAM_MIN_ENTRIES``, reads a copy: ``rows``).
"""

import functools

import numpy as np

from keras_psm.factorize.projections import transposed_copy
from keras_psm.factorize.threads import map_on_cores, panel_columns, sparse_times

# Rows of W per block when a product needs W^T: the block and its transposed
# copy stay a few MB whatever the size of W.
BLOCK_ENTRIES = 2 ** 20


class StoredMatrix:
    """``W`` held once, seen by a run as ``W`` or as ``W^T`` (``transposed``)."""

    def __init__(self, matrix, transposed=False, squared_norm=None):
        self.matrix = matrix
        self.transposed = transposed
        if squared_norm is None:
            squared_norm = float(np.einsum("ij,ij->", matrix, matrix, dtype=np.float64))
        self.squared_norm = squared_norm

    @property
    def view(self):
        """The matrix the run factorizes (a view, never a copy)."""
        return self.matrix.T if self.transposed else self.matrix

    @functools.cached_property
    def rows(self):
        """The matrix the run factorizes, C-contiguous: ``W`` itself, or a copy of ``W^T``
        made once per run. The residual form reads it row by row, where a strided view of
        ``W^T`` is 1.1-1.4x slower on ResNet50's shapes."""
        return transposed_copy(self.matrix) if self.transposed else self.matrix

    @property
    def shape(self):
        return self.view.shape

    def transpose(self):
        """The same stored matrix seen transposed."""
        return StoredMatrix(self.matrix, not self.transposed, self.squared_norm)

    def left_product(self, first_transposed):
        """``S^T V`` for the sparse ``S`` given as the CSR matrix ``S^T``."""
        if not self.transposed:
            return sparse_times(first_transposed, self.matrix)
        return _apply_to_transpose(self.matrix,
                                   lambda block: sparse_times(first_transposed, block))

    def right_product(self, chain):
        """``V R^T`` for ``R = chain[0] @ ... @ chain[-1]`` (sparse), as ``(R V^T)^T``."""
        if not self.transposed:
            return _apply_to_transpose(self.matrix, lambda block: chain_times(chain, block),
                                       transpose_result=True)
        return transposed_copy(chain_times(chain, self.matrix))


def _apply_to_transpose(matrix, apply, transpose_result=False):
    """``apply(matrix^T)`` (or its transpose) for a column-wise ``apply``, in row blocks of
    ``matrix`` spread over the CPU cores: no copy of ``matrix^T`` is made."""
    rows = max(1, BLOCK_ENTRIES // matrix.shape[1])
    first = apply(transposed_copy(matrix[:rows]))
    shape = ((matrix.shape[0], first.shape[0]) if transpose_result
             else (first.shape[0], matrix.shape[0]))
    result = np.empty(shape, dtype=first.dtype)

    def store(start, block):
        if transpose_result:
            transposed_copy(block, out=result[start:start + rows])
        else:
            result[:, start:start + rows] = block

    store(0, first)
    map_on_cores(lambda start: store(start, apply(transposed_copy(matrix[start:start + rows]))),
                 range(rows, matrix.shape[0], rows))
    return result


def chain_times(chain, block):
    """``chain[0] @ chain[1] @ ... @ chain[-1] @ block``, one sparse product at a time."""
    for factor in reversed(chain):
        block = sparse_times(factor, block)
    return block


def sandwich(sparse, gram):
    """``A G A^T`` for a sparse ``A`` and a symmetric dense ``G``: ``A (A G)^T``."""
    return sparse_times(sparse, transposed_copy(sparse_times(sparse, gram)))


def gram(sparse, sparse_transposed):
    """``A A^T`` as a dense array, from the CSR matrices ``A`` and ``A^T``."""
    return (sparse @ sparse_transposed).toarray()


def gram_entries(matrix_shape, factor_shape, has_left, has_right):
    """Dense entries the Gram update writes besides the candidate: ``L^T W R^T``, with a
    left chain ``L^T L`` and (when a right chain follows) ``L^T W``, with a right chain
    ``R R^T``. Without a right chain ``L^T W R^T`` is ``L^T W`` itself."""
    n_columns = matrix_shape[1]
    rows, columns = factor_shape
    entries = rows * columns
    if has_left:
        entries += rows * rows + (rows * n_columns if has_right else 0)
    if has_right:
        entries += columns * columns
    return entries


def gradient_step(factor, left_gram, right_gram, data_term, scale, step, left_chain=None):
    """``S - step (lambda G_L S G_R - L^T W R^T)`` with ``G_L = L^T L`` and ``G_R = R R^T``
    (None for an empty chain; not both), a new array.

    ``factor`` is a ``_SparseFactor`` (CSR matrix, its transpose, flat positions).
    ``left_chain``: the CSR factors of ``L`` and their transposes, to apply ``G_L`` as
    ``L^T (L .)`` (``gram_chain_times``) when both chains are present; None: ``G_L @ .``.
    """
    if left_gram is None:
        candidate = sparse_times(factor.matrix, right_gram)
    elif right_gram is None:
        candidate = _gram_times(left_gram, factor.transposed)
    elif left_chain is not None:
        candidate = gram_chain_times(*left_chain, sparse_times(factor.matrix, right_gram))
    else:
        candidate = left_gram @ sparse_times(factor.matrix, right_gram)
    rows = max(1, BLOCK_ENTRIES // candidate.shape[1])

    def step_rows(start):  # in place, in row blocks: no temporary of the candidate's size
        block = candidate[start:start + rows]
        block *= -scale
        block += data_term[start:start + rows]
        block *= step

    map_on_cores(step_rows, range(0, candidate.shape[0], rows))
    candidate.ravel()[factor.flat_positions] += factor.matrix.data
    return candidate


def gram_chain_times(chain, chain_transposed, block):
    """``L^T L B`` as ``L^T (L B)`` for ``L = chain[0] @ ... @ chain[-1]`` (sparse, with the
    CSR transposes), one column panel of ``B`` at a time on each core: ``L B`` is never
    formed whole, and each panel's products stay in cache."""
    result = np.empty((chain[-1].shape[1], block.shape[1]),
                      dtype=np.result_type(chain[0].dtype, block.dtype))
    width = max(1, BLOCK_ENTRIES // chain[0].shape[0])

    def panel(start):
        columns = slice(start, start + width)
        image = chain_times(chain, np.ascontiguousarray(block[:, columns]))
        result[:, columns] = chain_times(chain_transposed[::-1], image)

    map_on_cores(panel, range(0, block.shape[1], width))
    return result


def _gram_times(gram_matrix, sparse_transposed):
    """``G S`` for a symmetric dense ``G`` and the CSR matrix ``S^T``: rows ``p`` of ``G S``
    are ``(S^T G[:, p])^T``, made for one column panel ``p`` of ``G`` at a time
    (``threads.panel_columns``) and spread over the cores, so no temporary has the size of
    the result and each panel of ``G`` is read from cache."""
    result = np.empty((gram_matrix.shape[0], sparse_transposed.shape[0]),
                      dtype=np.result_type(gram_matrix.dtype, sparse_transposed.dtype))
    width = min(panel_columns(gram_matrix), max(1, BLOCK_ENTRIES // result.shape[1]))

    def rows_block(start):
        panel = slice(start, start + width)
        transposed_copy(sparse_transposed @ np.ascontiguousarray(gram_matrix[:, panel]),
                        out=result[panel])

    map_on_cores(rows_block, range(0, result.shape[0], width))
    return result


def trace_terms(factor, data_term, right_gram):
    """``<W, X>`` and ``||X||^2`` for ``X = S_1 R`` from ``<W R^T, S_1>`` and
    ``<S_1^T S_1, R R^T>`` (float64 sums)."""
    inner = np.dot(data_term.ravel()[factor.flat_positions].astype(np.float64),
                   factor.matrix.data.astype(np.float64))
    overlap = gram(factor.transposed, factor.matrix)
    energy = np.einsum("ij,ij->", overlap, right_gram, dtype=np.float64)
    return float(inner), float(energy)
