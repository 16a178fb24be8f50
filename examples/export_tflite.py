"""Compress a LeNet-5 with PSM and ship it as a .tflite file that stays small.

    python examples/export_tflite.py [--out-dir DIR]

Trains a LeNet-5 for two epochs on the bundled MNIST digits, compresses
every layer into products of sparse factors (Q = 2, K = 4), fine-tunes for
one epoch, then exports both the dense and the compressed model with
``keras_psm.export.to_tflite``. The export checks each file with the LiteRT
interpreter against its Keras model before writing it; ``size_report``
compares the files and the per-layer parameters, and the test digits are
classified by the .tflite file itself.
"""

import argparse
import os

import numpy as np

import keras_psm
from keras_psm import demo, export
from keras_psm.datasets import load_mnist_5k


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=".", help="where to write the .tflite files")
    args = parser.parse_args()
    (x_train, y_train), (x_test, y_test) = load_mnist_5k(test_size=500, seed=0)

    dense = demo.lenet5()
    dense.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    dense.fit(x_train, y_train, epochs=2, batch_size=64, verbose=0)

    compressed, report = keras_psm.compress(dense, "psm", n_factors=2, sparsity=4,
                                            max_iter=100, verbose=0)
    compressed.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    compressed.fit(x_train, y_train, epochs=1, batch_size=64, verbose=0)
    print(report)

    os.makedirs(args.out_dir, exist_ok=True)
    check = x_test[:16]  # real samples make the export's LiteRT check meaningful
    dense_path = export.to_tflite(dense, os.path.join(args.out_dir, "lenet5_dense.tflite"),
                                  inputs=check)
    psm_path = export.to_tflite(compressed, os.path.join(args.out_dir, "lenet5_psm.tflite"),
                                inputs=check)
    half_path = export.to_tflite(compressed,
                                 os.path.join(args.out_dir, "lenet5_psm_float16.tflite"),
                                 inputs=check, quantization="float16")
    print()
    print(export.size_report(compressed, psm_path, dense_model=dense, dense_path=dense_path))
    print(f"float16 file: {os.path.getsize(half_path):,} bytes")

    probabilities = export.run_tflite(psm_path, x_test)[0]
    keras_accuracy = compressed.evaluate(x_test, y_test, verbose=0)[1]
    tflite_accuracy = float(np.mean(probabilities.argmax(axis=1) == y_test))
    print(f"test accuracy: Keras {keras_accuracy:.3f}, .tflite (LiteRT) {tflite_accuracy:.3f}; "
          f"max |tflite - keras| = {export.verify_tflite(psm_path, compressed, x_test):.1e}")


if __name__ == "__main__":
    main()
