"""A sparse matrix held as its nonzeros, multiplied in ``keras_psm.ops`` only.

A factor F (m x n) with nonzeros v_k at (r_k, c_k) is applied by a gather and
a segment sum, on every Keras backend (PyTorch has no sparse tensor Keras
supports, JAX's BCOO and TensorFlow's ``SparseTensor`` differ):

    (X @ F)[:, c] = sum over k with c_k = c of v_k X[:, r_k]
    (F @ B)[r, :] = sum over k with r_k = r of v_k B[c_k, :]

Both cost O(nnz) per row of X (column of B), and their gradients reach the
values v_k only, never the entries off the support.
"""

import typing

from keras_psm import ops
from keras_psm.backend import BACKEND


def segment_sum(data, segment_ids, num_segments):
    """``ops.segment_sum`` of the rows of ``data``; on PyTorch ``index_add``, which
    adds each row in place: Keras's PyTorch segment sum first copies the ids to
    ``data``'s shape in int64, about 3x the time of a factor's fit step."""
    if BACKEND != "torch":
        return ops.segment_sum(data, segment_ids, num_segments=num_segments)
    import torch

    sums = torch.zeros((num_segments,) + tuple(data.shape[1:]), dtype=data.dtype,
                       device=data.device)
    return sums.index_add(0, segment_ids, data)


class SparseMatrix(typing.NamedTuple):
    """Nonzeros ``values`` at ``rows``, ``cols`` (int tensors) of a ``shape`` matrix."""

    rows: typing.Any
    cols: typing.Any
    values: typing.Any
    shape: tuple

    def to_dense(self):
        """The dense (m, n) matrix: the values scattered on their positions.

        On PyTorch through ``index_put``: Keras's PyTorch ``scatter`` adds one
        index at a time in a Python loop (minutes per fit step at 10^5 nonzeros).
        """
        if BACKEND != "torch":
            return ops.scatter(ops.stack([self.rows, self.cols], axis=1), self.values,
                               self.shape)
        import torch

        values, rows, cols = (ops.convert_to_tensor(t) for t in (self.values, self.rows, self.cols))
        dense = torch.zeros(self.shape, dtype=values.dtype, device=values.device)
        return dense.index_put((rows.long(), cols.long()), values, accumulate=True)

    def times(self, block):
        """``F @ block`` for a dense (n, k) ``block``."""
        gathered = ops.take(block, self.cols, axis=0) * ops.expand_dims(self.values, 1)
        return segment_sum(gathered, self.rows, self.shape[0])

    def applied_to(self, inputs):
        """``inputs @ F`` for dense (batch, m) ``inputs``."""
        gathered = (ops.take(ops.transpose(inputs), self.rows, axis=0)
                    * ops.expand_dims(self.values, 1))
        return ops.transpose(segment_sum(gathered, self.cols, self.shape[1]))
