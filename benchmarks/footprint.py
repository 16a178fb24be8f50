"""Where a user holds a PSM model: .keras file, variables, fit memory and time, .tflite.

For VGG19 for CIFAR-10 (16 3x3 convolutions 64-64-M-128-128-M-256x4-M-512x4-M-512x4-M,
then Dense(10): 20.0 M weights at ``--width 1``) and LeNet-5, each dense and
compressed with PSM at Q=3 K=14 and Q=2 K=4 (``compress(method="psm")``,
palm4MSA capped at ``--max-iter`` iterations), one run prints:

- ``.keras`` bytes (``model.save``);
- bytes of the model's variables (values, indices and bias);
- peak resident memory of a ``fit`` (``peak_resident_bytes`` of a fresh
  process that loads the ``.keras`` file and trains, Adam);
- CPU fit-step time at batch 64 (Adam, ``train_on_batch``): the variants of
  a model take turns, one step each, for ``--steps`` rounds after two
  warm-up steps, so that load from other processes falls on all of them
  alike; the median per variant;
- ``.tflite`` bytes (``keras_psm.export.to_tflite``) and single-sample LiteRT
  latency (one thread) for each ``factor_form`` (``--no-tflite`` skips them).

``--break-even`` instead times a fit step of one factor on the current Keras
backend (``KERAS_BACKEND``: TensorFlow, JAX or PyTorch), as a dense product
(values scattered, then ``matmul``) and as the layers' sparse product
(``SparseMatrix``: a gather and a segment sum) at several densities: the
measurement behind ``keras_psm.layers.sparse_factor.SPARSE_SLOWDOWN``.

Weights are He-initialized, not trained: sizes and speeds depend on the
structure only. Every figure is also printed as a ratio to the dense model.
Run ``python benchmarks/footprint.py`` (``--width 0.25 --max-iter 5`` for a
quick run).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

import keras_psm
from keras_psm import demo, export, ops
from keras_psm.backend import BACKEND, keras
from keras_psm.layers.sparse_factor import SPARSE_SLOWDOWN
from keras_psm.layers.sparse_matrix import SparseMatrix

import step_time  # noqa: E402 (benchmarks/, the script's folder, is on sys.path)

VARIANTS = (("dense", None), ("psm Q=3 K=14", dict(n_factors=3, sparsity=14)),
            ("psm Q=2 K=4", dict(n_factors=2, sparsity=4)))
BATCH = 64


def vgg19_cifar(width=1.0, n_classes=10, seed=0):
    """``step_time.vgg19_cifar`` with a softmax classifier."""
    return step_time.vgg19_cifar(width, n_classes, seed, activation="softmax")


def variable_bytes(model):
    return sum(np.asarray(v.numpy()).nbytes for v in model.weights)


def batch_for(model):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH,) + tuple(model.inputs[0].shape[1:])).astype("float32")
    return x, rng.integers(0, 10, BATCH)


def compiled(model):
    model.compile(keras.optimizers.Adam(1e-4), "sparse_categorical_crossentropy")
    return model


def peak_fit_bytes(path, steps):
    """Peak resident bytes of a fresh process that loads ``path`` and trains it."""
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--fit-child", path,
                           "--steps", str(steps)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"]


def fit_child(path, steps):
    model = compiled(keras.models.load_model(path))
    x, y = batch_for(model)
    for _ in range(steps + 2):
        model.train_on_batch(x, y)
    print(json.dumps({"peak_bytes": peak_resident_bytes()}))


def peak_resident_bytes():
    """This process's peak resident memory: Linux's ``VmHWM``, which starts anew
    at ``exec``. (``getrusage``'s maxrss does not: a child started from a
    large parent reports at least the parent's size at the fork.)"""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KB on Linux


def step_seconds(models, steps):
    """Median ``train_on_batch`` seconds of each model, the models taking turns."""
    models = [compiled(model) for model in models]
    batches = [batch_for(model) for model in models]
    times = [[] for _ in models]
    for step in range(steps + 2):
        for model, (x, y), spent in zip(models, batches, times):
            start = time.perf_counter()
            model.train_on_batch(x, y)
            if step >= 2:
                spent.append(time.perf_counter() - start)
    return [float(np.median(spent)) for spent in times]


def measure(model, directory, steps, tflite, runs):
    path = os.path.join(directory, f"{model.name}.keras")
    model.save(path)
    row = {"keras_bytes": os.path.getsize(path), "variable_bytes": variable_bytes(model),
           "peak_fit_bytes": peak_fit_bytes(path, steps)}
    if tflite:
        forms = export.FACTOR_FORMS if any(
            isinstance(layer, (keras_psm.SparseFactorDense, keras_psm.SparseFactorConv2D))
            for layer in model.layers) else ("auto",)
        for form in forms:
            file = os.path.join(directory, f"{model.name}_{form}.tflite")
            export.to_tflite(model, file, factor_form=form)
            row[f"tflite_bytes {form}"] = os.path.getsize(file)
            row[f"latency_us {form}"] = 1e6 * export.litert_latency(file, runs)
    return row


def run(builders, max_iter, steps, tflite, runs):
    for name, build in builders:
        dense = build()
        print(f"\n{name}: {dense.count_params():,} weights", flush=True)
        models, rows, notes = [], [], []
        with tempfile.TemporaryDirectory() as directory:
            for variant, options in VARIANTS:
                start = time.perf_counter()
                model = dense if options is None else keras_psm.compress(
                    dense, "psm", max_iter=max_iter, verbose=0, **options)[0]
                notes.append("" if options is None else
                             f"  (palm4MSA {time.perf_counter() - start:.0f} s)")
                models.append(model)
                rows.append(measure(model, directory, steps, tflite, runs))
        for row, seconds in zip(rows, step_seconds(models, steps)):
            row["fit_step_seconds"] = seconds
        for (variant, _), model, row, note in zip(VARIANTS, models, rows, notes):
            nonzero = sum(layer.count_nonzero_params() if hasattr(
                layer, "count_nonzero_params") else layer.count_params()
                for layer in model.layers)
            print(f"  {variant:14s} nonzero {nonzero:>11,}  "
                  f"x{nonzero / dense.count_params():.3f}{note}")
            for key, value in row.items():
                base = rows[0].get(key) or rows[0][
                    "tflite_bytes auto" if key.startswith("tflite") else "latency_us auto"]
                print(f"    {key:22s} {value:>14,.4g}   x{value / base:.3f} of dense", flush=True)


class OneFactor(keras.layers.Layer):
    """``x @ F`` for a fixed-support factor F whose nonzero values are trained,
    applied as a ``SparseMatrix`` product or as the dense matrix; its support
    is held in non-trainable int32 variables, as the layers hold it."""

    def __init__(self, rows, cols, shape, sparse):
        super().__init__()
        self.shape, self.sparse = shape, sparse
        self.values = self.add_weight(shape=(rows.size,), initializer="random_normal")
        self.rows, self.cols = [
            self.add_weight(shape=(rows.size,), dtype="int32", trainable=False,
                            initializer=keras.initializers.Constant(index))
            for index in (rows, cols)]

    def call(self, inputs):
        factor = SparseMatrix(self.rows, self.cols, self.values, self.shape)
        if self.sparse:
            return factor.applied_to(inputs)
        return ops.matmul(inputs, factor.to_dense())


def factor_step_seconds(n_rows, shape, densities, repeats=5):
    """Median ``train_on_batch`` seconds of ``x @ F`` (squared loss, SGD) at each
    density, as (dense, sparse) pairs; the two forms take turns."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n_rows, shape[0])).astype("float32")
    y = np.zeros((n_rows, shape[1]), "float32")
    pairs = []
    for density in densities:
        flat = np.sort(rng.choice(shape[0] * shape[1],
                                  max(1, int(density * shape[0] * shape[1])), replace=False))
        rows, cols = (flat // shape[1]).astype("int32"), (flat % shape[1]).astype("int32")
        models = []
        for sparse in (False, True):
            model = keras.Sequential([keras.Input(shape[:1]),
                                      OneFactor(rows, cols, shape, sparse)])
            model.compile(keras.optimizers.SGD(1e-6), "mse")
            model.train_on_batch(x, y)   # compiles
            models.append(model)
        times = [[], []]
        for _ in range(repeats):
            for model, spent in zip(models, times):
                start = time.perf_counter()
                float(np.asarray(model.train_on_batch(x, y)))   # waits for the device
                spent.append(time.perf_counter() - start)
        pairs.append([float(np.median(spent)) for spent in times])
    return pairs


def break_even(densities=(0.003, 0.01, 0.03)):
    print(f"{BACKEND}: dense / sparse seconds per fit step of one factor (sparse wins above 1; "
          f"the layers use the sparse product below density 1 / {SPARSE_SLOWDOWN:g})")
    for n_rows, shape in ((1024, (4608, 512)), (256, (512, 512)), (4096, (2304, 256))):
        pairs = factor_step_seconds(n_rows, shape, densities)
        figures = ", ".join(f"{100 * density:g}% {dense / sparse:.2f}"
                            for density, (dense, sparse) in zip(densities, pairs))
        print(f"  {n_rows} rows x {shape}: density {figures}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=1.0, help="VGG19 width multiplier")
    parser.add_argument("--max-iter", type=int, default=300, help="palm4MSA iterations")
    parser.add_argument("--steps", type=int, default=5, help="timed fit steps")
    parser.add_argument("--runs", type=int, default=50, help="timed LiteRT invocations")
    parser.add_argument("--no-tflite", action="store_true", help="skip the .tflite figures")
    parser.add_argument("--models", nargs="+", default=["lenet5", "vgg19"],
                        choices=["lenet5", "vgg19"])
    parser.add_argument("--break-even", action="store_true",
                        help="time dense against sparse products of one factor instead")
    parser.add_argument("--fit-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.break_even:
        break_even()
        return
    if args.fit_child:
        fit_child(args.fit_child, args.steps)
        return
    builders = {"lenet5": ("LeNet-5", demo.lenet5),
                "vgg19": (f"VGG19-CIFAR (width {args.width})",
                          lambda: vgg19_cifar(args.width))}
    run([builders[name] for name in args.models], args.max_iter, args.steps,
        not args.no_tflite, args.runs)


if __name__ == "__main__":
    main()
