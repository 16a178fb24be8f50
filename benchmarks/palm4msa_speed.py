"""Speed and error of keras_psm's palm4MSA against FAuST's C++ implementation (pyfaust).

Both sides factorize the same matrices with the same constraints (splincol
``K`` on every factor), the same factor shapes and the same number of
iterations (our ``tol=0`` and pyfaust's ``StoppingCriterion(num_its=...)``),
each with its default start and update order: FAuST updates left to right
from a zero first factor; ours (``update_order="auto"``) probes that and the
right-to-left order for 1/6 of the iterations and continues the better.

Cases:

- Gaussian 256x256 (Q=2, K=14), 512x512 (Q=3, K=14), 512x1024 (Q=3, K=8);
- matrices ``U diag(i^-alpha) V^T`` (random orthonormal ``U``, ``V``) whose
  singular values decay like a power law, as those of trained layers do:
  784x256 (alpha=0.5, Q=2, K=14), 256x784 (alpha=1, Q=2, K=8), 512x256
  (alpha=1, Q=3, K=8);
- trained kernels: the first Dense kernel (784x256, Q=3, K=14) of an MLP,
  the ``fc1`` kernel (400x120, Q=2, K=4) of the demo's LeNet-5, and the
  ``fc1`` kernel (576x128, Q=2, K=8) and the ``block3_conv2`` kernel as a
  576x64 matrix (Q=2, K=4) of the demo's ``vgg_small``, each trained here
  for 3 epochs on the bundled MNIST digits;
- the hierarchical factorization of the 256x256 Hadamard matrix into 8
  factors against ``pyfaust.fact.hierarchical(H, 'hadamard')`` (30
  iterations per inner run, splincol 2 on the factors, d/2^l on the
  residuals, as that preset).

pyfaust is optional (``pip install keras-psm[bench]``); without it only our
times are printed. Writes ``results/palm4msa_speed.csv`` and
``results/palm4msa_speed.png`` next to this script.

Large layers, before against after (``--before COMMIT``): the ``keras_psm``
package of ``COMMIT`` (from ``git archive``) against the current one, each
case in a fresh subprocess, one at a time, reporting seconds per iteration,
peak resident memory (``VmHWM``) and the error: VGG16's ``fc6`` kernel shape
(25,088 x 4,096, Q=3, K=14) and kernel shapes of ResNet50 at 224x224 (Q=3,
K=14), on Gaussian matrices of those shapes (the pretrained weights need a
download).

``--precision``: float32 against float64 (``palm4msa(..., dtype=...)``) at
palm4msa's defaults (300 iterations, tol 1e-6, ``"auto"``; Q=3, K=14) on the
ResNet50 shapes and 2304x256 and 1024x256, with power-law (alpha 0.7) and
Gaussian matrices: seconds, iterations and errors.

``--fc6-only --device auto`` runs only fc6 with ``palm4msa_on_device`` on
the current Keras backend and its device (no TensorFlow or pyfaust needed
with ``KERAS_BACKEND=jax``); ``--device cpu`` runs the NumPy ``palm4msa``.

    python benchmarks/palm4msa_speed.py            # all cases, 300 iterations
    python benchmarks/palm4msa_speed.py --quick    # 256x256 and Hadamard 64, seconds
    python benchmarks/palm4msa_speed.py --before c58aca2 --iterations 3
    python benchmarks/palm4msa_speed.py --precision
    KERAS_BACKEND=jax python benchmarks/palm4msa_speed.py --fc6-only --device auto
"""

import argparse
import csv
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.linalg import hadamard

from keras_psm.factorize.palm4msa import factor_shapes, hierarchical_palm4msa, palm4msa

