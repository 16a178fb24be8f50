"""What a budget costs: ``compress(..., target_ratio=R)`` against a plain compress.

``keras_psm.budget`` prices each layer's candidate sizes cheaply (one SVD,
one sort, short warm-started palm4MSA fits) and fits only the chosen sizes.
This script prints, in one run:

1. Before against after, on LeNet-5 and the VGG-style model trained briefly
   on the bundled digits (VGG-style on the digits padded to 32x32x3): for
   psm, svd and hard-pruning at ``--ratio``, the seconds, the summed relative
   error the allocation minimizes, and the accuracy right after compression,
   of the budget at commit c58aca2 (every candidate fitted in full, loaded
   with ``git show``) and of today's. PSM runs ``--max-iter`` palm4MSA
   iterations in both (100: the old budget fits every candidate in full).
   Also how well PSM's estimates rank the candidates: Kendall's tau between
   the estimated and the full-fit errors of every candidate of every layer.
2. MobileNetV2 (96x96x3, 10 classes, random weights) at ``target_ratio=8``
   against a plain compress of it at a similar size, for psm (300
   iterations), svd and hard-pruning: the time ratio, the sizes reached and
   the summed relative error.
3. ResNet50 (224x224x3, 1000 classes, random weights): PSM's plain compress
   (the defaults, Q=3 K=14) against ``target_ratio`` set to the ratio the
   plain compress reached (about 35 minutes on 2 cores, so only with
   ``--parts resnet50``).

    python benchmarks/budget_speed.py                 # parts 1 and 2
    python benchmarks/budget_speed.py --parts resnet50
    python benchmarks/budget_speed.py --parts mobilenet --methods svd hard-pruning
    python benchmarks/budget_speed.py --parts before-after ranking --models lenet5
"""

import argparse
import subprocess
import sys
import time
import types

import numpy as np
from scipy.stats import kendalltau

import keras_psm
from keras_psm import demo
from keras_psm.backend import keras
from keras_psm.datasets import load_mnist_5k
from keras_psm.methods import get_method

BEFORE = "c58aca2"
METHODS = ("psm", "svd", "hard-pruning")
#: Plain configs of MobileNetV2 at about the size of target_ratio=8.
PLAIN = {"psm": dict(n_factors=2, sparsity=13), "svd": dict(rank_ratio=0.1),
         "hard-pruning": dict(target_sparsity=0.875)}


def old_budget_module():
    """``keras_psm/budget.py`` as it was at commit ``BEFORE``."""
    source = subprocess.run(["git", "show", f"{BEFORE}:keras_psm/budget.py"], check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType(f"keras_psm_budget_{BEFORE}")
    exec(compile(source, module.__name__, "exec"), module.__dict__)  # noqa: S102
    return module


def timed_compress(model, method, budget_module=None, **options):
    """``(compressed, report, seconds)``, with ``budget_module`` standing in for today's."""
    compress_module = sys.modules["keras_psm.compress"]
    today = compress_module.budgets
    if budget_module is not None:
        compress_module.budgets = budget_module
    try:
        start = time.perf_counter()
        compressed, report = keras_psm.compress(model, method, verbose=0, **options)
        return compressed, report, time.perf_counter() - start
    finally:
        compress_module.budgets = today


def summary(report):
    """Compression ratio and summed relative error of the compressed layers."""
    before = sum(row.params_before for row in report.compressed)
    after = sum(row.params_after for row in report.compressed)
    return before / after, sum(row.relative_error for row in report.compressed)


def trained_models(names, epochs):
    """LeNet-5 and/or the VGG-style model (``names``), trained on the bundled digits,
    with their test sets."""
    (x_train, y_train), (x_test, y_test) = load_mnist_5k()

    def as_rgb32(x):
        return np.repeat(np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0))), 3, axis=-1)

    models = {"lenet5": lambda: (demo.lenet5(), x_train, x_test),
              "vgg_small": lambda: (demo.vgg_small(), as_rgb32(x_train), as_rgb32(x_test))}
    for name in names:
        model, x, x_eval = models[name]()
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        model.fit(x, y_train, epochs=epochs, batch_size=64, verbose=0)
        yield model, x_eval, y_test


