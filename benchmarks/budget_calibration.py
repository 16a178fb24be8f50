"""Equal budgets and calibration: LeNet-5 at target_ratio 10, 20 and 40.

``compress(..., target_ratio=R)`` chooses each method's size per layer
(``keras_psm.budget``) and ``calibration_data=`` fits each layer to its
inputs (``keras_psm.calibration``). On LeNet-5 trained on the bundled digits
and on 5,000 Fashion-MNIST images, for each ratio:

- PSM with one K for every layer (Q = 3, the largest K whose ratio reaches R),
  PSM with K and Q allocated per layer, and allocated with calibration;
- SVD and hard pruning, allocated, without and with calibration.

Each model's test accuracy is measured right after compression and after the
same fine-tuning (Adam, at the learning rate the PSM paper's protocol picks:
``keras_psm.pick_learning_rate``), twice from the same start: on the labels
alone ("after") and distilled from the uncompressed model ("distilled",
``keras_psm.Distiller``, ``--objective``; ``--distill-epochs N`` distils in
the first N epochs only). ``--no-balance`` fits PSM with
``balance=False`` (``lambda`` in ``S_1``, as the paper does). ``--seeds N`` repeats each
fine-tuning with N seeds and reports the means. A longer-fine-tuning row
(``--long-epochs``) shows what more epochs buy calibrated PSM. Prints one table and writes
``benchmarks/results/budget_calibration.csv`` (``--output``).

    python benchmarks/budget_calibration.py                       # both data sets
    python benchmarks/budget_calibration.py --datasets digits --ratios 20 --finetune-epochs 1
    python benchmarks/budget_calibration.py --ratios 20 40 --variants "psm allocated + calibration"
"""

import argparse
import csv
import os
import time

import dataclasses

import numpy as np

import keras_psm
from keras_psm import demo
from keras_psm.datasets import DATASETS, load_dataset, load_mnist_5k
from keras_psm.distill import OBJECTIVES

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
FASHION = "/work/shared/data/fashion_mnist_5k.npz"
#: (label, method, calibrated): the allocated variants.
VARIANTS = [
    ("psm allocated", "psm", False),
    ("psm allocated + calibration", "psm", True),
    ("svd allocated", "svd", False),
    ("svd allocated + calibration", "svd", True),
    ("hard-pruning allocated", "hard-pruning", False),
    ("hard-pruning allocated + calibration", "hard-pruning", True),
]
UNIFORM = "psm uniform"
#: The variant the longer-fine-tuning row fine-tunes.
LONG_VARIANT = "psm allocated + calibration"
FIELDS = ("dataset", "target_ratio", "variant", "ratio", "params", "accuracy_before",
          "accuracy_after", "accuracy_distilled", "distillation_gain_se", "finetune_epochs",
          "finetune_seeds", "compress_seconds", "layer_knobs")


def load(name, fashion_path):
    """``(x_train, y_train), (x_test, y_test)`` of the bundled digits or of Fashion-MNIST 5k.

    Fashion-MNIST comes from ``keras_psm.datasets`` when it bundles it, else
    from ``fashion_path`` (the archive of 4,000 training and 1,000 test images).
    """
    if name == "digits":
        return load_mnist_5k()
    if "fashion_mnist_5k" in DATASETS:
        return load_dataset("fashion_mnist_5k")
    data = np.load(fashion_path)
    images = lambda x: (x.astype("float32") / 255.0)[..., None]  # noqa: E731
    return ((images(data["x_train"]), data["y_train"].astype("int64")),
            (images(data["x_test"]), data["y_test"].astype("int64")))


