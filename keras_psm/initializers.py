"""Sparse He and Xavier (Glorot) initialization, fan-in counted on the support.

PSM supplement A.3: when the weights of a sparse factor do not come from
palm4MSA, their scale must follow the reduced number of connections. For a
factor of shape (rows, cols) with 0/1 support M, unit j of the output sees
``fan_in_j = sum_i M[i, j]`` inputs and input i feeds
``fan_out_i = sum_j M[i, j]`` outputs. Then, on the support,

- He (first factor, followed by a ReLU):   w_ij ~ N(0, 2 / fan_in_j)
- Xavier (other factors, no nonlinearity): w_ij ~ N(0, 2 / (fan_in_j + fan_out_i))

and zero outside it. Pure NumPy, so a layer can draw its starting values once.
"""

import numpy as np

from keras_psm.factorize.projections import splincol_support


def sparse_he_normal(support, rng):
    """He-normal weights on ``support`` (bool, (rows, cols)), fan-in per column."""
    support = np.asarray(support, dtype=bool)
    fan_in = np.maximum(support.sum(axis=0, keepdims=True), 1)
    std = np.sqrt(2.0 / fan_in)
    return rng.standard_normal(support.shape) * std * support


def sparse_glorot_normal(support, rng):
    """Xavier-normal weights on ``support``, fan-in per column, fan-out per row."""
    support = np.asarray(support, dtype=bool)
    fan_in = support.sum(axis=0, keepdims=True)
    fan_out = support.sum(axis=1, keepdims=True)
    std = np.sqrt(2.0 / np.maximum(fan_in + fan_out, 1))
    return rng.standard_normal(support.shape) * std * support


def sparse_factor_init(supports, rng):
    """Starting weights of a product of sparse factors: He first, Xavier after."""
    return [
        sparse_he_normal(support, rng) if index == 0 else sparse_glorot_normal(support, rng)
        for index, support in enumerate(supports)
    ]


def random_supports(shapes, sparsity, rng):
    """Random supports: the ``splincol`` support of centred Gaussian matrices.

    The "PSM random" setting of the PSM paper (Table 1): at least ``sparsity``
    nonzeros in every row and column of each factor.
    """
    return [splincol_support(rng.standard_normal(shape), sparsity) for shape in shapes]
