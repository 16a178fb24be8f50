"""palm4MSA: approximate a matrix by a product of sparse matrices.

Implements Algorithm 1 of the PSM paper's supplement (A.4), which is the
palm4MSA algorithm of Le Magoarou & Gribonval (2016), and the hierarchical
variant of Le Magoarou & Gribonval, "Flexible multilayer sparse
approximations of matrices and applications" (IEEE JSTSP, 2016).

Conventions (Keras orientation): the matrix ``W`` is ``(in, out)`` and

    W ~ S_1 @ S_2 @ ... @ S_Q,   S_1: (in, r),  S_2 .. S_{Q-1}: (r, r),  S_Q: (r, out)

with ``r = min(in, out)`` unless ``rank`` is given. Inside the algorithm each
factor has unit Frobenius norm and a scalar ``lambda`` carries the scale;
``lambda`` is folded into ``S_1`` before returning.

Speed: factors are kept as ``scipy.sparse`` CSR matrices (and their
transposes), products of factors are applied one sparse factor at a time to
a dense block, spectral norms come from warm-started power iterations on
those sparse chains, and the full product needed for the residual of the
next update is formed once per factor update. Large matrices skip that
``in x out`` product and residual: their updates use Gram matrices
(``palm4msa_gram``), and ``W`` is kept once. From 2^18 entries on, ``W``
and the products are float32.
Large sparse products, projections and transposes run in pieces on every
CPU core, and large dense operands in column panels that stay in cache
(``threads``).
"""

import numbers
from dataclasses import dataclass
from functools import reduce

import numpy as np
import scipy.sparse as sps
from tqdm.auto import tqdm

from keras_psm.factorize.palm4msa_gram import (
    StoredMatrix,
    chain_times,
    gradient_step,
    gram,
    gram_entries,
    sandwich,
    trace_terms,
)
from keras_psm.factorize.projections import (
    splincol_blocks_support,
    splincol_support,
    transposed_copy,
)
from keras_psm.factorize.threads import sparse_times
from keras_psm.validation import check_bool

__all__ = ["Factorization", "factor_shapes", "hierarchical_palm4msa", "palm4msa", "run_best"]

# The step 1/c uses c = LIPSCHITZ_MARGIN * lambda^2 ||L||_2^2 ||R||_2^2, just above
# the Lipschitz constant of the gradient (the value FAuST uses).
LIPSCHITZ_MARGIN = 1.001

# Power iteration for ||.||_2^2: stop when the estimate changes by less than
# this relative amount, or after NORM_MAX_STEPS steps (FAuST's defaults).
NORM_RTOL = 1e-6
NORM_MAX_STEPS = 100

# A relative error below this is rounding noise of the product (an exact
# factorization, e.g. of a Hadamard matrix); its relative changes are
# meaningless, so palm4msa stops there unless ``tol == 0``.
ERROR_FLOOR = 1e-13

# A dense GEMM replaces a chain of sparse products (right-hand side of the
# gradient) only when the chain needs this many times more multiply-adds: BLAS
# does 6-10 times more per second than SciPy's sparse kernel on one idle core,
# but a multithreaded BLAS stalls when the other cores are busy.
DENSE_SPEEDUP = 3.0

# The Gram form applies L^T L (r x r) as the sparse chain L^T (L .) when that needs this
# many times fewer multiply-adds (2 nnz(L) against r^2 per column). Measured on 2 cores
# (AMD EPYC, AVX-512) against the dense 4096 x 4096 product, float32, splincol factors:
# L of 25,088 x 4,096 with K = 14 (24x fewer) took 0.67x the GEMM's time and with K = 28
# (12x fewer) 1.17x; L of 4,096 x 4,096 with K = 14 to 112 (127x to 17x fewer) took 0.09x
# to 0.44x.
GRAM_CHAIN_SPEEDUP = 12.0

# Update orders of palm4msa. "auto" runs both for PROBE_FRACTION of max_iter
# and continues only the one with the lower error. On 83 cases (power-law spectra,
# Gaussian matrices and LeNet-5's trained kernels; Q = 2, 3; K = 4 to 14;
# benchmarks/update_order.py) the orders ended more than 0.01 apart in 50, up to
# 0.127, either order ahead, so no fixed order is safe. The order ahead after 50 of
# 300 iterations ended behind in 9 cases, by at most 0.030 (after 25: 12, 0.030;
# after 100: 4, 0.0085; after 150: 2, 0.0042); a longer probe costs its length again.
# "both" runs both to the end (twice the time of one order) and keeps the better.
ORDERS = ("right_to_left", "left_to_right")
UPDATE_ORDERS = ("auto", "both") + ORDERS
PROBE_FRACTION = 1 / 6

# Below this many entries (32 MB of float32) the residual form is as fast or faster:
# the Gram form's fixed costs per update (Gram blocks, sparse-sparse products, the
# r x r x r product of a middle factor) dominate, and its memory saving does not matter.
# Seconds per iteration, Q=3 K=14, Gram against residual form, right to left / left to
# right, on 2 cores (AMD EPYC, AVX-512): 784x256 Q=2 3.5x slower in the Gram form;
# ResNet50's 4608x512 0.126 / 0.140 against 0.100 / 0.136, 2048x1000 0.178 / 0.176
# against 0.125 / 0.124; 8192x1024 0.245 / 0.326 against 0.230 / 0.339; 4096x4096
# 0.98 / 0.95 against 0.90 / 0.94; fc6 (25,088 x 4,096) 3.44 against 3.46 right to
# left, with 2.5x less memory.
GRAM_MIN_ENTRIES = 2 ** 23