def finetune_and_score(model, report, base, data, settings, seeds=1):
    """Test accuracy before fine-tuning, after it, and after it distilled from ``base``.

    Every fine-tuning starts from the compressed weights (``demo.finetune``);
    with ``seeds`` > 1, each is run with seeds ``settings.seed`` onwards (the
    batches' order) and the accuracies are their means. The fourth value is
    the standard error of the distilled-minus-labels difference, paired by
    seed (``std(d, ddof=1) / sqrt(seeds)``; NaN with one seed).
    """
    _, (x_test, y_test) = data
    before = demo.accuracy(model, x_test, y_test)
    if not settings.finetune_epochs:
        return before, before, before, float("nan")
    start = model.get_weights()
    accuracies = {False: [], True: []}
    for distill in (False, True):
        for seed in range(settings.seed, settings.seed + seeds):
            model.set_weights(start)
            demo.finetune(model, base, data,
                          dataclasses.replace(settings, distill=distill, seed=seed),
                          report.callbacks)
            accuracies[distill].append(demo.accuracy(model, x_test, y_test))
    gains = np.subtract(accuracies[True], accuracies[False])
    gain_error = float(np.std(gains, ddof=1) / np.sqrt(seeds)) if seeds > 1 else float("nan")
    return (before, float(np.mean(accuracies[False])), float(np.mean(accuracies[True])),
            gain_error)


def row(dataset, target, variant, report, scores, seconds, epochs, seeds):
    before = sum(r.params_before for r in report.compressed)
    after = sum(r.params_after for r in report.compressed)
    return dict(dataset=dataset, target_ratio=target, variant=variant,
                ratio=round(before / after, 2), params=after,
                accuracy_before=round(scores[0], 4), accuracy_after=round(scores[1], 4),
                accuracy_distilled=round(scores[2], 4),
                distillation_gain_se=round(scores[3], 4), finetune_epochs=epochs,
                finetune_seeds=seeds,
                compress_seconds=round(seconds, 1),
                layer_knobs="; ".join(f"{r.name}: {r.note}" for r in report.compressed))


def uniform_psm(base, ratios, max_iter, balance):
    """For each ratio, the Q = 3 PSM compression with one K for all layers reaching it."""
    found, k = {}, 1
    fits = {}
    while len(found) < len(ratios) and k <= 16:
        fits[k] = keras_psm.compress(base, "psm", n_factors=3, sparsity=k, max_iter=max_iter,
                                     balance=balance, verbose=0)
        k += 1
    for ratio in ratios:
        reaching = [k for k, (_, report) in fits.items() if report.compression_ratio >= ratio]
        if reaching:
            found[ratio] = (max(reaching), fits[max(reaching)])
    return found


def run(dataset, args):
    settings = demo.Settings(train_epochs=args.train_epochs, finetune_epochs=args.finetune_epochs,
                             max_iter=args.max_iter, temperature=args.temperature,
                             alpha=args.alpha, objective=args.objective,
                             distill_epochs=args.distill_epochs, pick_steps=args.pick_steps)
    data = load(dataset, args.fashion_path)
    (x, y), (x_test, y_test) = data
    base = demo.lenet5(x.shape[1:], 10, seed=settings.seed)
    demo.train(base, data, settings)
    # Fine-tuning only: a fixed rate instead of the pick, a moving average of the weights.
    if args.learning_rate is not None:
        settings = dataclasses.replace(settings, learning_rate=args.learning_rate,
                                       pick_rate=False)
    settings = dataclasses.replace(settings, ema_momentum=args.ema)
    dense = demo.accuracy(base, x_test, y_test)
    calibration = x[:args.calibration_samples]
    rows = [dict(dataset=dataset, target_ratio=1, variant="dense", ratio=1.0,
                 params=base.count_params(), accuracy_before=round(dense, 4),
                 accuracy_after=round(dense, 4), accuracy_distilled=round(dense, 4),
                 finetune_epochs=0, finetune_seeds=0, compress_seconds=0.0, layer_knobs="")]
    uniform = {}
    if UNIFORM in args.variants:
        start = time.perf_counter()
        uniform = uniform_psm(base, args.ratios, args.max_iter, args.balance)
        uniform_seconds = time.perf_counter() - start
    long_settings = dataclasses.replace(settings, finetune_epochs=args.long_epochs)
    for ratio in args.ratios:
        if ratio in uniform:
            k, (model, report) = uniform[ratio]
            rows.append(row(dataset, ratio, f"{UNIFORM} K={k}", report,
                            finetune_and_score(model, report, base, data, settings,
                                               args.seeds),
                            uniform_seconds, settings.finetune_epochs, args.seeds))
        for label, method, calibrated in VARIANTS:
            if label not in args.variants:
                continue
            options = dict(max_iter=args.max_iter, balance=args.balance) if method == "psm" else {}
            start = time.perf_counter()
            model, report = keras_psm.compress(
                base, method, target_ratio=ratio, verbose=0,
                calibration_data=calibration if calibrated else None, **options)
            seconds = time.perf_counter() - start
            runs = [(label, settings)]
            if label == LONG_VARIANT and ratio in args.long_ratios and args.long_epochs:
                runs.append((f"{label}, {args.long_epochs} epochs", long_settings))
            start_weights = model.get_weights()
            for name, run_settings in runs:
                model.set_weights(start_weights)
                scores = finetune_and_score(model, report, base, data, run_settings,
                                            args.seeds)
                rows.append(row(dataset, ratio, name, report, scores, seconds,
                                run_settings.finetune_epochs, args.seeds))
                print(f"  {dataset} x{ratio} {name}: acc {scores[0]:.3f} -> {scores[1]:.3f}, "
                      f"distilled {scores[2]:.3f} (gain s.e. {scores[3]:.3f}, "
                      f"x{rows[-1]['ratio']}, {seconds:.0f} s)",
                      flush=True)
    return rows


