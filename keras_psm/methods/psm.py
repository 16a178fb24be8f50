"""``method="psm"``: each kernel as a product of sparse factors fitted by palm4MSA.

PSM paper, section 2.2: the trained kernel W (a Conv2D kernel as the
(kh * kw * cin, cout) matrix) is approximated by S_1 ... S_Q with at least K
nonzeros per row and column of each factor (``splincol``), then the network
is fine-tuned with the supports fixed.
"""

import dataclasses
import math
from typing import Optional

import numpy as np

from keras_psm.backend import keras
from keras_psm.budget import Estimate, knob_grid
from keras_psm.factorize.balance import balance_norms
from keras_psm.factorize.calibrated import whitening_factor
from keras_psm.factorize.palm4msa import UPDATE_ORDERS, hierarchical_palm4msa, palm4msa
from keras_psm.layers.sparse_factor import SparseFactorConv2D, SparseFactorDense
from keras_psm.methods.registry import Method, register_method
from keras_psm.validation import check_bool, check_choice, check_float, check_int

PSM_PAPER = "Sparse matrix products for neural network compression (PSM)"

#: A budget prices each PSM candidate with this many palm4MSA iterations (at most its
#: ``max_iter``), each K continuing from the previous one's factors. On LeNet-5 at x10
#: with 300 iterations, 5 ranked the candidates as full fits do up to a Kendall tau of
#: 0.87 (10: 0.89), and the allocation's summed error was 1.78 (10: 1.82) at the same
#: accuracy; 2 iterations (at 100) raised it 5% and lost 24 points of accuracy.
ESTIMATE_ITERATIONS = 5

#: Between two priced K whose errors differ by at most this, the K in between is interpolated.
SMOOTH_ERROR = 0.02


@dataclasses.dataclass(frozen=True)
class PSMConfig:
    """Options of ``method="psm"``.

    Attributes:
        n_factors: Q, sparse factors per layer (the paper uses 2 and 3).
        sparsity: K, at least K nonzeros in every row and column of each factor
            (the paper uses 2 to 14).
        rank: inner size r of the factors; min(in, out) by default.
        hierarchical: fit with hierarchical palm4MSA (one factor peeled at a
            time) instead of plain palm4MSA.
        max_iter, tol: palm4MSA stops after ``max_iter`` iterations or when the
            relative change of the error drops below ``tol`` (paper: 300, 1e-6).
        seed: seed of palm4MSA's random start, for reproducible fits.
        block: rows per block of the supports: 4 fits supports of whole 1x4
            blocks along the input axis, which LiteRT's sparse fully connected
            kernel runs on (``palm4msa``'s ``block``); 1 is plain splincol.
        device: ``"cpu"`` fits with the NumPy/SciPy ``palm4msa``; ``"auto"`` with
            ``palm4msa_on_device`` on the Keras backend's device (a GPU when the
            backend sees one; Keras 3, plain palm4MSA with ``block=1``).
        verbose: show each layer's palm4MSA iterations in a progress bar.
        update_order: palm4MSA's ``update_order``: ``"auto"`` probes both
            orders for a sixth of the iterations and continues the better one,
            ``"both"`` runs both to the end (twice the time) and keeps the
            better one, ``"right_to_left"`` or ``"left_to_right"`` runs one.
            Plain palm4MSA only (``hierarchical=False``).
        balance: True (the default) gives every factor the norm
            ``|lambda|^(1/Q)``, the product unchanged (``factorize.balance``):
            fine-tuning then recovers more accuracy (docs/finetuning.md).
            False keeps palm4MSA's unit-norm factors with ``lambda`` folded
            into ``S_1``, as the paper does.
    """

    n_factors: int = 3
    sparsity: int = 14
    rank: Optional[int] = None
    hierarchical: bool = False
    max_iter: int = 300
    tol: float = 1e-6
    seed: Optional[int] = 0
    block: int = 1
    device: str = "cpu"
    verbose: bool = False
    update_order: str = "auto"
    balance: bool = True

    def __post_init__(self):
        where = type(self).__name__
        check_int(self.n_factors, "n_factors", minimum=1, where=where)
        check_int(self.sparsity, "sparsity", minimum=1, where=where)
        check_int(self.rank, "rank", minimum=1, where=where, allow_none=True)
        check_int(self.max_iter, "max_iter", minimum=1, where=where)
        check_float(self.tol, "tol", minimum=0.0, where=where)
        check_int(self.seed, "seed", minimum=0, where=where, allow_none=True)
        check_bool(self.hierarchical, "hierarchical", where=where)
        check_int(self.block, "block", minimum=1, where=where)
        check_choice(self.device, "device", ("cpu", "auto"), where=where)
        check_bool(self.verbose, "verbose", where=where)
        check_bool(self.balance, "balance", where=where)
        check_choice(self.update_order, "update_order", UPDATE_ORDERS, where=where)
        if self.hierarchical and self.update_order != "auto":
            raise ValueError(f"{where}: `update_order` applies to plain palm4MSA; got "
                             f"update_order={self.update_order!r} with hierarchical=True.")
        if self.device == "auto" and (self.hierarchical or self.block != 1):
            raise ValueError(f"{where}: `device='auto'` fits plain palm4MSA with block=1; "
                             f"got hierarchical={self.hierarchical}, block={self.block}.")