# W is kept in float32 from this many entries on (ResNet50's 1x1 1024 -> 256). At
# palm4msa's defaults (Q=3, K=14, 300 iterations, tol 1e-6, "auto"), float32 took 0.53 to
# 0.72 the time of float64 on ResNet50's shapes of 1024 x 256 to 4608 x 512, power-law
# spectra and Gaussian (benchmarks/palm4msa_speed.py --precision), with the same number
# of iterations (one Gaussian 1024 x 256 ran 202 against 171) and errors within 3.3e-4
# (equal to 6 digits in 7 cases of 12); on fc6 (25,088 x 4,096, Gaussian) the error after
# 3 iterations was 0.97864 in both.
FLOAT32_ENTRIES = 2 ** 18


@dataclass
class Factorization:
    """Result of ``palm4msa`` / ``hierarchical_palm4msa``.

    Attributes:
        factors: float64 arrays ``S_1 .. S_Q`` with ``S_1 @ ... @ S_Q ~ matrix``
            (the scale ``lambda`` is folded into ``S_1``). The butterfly fit
            returns ``scipy.sparse.csr_array``s instead, whose stored entries
            are exactly the supports.
        supports: boolean arrays of the same shapes (boolean ``csr_array``s
            for the butterfly fit), the sparsity pattern of each factor (the
            support chosen by its last projection).
        errors: ``||W - lambda S_1 ... S_Q||_F / ||W||_F`` after each iteration
            (for the hierarchical variant: of its final global pass).
    """

    factors: list
    supports: list
    errors: np.ndarray

    @property
    def product(self):
        """The dense product ``S_1 @ ... @ S_Q`` (sparse factors applied right to left)."""
        if not any(sps.issparse(factor) for factor in self.factors):
            return reduce(np.matmul, self.factors)
        product = np.asarray(self.factors[-1].toarray() if sps.issparse(self.factors[-1])
                             else self.factors[-1])
        for factor in reversed(self.factors[:-1]):
            product = factor @ product
        return np.asarray(product)

    @property
    def relative_error(self):
        """``||W - product||_F / ||W||_F`` of the returned factors.

        The last entry of ``errors`` is computed from the final factors
        themselves (after the last update and the last ``lambda``), so it is
        this error up to floating-point rounding.
        """
        return float(self.errors[-1])


def factor_shapes(matrix_shape, n_factors, rank=None):
    """Factor shapes ``(in, r), (r, r), ..., (r, out)`` for an ``(in, out)`` matrix.

    ``r = min(in, out)`` unless ``rank`` is given; one factor is ``(in, out)``.
    """
    n_in, n_out = matrix_shape
    n_factors = _check_int(n_factors, "n_factors", minimum=1)
    if n_factors == 1:
        if rank is not None:
            raise ValueError("`rank` must be None when `n_factors` is 1 (the factor is (in, out)).")
        return [(n_in, n_out)]
    inner = min(n_in, n_out) if rank is None else _check_int(rank, "rank", minimum=1)
    return [(n_in, inner)] + [(inner, inner)] * (n_factors - 2) + [(inner, n_out)]


