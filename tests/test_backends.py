"""keras_psm on Keras 3's other backends: import, compress, fit and ``.keras`` files
without TensorFlow, and ``.keras`` files that TensorFlow loads and exports to TFLite.

Each check runs in a subprocess on its own backend, whatever backend runs the suite.
A process "without TensorFlow" refuses to import it, as on a machine where it is
not installed (Keras itself would otherwise load it when available).
"""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

from keras_psm.backend import BACKEND

WITHOUT_TENSORFLOW = textwrap.dedent("""
    import sys

    class NoTensorFlow:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "tensorflow":
                raise ImportError(f"{name} is not installed here")

    sys.meta_path.insert(0, NoTensorFlow())
""")

OTHER_BACKENDS = [
    pytest.param(name, marks=pytest.mark.skipif(importlib.util.find_spec(name) is None,
                                                reason=f"{name} is not installed"))
    for name in ("jax", "torch")
]


def run_python(code, backend, timeout=600):
    """Run ``code`` in a fresh Python on Keras 3 with ``backend``; return its stdout."""
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env["KERAS_BACKEND"] = backend
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_import_leaves_tensorflow_out(backend):
    code = "import sys, keras_psm\nprint(keras_psm.BACKEND, 'tensorflow' in sys.modules)"
    assert run_python(code, backend).split()[-2:] == [backend, "False"]


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_export_on_another_backend_says_how_in_one_line(backend):
    code = textwrap.dedent("""
        import numpy as np
        import keras_psm
        from keras_psm.backend import keras
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        try:
            keras_psm.to_tflite(model, "never.tflite")
        except RuntimeError as error:
            print(repr(str(error)))
    """)
    message = run_python(code, backend).strip().splitlines()[-1]
    assert "TensorFlow backend" in message and "KERAS_BACKEND=tensorflow" in message
    assert backend in message and "\\n" not in message
    assert not os.path.exists("never.tflite")


@pytest.mark.slow
@pytest.mark.skipif(BACKEND != "jax", reason="the same subprocesses in every mode: run once, "
                    "in the suite's KERAS_BACKEND=jax mode")
@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_compressed_model_trains_without_tensorflow_and_exports_under_it(backend, tmp_path):
    """compress (PSM with a sparse product, Kronecker), fit and a
    ``.keras`` round trip without TensorFlow; TensorFlow then loads the file to the
    same outputs and ``to_tflite`` writes a file that LiteRT runs within 1e-4."""
    train = WITHOUT_TENSORFLOW + textwrap.dedent(f"""
        import numpy as np
        import keras_psm
        from keras_psm.backend import keras
        from keras_psm.layers import SparseFactorDense
        directory = {str(tmp_path)!r}
        keras.utils.set_random_seed(0)
        inputs = keras.Input((8, 8, 3))
        x = keras.layers.Conv2D(8, 3, activation="relu", name="conv")(inputs)
        x = keras.layers.Flatten()(x)
        x = keras.layers.Dense(300, activation="relu", name="fc1")(x)
        outputs = keras.layers.Dense(10, name="fc2")(x)
        model = keras.Model(inputs, outputs)
        x = np.random.default_rng(0).standard_normal((32, 8, 8, 3)).astype("float32")
        y = np.random.default_rng(1).integers(0, 10, 32)
        np.save(directory + "/x.npy", x)
        for method, options in [("psm", dict(n_factors=2, sparsity=2, max_iter=5)),
                                ("kpd", {{}})]:
            compressed, _ = keras_psm.compress(model, method, verbose=0, **options)
            if method == "psm":   # 288 x 288 with 2 nonzeros a row and column: a sparse product
                layer = compressed.get_layer("fc1")
                assert isinstance(layer, SparseFactorDense) and layer._applied_sparse()[0]
            compressed.compile("adam", keras.losses.SparseCategoricalCrossentropy(
                from_logits=True))
            history = compressed.fit(x, y, epochs=2, batch_size=16, verbose=0)
            assert np.isfinite(history.history["loss"][-1])
            path = f"{{directory}}/{{method}}.keras"
            compressed.save(path)
            reloaded = keras.models.load_model(path)
            outputs = keras.ops.convert_to_numpy(compressed(x))
            # Same weights, same backend; float32 rounding of the compiled graph at most.
            np.testing.assert_allclose(keras.ops.convert_to_numpy(reloaded(x)), outputs,
                                       rtol=1e-5, atol=1e-6)
            np.save(f"{{directory}}/{{method}}.npy", outputs)
        print("trained", "tensorflow" in sys.modules)
    """)
    assert run_python(train, backend).split()[-2:] == ["trained", "False"]
    export = textwrap.dedent(f"""
        import numpy as np
        import keras_psm
        from keras_psm.backend import keras
        directory = {str(tmp_path)!r}
        x = np.load(directory + "/x.npy")
        for method in ("psm", "kpd"):
            model = keras.models.load_model(f"{{directory}}/{{method}}.keras")
            expected = np.load(f"{{directory}}/{{method}}.npy")
            # The same float32 weights through other kernels: float32 rounding only.
            np.testing.assert_allclose(keras.ops.convert_to_numpy(model(x)), expected,
                                       rtol=1e-4, atol=1e-5)
            path = keras_psm.to_tflite(model, f"{{directory}}/{{method}}.tflite", inputs=x[:8])
            scale = max(1.0, float(np.abs(expected).max()))
            assert keras_psm.verify_tflite(path, model, x[:8]) <= 1e-4 * scale
        print("exported")
    """)
    assert run_python(export, "tensorflow").split()[-1] == "exported"
