"""Keras layers that replace Dense/Conv2D with structured factorizations."""

from keras_psm.layers.base import CompressedLayer
from keras_psm.layers.sparse_factor import SparseFactorConv2D, SparseFactorDense

__all__ = ["CompressedLayer", "SparseFactorConv2D", "SparseFactorDense"]