def palm4msa(matrix, n_factors, sparsity, *, rank=None, max_iter=300, tol=1e-6,
             supports=None, random_state=None, block=1, left=None, update_order="auto",
             init=None, init_only=False, dtype=None, verbose=False):
    """Approximate ``matrix`` by ``n_factors`` sparse factors with palm4MSA.

    Minimizes ``||W - lambda S_1 ... S_Q||_F^2`` over unit-norm factors
    ``S_q`` in their constraint sets (PSM paper, Eq. 3 and Algorithm 1 of
    supplement A.4). One iteration updates every factor once (from ``q = Q``
    down to ``q = 1``, or the reverse, see ``update_order``) by a projected
    gradient step, with ``L = S_1 .. S_{q-1}`` and ``R = S_{q+1} .. S_Q``::

        c   = 1.001 * lambda^2 ||L||_2^2 ||R||_2^2
        S_q = P_q(S_q - (lambda / c) L^T (lambda L S_q R - W) R^T)

    then sets ``lambda = <W, X> / <X, X>`` for the new product ``X`` (the
    optimal scale). It stops after ``max_iter`` iterations or when the
    relative change of the error drops below ``tol``.

    Initialization (FAuST's): the factor updated first (``S_Q`` right to
    left, ``S_1`` left to right) is zero, the others are rectangular
    identities and ``lambda = 1``. The two orders reach different local
    minima; on matrices with decaying spectra either can be ahead by several
    hundredths of relative error, so by default both are tried.

    Args:
        matrix: 2-D array ``(in, out)`` of finite values.
        n_factors: number of factors ``Q >= 1``. With ``Q = 1`` the single
            ``(in, out)`` factor is the projection of ``matrix`` itself,
            optimally scaled (hard pruning when the constraint is ``sp``).
        sparsity: splincol ``K`` of every factor (int), or one int per
            factor: each row and each column of ``S_q`` keeps its ``K``
            largest entries. Ignored (may be None) when ``supports`` is given.
        rank: inner dimension ``r`` (default ``min(in, out)``).
        max_iter: maximum number of iterations (>= 1).
        tol: stop when ``|e_{i-1} - e_i| <= tol * e_{i-1}`` or when the error
            ``e_i`` is below 1e-13 (rounding noise); ``tol = 0`` runs exactly
            ``max_iter`` iterations.
        supports: optional list of one boolean array per factor; factor ``q``
            is then projected onto that fixed support instead of splincol.
        random_state: seed or ``np.random.Generator`` for the start vectors
            of the power iterations (the result barely depends on it).
        block: rows per block of the splincol support
            (``projections.splincol_blocks``): 4 keeps whole 1x4 blocks
            along the input axis, which LiteRT's sparse fully connected
            kernel runs on; 1 is plain splincol.
        left: optional ``(in, in)`` matrix ``M``, a fixed, unprojected leftmost
            factor: minimizes ``||M W - lambda M S_1 ... S_Q||_F`` instead
            (``errors`` relative to ``||M W||_F``). With ``M^T M = X^T X``
            this is the error on the layer inputs ``X``.
        update_order: ``"right_to_left"`` (Algorithm 1 of the PSM
            supplement), ``"left_to_right"`` (FAuST's default), ``"auto"``:
            run both for ``ceil(max_iter / 6)`` iterations and continue the
            one with the lower error (about 1.2x the time of one order), or
            ``"both"``: run both to the end and keep the lower error (2x the
            time; the order ahead after the probe of ``"auto"`` can end
            behind, ``benchmarks/update_order.py``). With ``left``, the order
            is right to left.
        init: optional start factors ``S_1 .. S_Q`` (e.g. the ``factors`` of
            an earlier fit), each scaled to unit norm, their norms' product
            starting ``lambda``. They are tried besides FAuST's start: each
            start runs ``ceil(max_iter / 6)`` iterations (all of them with
            ``"both"``) and the one with the lower error continues
            (``update_order`` right to left unless given). palm4MSA steps
            never raise the error, so the result is no worse than ``init``.
        init_only: with ``init``, continue from it alone, without trying
            FAuST's start (for warm starts along a ladder of K, where the
            smaller K's factors are already the better start).
        dtype: ``"float32"`` or ``"float64"``, the precision ``W``, the
            factors and the products are kept in; None: float32 for matrices
            of at least 2^18 entries (0.53 to 0.72 the time, errors within
            3.3e-4 on ResNet50's shapes), float64 otherwise. The returned
            factors are float64.
        verbose: show a tqdm progress bar of the iterations (error, time left).

    Returns:
        A ``Factorization``.
    """
    matrix = _check_matrix(matrix, _check_dtype(dtype, np.shape(matrix)))
    fixed = [] if left is None else [sps.csr_matrix(_check_left(left, matrix.shape[0]),
                                                    dtype=matrix.dtype)]
    orders, probe_fraction = _orders_to_run(update_order)
    if fixed:
        if update_order == "left_to_right":
            raise ValueError("palm4msa: `left` needs update_order 'right_to_left', 'auto' or "
                             "'both', got 'left_to_right'.")
        orders = ("right_to_left",)
    shapes = factor_shapes(matrix.shape, n_factors, rank)
    n_factors = len(shapes)
    init = None if init is None else _check_init(init, shapes)
    init_only = check_bool(init_only, "init_only", where="palm4msa")
    if init_only and init is None:
        raise ValueError("palm4msa: `init_only=True` needs `init` (the start factors).")
    max_iter = _check_int(max_iter, "max_iter", minimum=1)
    tol = _check_tol(tol)
    if supports is None:
        block = _check_int(block, "block", minimum=1)
        projectors = [_SplincolProjector(k, block) for k in _check_sparsity(sparsity, n_factors)]
    else:
        if sparsity is not None:
            _check_sparsity(sparsity, n_factors)
        projectors = [_FixedSupportProjector(s) for s in _check_supports(supports, shapes)]
    rng = np.random.default_rng(random_state)

    if not matrix.any():
        return _zero_factorization(shapes, projectors)
    if n_factors == 1 and not fixed:
        return _single_factor(matrix, projectors[0])
    target = StoredMatrix(fixed[0] @ matrix if fixed else matrix)
    runs = ([] if init_only else
            [_OrderedRun(target, shapes, projectors, order, fixed) for order in orders])
    if init is not None:
        runs.append(_OrderedRun(target, shapes, projectors, orders[0], fixed, init))
    return run_best(runs, max_iter, tol, rng, verbose, probe_fraction).result()


def _orders_to_run(update_order):
    """The update orders ``update_order`` runs, and the fraction of ``max_iter`` for which
    ``run_best`` runs them all: ``PROBE_FRACTION`` (``"auto"``, or one order with an
    ``init``) or 1 (``"both"``). Raises ValueError for another value."""
    update_order = _check_update_order(update_order)
    if update_order in ("auto", "both"):
        return ORDERS, 1.0 if update_order == "both" else PROBE_FRACTION
    return (update_order,), PROBE_FRACTION


def run_best(runs, max_iter, tol, rng, verbose=False, probe_fraction=PROBE_FRACTION):
    """Run each of ``runs`` for ``ceil(max_iter * probe_fraction)`` iterations (when there
    are several), continue the one with the lowest error up to ``max_iter`` and return it.

    A run has ``iterate(n_iterations, tol, rng, progress)`` and ``errors``;
    ``verbose`` shows a tqdm bar of the iterations with the error. The runs
    that lose are removed from the list ``runs``, which frees their factors.
    """
    probe = int(np.ceil(max_iter * probe_fraction)) if len(runs) > 1 else 0
    shape = runs[0].shape
    with tqdm(total=probe * len(runs) + max_iter - probe, desc=f"palm4MSA {shape}",
              unit="it", disable=not verbose, leave=False) as progress:
        if len(runs) > 1:
            for run in runs:
                run.iterate(probe, tol, rng, progress)
            runs[:] = [min(runs, key=lambda run: run.errors[-1])]
        best = runs[0]
        best.iterate(max_iter - len(best.errors), tol, rng, progress)
    return best