RESULTS_DIR = Path(__file__).resolve().parent / "results"
HADAMARD_ITERATIONS = 30  # what pyfaust's 'hadamard' preset runs per inner palm4MSA
REPOSITORY = Path(__file__).resolve().parent.parent
FC6 = (25088, 4096)
# (kh * kw * cin, cout) kernel matrices of ResNet50 at 224x224: a 3x3 conv of the
# last stage, 1x1 expansions and reductions, the first stage's 3x3 conv, the classifier.
RESNET50_SHAPES = [(4608, 512), (1024, 2048), (2048, 512), (576, 64), (2048, 1000)]


@dataclass
class Case:
    """One matrix to factorize: ``n_factors`` splincol-``sparsity`` factors."""

    name: str
    matrix: np.ndarray
    n_factors: int
    sparsity: int
    hierarchical: bool = False


@dataclass
class Timing:
    seconds: float
    relative_error: float


def gaussian_case(rows, columns, n_factors, sparsity, rng):
    matrix = rng.standard_normal((rows, columns))
    return Case(f"gaussian {rows}x{columns} Q={n_factors} K={sparsity}", matrix,
                n_factors, sparsity)


def decaying_case(rows, columns, alpha, n_factors, sparsity, rng):
    """``U diag(i^-alpha) V^T``: singular values decaying like a power law."""
    rank = min(rows, columns)
    left, _ = np.linalg.qr(rng.standard_normal((rows, rank)))
    right, _ = np.linalg.qr(rng.standard_normal((columns, rank)))
    matrix = (left * np.arange(1.0, rank + 1) ** -alpha) @ right.T
    return Case(f"decay^{alpha:g} {rows}x{columns} Q={n_factors} K={sparsity}", matrix,
                n_factors, sparsity)


def trained_kernels(epochs=3, seed=0):
    """Kernels (as ``(in, out)`` matrices) of three models trained on the bundled MNIST digits."""
    from keras_psm import demo
    from keras_psm.backend import keras
    from keras_psm.datasets import load_mnist_5k

    (x_train, y_train), _ = load_mnist_5k(seed=seed)
    keras.utils.set_random_seed(seed)
    mlp = keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Flatten(),
        keras.layers.Dense(256, activation="relu", name="fc1"),
        keras.layers.Dense(10, activation="softmax"),
    ])
    models = {"MLP": mlp, "LeNet-5": demo.lenet5(seed=seed),
              "vgg_small": demo.vgg_small(input_shape=(28, 28, 1), seed=seed)}
    kernels = {}
    for name, model in models.items():
        model.compile("adam", "sparse_categorical_crossentropy")
        model.fit(x_train, y_train, epochs=epochs, batch_size=64, verbose=0)
        for layer in model.layers:
            if layer.name in ("fc1", "block3_conv2"):
                kernel = np.asarray(layer.get_weights()[0], dtype=np.float64)
                kernels[f"{name} {layer.name}"] = kernel.reshape(-1, kernel.shape[-1])
    return kernels


def trained_cases(seed):
    kernels = trained_kernels(seed=seed)
    cases = []
    for name, n_factors, sparsity in [("MLP fc1", 3, 14), ("LeNet-5 fc1", 2, 4),
                                      ("vgg_small fc1", 2, 8), ("vgg_small block3_conv2", 2, 4)]:
        kernel = kernels[name]
        rows, columns = kernel.shape
        cases.append(Case(f"{name} {rows}x{columns} Q={n_factors} K={sparsity}", kernel,
                          n_factors, sparsity))
    return cases


def hadamard_case(n):
    matrix = hadamard(2 ** n).astype(np.float64)
    return Case(f"hierarchical Hadamard {2 ** n}x{2 ** n} Q={n} K=2", matrix, n, 2,
                hierarchical=True)


def relative_error(matrix, product):
    return float(np.linalg.norm(matrix - product) / np.linalg.norm(matrix))


def run_ours(case, iterations):
    start = time.perf_counter()
    if case.hierarchical:
        result = hierarchical_palm4msa(case.matrix, case.n_factors, case.sparsity,
                                       max_iter=HADAMARD_ITERATIONS, tol=0)
    else:
        result = palm4msa(case.matrix, case.n_factors, case.sparsity,
                          max_iter=iterations, tol=0)
    seconds = time.perf_counter() - start
    return Timing(seconds, relative_error(case.matrix, result.product))


