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

    python benchmarks/palm4msa_speed.py            # all cases, 300 iterations
    python benchmarks/palm4msa_speed.py --quick    # 256x256 and Hadamard 64, seconds
"""

import argparse
import csv
import importlib
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.linalg import hadamard

from keras_psm.factorize.palm4msa import factor_shapes, hierarchical_palm4msa, palm4msa

RESULTS_DIR = Path(__file__).resolve().parent / "results"
HADAMARD_ITERATIONS = 30  # what pyfaust's 'hadamard' preset runs per inner palm4MSA


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="only the 256x256 and the 64x64 Hadamard cases")
    parser.add_argument("--iterations", type=int, default=300,
                        help="palm4MSA iterations for the non-hierarchical cases (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-faust", action="store_true", help="time keras_psm only")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    if args.iterations < 1:
        parser.error("--iterations must be >= 1")

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