def hierarchical_palm4msa(matrix, n_factors, sparsity, *, residual_sparsity=None, rank=None,
                          max_iter=300, tol=1e-6, random_state=None, block=1):
    """Hierarchical palm4MSA: peel one sparse factor at a time from the left.

    Le Magoarou & Gribonval (2016, "Flexible multilayer sparse
    approximations", Algorithm 2), peeling from the left as pyfaust does by
    default. With ``T_0 = W``, for ``l = 1 .. Q-1``:

    1. split the residual in two: ``T_{l-1} ~ lambda' S_l T_l`` (2-factor
       palm4MSA; ``S_l`` splincol ``sparsity[l-1]``, ``T_l`` splincol
       ``residual_sparsity[l-1]``, or ``sparsity[-1]`` at the last level);
    2. global optimization: palm4MSA of ``W`` over ``S_1 .. S_l, T_l``
       started from the current factors and ``lambda * lambda'``.

    The last residual ``T_{Q-1}`` is the last factor ``S_Q``. A ``2^n x 2^n``
    Hadamard matrix is recovered exactly with ``n`` factors, ``sparsity=2``
    and the default residual sparsities.

    Args:
        matrix, n_factors, sparsity, rank, max_iter, tol, random_state, block: as
            in ``palm4msa`` (``max_iter`` and ``tol`` apply to every inner run).
        residual_sparsity: splincol ``K`` of the intermediate residuals
            ``T_1 .. T_{Q-2}``: an int, a sequence of ``Q - 2`` ints, or None
            for ``max(sparsity[-1], ceil(min(r, out) / 2^l))`` (halved at each
            level, FAuST's Hadamard setting).

    Returns:
        A ``Factorization`` whose ``errors`` are those of the final global pass.
    """
    matrix = _check_matrix(matrix)
    shapes = factor_shapes(matrix.shape, n_factors, rank)
    n_factors = len(shapes)
    max_iter = _check_int(max_iter, "max_iter", minimum=1)
    tol = _check_tol(tol)
    factor_ks = _check_sparsity(sparsity, n_factors)
    residual_ks = _check_residual_sparsity(residual_sparsity, shapes, factor_ks)
    rng = np.random.default_rng(random_state)

    block = _check_int(block, "block", minimum=1)
    final_projectors = [_SplincolProjector(k, block) for k in factor_ks]
    if not matrix.any():
        return _zero_factorization(shapes, final_projectors)
    if n_factors == 1:
        return _single_factor(matrix, final_projectors[0])

    target = StoredMatrix(matrix)
    peeled = []
    residual = matrix
    scale = 1.0
    for level in range(1, n_factors):
        residual_projector = _SplincolProjector(residual_ks[level - 1], block)
        split_shapes = [shapes[level - 1], shapes[-1]]
        split = _palm(StoredMatrix(residual), _initial_factors(split_shapes), 1.0,
                      [final_projectors[level - 1], residual_projector], max_iter, tol, rng)
        start = peeled + split.factors
        projectors = final_projectors[:level] + [residual_projector]
        state = _palm(target, start, scale * split.scale, projectors, max_iter, tol, rng)
        peeled = state.factors[:-1]
        residual = state.factors[-1].matrix.toarray()
        scale = state.scale
    return state.result()


class _SparseFactor:
    """One factor in CSR form, with its transpose (also CSR, for ``S^T @ block``) and
    the flat row-major positions of its stored entries (its support)."""

    def __init__(self, matrix, flat_positions=None):
        self.matrix = matrix
        self.transposed = matrix.T.tocsr()
        if flat_positions is None:
            rows = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))
            flat_positions = rows * matrix.shape[1] + matrix.indices
        self.flat_positions = flat_positions

    @property
    def support(self):
        """The boolean support, built when asked: only the result needs it."""
        support = np.zeros(self.matrix.shape, dtype=bool)
        support.ravel()[self.flat_positions] = True
        return support


class _SplincolProjector:
    """Projection onto {unit Frobenius norm, splincol support of ``k``} (of
    ``k`` blocks of ``block`` rows with ``block > 1``)."""

    def __init__(self, k, block=1, blocks_along_columns=False):
        self.k = k
        self.block = block
        self.blocks_along_columns = blocks_along_columns

    def transposed(self):
        """The projector of the transposed factor: splincol treats rows and columns
        alike, and blocks of rows become blocks of columns."""
        if self.block == 1:
            return self
        return _SplincolProjector(self.k, self.block, not self.blocks_along_columns)

    def __call__(self, candidate):
        if self.block == 1:
            support = splincol_support(candidate, self.k)
        elif self.blocks_along_columns:
            support = np.ascontiguousarray(
                splincol_blocks_support(candidate.T, self.k, self.block).T)
        else:
            support = splincol_blocks_support(candidate, self.k, self.block)
        flat_positions = np.flatnonzero(support)
        values = _unit_norm(candidate.ravel()[flat_positions])
        row_starts = np.zeros(candidate.shape[0] + 1, dtype=np.int64)
        np.cumsum(np.count_nonzero(support, axis=1), out=row_starts[1:])
        column_indices = flat_positions % candidate.shape[1]
        matrix = sps.csr_matrix((values, column_indices, row_starts), shape=candidate.shape)
        return _SparseFactor(matrix, flat_positions)


