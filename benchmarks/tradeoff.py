"""Accuracy against parameters: PSM and its baselines, the PSM paper's comparison at small scale.

PSM paper, Figure 1 and Table 4 (supplement A.7), on a LeNet-5 with the MNIST
digits and a small VGG-style CNN with CIFAR-size inputs (the MNIST digits
padded to 32 x 32 and repeated over 3 channels, or CIFAR-10 with
``--dataset cifar10`` where the network allows):

- PSM at (Q, K) in {2, 3} x {2, 4, 8, 14};
- PSM re-init. and PSM random at (Q, K) in {2, 3} x {2, 14} (Table 4);
- hard pruning and iterative pruning at 95% and 98% sparsity, Tucker-SVD
  keeping 10% and 20% of the Dense ranks, TT with 4 cores and R = 6, 10, 14
  (Figure 1's baselines), each one that is registered.

Every compressed model is fine-tuned with the same optimizer (Adam) for the
same number of epochs (``keras_psm.demo.run_trials``). The script prints one
table per model, PSM's accuracy against each baseline at no more parameters,
and the Table 4 comparison, and writes ``benchmarks/results/tradeoff_MODEL.csv``
and ``.png`` (MODEL: lenet5, vgg_small).

    python benchmarks/tradeoff.py --models lenet5    # about 5 minutes on 2 CPU cores
    python benchmarks/tradeoff.py --models vgg --train-samples 3000 --finetune-epochs 2
"""

import argparse
import dataclasses
import os
import time

import numpy as np

import keras_psm
from keras_psm import demo
from keras_psm.datasets import DATASETS

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PSM_GRID = [(q, k) for q in (2, 3) for k in (2, 4, 8, 14)]
VARIANT_GRID = [(q, k) for q in (2, 3) for k in (2, 14)]
PSM_VARIANTS = ("psm-reinit", "psm-random")
#: Figure 1's baselines: (method, budget label, options).
BASELINES = [
    ("hard-pruning", "HP 95%", dict(target_sparsity=0.95)),
    ("hard-pruning", "HP 98%", dict(target_sparsity=0.98)),
    ("iterative-pruning", "IP 95%", dict(target_sparsity=0.95)),
    ("iterative-pruning", "IP 98%", dict(target_sparsity=0.98)),
    ("tucker-svd", "Tucker-SVD 10%", dict(dense_rank_ratio=0.1)),
    ("tucker-svd", "Tucker-SVD 20%", dict(dense_rank_ratio=0.2)),
    ("tt", "TT R=6", dict(n_cores=4, max_rank=6)),
    ("tt", "TT R=10", dict(n_cores=4, max_rank=10)),
    ("tt", "TT R=14", dict(n_cores=4, max_rank=14)),
]
#: Baselines PSM is expected to beat at equal parameters (paper, section 3.3).
BEATEN_BY_PSM = ("hard-pruning", "tucker-svd")


def trials(max_iter):
    """The comparison's trials, for the methods that are registered."""
    available = keras_psm.available_methods()
    grid = [("psm", q, k) for q, k in PSM_GRID]
    grid += [(name, q, k) for name in PSM_VARIANTS if name in available for q, k in VARIANT_GRID]
    result = [
        demo.Trial(name, f"Q={q} K={k}", demo.cap_max_iter(
            keras_psm.get_method(name), dict(n_factors=q, sparsity=k), max_iter))
        for name, q, k in grid
    ]
    result += [demo.Trial(name, label, options) for name, label, options in BASELINES
               if name in available]
    missing = sorted({name for name, _, _ in BASELINES if name not in available}
                     | {name for name in PSM_VARIANTS if name not in available})
    if missing:
        print(f"not registered, left out: {', '.join(missing)}")
    return result


def series_name(result):
    """Figure 1's series: one per PSM kind and Q, one per baseline method."""
    if result.method in ("psm",) + PSM_VARIANTS:
        return f"{result.method} {result.budget.split()[0]}"
    return result.method


def padded_rgb(images):
    """28 x 28 x 1 digits as 32 x 32 x 3 images (zero border, grey repeated)."""
    return np.repeat(np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0))), 3, axis=-1)


