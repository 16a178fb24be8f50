"""keras_psm: compress trained Keras models with structured factorizations.

    import keras_psm
    compressed, report = keras_psm.compress(model, method="psm", n_factors=3, sparsity=14)

The Keras in use is ``keras_psm.backend.keras``: Keras 3, or tf_keras when
``TF_USE_LEGACY_KERAS=1`` is set before the import.
"""

from keras_psm.backend import KERAS_NAME, LEGACY_KERAS, keras
from keras_psm.compress import compress
from keras_psm.layers import CompressedLayer, SparseFactorConv2D, SparseFactorDense
from keras_psm.methods import Method, PSMConfig, available_methods, get_method, register_method
from keras_psm.report import CompressionReport, LayerReport

__version__ = "0.1.0"

__all__ = [
    "KERAS_NAME",
    "LEGACY_KERAS",
    "CompressedLayer",
    "CompressionReport",
    "LayerReport",
    "Method",
    "PSMConfig",
    "SparseFactorConv2D",
    "SparseFactorDense",
    "available_methods",
    "compress",
    "get_method",
    "keras",
    "register_method",
]