class _FixedSupportProjector:
    """Projection onto {unit Frobenius norm, fixed ``support``}."""

    def __init__(self, support):
        self.support = support
        self.pattern = sps.csr_matrix(support, dtype=np.float64)
        self.flat_positions = np.flatnonzero(support)

    def transposed(self):
        """The projector of the transposed factor."""
        return _FixedSupportProjector(self.support.T)

    def __call__(self, candidate):
        matrix = self.pattern.copy()
        matrix.data = _unit_norm(candidate.ravel()[self.flat_positions])
        return _SparseFactor(matrix, self.flat_positions)


class _PalmState:
    """Factors (``_SparseFactor``), ``lambda``, the error history of a palm4MSA run and
    the start vectors of its power iterations (to continue the run where it stopped)."""

    def __init__(self, factors, scale, errors, start_vectors=None):
        self.factors = factors
        self.scale = scale
        self.errors = errors
        self.start_vectors = {} if start_vectors is None else start_vectors

    def result(self, transposed=False):
        """A ``Factorization`` with ``lambda`` folded into the first factor.

        ``transposed``: the run factorized ``W^T = S_Q^T ... S_1^T``; the
        factors are transposed back (from their CSR transposes: no dense copy)
        and reversed.
        """
        if transposed:
            dense = [factor.transposed.astype(np.float64).toarray()
                     for factor in reversed(self.factors)]
            supports = [transposed_copy(factor.support) for factor in reversed(self.factors)]
        else:
            dense = [factor.matrix.astype(np.float64).toarray() for factor in self.factors]
            supports = [factor.support for factor in self.factors]
        dense[0] *= self.scale
        return Factorization(dense, supports, np.asarray(self.errors, dtype=np.float64))


class _OrderedRun:
    """A palm4MSA run of ``W`` in one update order, from FAuST's start for that order.

    Updating ``S_1 .. S_Q`` left to right is updating the factors of
    ``W^T = S_Q^T ... S_1^T`` right to left, so ``_palm`` (right to left)
    runs on ``W^T`` with the factor shapes and projectors transposed and
    reversed. ``fixed`` (right to left only) is prepended to every left chain.
    ``init`` (checked start factors) replaces FAuST's start.
    """

    def __init__(self, target, shapes, projectors, order, fixed=(), init=None):
        self.transposed = order == "left_to_right"
        if self.transposed:
            target = target.transpose()
            shapes = [(columns, rows) for rows, columns in reversed(shapes)]
            projectors = [projector.transposed() for projector in reversed(projectors)]
            init = None if init is None else [factor.T for factor in reversed(init)]
        self.target = target
        self.projectors = projectors
        self.fixed = fixed
        if init is None:
            self.state = _PalmState(_initial_factors(shapes, target.matrix.dtype), 1.0, [])
        else:
            norms = [np.linalg.norm(factor) for factor in init]
            self.state = _PalmState([_SparseFactor(sps.csr_matrix(factor / norm,
                                                                  dtype=target.matrix.dtype))
                                     for factor, norm in zip(init, norms)], float(np.prod(norms)),
                                    [])

    def iterate(self, n_iterations, tol, rng, progress=None):
        """Up to ``n_iterations`` more iterations (fewer once converged)."""
        if n_iterations > 0:
            self.state = _palm(self.target, self.state.factors, self.state.scale,
                               self.projectors, n_iterations, tol, rng,
                               self.state.errors, self.state.start_vectors, self.fixed, progress)

    @property
    def errors(self):
        return self.state.errors

    @property
    def shape(self):
        """Shape of the matrix as given to palm4msa."""
        return self.target.matrix.shape

    def result(self):
        return self.state.result(self.transposed)