def run_faust(case, iterations):
    from pyfaust.fact import hierarchical, palm4msa as faust_palm4msa
    from pyfaust.factparams import ConstraintList, ParamsPalm4MSA, StoppingCriterion

    if case.hierarchical:
        start = time.perf_counter()
        faust = hierarchical(case.matrix, "hadamard")
    else:
        constraint_args = []
        for rows, columns in factor_shapes(case.matrix.shape, case.n_factors):
            constraint_args += ["splincol", case.sparsity, rows, columns]
        params = ParamsPalm4MSA(ConstraintList(*constraint_args),
                                StoppingCriterion(num_its=iterations))
        start = time.perf_counter()
        faust = faust_palm4msa(case.matrix, params)
    seconds = time.perf_counter() - start
    return Timing(seconds, relative_error(case.matrix, faust.toarray()))


def faust_available():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importlib.import_module("pyfaust.fact")
    except ImportError:
        return False
    return True


def build_cases(quick, seed):
    rng = np.random.default_rng(seed)
    if quick:
        return [gaussian_case(256, 256, 2, 14, rng), hadamard_case(6)]
    return [
        gaussian_case(256, 256, 2, 14, rng),
        gaussian_case(512, 512, 3, 14, rng),
        gaussian_case(512, 1024, 3, 8, rng),
        decaying_case(784, 256, 0.5, 2, 14, rng),
        decaying_case(256, 784, 1.0, 2, 8, rng),
        decaying_case(512, 256, 1.0, 3, 8, rng),
        *trained_cases(seed),
        hadamard_case(8),
    ]


def print_table(rows, with_faust):
    header = f"{'case':<42} {'ours (s)':>9} {'ours err':>10}"
    if with_faust:
        header += (f" {'FAuST (s)':>10} {'FAuST err':>10} {'err - FAuST':>12}"
                   f" {'time ours/FAuST':>16}")
    print(header)
    print("-" * len(header))
    for row in rows:
        line = f"{row['case']:<42} {row['ours_seconds']:>9.2f} {row['ours_error']:>10.3g}"
        if with_faust:
            line += (f" {row['faust_seconds']:>10.2f} {row['faust_error']:>10.3g}"
                     f" {row['ours_error'] - row['faust_error']:>+12.4f} {row['ratio']:>16.3f}")
        print(line)