def format_rows(rows):
    header = ("data", "target", "variant", "ratio", "acc. before", "acc. after", "distilled",
              "gain s.e.", "epochs", "compress s")
    lines = [header] + [
        (r["dataset"], f"x{r['target_ratio']}", r["variant"], f"x{r['ratio']}",
         f"{r['accuracy_before']:.4f}", f"{r['accuracy_after']:.4f}",
         f"{r['accuracy_distilled']:.4f}", f"{r.get('distillation_gain_se', float('nan')):.4f}",
         str(r["finetune_epochs"]),
         f"{r['compress_seconds']:.0f}") for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()
                     for line in lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["digits", "fashion"],
                        choices=["digits", "fashion"])
    parser.add_argument("--ratios", nargs="+", type=int, default=[10, 20, 40])
    parser.add_argument("--train-epochs", type=int, default=10)
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=[UNIFORM] + [v[0] for v in VARIANTS],
                        choices=[UNIFORM] + [v[0] for v in VARIANTS])
    parser.add_argument("--long-epochs", type=int, default=20,
                        help=f"epochs of the longer fine-tuning of {LONG_VARIANT!r} (0: none)")
    parser.add_argument("--long-ratios", nargs="+", type=int, default=[40],
                        help="the ratios that get the longer-fine-tuning row")
    parser.add_argument("--temperature", type=float, default=demo.FULL.temperature)
    parser.add_argument("--alpha", type=float, default=demo.FULL.alpha)
    parser.add_argument("--objective", choices=OBJECTIVES,
                        default=demo.FULL.objective)
    parser.add_argument("--distill-epochs", type=int, metavar="N",
                        help="distil in the first N fine-tuning epochs only (default: all)")
    parser.add_argument("--learning-rate", type=float,
                        help="fine-tune at this rate (default: the paper's pick of 1e-3, 1e-4, "
                             "1e-5); the dense model always trains at 1e-3")
    parser.add_argument("--pick-steps", type=int, default=demo.FULL.pick_steps,
                        help="steps each rate trains before the pick compares them "
                             "(the paper: 10)")
    parser.add_argument("--ema", type=float, metavar="MOMENTUM",
                        help="fine-tune with a moving average of the weights (Adam's use_ema)")
    parser.add_argument("--max-iter", type=int, default=300,
                        help="palm4MSA iterations per fit (default: compress's and the paper's)")
    parser.add_argument("--balance", action=argparse.BooleanOptionalAction, default=True,
                        help="fit PSM with balance=True (the default: every factor the same "
                             "norm); --no-balance: lambda in S_1, as the paper does")
    parser.add_argument("--seeds", type=int, default=1,
                        help="fine-tune each model this many times, with seeds 0, 1, ..., "
                             "and report the mean accuracies (default: 1)")
    parser.add_argument("--calibration-samples", type=int, default=256)
    parser.add_argument("--fashion-path", default=FASHION,
                        help="fashion_mnist_5k.npz, when keras_psm.datasets does not bundle it")
    parser.add_argument("--output", default=os.path.join(RESULTS, "budget_calibration.csv"))
    args = parser.parse_args()
    rows = []
    for dataset in args.datasets:
        rows += run(dataset, args)
    print(format_rows(rows))
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