def kernel_matrix(kernel):
    """A Keras kernel as a matrix: (in, out), or (kh * kw * cin, cout) for Conv2D."""
    return kernel.reshape(-1, kernel.shape[-1])


def fit_psm(kernel, config, covariance=None):
    """palm4MSA (or its hierarchical variant) on the kernel matrix.

    With the layer's input ``covariance`` ``C``, palm4MSA then fits
    ``R W ~ R S_1 ... S_Q`` with ``R^T R = C`` a fixed leftmost factor
    (``||X (W - W_hat)||_F``), starting from the plain fit: its steps only
    lower the error on the data, and the plain fit is a far better start
    than FAuST's when ``C`` is ill-conditioned (small steps along the
    directions the inputs rarely take). This doubles the fitting time.
    With ``config.balance`` the factors are rescaled to one norm
    (``balance_norms``), their product unchanged.
    """
    if covariance is not None and config.hierarchical:
        raise ValueError("PSMConfig: `hierarchical=True` does not take calibration data; "
                         "use hierarchical=False with `calibration_data`.")
    matrix = kernel_matrix(kernel)
    options = dict(rank=config.rank, max_iter=config.max_iter, tol=config.tol,
                   random_state=config.seed)
    if config.device == "auto":
        from keras_psm.palm4msa_accelerated import palm4msa_on_device

        plain = palm4msa_on_device(matrix, config.n_factors, config.sparsity,
                                   update_order=config.update_order, verbose=config.verbose,
                                   **options)
    elif config.hierarchical:
        plain = hierarchical_palm4msa(matrix, config.n_factors, config.sparsity,
                                      block=config.block, **options)
    else:
        plain = palm4msa(matrix, config.n_factors, config.sparsity, block=config.block,
                         update_order=config.update_order, verbose=config.verbose, **options)
    fit = plain
    if covariance is not None:
        options["block"] = config.block
        # With ``left`` palm4msa runs right to left; "both" runs both starts to the end.
        update_order = "both" if config.update_order == "both" else "auto"
        fit = palm4msa(matrix, config.n_factors, config.sparsity,
                       left=whitening_factor(covariance), init=plain.factors,
                       update_order=update_order, **options)
    if not config.balance:
        return fit
    return dataclasses.replace(fit, factors=balance_norms(fit.factors))


