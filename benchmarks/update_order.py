"""How long ``update_order="auto"`` must probe both orders to pick the better one.

palm4msa's two update orders (right to left, the PSM supplement's Algorithm 1;
left to right, FAuST's) reach different local minima. ``"auto"`` runs both for
a sixth of the iterations (``PROBE_FRACTION``: 50 of 300) and continues the one
with the lower error. For each case this script runs both orders for 300
iterations (``tol=0``) and, for probes of 10, 25, 50, 100 and 150 iterations
(those shorter than ``--iterations``), counts the cases where the order ahead
after the probe ends behind, and by how much (the relative error lost against
the better order).

Cases: Q = 2, K = 4; Q = 3, K = 8; Q = 3, K = 14, on matrices with power-law
spectra (singular values ``i^-alpha``, alpha 0.5, 1 and 2, random singular
vectors), Gaussian matrices, six shapes from 200 x 400 to 784 x 256, and the
kernels of a LeNet-5 trained 5 epochs on the bundled digits (conv2, fc1, fc2,
fc3). Each case where K reaches the smaller side is left out.

Run ``python benchmarks/update_order.py`` (about 5 minutes on 2 cores); it
writes ``benchmarks/results/update_order.csv``.
"""

import argparse
import csv
import itertools
import os

import numpy as np

from keras_psm import demo
from keras_psm.datasets import load_mnist_5k
from keras_psm.factorize.palm4msa import palm4msa

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SHAPES = [(256, 512), (512, 256), (400, 200), (200, 400), (784, 256), (576, 128)]
ALPHAS = (0.5, 1.0, 2.0)
SIZES = [(2, 4), (3, 8), (3, 14)]
PROBES = (10, 25, 50, 100, 150)
ORDERS = ("right_to_left", "left_to_right")


def power_law(shape, alpha, rng):
    """``U diag(i^-alpha) V^T`` with random orthonormal ``U`` and ``V``."""
    rank = min(shape)
    u, _ = np.linalg.qr(rng.standard_normal((shape[0], rank)))
    v, _ = np.linalg.qr(rng.standard_normal((shape[1], rank)))
    return (u * np.arange(1, rank + 1) ** -alpha) @ v.T


def matrices(epochs):
    """The synthetic matrices and the trained LeNet-5 kernels, by name."""
    rng = np.random.default_rng(0)
    found = {}
    for shape in SHAPES:
        for alpha in ALPHAS:
            found[f"power law {alpha} {shape[0]}x{shape[1]}"] = power_law(shape, alpha, rng)
        found[f"Gaussian {shape[0]}x{shape[1]}"] = rng.standard_normal(shape)
    data = load_mnist_5k()
    settings = demo.Settings(train_epochs=epochs)
    model = demo.lenet5(data[0][0].shape[1:], 10, seed=settings.seed)
    demo.train(model, data, settings)
    for name in ("conv2", "fc1", "fc2", "fc3"):
        kernel = np.asarray(model.get_layer(name).kernel, dtype=np.float64)
        matrix = kernel.reshape(-1, kernel.shape[-1])
        found[f"LeNet-5 {name} {matrix.shape[0]}x{matrix.shape[1]}"] = matrix
    return found


def one_case(name, matrix, n_factors, sparsity, iterations, probes):
    """Both orders' final errors, and what each probe length's pick loses at the end."""
    errors = {order: palm4msa(matrix, n_factors, sparsity, max_iter=iterations, tol=0,
                              update_order=order, random_state=0).errors
              for order in ORDERS}
    final = {order: errors[order][-1] for order in ORDERS}
    row = dict(case=name, n_factors=n_factors, sparsity=sparsity,
               right_to_left=round(final["right_to_left"], 6),
               left_to_right=round(final["left_to_right"], 6))
    for probe in probes:
        picked = min(ORDERS, key=lambda order: errors[order][probe - 1])
        row[f"lost_after_{probe}"] = round(final[picked] - min(final.values()), 6)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--train-epochs", type=int, default=5,
                        help="epochs of the LeNet-5 whose kernels are cases")
    args = parser.parse_args()
    probes = [probe for probe in PROBES if probe < args.iterations]
    rows = []
    for (name, matrix), (n_factors, sparsity) in itertools.product(
            matrices(args.train_epochs).items(), SIZES):
        if sparsity < min(matrix.shape):
            rows.append(one_case(name, matrix, n_factors, sparsity, args.iterations, probes))
            row = rows[-1]
            print(f"{name:28s} Q={n_factors} K={sparsity:2d}: right to left "
                  f"{row['right_to_left']:.5f}, left to right {row['left_to_right']:.5f}",
                  flush=True)
    gaps = np.array([abs(row["right_to_left"] - row["left_to_right"]) for row in rows])
    print(f"\n{len(rows)} cases; the orders end more than 0.01 apart in {np.sum(gaps > 0.01)}, "
          f"at most {gaps.max():.3f} apart")
    for probe in probes:
        lost = np.array([row[f"lost_after_{probe}"] for row in rows])
        print(f"probe of {probe:2d} iterations: picks the order behind at the end in "
              f"{np.sum(lost > 0):2d} cases, losing at most {lost.max():.4f} "
              f"(more than 0.001 in {np.sum(lost > 0.001)})")
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "update_order.csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