def _palm(target, factors, scale, projectors, max_iter, tol, rng, errors=(),
          start_vectors=None, fixed=(), progress=None):
    """palm4MSA iterations (supplement A.4, Algorithm 1) from the given factors and scale.

    ``target`` is the ``StoredMatrix`` to factorize. ``errors`` and
    ``start_vectors`` continue an earlier run (its error history, for the
    stopping test, and its power-iteration vectors); a run that had converged
    is returned unchanged. ``progress`` (a tqdm bar or None) advances once per
    iteration.

    Each factor update q (from Q down to 1) needs L = S_1..S_{q-1} (not yet
    updated in this iteration) and R = S_{q+1}..S_Q (already updated). It takes
    one of two forms, fixed by the shapes (``_uses_gram_form``):

    - residual form: R is kept as a dense block, grown by one sparse product
      per update, L is applied as a chain of sparse products, and the dense
      residual ``lambda L S_q R - W`` gives the gradient; the product after
      the last update gives ``lambda`` and the error;
    - Gram form (``palm4msa_gram``): ``L^T W`` and ``L^T L`` from the factors
      at the start of the iteration, ``R R^T`` grown by one update at a time,
      and the error from traces. ``L^T L`` is applied as the chain
      ``L^T (L .)`` where that costs less (``_chain_is_cheaper``), and a wide
      matrix takes its data terms from ``R W^T`` (``right_first``).

    ``fixed`` (a list of sparse matrices) is prepended to every L, never
    updated; it keeps the residual form.
    """
    fixed = list(fixed)
    fixed_transposed = [f.T.tocsr() for f in fixed]
    n_factors = len(factors)
    factors = list(factors)
    errors = list(errors)
    start_vectors = {} if start_vectors is None else start_vectors
    if errors and tol > 0 and _converged(errors, tol):
        return _PalmState(factors, scale, errors, start_vectors)
    uses_gram = [not fixed and _uses_gram_form(target.shape, factor.matrix.shape, q, n_factors)
                 for q, factor in enumerate(factors)]
    matrix = target.view if all(uses_gram) else target.rows
    # A wide matrix (in < out) takes its data terms L^T W R^T as L^T (R W^T)^T, from
    # R W^T (``right_image``, r x in, one sparse product more per update) rather than
    # from L^T W (r x out); only the last factor's L^T W (R = I) is still needed.
    right_first = all(uses_gram) and target.shape[0] < target.shape[1]
    transposed_target = target.transpose()  # S W^T is its left_product(S)
    projected = [uses_gram[q] and (q == n_factors - 1 or not right_first)
                 for q in range(n_factors)]

    residual = None  # lambda L S_q R - W for the next update, when the last one formed it
    for _ in range(max_iter):
        right_product = right_gram = right_image = None
        left_projections, left_grams = _left_blocks(target, factors, uses_gram, projected)
        for q in reversed(range(n_factors)):  # 0-based: factors[q] is S_{q+1}
            left = fixed + [f.matrix for f in factors[:q]]
            left_transposed = fixed_transposed + [f.transposed for f in factors[:q]]
            right = [f.matrix for f in factors[q + 1:]]
            right_transposed = [f.transposed for f in factors[q + 1:]]

            # c = 1.001 lambda^2 ||L||_2^2 ||R||_2^2;  S_q <- P(S_q - (lambda / c) gradient)
            lipschitz = (scale ** 2
                         * _squared_norm(left, left_transposed, ("left", q), start_vectors, rng)
                         * _squared_norm(right, right_transposed, ("right", q), start_vectors,
                                         rng))
            step = scale / (LIPSCHITZ_MARGIN * lipschitz) if lipschitz > 0 else 0.0
            if uses_gram[q]:
                if right_image is not None:  # L^T W R^T = L^T (R W^T)^T
                    data_term = chain_times(left_transposed[::-1], transposed_copy(right_image))
                elif q == 0:
                    data_term = target.right_product(right)
                else:
                    data_term = _times_chain_transposed(left_projections.pop(q), right)
                left_chain = ((left, left_transposed) if right_gram is not None
                              and _chain_is_cheaper(left, factors[q].matrix.shape[0]) else None)
                candidate = gradient_step(factors[q], left_grams.pop(q, None), right_gram,
                                          data_term, scale, step, left_chain)
                if q > 0:
                    data_term = None  # only S_1's is needed after its update (the traces)
            else:
                if residual is None:
                    start = (factors[q].matrix.toarray() if right_product is None
                             else sparse_times(factors[q].matrix, right_product))
                    residual = _residual(scale, chain_times(left, start), matrix)
                # gradient = L^T (lambda L S_q R - W) R^T
                candidate = chain_times(left_transposed[::-1], residual)
                if right_product is not None:
                    candidate = _times_transpose(candidate, right, right_product)
                candidate *= -step  # in place: nothing else uses this array
                candidate.ravel()[factors[q].flat_positions] += factors[q].matrix.data
            residual = None
            factors[q] = projectors[q](candidate)
            del candidate

            # Blocks of R for the next updates: R <- S_q R.
            new_factor = factors[q]
            if not all(uses_gram[:max(q, 1)]):
                right_product = (new_factor.matrix.toarray() if right_product is None
                                 else sparse_times(new_factor.matrix, right_product))
            if any(uses_gram[:q]):
                right_gram = (gram(new_factor.matrix, new_factor.transposed) if right_gram is None
                              else sandwich(new_factor.matrix, right_gram))
            if right_first and q > 0:
                right_image = (transposed_target.left_product(new_factor.matrix)
                               if right_image is None
                               else sparse_times(new_factor.matrix, right_image))
            if q > 0 and not uses_gram[q - 1]:
                residual = _residual(scale, chain_times(left, right_product), matrix)

        if uses_gram[0]:
            inner, energy = trace_terms(factors[0], data_term, right_gram)
            scale = inner / energy if energy > 0 else scale
            squared_error = target.squared_norm - 2 * scale * inner + scale ** 2 * energy
            errors.append(np.sqrt(max(squared_error, 0.0) / target.squared_norm))
            del data_term
        else:
            product = chain_times(fixed, right_product)
            scale = _optimal_scale(matrix, product, scale)
            residual = _residual(scale, product, matrix)
            errors.append(np.sqrt(_inner(residual, residual)) / np.sqrt(target.squared_norm))
        if progress is not None:
            progress.update(1)
            progress.set_postfix(error=f"{errors[-1]:.4f}", refresh=False)
        if tol > 0 and _converged(errors, tol):
            break
    return _PalmState(factors, scale, errors, start_vectors)


def _uses_gram_form(matrix_shape, factor_shape, q, n_factors):
    """Cost rule: update ``q`` of a matrix of at least ``GRAM_MIN_ENTRIES`` entries takes
    the Gram form when the dense blocks it writes (``palm4msa_gram.gram_entries``) are
    fewer than the residual form's ``in x out`` product and residual."""
    size = matrix_shape[0] * matrix_shape[1]
    entries = gram_entries(matrix_shape, factor_shape, q > 0, q < n_factors - 1)
    return size >= GRAM_MIN_ENTRIES and entries < 2 * size


