"""One norm for every factor of a product, for fine-tuning by gradient steps.

palm4MSA keeps each factor at unit Frobenius norm and returns the scale
``lambda`` folded into ``S_1`` (PSM paper, supplement A.4, Algorithm 1,
line 14), so ``S_1`` starts ``|lambda|`` times larger than the others. The
product ``S_1 ... S_Q`` is unchanged by ``S_q -> c_q S_q`` whenever
``prod_q c_q = 1``; ``balance_norms`` picks the positive ``c_q`` that give
every factor the same norm::

    g = (prod_q ||S_q||_F)^(1/Q),   c_q = g / ||S_q||_F

(``|lambda|^(1/Q)`` each for palm4MSA's factors). Gradient descent keeps
the differences ``||S_{q+1}||_F^2 - ||S_q||_F^2`` of such a product almost
constant (Du, Hu & Lee, "Algorithmic Regularization in Learning Deep
Homogeneous Models: Layers are Automatically Balanced", NeurIPS 2018), so a
start with ``lambda`` in one factor stays unbalanced through fine-tuning.
"""

import numpy as np

__all__ = ["balance_norms"]


def balance_norms(factors):
    """``[c_q S_q]`` with ``prod_q c_q = 1`` and ``||c_q S_q||_F`` the same for every ``q``.

    ``factors``: dense arrays ``S_1 .. S_Q``. Returns float64 arrays with the
    same supports and signs; unchanged (as float64) if a factor is all zero,
    since the product is then zero and no scale is defined.
    """
    factors = [np.asarray(factor, dtype=np.float64) for factor in factors]
    norms = [float(np.linalg.norm(factor)) for factor in factors]
    if len(factors) < 2 or min(norms) == 0.0:
        return factors
    log_norms = np.log(norms)
    log_scales = log_norms.mean() - log_norms  # sums to zero: the product is unchanged
    return [factor * np.exp(log_scale) for factor, log_scale in zip(factors, log_scales)]