def estimate_ranking(model, max_iter):
    """Kendall's tau between PSM's estimated and full-fit errors, over all candidates."""
    spec = get_method("psm")
    config = spec.make_config(max_iter=max_iter)
    estimated, full = [], []
    for layer in model.layers:
        if isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D)):
            kernel = layer.get_weights()[0].astype(np.float64)
            for ladder in spec.size_knob(kernel.shape, config):
                estimated += [e.error for e in spec.size_estimates(kernel, ladder)]
                full += [spec.fit(kernel, c).relative_error for c in ladder]
    return kendalltau(estimated, full).statistic, len(full)


def before_after(models, methods, ratio, max_iter):
    old = old_budget_module()
    print(f"Before ({BEFORE}, every candidate fitted) against after, target_ratio={ratio}, "
          f"psm max_iter={max_iter}")
    print(f"{'model':10} {'method':13} {'before s':>9} {'after s':>8} {'x before':>9} "
          f"{'x after':>8} {'sum err before':>15} {'sum err after':>14} "
          f"{'acc before':>11} {'acc after':>10}")
    for model, x, y in models:
        for method in methods:
            options = dict(target_ratio=ratio)
            if method == "psm":
                options["max_iter"] = max_iter
            rows = []
            for module in (old, None):
                compressed, report, seconds = timed_compress(model, method, module, **options)
                rows.append((seconds, *summary(report), demo.accuracy(compressed, x, y)))
            (t0, r0, e0, a0), (t1, r1, e1, a1) = rows
            print(f"{model.name:10} {method:13} {t0:9.1f} {t1:8.1f} {r0:9.1f} {r1:8.1f} "
                  f"{e0:15.3f} {e1:14.3f} {a0:11.3f} {a1:10.3f}", flush=True)


def ranking(models, max_iter):
    for model, _, _ in models:
        tau, count = estimate_ranking(model, max_iter)
        print(f"{model.name}: PSM estimates against full fits (max_iter={max_iter}), "
              f"Kendall tau {tau:.2f} over {count} candidates", flush=True)


def mobilenet(methods, ratio):
    model = keras.applications.MobileNetV2(weights=None, input_shape=(96, 96, 3), classes=10)
    print(f"MobileNetV2-96, target_ratio={ratio} against a plain compress")
    print(f"{'method':13} {'plain':>26} {'x plain':>8} {'x budget':>9} {'time ratio':>11} "
          f"{'sum err plain':>14} {'sum err budget':>15}")
    for method in methods:
        _, plain, plain_seconds = timed_compress(model, method, **PLAIN[method])
        _, budgeted, budget_seconds = timed_compress(model, method, target_ratio=ratio)
        (rp, ep), (rb, eb) = summary(plain), summary(budgeted)
        label = ", ".join(f"{k}={v}" for k, v in PLAIN[method].items())
        print(f"{method:13} {label:>26} {rp:8.1f} {rb:9.1f} "
              f"{budget_seconds / plain_seconds:11.2f} {ep:14.2f} {eb:15.2f}", flush=True)


def resnet50():
    model = keras.applications.ResNet50(weights=None, input_shape=(224, 224, 3), classes=1000)
    _, plain, plain_seconds = timed_compress(model, "psm")
    plain_ratio, plain_error = summary(plain)
    ratio = round(plain_ratio, 1)
    _, budgeted, budget_seconds = timed_compress(model, "psm", target_ratio=ratio)
    budget_ratio, budget_error = summary(budgeted)
    print(f"ResNet50-224 psm: plain (Q=3, K=14) x{plain_ratio:.1f} in {plain_seconds:.0f} s, "
          f"summed error {plain_error:.2f}; target_ratio={ratio} x{budget_ratio:.1f} in "
          f"{budget_seconds:.0f} s, summed error {budget_error:.2f}; time ratio "
          f"{budget_seconds / plain_seconds:.2f}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["before-after", "ranking", "mobilenet"],
                        choices=["before-after", "ranking", "mobilenet", "resnet50"])
    parser.add_argument("--models", nargs="+", default=["lenet5", "vgg_small"],
                        choices=["lenet5", "vgg_small"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--ratio", type=float, default=10.0)
    parser.add_argument("--max-iter", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    models = (list(trained_models(args.models, args.epochs))
              if {"before-after", "ranking"} & set(args.parts) else [])
    if "before-after" in args.parts:
        before_after(models, args.methods, args.ratio, args.max_iter)
    if "ranking" in args.parts:
        ranking(models, args.max_iter)
    if "mobilenet" in args.parts:
        mobilenet(args.methods, 8)
    if "resnet50" in args.parts:
        resnet50()


if __name__ == "__main__":
    main()
