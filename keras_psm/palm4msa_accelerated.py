"""palm4MSA on the Keras backend's device: a GPU when TensorFlow, JAX or PyTorch sees one.

``palm4msa_on_device`` runs the iteration of ``factorize.palm4msa.palm4msa``
(PSM supplement A.4, Algorithm 1, in its Gram form, see
``factorize.palm4msa_gram``) with ``keras.ops``: the factors are dense
tensors holding their zeros, every product is a dense matrix product, and the
splincol projection is two ``top_k`` passes (rows, then columns). On a GPU
dense products beat sparse ones at these densities; on a CPU the NumPy/SciPy
``palm4msa`` is faster. It is a separate function, rather than an option of
``palm4msa``, because ``factorize`` holds pure NumPy/SciPy code, and it takes
no device argument because the backend already places tensors on its default
device (``CUDA_VISIBLE_DEVICES=""`` or the backend's device scope keeps it on
the CPU).

This module imports ``keras`` itself (Keras 3 only: tf_keras has no
``keras.ops``), never TensorFlow, so it runs with ``KERAS_BACKEND=jax`` or
``torch`` on a machine without TensorFlow.
"""

import math

import keras
import numpy as np
from keras import ops

from keras_psm.factorize.palm4msa import (
    LIPSCHITZ_MARGIN,
    NORM_MAX_STEPS,
    NORM_RTOL,
    Factorization,
    _check_int,
    _check_matrix,
    _check_sparsity,
    _check_tol,
    _converged,
    _orders_to_run,
    factor_shapes,
    palm4msa,
    run_best,
)

__all__ = ["palm4msa_on_device"]


def palm4msa_on_device(matrix, n_factors, sparsity, *, rank=None, max_iter=300, tol=1e-6,
                       random_state=None, update_order="auto", verbose=False):
    """``palm4msa`` with float32 dense products and projections on the Keras backend's device.

    Same arguments, start, update orders, step sizes and stopping rule as
    ``factorize.palm4msa.palm4msa`` (splincol supports only: no ``supports``,
    ``block``, ``left`` or ``init``), and the same result within float32
    rounding, except where two entries of a row or column tie for the
    ``K``-th largest magnitude: both are kept here, the first one there.

    Returns:
        A ``Factorization`` (float64 NumPy factors, boolean supports, errors).
    """
    matrix = _check_matrix(matrix, np.float32)
    shapes = factor_shapes(matrix.shape, n_factors, rank)
    sparsities = _check_sparsity(sparsity, len(shapes))
    max_iter = _check_int(max_iter, "max_iter", minimum=1)
    tol = _check_tol(tol)
    orders, probe_fraction = _orders_to_run(update_order)
    if len(shapes) == 1 or not matrix.any():  # a projection, no iterations to run
        return palm4msa(matrix, n_factors, sparsity, rank=rank, dtype="float32")
    rng = np.random.default_rng(random_state)
    target = ops.convert_to_tensor(matrix, dtype="float32")
    runs = [_DeviceRun(target, shapes, sparsities, order) for order in orders]
    return run_best(runs, max_iter, tol, rng, verbose, probe_fraction).result()