def model_and_data(name, settings):
    data = demo.load_data(settings)
    (x, y), (x_test, y_test) = data
    n_classes = int(y.max()) + 1
    if name == "lenet5":
        return demo.lenet5(x.shape[1:], n_classes, seed=settings.seed), data
    if x.shape[1:] != (32, 32, 3):
        data = ((padded_rgb(x), y), (padded_rgb(x_test), y_test))
    return demo.vgg_small(data[0][0].shape[1:], n_classes, seed=settings.seed), data


def run_model(name, settings, max_iter):
    model, data = model_and_data(name, settings)
    train_seconds = demo.train(model, data, settings)
    results = [demo.base_result(model, data, train_seconds)]
    results += demo.run_trials(model, trials(max_iter), data, settings)
    return results


def psm_versus_baselines(results):
    """Lines comparing each baseline with the best PSM model that has no more parameters."""
    psm = [r for r in results if r.method == "psm" and not r.failed]
    lines = []
    for baseline in results:
        if baseline.failed or baseline.method in ("psm", demo.BASE) + PSM_VARIANTS:
            continue
        rivals = [r for r in psm if r.params <= baseline.params]
        if not rivals:
            lines.append(f"  {baseline.budget:15s} {baseline.params:8,} params "
                         f"acc {baseline.accuracy_after:.4f}: no PSM model this small")
            continue
        best = max(rivals, key=lambda r: r.accuracy_after)
        lines.append(
            f"  {baseline.budget:15s} {baseline.params:8,} params acc "
            f"{baseline.accuracy_after:.4f} | PSM {best.budget:9s} {best.params:8,} params acc "
            f"{best.accuracy_after:.4f} ({best.accuracy_after - baseline.accuracy_after:+.4f})")
    return lines


def table4(results):
    """PSM, PSM re-init. and PSM random side by side, as in Table 4."""
    accuracy = {(r.method, r.budget): r for r in results}
    lines = [f"  {'':9s}" + "".join(f"{name:>12s}" for name in ("psm",) + PSM_VARIANTS)]
    for q, k in VARIANT_GRID:
        cells = []
        for name in ("psm",) + PSM_VARIANTS:
            result = accuracy.get((name, f"Q={q} K={k}"))
            cells.append("      failed" if result is None or result.failed
                         else f"{result.accuracy_after:12.4f}")
        lines.append(f"  Q={q} K={k:<3d}" + "".join(cells))
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=("lenet5", "vgg"),
                        default=["lenet5", "vgg"])
    parser.add_argument("--dataset", choices=DATASETS,
                        default="mnist_5k",
                        help="mnist_5k is bundled; cifar10 is used as is by the VGG-style CNN "
                             "(and LeNet-5); MNIST digits are padded to 32 x 32 x 3 for it")
    parser.add_argument("--train-samples", type=int, default=demo.FULL.train_samples)
    parser.add_argument("--train-epochs", type=int, default=demo.FULL.train_epochs)
    parser.add_argument("--finetune-epochs", type=int, default=demo.FULL.finetune_epochs)
    parser.add_argument("--max-iter", type=int, default=None,
                        help="palm4MSA iterations (default: each method's own, 300)")
    parser.add_argument("--output", default=RESULTS)
    args = parser.parse_args()

    settings = dataclasses.replace(
        demo.FULL, dataset=args.dataset, train_samples=args.train_samples,
        train_epochs=args.train_epochs, finetune_epochs=args.finetune_epochs,
        max_iter=args.max_iter)
    os.makedirs(args.output, exist_ok=True)
    print(f"{keras_psm.KERAS_NAME}; {settings}")

    for name in args.models:
        start = time.perf_counter()
        results = run_model(name, settings, args.max_iter)
        model_name = results[0].model_name
        title = (f"{model_name} on {settings.dataset} ({settings.train_samples} samples), "
                 f"fine-tuned {settings.finetune_epochs} epochs (Adam)")
        print(f"\n{title} ({time.perf_counter() - start:.0f} s)")
        print(demo.format_table(results))
        print("\neach baseline against the most accurate PSM model with no more parameters:")
        print("\n".join(psm_versus_baselines(results)))
        print("\nTable 4 (accuracy after fine-tuning):")
        print("\n".join(table4(results)))
        stem = os.path.join(args.output, f"tradeoff_{model_name}")
        demo.write_csv(results, f"{stem}.csv")
        demo.plot_tradeoff(results, f"{stem}.png", title=title, series_of=series_name)
        print(f"\nwrote {stem}.csv and {stem}.png")


if __name__ == "__main__":
    main()