def psm_sizes(kernel_shape, config):
    """``target_ratio`` ladders: 12 K on ``knob_grid`` for Q = 2 and Q = 3 (the paper's range),
    up to where splincol's K (max(in, r) + ... + max(r, out)) nonzeros reach the kernel's."""
    rows, cols = math.prod(kernel_shape[:-1]), kernel_shape[-1]
    rank = config.rank or min(rows, cols)
    ladders = []
    for n_factors in (2, 3):
        least = max(rows, rank) + (n_factors - 2) * rank + max(rank, cols)
        top = min(rank, max(1, rows * cols // least))
        ladders.append([dataclasses.replace(config, n_factors=n_factors, sparsity=k)
                        for k in knob_grid(top, count=12)])
    return ladders


def psm_estimates(kernel, ladder, covariance=None, limit=math.inf):
    """Short palm4MSA fits pricing one ladder (``Method.size_estimates``).

    Each priced K runs ``ESTIMATE_ITERATIONS`` palm4MSA iterations,
    continuing from the previous priced K's factors alone
    (``palm4msa(init=..., init_only=True)``: their supports fit inside the
    larger K's, so the error only falls along the ladder), to ``||R (W - S_1 ... S_Q)||_F``
    with ``R^T R = covariance`` when given. Every other K is priced first;
    one in between is interpolated (its nonzeros and error linearly in K)
    where its neighbours' errors differ by at most ``SMOOTH_ERROR``, and
    priced from its smaller neighbour otherwise. Stops after the first fit
    past ``limit`` nonzeros.
    """
    matrix = kernel_matrix(kernel)
    left = None if covariance is None else whitening_factor(covariance)

    def quick(config):
        return dataclasses.replace(config, max_iter=min(config.max_iter, ESTIMATE_ITERATIONS))

    def price(config, start):
        options = dict(rank=config.rank, max_iter=quick(config).max_iter, tol=config.tol,
                       random_state=config.seed, block=config.block)
        if config.hierarchical:
            # the hierarchical fit takes no start
            fit = hierarchical_palm4msa(matrix, config.n_factors, config.sparsity, **options)
        else:
            fit = palm4msa(matrix, config.n_factors, config.sparsity, left=left, init=start,
                           init_only=start is not None, update_order="right_to_left", **options)
        nonzeros = sum(int(np.count_nonzero(support)) for support in fit.supports)
        return Estimate(nonzeros, fit.relative_error, quick(config)), fit.factors

    priced, start = {}, None
    for index in [*range(0, len(ladder) - 1, 2), len(ladder) - 1]:
        priced[index] = price(ladder[index], start)
        start = priced[index][1]
        if priced[index][0].nonzeros > limit:
            break
    estimates = []
    for index in range(max(priced) + 1):
        if index not in priced:
            (low, start), (high, _) = priced[index - 1], priced[index + 1]
            if abs(low.error - high.error) <= SMOOTH_ERROR:
                share = ((ladder[index].sparsity - ladder[index - 1].sparsity)
                         / (ladder[index + 1].sparsity - ladder[index - 1].sparsity))
                priced[index] = (Estimate(
                    int(round(low.nonzeros + share * (high.nonzeros - low.nonzeros))),
                    low.error + share * (high.error - low.error), quick(ladder[index])), None)
            else:
                priced[index] = price(ladder[index], start)
        estimates.append(priced[index][0])
    return estimates


def build_sparse_factor_layer(layer, factorization, config, prunable=False):
    """``SparseFactorDense``/``SparseFactorConv2D`` from a ``Factorization``.

    The layer records as its ``sparsity`` the fewest nonzeros of any row or
    column of the supports, so its config describes the support it holds;
    ``prunable`` layers also hold a 0/1 mask over their values for pruning
    during ``fit``.
    """
    fewest = min(
        int(min(support.sum(axis=0).min(), support.sum(axis=1).min()))
        for support in factorization.supports
    )
    layer_class = (
        SparseFactorConv2D if isinstance(layer, keras.layers.Conv2D) else SparseFactorDense
    )
    return layer_class.replacing(
        layer, factorization.factors, factorization.supports, sparsity=max(1, fewest),
        prunable=prunable,
    )


#: Options at a small and a large parameter budget (the PSM paper's extremes).
PSM_PRESETS = {"small": dict(n_factors=2, sparsity=2), "large": dict(n_factors=3, sparsity=14)}

PSM = register_method(Method(
    name="psm",
    description="product of Q sparse factors per layer, fitted by palm4MSA",
    config_class=PSMConfig,
    fit=fit_psm,
    build=build_sparse_factor_layer,
    presets=PSM_PRESETS,
    paper=PSM_PAPER,
    calibrated=True,
    size_knob=psm_sizes,
    size_estimates=psm_estimates,
))