class _DeviceRun:
    """A palm4MSA run in one update order (left to right: right to left on ``W^T``)."""

    def __init__(self, target, shapes, sparsities, order):
        self.shape = tuple(target.shape)
        self.transposed = order == "left_to_right"
        if self.transposed:
            target = ops.transpose(target)
            shapes = [(columns, rows) for rows, columns in reversed(shapes)]
            sparsities = sparsities[::-1]
        self.target = target
        self.squared_norm = float(ops.sum(ops.square(target)))
        self.sparsities = sparsities
        self.factors = [ops.eye(rows, columns, dtype="float32") for rows, columns in shapes]
        self.factors[-1] = ops.zeros(shapes[-1], dtype="float32")
        self.scale = 1.0
        self.errors = []
        self.start_vectors = {}

    def iterate(self, n_iterations, tol, rng, progress):
        """Up to ``n_iterations`` more iterations (fewer once converged)."""
        for _ in range(n_iterations):
            if self.errors and tol > 0 and _converged(self.errors, tol):
                return
            self._iteration(rng)
            progress.update(1)
            progress.set_postfix(error=f"{self.errors[-1]:.4f}", refresh=False)

    def _iteration(self, rng):
        """Update ``S_Q`` down to ``S_1`` in the Gram form, then ``lambda`` and the error."""
        factors = self.factors
        left_projections, left_grams = {}, {}  # L^T W and L^T L, L = S_1 .. S_q (0-based q)
        for q in range(1, len(factors)):
            previous = ops.transpose(factors[q - 1])
            if q == 1:
                left_projections[q] = ops.matmul(previous, self.target)
                left_grams[q] = ops.matmul(previous, factors[0])
            else:
                left_projections[q] = ops.matmul(previous, left_projections[q - 1])
                left_grams[q] = ops.matmul(ops.matmul(previous, left_grams[q - 1]),
                                           factors[q - 1])
        right = right_gram = None  # R = S_{q+1} .. S_Q and R R^T
        for q in reversed(range(len(factors))):
            left_gram = left_grams.get(q)
            lipschitz = (self.scale ** 2 * self._squared_norm(left_gram, ("left", q), rng)
                         * self._squared_norm(right_gram, ("right", q), rng))
            step = self.scale / (LIPSCHITZ_MARGIN * lipschitz) if lipschitz > 0 else 0.0
            data_term = (ops.matmul(self.target, ops.transpose(right)) if q == 0
                         else left_projections.pop(q) if right is None
                         else ops.matmul(left_projections.pop(q), ops.transpose(right)))
            factor = factors[q]
            if left_gram is None:
                curvature = ops.matmul(factor, right_gram)
            elif right_gram is None:
                curvature = ops.matmul(left_gram, factor)
            else:
                curvature = ops.matmul(ops.matmul(left_gram, factor), right_gram)
            candidate = factor - step * (self.scale * curvature - data_term)
            factors[q] = _splincol(candidate, self.sparsities[q])
            if q > 0:
                new = factors[q]
                right = new if right is None else ops.matmul(new, right)
                gram = ops.matmul(new, ops.transpose(new)) if right_gram is None else (
                    ops.matmul(ops.matmul(new, right_gram), ops.transpose(new)))
                right_gram = gram
        # ||W - lambda X||^2 from <W, X> = <W R^T, S_1> and ||X||^2 = <S_1^T S_1, R R^T>.
        inner = float(ops.sum(data_term * factors[0]))
        overlap = ops.matmul(ops.transpose(factors[0]), factors[0])
        energy = float(ops.sum(overlap * right_gram))
        self.scale = inner / energy if energy > 0 else self.scale
        squared_error = self.squared_norm - 2 * self.scale * inner + self.scale ** 2 * energy
        self.errors.append(math.sqrt(max(squared_error, 0.0) / self.squared_norm))

    def _squared_norm(self, gram, key, rng):
        """``||A||_2^2`` as the top eigenvalue of ``G = A^T A`` (1 without ``A``): power
        iteration warm-started from the last vector under ``key``, as ``palm4msa``'s."""
        if gram is None:
            return 1.0
        vector = self.start_vectors.get(key)
        if vector is None:
            start = rng.standard_normal(gram.shape[0])
            vector = ops.convert_to_tensor((start / np.linalg.norm(start))[:, None],
                                           dtype="float32")
        estimate = 0.0
        for _ in range(NORM_MAX_STEPS):
            image = ops.matmul(gram, vector)
            previous, estimate = estimate, float(ops.norm(image))
            if estimate == 0.0:
                return 0.0
            vector = image / estimate
            if estimate - previous <= NORM_RTOL * estimate:
                break
        self.start_vectors[key] = vector
        return estimate

    def result(self):
        """A ``Factorization`` in the caller's orientation, ``lambda`` folded into ``S_1``."""
        factors = [keras.ops.convert_to_numpy(factor).astype(np.float64)
                   for factor in self.factors]
        if self.transposed:
            factors = [np.ascontiguousarray(factor.T) for factor in reversed(factors)]
        factors[0] *= self.scale
        return Factorization(factors, [factor != 0 for factor in factors],
                             np.asarray(self.errors, dtype=np.float64))


def _splincol(candidate, k):
    """``splincol(candidate, k)`` (``factorize.projections``) with ``top_k``: the
    ``k`` largest magnitudes of every row and of every column, unit Frobenius norm."""
    magnitude = ops.abs(candidate)
    kept = ops.logical_or(_top_k_mask(magnitude, k),
                          ops.transpose(_top_k_mask(ops.transpose(magnitude), k)))
    kept = ops.logical_and(kept, magnitude > 0)
    values = ops.where(kept, candidate, ops.zeros_like(candidate))
    return ops.divide_no_nan(values, ops.sqrt(ops.sum(ops.square(values))))


def _top_k_mask(magnitude, k):
    """Entries at least the ``k``-th largest of their row."""
    if k >= magnitude.shape[1]:
        return ops.ones_like(magnitude, dtype="bool")
    kth_largest = ops.top_k(magnitude, k)[0][:, k - 1:k]
    return magnitude >= kth_largest