def write_csv(rows, path):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot(rows, with_faust, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    positions = np.arange(len(rows))
    width = 0.4 if with_faust else 0.8
    figure, axis = plt.subplots(figsize=(10, 4.5))
    axis.bar(positions - (width / 2 if with_faust else 0), [r["ours_seconds"] for r in rows],
             width, label="keras_psm (NumPy/SciPy)")
    if with_faust:
        axis.bar(positions + width / 2, [r["faust_seconds"] for r in rows], width,
                 label="pyfaust (C++)")
        for position, row in zip(positions, rows):
            top = max(row["ours_seconds"], row["faust_seconds"])
            axis.annotate(f"ours/FAuST {row['ratio']:.2f}", (position, top),
                          ha="center", va="bottom", fontsize=8)
    axis.set_xticks(positions)
    axis.set_xticklabels([r["case"] for r in rows], rotation=15, ha="right", fontsize=8)
    axis.set_ylabel("seconds (wall clock)")
    axis.set_yscale("log")
    axis.set_title("palm4MSA: keras_psm vs pyfaust (same constraints and iterations)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def peak_memory_bytes():
    """This process's peak resident memory (``VmHWM``)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM"))
    return int(line.split()[1]) * 1024


def large_matrix(shape, seed=0):
    """A float32 Gaussian matrix, as a Keras kernel of that shape would be."""
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def measure_in_this_process(shape, iterations, tol):
    """Fit Q=3, K=14 with the ``palm4msa`` that ``keras_psm`` imports from: seconds per
    iteration, peak memory (GB, all and during the fit) and the error, as one JSON line."""
    import keras_psm
    from keras_psm.factorize.palm4msa import palm4msa

    matrix = large_matrix(shape)
    before = peak_memory_bytes()
    start = time.perf_counter()
    result = palm4msa(matrix, 3, 14, max_iter=iterations, tol=tol, random_state=0)
    seconds = time.perf_counter() - start
    peak = peak_memory_bytes()
    print(json.dumps({"seconds_per_iteration": seconds / len(result.errors),
                      "iterations": len(result.errors), "peak_gb": peak / 1e9,
                      "fit_peak_gb": (peak - before) / 1e9, "error": float(result.errors[-1]),
                      "package": keras_psm.__file__}))


def measure_in_subprocess(package_root, shape, iterations, tol):
    """``measure_in_this_process`` in a fresh process importing ``keras_psm`` from
    ``package_root``."""
    command = [sys.executable, __file__, "--measure", f"{shape[0]}x{shape[1]}",
               "--iterations", str(iterations), "--tol", str(tol)]
    completed = subprocess.run(command, capture_output=True, text=True, check=True,
                               env={**os.environ, "PYTHONPATH": str(package_root)})
    return json.loads(completed.stdout.strip().splitlines()[-1])


def before_after(commit, iterations, tol):
    """fc6 and the ResNet50 shapes with the ``keras_psm`` of ``commit`` and the current one."""
    with tempfile.TemporaryDirectory() as folder:
        archive = subprocess.run(["git", "-C", str(REPOSITORY), "archive", commit, "keras_psm"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
        print(f"{'shape (Q=3, K=14)':<18} {'s/it before':>11} {'s/it after':>10} {'ratio':>6}"
              f" {'peak GB before':>14} {'after':>6} {'fit GB before':>13} {'after':>6}"
              f" {'error before':>12} {'after':>8}")
        for shape in [FC6] + RESNET50_SHAPES:
            before = measure_in_subprocess(folder, shape, iterations, tol)
            after = measure_in_subprocess(REPOSITORY, shape, iterations, tol)
            print(f"{shape[0]}x{shape[1]:<12} {before['seconds_per_iteration']:>11.2f}"
                  f" {after['seconds_per_iteration']:>10.2f}"
                  f" {before['seconds_per_iteration'] / after['seconds_per_iteration']:>6.2f}"
                  f" {before['peak_gb']:>14.2f} {after['peak_gb']:>6.2f}"
                  f" {before['fit_peak_gb']:>13.2f} {after['fit_peak_gb']:>6.2f}"
                  f" {before['error']:>12.5f} {after['error']:>8.5f}", flush=True)


def precision(seed):
    """float32 against float64 at palm4msa's defaults on the ResNet50 shapes (and 2304x256,
    1024x256), power-law and Gaussian matrices."""
    rng = np.random.default_rng(seed)
    print(f"{'case':<32} {'s float64':>9} {'float32':>8} {'ratio':>6} {'iterations':>11}"
          f" {'error float64':>13} {'float32':>9}")
    for rows, columns in RESNET50_SHAPES + [(2304, 256), (1024, 256)]:
        for case in (decaying_case(rows, columns, 0.7, 3, 14, rng),
                     gaussian_case(rows, columns, 3, 14, rng)):
            fits = {}
            for dtype in ("float64", "float32"):
                start = time.perf_counter()
                result = palm4msa(case.matrix, 3, 14, random_state=0, dtype=dtype)
                fits[dtype] = (time.perf_counter() - start, len(result.errors), result.errors[-1])
            (seconds64, iterations64, error64), (seconds32, iterations32, error32) = (
                fits["float64"], fits["float32"])
            print(f"{case.name:<32} {seconds64:>9.2f} {seconds32:>8.2f}"
                  f" {seconds32 / seconds64:>6.2f} {f'{iterations64} / {iterations32}':>11}"
                  f" {error64:>13.6f} {error32:>9.6f}", flush=True)


def fc6_alone(device, iterations):
    """fc6 on the current Keras backend's device (``auto``) or with NumPy (``cpu``)."""
    if device == "auto":
        import keras

        from keras_psm.palm4msa_accelerated import palm4msa_on_device as fit

        where = f"Keras {keras.__version__}, backend {keras.backend.backend()}"
    else:
        from keras_psm.factorize.palm4msa import palm4msa as fit

        where = f"NumPy/SciPy, {os.cpu_count()} CPUs"
    matrix = large_matrix(FC6)
    start = time.perf_counter()
    fit(matrix, 3, 14, max_iter=1, tol=0)  # the backend compiles its kernels for these shapes
    warm_up = time.perf_counter() - start
    start = time.perf_counter()
    result = fit(matrix, 3, 14, max_iter=iterations, tol=0, random_state=0)
    seconds = time.perf_counter() - start
    print(f"fc6 {FC6[0]}x{FC6[1]} Q=3 K=14, {where}: {iterations} iterations in"
          f" {seconds:.1f} s, {seconds / iterations:.3f} s per iteration, after a"
          f" 1-iteration warm-up of {warm_up:.1f} s; relative error {result.relative_error:.5f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="only the 256x256 and the 64x64 Hadamard cases")
    parser.add_argument("--iterations", type=int, default=300,
                        help="palm4MSA iterations for the non-hierarchical cases (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-faust", action="store_true", help="time keras_psm only")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--before", metavar="COMMIT",
                        help="fc6 and ResNet50 shapes: palm4msa.py of COMMIT against the current")
    parser.add_argument("--tol", type=float, default=0.0, help="tol of the --before fits")
    parser.add_argument("--fc6-only", action="store_true", help="only fc6, on --device")
    parser.add_argument("--device", choices=("auto", "cpu"), default="auto",
                        help="auto: palm4msa_on_device on the Keras backend; cpu: NumPy")
    parser.add_argument("--precision", action="store_true",
                        help="float32 against float64 at the defaults on the ResNet50 shapes")
    parser.add_argument("--measure", metavar="SHAPE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.iterations < 1:
        parser.error("--iterations must be >= 1")
    if args.measure:
        shape = tuple(int(size) for size in args.measure.split("x"))
        return measure_in_this_process(shape, args.iterations, args.tol)
    if args.before:
        return before_after(args.before, args.iterations, args.tol)
    if args.fc6_only:
        return fc6_alone(args.device, args.iterations)
    if args.precision:
        return precision(args.seed)

    with_faust = not args.no_faust and faust_available()
    if not with_faust and not args.no_faust:
        print("pyfaust is not installed: timing keras_psm only.")
    cases = build_cases(args.quick, args.seed)

    rows = []
    for case in cases:
        ours = run_ours(case, args.iterations)
        row = {"case": case.name, "ours_seconds": ours.seconds, "ours_error": ours.relative_error}
        if with_faust:
            faust = run_faust(case, args.iterations)
            row.update(faust_seconds=faust.seconds, faust_error=faust.relative_error,
                       ratio=ours.seconds / faust.seconds)
        rows.append(row)
        print(f"done: {case.name}", flush=True)

    print()
    print_table(rows, with_faust)
    print(f"\n{os.cpu_count()} CPUs; load average (1, 5, 15 min) at the end: "
          + ", ".join(f"{load:.1f}" for load in os.getloadavg()))
    args.output_dir.mkdir(parents=True, exist_ok=True)
    write_csv(rows, args.output_dir / "palm4msa_speed.csv")
    plot(rows, with_faust, args.output_dir / "palm4msa_speed.png")
    print(f"\nwrote {args.output_dir / 'palm4msa_speed.csv'} and "
          f"{args.output_dir / 'palm4msa_speed.png'}")


if __name__ == "__main__":
    main()