def _left_blocks(target, factors, uses_gram, projected):
    """``L^T L`` for every Gram-form update ``q >= 1`` and ``L^T W`` for those marked in
    ``projected`` (``L = S_1 .. S_q``, 0-based ``q``), from the factors at the start of
    the iteration."""
    projections, grams = {}, {}
    last = max((q for q, gram_form in enumerate(uses_gram) if gram_form and q > 0), default=0)
    for q in range(1, last + 1):
        previous = factors[q - 1]
        if q == 1:
            projection = target.left_product(previous.transposed)
            left_gram = gram(previous.transposed, previous.matrix)
        else:
            projection = sparse_times(previous.transposed, projection)
            left_gram = sandwich(previous.transposed, left_gram)
        if uses_gram[q]:
            grams[q] = left_gram
        if projected[q]:
            projections[q] = projection
    return projections, grams


def _times_chain_transposed(block, chain):
    """``block @ R^T`` for ``R = chain[0] @ ... @ chain[-1]`` (sparse), as ``(R block^T)^T``."""
    if not chain:
        return block
    return transposed_copy(chain_times(chain, transposed_copy(block)))


def _converged(errors, tol):
    """The error is rounding noise, or changed by at most ``tol`` (relative) last iteration."""
    if errors[-1] <= ERROR_FLOOR:
        return True
    return len(errors) > 1 and abs(errors[-2] - errors[-1]) <= tol * errors[-2]


def _chain_is_cheaper(chain, rows):
    """Apply the Gram matrix ``L^T L`` (``rows x rows``) of ``L = chain[0] @ ... @ chain[-1]``
    as the chain ``L^T (L .)``: ``2 nnz(L)`` multiply-adds per column against ``rows^2``,
    speed-weighted by ``GRAM_CHAIN_SPEEDUP``."""
    return GRAM_CHAIN_SPEEDUP * 2 * sum(factor.nnz for factor in chain) < rows * rows


def _times_transpose(block, right, right_product):
    """``block @ R^T`` for ``R = right[0] @ ... @ right[-1]`` (dense: ``right_product``).

    Uses the chain of sparse factors, ``(R block^T)^T``, when that costs fewer
    (speed-weighted) multiply-adds than a dense GEMM with ``right_product``.
    """
    sparse_cost = sum(factor.nnz for factor in right) * block.shape[0]
    dense_cost = right_product.size * block.shape[0]
    if DENSE_SPEEDUP * sparse_cost < dense_cost:
        return transposed_copy(chain_times(right, transposed_copy(block)))
    return block @ right_product.T


def _squared_norm(chain, chain_transposed, key, start_vectors, rng):
    """``||A||_2^2`` for ``A = chain[0] @ ... @ chain[-1]`` (1 for an empty chain).

    Power iteration on ``A^T A``, warm-started from the vector stored under
    ``key`` by the previous call: the factors change little between
    iterations, so few steps are needed. Estimates approach the value from
    below; it stops when they change by less than ``NORM_RTOL`` (relative).
    """
    if not chain:
        return 1.0
    vector = start_vectors.get(key)
    if vector is None:
        vector = rng.standard_normal(chain[-1].shape[1])
        vector /= _norm(vector)
    estimate = 0.0
    for _ in range(NORM_MAX_STEPS):
        image = chain_times(chain_transposed[::-1], chain_times(chain, vector))
        previous, estimate = estimate, _norm(image)
        if estimate == 0.0:
            return 0.0
        vector = image / estimate
        if estimate - previous <= NORM_RTOL * estimate:
            break
    start_vectors[key] = vector
    return estimate


def _residual(scale, product, matrix):
    """``lambda X - W`` (one new array, no temporary)."""
    residual = np.multiply(product, scale)
    residual -= matrix
    return residual


def _optimal_scale(matrix, product, previous):
    """``lambda = <W, X> / <X, X>``, the best scale of the product ``X`` (kept if ``X = 0``)."""
    energy = _inner(product, product)
    return _inner(matrix, product) / energy if energy > 0 else previous


def _inner(a, b):
    """Frobenius inner product ``<a, b>``.

    ``np.einsum`` runs on the calling thread; BLAS's ``ddot`` may start its
    threads for big arrays, which stalls when the other cores are busy.
    """
    return float(np.einsum("ij,ij->", a, b))


def _unit_norm(values):
    """``values / ||values||`` (unchanged if all zero)."""
    norm = _norm(values)
    return values / norm if norm > 0 else values


def _norm(vector):
    """Euclidean norm of a 1-D array, on the calling thread (see ``_inner``)."""
    return float(np.sqrt(np.einsum("i,i->", vector, vector)))


def _initial_factors(shapes, dtype=np.float64):
    """FAuST's start: the last factor (updated first) zero, the others rectangular identities."""
    factors = [sps.eye(rows, columns, format="csr", dtype=dtype) for rows, columns in shapes]
    factors[-1] = sps.csr_matrix(shapes[-1], dtype=dtype)
    return [_SparseFactor(factor) for factor in factors]


def _single_factor(matrix, projector):
    """``Q = 1``: the projection ``S`` of ``W`` scaled by ``lambda = <W, S>`` (``||S|| = 1``)."""
    factor = projector(matrix)
    scale = float(factor.matrix.data @ matrix.ravel()[factor.flat_positions])
    error = np.linalg.norm(scale * factor.matrix.toarray() - matrix) / np.linalg.norm(matrix)
    return _PalmState([factor], scale, [error]).result()


