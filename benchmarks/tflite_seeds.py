"""The default float32 and int8 TFLite files of a trained LeNet-5 PSM, over seeds.

The recipe, once per seed: a LeNet-5 trained 2 epochs on the first 4,000
bundled digits (``keras.utils.set_random_seed(seed)``), ``compress(model,
"psm", n_factors=2, sparsity=4)``, then ``to_tflite`` with its defaults
(float32, ``factor_form="sequence"``) and with ``quantization="dynamic_int8"``.
For each seed it prints which candidate the float32 file keeps (the sparse or
the dense encoding of the sequence, or the product form), its size against
the uncompressed LeNet-5's file, and the float32 / int8 size ratio.

``--without-route`` exports as keras_psm did before it routed the weights
that TFLite's converter truncates (``litert_cost.drops_inputs``) through 1x1
convolutions, to count how often the fault shows.

Run ``python benchmarks/tflite_seeds.py --seeds 20`` (about half a minute a
seed on 2 cores); it writes ``benchmarks/results/tflite_seeds.csv``.
"""

import argparse
import collections
import csv
import os
import tempfile
import warnings

import numpy as np

import keras_psm
from keras_psm import demo, export
from keras_psm.backend import keras
from keras_psm.datasets import load_mnist_5k

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def kept_candidate(caught):
    """Which candidate ``to_tflite`` kept, from the warning it gave (none: the sparse encoding)."""
    for warning in caught:
        text = str(warning.message)
        for label in ("the product form", "the dense encoding", "the sparse encoding"):
            if f"keeps {label}" in text:
                return label.removeprefix("the ")
    return "sparse encoding"


def export_size(model, path, inputs, **options):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        keras_psm.to_tflite(model, path, inputs=inputs, **options)
    return os.path.getsize(path), kept_candidate(caught)


def one_seed(seed, data, directory):
    (x, y), check = data
    keras.utils.set_random_seed(seed)
    model = demo.lenet5(seed=seed)
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=2, batch_size=64, verbose=0)
    small, _ = keras_psm.compress(model, "psm", n_factors=2, sparsity=4, verbose=0)
    dense_bytes = os.path.getsize(keras_psm.to_tflite(
        model, os.path.join(directory, "dense.tflite"), sparse=False))
    float_bytes, kept = export_size(small, os.path.join(directory, "f32.tflite"), check)
    int8_bytes, _ = export_size(small, os.path.join(directory, "int8.tflite"), check,
                                quantization="dynamic_int8")
    return dict(seed=seed, kept=kept, dense_bytes=dense_bytes, float32_bytes=float_bytes,
                int8_bytes=int8_bytes, dense_over_float32=dense_bytes / float_bytes,
                float32_over_int8=float_bytes / int8_bytes)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=20, help="number of seeds (0, 1, ...)")
    parser.add_argument("--without-route", action="store_true",
                        help="export as before the route around the converter's truncation")
    args = parser.parse_args()
    if args.without_route:
        export.drops_inputs = lambda matrix: False
    (x_train, y_train), _ = load_mnist_5k(test_size=1000, seed=0)
    data = (x_train[:4000], y_train[:4000]), x_train[:64]
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for seed in range(args.seeds):
            rows.append(one_seed(seed, data, directory))
            row = rows[-1]
            print(f"seed {seed:2d}: keeps {row['kept']:<16} {row['float32_bytes']:>8,} bytes, "
                  f"dense / float32 x{row['dense_over_float32']:.1f}, "
                  f"float32 / int8 x{row['float32_over_int8']:.2f}", flush=True)
    counts = collections.Counter(row["kept"] for row in rows)
    ratios = np.array([row["dense_over_float32"] for row in rows])
    int8 = np.array([row["float32_over_int8"] for row in rows])
    print(f"\n{len(rows)} seeds: kept " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print(f"dense / float32 file: min x{ratios.min():.2f}, median x{np.median(ratios):.2f}, "
          f"max x{ratios.max():.2f}")
    print(f"float32 / int8 file: min x{int8.min():.2f}, median x{np.median(int8):.2f}, "
          f"max x{int8.max():.2f}")
    os.makedirs(RESULTS, exist_ok=True)
    name = "tflite_seeds_without_route.csv" if args.without_route else "tflite_seeds.csv"
    with open(os.path.join(RESULTS, name), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
