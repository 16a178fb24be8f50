"""keras_psm: compress trained Keras models with structured factorizations.

    import keras_psm
    compressed, report = keras_psm.compress(model, method="psm", n_factors=3, sparsity=14)

The Keras in use is ``keras_psm.backend.keras``: Keras 3 (on any backend), or
tf_keras when ``TF_USE_LEGACY_KERAS=1`` is set before the import. The export
functions (``to_tflite``, ``verify_tflite``, ``size_report``) import
TensorFlow, so they load on first use.
"""

from keras_psm.backend import BACKEND, KERAS_NAME, LEGACY_KERAS, keras
from keras_psm.compress import compress
from keras_psm.distill import Distiller
from keras_psm.learning_rate import LearningRatePick, pick_learning_rate
from keras_psm.layers import (
    CompressedConv1D,
    CompressedEinsumDense,
    CompressedLayer,
    CompressedMultiHeadAttention,
    CompressedSeparableConv,
    KroneckerDense,
    KroneckerPatternDense,
    LowRankConv,
    LowRankDense,
    PenaltySchedule,
    SparseFactorConv2D,
    SparseFactorDense,
    TTConv2D,
    TTDense,
    TuckerConv,
)
from keras_psm.methods import (
    ALDSConfig,
    ButterflyConfig,
    HardPruningConfig,
    IterativePruningConfig,
    KPDConfig,
    Method,
    PSMConfig,
    SVDConfig,
    TTConfig,
    TuckerSVDConfig,
    available_methods,
    get_method,
    register_method,
)
from keras_psm.pruning import IterativePruning
from keras_psm.pruning_at_init import prune_at_init
from keras_psm.report import CompressionReport, LayerReport

__version__ = "0.1.0"

_EXPORT_FUNCTIONS = ("size_report", "to_tflite", "verify_tflite")


def __getattr__(name):
    """The export functions, from ``keras_psm.export`` (TensorFlow) on first use."""
    if name in _EXPORT_FUNCTIONS:
        from keras_psm import export

        return getattr(export, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BACKEND",
    "KERAS_NAME",
    "LEGACY_KERAS",
    "ALDSConfig",
    "ButterflyConfig",
    "CompressedConv1D",
    "CompressedEinsumDense",
    "CompressedLayer",
    "CompressedMultiHeadAttention",
    "CompressedSeparableConv",
    "CompressionReport",
    "Distiller",
    "HardPruningConfig",
    "IterativePruning",
    "IterativePruningConfig",
    "KPDConfig",
    "KroneckerDense",
    "KroneckerPatternDense",
    "LayerReport",
    "LearningRatePick",
    "LowRankConv",
    "LowRankDense",
    "Method",
    "PSMConfig",
    "PenaltySchedule",
    "SVDConfig",
    "SparseFactorConv2D",
    "SparseFactorDense",
    "TTConfig",
    "TTConv2D",
    "TTDense",
    "TuckerConv",
    "TuckerSVDConfig",
    "available_methods",
    "compress",
    "get_method",
    "keras",
    "pick_learning_rate",
    "prune_at_init",
    "register_method",
    "size_report",
    "to_tflite",
    "verify_tflite",
]