def _zero_factorization(shapes, projectors):
    """An all-zero ``W`` is matched exactly by all-zero factors (error 0)."""
    factors = [project(np.zeros(shape)) for shape, project in zip(shapes, projectors)]
    return _PalmState(factors, 0.0, [0.0]).result()


def _check_matrix(matrix, dtype=np.float64):
    matrix = np.asarray(matrix, dtype=dtype)
    if matrix.ndim != 2 or 0 in matrix.shape:
        raise ValueError(
            f"`matrix` must be a non-empty 2-D array (in, out), got shape {matrix.shape}."
        )
    if not np.all(np.isfinite(matrix)):
        raise ValueError(
            "`matrix` holds NaN or Inf values; only finite matrices can be factorized."
        )
    return matrix


def _check_dtype(dtype, shape):
    """The dtype palm4msa keeps ``W`` in: float32 from ``FLOAT32_ENTRIES`` entries on by default."""
    if dtype is None:
        return np.float32 if np.prod(shape) >= FLOAT32_ENTRIES else np.float64
    if dtype not in ("float32", "float64", np.float32, np.float64):
        raise ValueError(f"`dtype` must be None, 'float32' or 'float64', got {dtype!r}.")
    return np.dtype(dtype).type


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_left(left, size):
    left = _check_matrix(left)
    if left.shape != (size, size):
        raise ValueError(f"`left` must be a ({size}, {size}) matrix, got shape {left.shape}.")
    return left


def _check_int(value, name, *, minimum):
    if not _is_int(value) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _check_tol(tol):
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not tol >= 0:
        raise ValueError(f"`tol` must be a number >= 0, got {tol!r}.")
    return float(tol)


def _check_update_order(update_order):
    if not isinstance(update_order, str) or update_order not in UPDATE_ORDERS:
        raise ValueError(
            f"`update_order` must be one of {', '.join(map(repr, UPDATE_ORDERS))}, "
            f"got {update_order!r}."
        )
    return update_order


def _check_sparsity(sparsity, n_factors):
    """One splincol ``K >= 1`` per factor, from an int or a sequence of ``n_factors`` ints."""
    if _is_int(sparsity):
        values = [sparsity] * n_factors
    elif isinstance(sparsity, (list, tuple, np.ndarray)) and len(sparsity) == n_factors:
        values = list(sparsity)
    else:
        raise ValueError(
            f"`sparsity` must be an integer >= 1 or a sequence of {n_factors} (n_factors) "
            f"integers >= 1, got {sparsity!r}."
        )
    return [_check_int(k, "sparsity", minimum=1) for k in values]


def _check_residual_sparsity(residual_sparsity, shapes, factor_ks):
    """splincol ``K`` of the residual after each level; the last level's is ``sparsity[-1]``."""
    n_intermediate = len(shapes) - 2
    if residual_sparsity is None:
        width = min(shapes[-1])
        values = [max(factor_ks[-1], -(-width // 2 ** level))
                  for level in range(1, n_intermediate + 1)]
    elif _is_int(residual_sparsity):
        values = [residual_sparsity] * n_intermediate
    elif (isinstance(residual_sparsity, (list, tuple, np.ndarray))
          and len(residual_sparsity) == n_intermediate):
        values = list(residual_sparsity)
    else:
        raise ValueError(
            f"`residual_sparsity` must be None, an integer >= 1 or a sequence of "
            f"{n_intermediate} (n_factors - 2) integers >= 1, got {residual_sparsity!r}."
        )
    values = [_check_int(k, "residual_sparsity", minimum=1) for k in values]
    return values + [factor_ks[-1]]


def _check_init(init, shapes):
    """Start factors: one finite array (or SciPy sparse array) per factor shape, none zero."""
    if not isinstance(init, (list, tuple)) or len(init) != len(shapes):
        raise ValueError(f"`init` must be a list of {len(shapes)} (n_factors) arrays of shapes "
                         f"{shapes}, got {type(init).__name__}"
                         + (f" of length {len(init)}." if isinstance(init, (list, tuple)) else "."))
    checked = []
    for index, (factor, shape) in enumerate(zip(init, shapes)):
        factor = np.asarray(factor.toarray() if sps.issparse(factor) else factor, dtype=np.float64)
        if factor.shape != shape:
            raise ValueError(f"`init[{index}]` must have shape {shape} (factor shapes are "
                             f"{shapes}), got {factor.shape}.")
        if not np.all(np.isfinite(factor)) or not factor.any():
            raise ValueError(f"`init[{index}]` must hold finite values, not all zero.")
        checked.append(factor)
    return checked


def _check_supports(supports, shapes):
    if not isinstance(supports, (list, tuple)) or len(supports) != len(shapes):
        raise ValueError(
            f"`supports` must be a list of {len(shapes)} (n_factors) boolean arrays, "
            f"got {type(supports).__name__}"
            + (f" of length {len(supports)}." if isinstance(supports, (list, tuple)) else ".")
        )
    checked = []
    for index, (support, shape) in enumerate(zip(supports, shapes)):
        support = np.asarray(support)
        if support.shape != shape:
            raise ValueError(
                f"`supports[{index}]` must have shape {shape} (factor shapes are "
                f"{shapes}), got {support.shape}."
            )
        support = support.astype(bool)
        if not support.any():
            raise ValueError(f"`supports[{index}]` must have at least one True entry.")
        checked.append(support)
    return checked
