"""Training cost of KroneckerDense against Dense (block-wise sparsity paper, Proposition 2).

For Dense layers of 784x256, 1024x1024 and 4096x1024 (in x out) and
KroneckerDense replacements of rank 2-4 with blocks 2x2 to 16x16, measures
in one run, side by side:

- trainable parameters (Dense: in * out + out; KroneckerDense: S, A_i, B_i and
  the bias, ``(r + 1) g + r b + out``);
- training FLOPs per step from Proposition 2 (appendix A.1: forward, loss and
  backward of a least-squares step, for the contraction order the layer
  uses), for a batch of ``--batch`` rows;
- the measured time of one ``train_on_batch`` step (Adam, mean squared
  error). Dense and KroneckerDense steps alternate in rounds, so that both
  see the same machine load, and each side keeps its fastest step.

Ratios are Dense / KroneckerDense (above 1: KroneckerDense is cheaper).
Writes ``results/kronecker_training.csv`` and ``results/kronecker_training.png``
next to this script.

    python benchmarks/kronecker_training.py           # ranks 2-4, blocks 2-16 (a few minutes)
    python benchmarks/kronecker_training.py --quick   # ranks 2 and 4, blocks 4 and 16
"""

import argparse
import csv
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from keras_psm.backend import KERAS_NAME, keras  # noqa: E402
from keras_psm.factorize.kronecker import (  # noqa: E402
    dense_training_flops,
    kronecker_training_flops,
)
from keras_psm.layers import KroneckerDense  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SHAPES = [(784, 256), (1024, 1024), (4096, 1024)]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="ranks 2 and 4, blocks 4x4 and 16x16, fewer steps")
    parser.add_argument("--batch", type=int, default=256, help="rows per training step")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per round and side (default 5, quick 3)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timing rounds")
    parser.add_argument("--jit", action="store_true", help="compile both models with XLA")
    return parser.parse_args()


def compiled_model(n_in, layer, jit):
    model = keras.Sequential([keras.Input((n_in,)), layer])
    model.compile(keras.optimizers.Adam(1e-3), "mse", jit_compile=jit)
    return model


def step_times(models, x, y, steps, rounds):
    """Fastest seconds of one ``train_on_batch`` per model, the models alternating in rounds.

    The minimum is the time least disturbed by other work on the machine.
    """
    for model in models:
        for _ in range(2):  # trace and warm up
            model.train_on_batch(x, y)
    times = [[] for _ in models]
    for _ in range(rounds):
        for model, samples in zip(models, times):
            for _ in range(steps):
                start = time.perf_counter()
                model.train_on_batch(x, y)
                samples.append(time.perf_counter() - start)
    return [min(samples) for samples in times]


def trainable_params(model):
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


def run(args):
    ranks = (2, 4) if args.quick else (2, 3, 4)
    blocks = (4, 16) if args.quick else (2, 4, 8, 16)
    steps = args.steps or (3 if args.quick else 5)
    rng = np.random.default_rng(0)
    rows = []
    for n_in, n_out in SHAPES:
        x = rng.standard_normal((args.batch, n_in)).astype("float32")
        y = rng.standard_normal((args.batch, n_out)).astype("float32")
        dense = compiled_model(n_in, keras.layers.Dense(n_out), args.jit)
        dense_flops = sum(dense_training_flops(n_in, n_out, args.batch))
        for rank in ranks:
            for block in blocks:
                layer = KroneckerDense(n_out, (block, block), rank=rank, seed=0)
                model = compiled_model(n_in, layer, args.jit)
                kpd_flops = sum(kronecker_training_flops(
                    n_in, n_out, layer.block_shape, rank, args.batch,
                    blocks_first=layer.geometry.blocks_first))
                dense_time, kpd_time = step_times([dense, model], x, y, steps, args.rounds)
                rows.append(dict(
                    shape=f"{n_in}x{n_out}", rank=rank, block=f"{block}x{block}",
                    params_dense=trainable_params(dense), params_kpd=trainable_params(model),
                    flops_dense=dense_flops, flops_kpd=kpd_flops,
                    ms_dense=1e3 * dense_time, ms_kpd=1e3 * kpd_time,
                ))
                print_row(rows[-1], header=len(rows) == 1)
    return rows


def ratios(row):
    return (row["params_dense"] / row["params_kpd"], row["flops_dense"] / row["flops_kpd"],
            row["ms_dense"] / row["ms_kpd"])


def print_row(row, header=False):
    if header:
        print(f"{'shape':>10} {'rank':>4} {'block':>6} {'params':>9} {'KPD params':>10} "
              f"{'x params':>8} {'GFLOPs':>7} {'KPD GFLOPs':>10} {'x FLOPs':>7} "
              f"{'ms':>7} {'KPD ms':>7} {'x time':>6}")
    params, flops, speed = ratios(row)
    print(f"{row['shape']:>10} {row['rank']:>4} {row['block']:>6} {row['params_dense']:>9,} "
          f"{row['params_kpd']:>10,} {params:>8.1f} {row['flops_dense'] / 1e9:>7.3f} "
          f"{row['flops_kpd'] / 1e9:>10.3f} {flops:>7.2f} {row['ms_dense']:>7.2f} "
          f"{row['ms_kpd']:>7.2f} {speed:>6.2f}", flush=True)


def write_csv(rows, path):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) + [
            "params_ratio", "flops_ratio", "speedup"])
        writer.writeheader()
        for row in rows:
            params, flops, speed = ratios(row)
            writer.writerow({**row, "params_ratio": round(params, 3),
                             "flops_ratio": round(flops, 3), "speedup": round(speed, 3)})


def plot(rows, path, batch):
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    for shape in dict.fromkeys(row["shape"] for row in rows):
        for rank in dict.fromkeys(row["rank"] for row in rows):
            selected = [row for row in rows if row["shape"] == shape and row["rank"] == rank]
            labels = [row["block"] for row in selected]
            for axis, index in zip(axes, (1, 2)):
                axis.plot(labels, [ratios(row)[index] for row in selected], marker="o",
                          label=f"{shape}, r={rank}")
    for axis, title in zip(axes, (f"training FLOPs, Dense / KroneckerDense (Prop. 2, N={batch})",
                                  f"measured step time, Dense / KroneckerDense ({KERAS_NAME})")):
        axis.axhline(1.0, color="gray", linewidth=0.8)
        axis.set_yscale("log")
        axis.set_xlabel("block (b_in x b_out)")
        axis.set_title(title, fontsize=10)
    axes[0].axhline(2.0, color="gray", linestyle="--", linewidth=0.8)
    axes[1].legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def summarize(rows):
    print("\nTarget (1024x1024 and 4096x1024, rank <= 4): >= 2x fewer FLOPs and a faster step")
    for row in rows:
        if row["shape"] == "784x256":
            continue
        params, flops, speed = ratios(row)
        met = flops >= 2 and speed > 1
        print(f"  {row['shape']:>9} r={row['rank']} {row['block']:>5}: FLOPs x{flops:.2f}, "
              f"time x{speed:.2f}, params x{params:.0f}  {'met' if met else 'not met'}")


def main():
    args = parse_args()
    RESULTS_DIR.mkdir(exist_ok=True)
    rows = run(args)
    write_csv(rows, RESULTS_DIR / "kronecker_training.csv")
    plot(rows, RESULTS_DIR / "kronecker_training.png", args.batch)
    summarize(rows)
    print(f"\nwrote {RESULTS_DIR / 'kronecker_training.csv'} and kronecker_training.png")


if __name__ == "__main__":
    main()
