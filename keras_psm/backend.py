"""Which Keras the plugin runs on, and on which backend.

TensorFlow 2.21 resolves ``tf.keras`` to Keras 3, or to ``tf_keras`` (Keras 2)
when the environment variable ``TF_USE_LEGACY_KERAS`` is ``1``/``true``. The
plugin applies the same rule once, when ``keras_psm`` is imported, through an
explicit ``import tf_keras`` or ``import keras``. It never touches ``tf.keras``:
TensorFlow resolves that attribute lazily, so import order would decide.

Keras 3 may run on any of its backends (``KERAS_BACKEND``: tensorflow, jax,
torch); the layers speak :mod:`keras_psm.ops` only. TensorFlow is imported
where it is the point (TFLite export, the tfmot baselines, tf_keras, a
``tf.data.Dataset`` given as calibration data): ``backend.tf`` imports it on
first use, never when ``keras_psm`` is imported.

``keras`` below is the module every other file of the package uses.
"""

import importlib
import os

_LEGACY_VALUES = ("true", "True", "1")  # the values TensorFlow itself accepts

#: True when running on tf_keras (``TF_USE_LEGACY_KERAS=1``), False on Keras 3.
LEGACY_KERAS = os.environ.get("TF_USE_LEGACY_KERAS", "") in _LEGACY_VALUES

if LEGACY_KERAS:
    import tf_keras as keras
else:
    import keras

#: Name of the Keras flavour in use, for messages and reports.
KERAS_NAME = "tf_keras" if LEGACY_KERAS else "keras"

#: The Keras backend: "tensorflow" (always so on tf_keras), "jax" or "torch".
BACKEND = "tensorflow" if LEGACY_KERAS else keras.backend.backend()


def require_tensorflow_backend(what, how):
    """Refuse ``what`` (a feature built on TensorFlow) on another Keras backend,
    in one line that says ``how`` to get it."""
    if BACKEND != "tensorflow":
        raise RuntimeError(f"{what} needs the TensorFlow backend, but Keras runs on "
                           f"{BACKEND!r} (KERAS_BACKEND): {how}")


def register_serializable(cls):
    """Register a layer class under the package name ``keras_psm``.

    Models saved as ``.keras`` then reload with no ``custom_objects``.
    """
    return keras.saving.register_keras_serializable(package="keras_psm")(cls)


def __getattr__(name):
    """``backend.tf``: TensorFlow, imported on first use."""
    if name == "tf":
        return importlib.import_module("tensorflow")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["keras", "BACKEND", "LEGACY_KERAS", "KERAS_NAME", "register_serializable",
           "require_tensorflow_backend"]
