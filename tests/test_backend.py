"""The Keras flavour is chosen once, by TensorFlow's own rule."""

import os
import subprocess
import sys

import pytest

import keras_psm
from keras_psm import backend


def keras_module_in_subprocess(env_value, prelude=""):
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    if env_value is not None:
        env["TF_USE_LEGACY_KERAS"] = env_value
    code = f"{prelude}\nimport keras_psm\nprint(keras_psm.keras.__name__, keras_psm.LEGACY_KERAS)"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.split()[-2:]


@pytest.mark.slow
@pytest.mark.parametrize("value, expected", [
    (None, ["keras", "False"]), ("0", ["keras", "False"]),
    ("1", ["tf_keras", "True"]), ("true", ["tf_keras", "True"]),
])
def test_choice_follows_tf_use_legacy_keras(value, expected):
    assert keras_module_in_subprocess(value) == expected


@pytest.mark.slow
def test_import_order_does_not_decide():
    # Touching tf.keras first must not change the plugin's choice.
    prelude = "import tensorflow as tf\n_ = tf.keras.layers.Dense"
    assert keras_module_in_subprocess("1", prelude) == ["tf_keras", "True"]
    assert keras_module_in_subprocess(None, prelude) == ["keras", "False"]


def test_current_process_matches_environment():
    legacy = os.environ.get("TF_USE_LEGACY_KERAS", "") in ("true", "True", "1")
    assert backend.LEGACY_KERAS == legacy
    assert keras_psm.keras.__name__ == ("tf_keras" if legacy else "keras")
    assert issubclass(keras_psm.SparseFactorDense, keras_psm.keras.layers.Layer)
