"""Which Keras the plugin runs on.

TensorFlow 2.21 resolves ``tf.keras`` to Keras 3, or to ``tf_keras`` (Keras 2)
when the environment variable ``TF_USE_LEGACY_KERAS`` is ``1``/``true``. The
plugin applies the same rule once, when ``keras_psm`` is imported, through an
explicit ``import tf_keras`` or ``import keras``. It never touches ``tf.keras``:
TensorFlow resolves that attribute lazily, so import order would decide.

``keras`` below is the module every other file of the package uses.
"""

import os

import tensorflow as tf

_LEGACY_VALUES = ("true", "True", "1")  # the values TensorFlow itself accepts

#: True when running on tf_keras (``TF_USE_LEGACY_KERAS=1``), False on Keras 3.
LEGACY_KERAS = os.environ.get("TF_USE_LEGACY_KERAS", "") in _LEGACY_VALUES


def check_keras_backend(name):
    """Refuse a Keras 3 backend other than TensorFlow (the layers use TF ops)."""
    if name != "tensorflow":
        raise ImportError(
            f"keras_psm needs Keras 3 on the TensorFlow backend, but KERAS_BACKEND "
            f"is {name!r}. Set KERAS_BACKEND=tensorflow before importing keras, or "
            "set TF_USE_LEGACY_KERAS=1 to use tf_keras."
        )


if LEGACY_KERAS:
    import tf_keras as keras
else:
    import keras

    check_keras_backend(keras.backend.backend())

#: Name of the Keras flavour in use, for messages and reports.
KERAS_NAME = "tf_keras" if LEGACY_KERAS else "keras"


def register_serializable(cls):
    """Register a layer class under the package name ``keras_psm``.

    Models saved as ``.keras`` then reload with no ``custom_objects``.
    """
    return keras.saving.register_keras_serializable(package="keras_psm")(cls)


__all__ = ["keras", "tf", "LEGACY_KERAS", "KERAS_NAME", "register_serializable"]
