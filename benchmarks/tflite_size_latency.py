"""TFLite file size and single-sample LiteRT latency: dense vs compressed.

For a LeNet-5 (28 x 28 x 1), a VGG-style CIFAR-size CNN (32 x 32 x 3) and
a Dense chain like that CNN's head (1024 -> 128 -> 10), every variant below
is exported with ``keras_psm.export.to_tflite`` (each file is checked
against its Keras model) and timed with
``keras_psm.export.litert_latency``: the LiteRT interpreter on one thread,
one sample at a time, median of ``--runs`` invocations.

- dense: the model itself, in float32, float16 and dynamic int8;
- psm Q=q K=k: ``compress(method="psm")`` for each (Q, K) of ``PSM_GRID``,
  exported in float32 with each ``factor_form`` ("sequence", the default:
  one op per factor; "product": one op with the product kernel; "auto":
  per layer, the faster of the two by ``keras_psm.litert_cost``) and
  quantized (float16, dynamic int8) as "sequence" (the factors' nonzero
  values and positions, unpacked by the graph) and as "product";
- psm Q=q K=k block=4: the same with supports of whole 1x4 blocks along the
  input axis (``PSMConfig.block``), which LiteRT's sparse fully connected
  kernel runs on;
- with ``--other-methods``: hard pruning at each PSM model's nonzero count
  and every other registered method at each of its presets.

Weights are He-initialized, not trained: size and speed depend on the
structure only. Run ``python benchmarks/tflite_size_latency.py`` (about ten
minutes on 2 cores); it prints the table with ratios to the dense float32
file and writes ``benchmarks/results/tflite_size_latency.csv`` and ``.png``.
"""

import argparse
import concurrent.futures
import csv
import dataclasses
import os
import tempfile

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import keras_psm  # noqa: E402
from keras_psm import demo, export  # noqa: E402
from keras_psm.backend import keras  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PSM_GRID = [(2, 2), (2, 4), (2, 8), (3, 4)]
BLOCK_GRID = [(2, 2), (2, 4)]
FACTOR_FORMS = ("sequence", "product", "auto")
QUANTIZATIONS = ("float16", "dynamic_int8")


@dataclasses.dataclass
class Row:
    model: str
    variant: str
    export: str  # factor_form or quantization
    nonzero: int
    file_bytes: int
    latency_us: float
    size_ratio: float = 1.0  # dense float32 file bytes / file bytes
    latency_ratio: float = 1.0  # latency / dense float32 latency
    max_abs_error: float = 0.0  # LiteRT vs Keras on the check samples


def dense_chain(n_inputs=1024, units=128, n_classes=10, seed=0):
    """Dense(units, relu) -> Dense(n_classes) on flat inputs."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((n_inputs,))
    x = keras.layers.Dense(units, activation="relu", name="fc1")(inputs)
    outputs = keras.layers.Dense(n_classes, name="fc2")(x)
    return keras.Model(inputs, outputs, name="dense_chain")


def measure(name, variant, model, directory, runs, inputs, **options):
    """Export ``model`` with ``options`` (to_tflite's) and measure the file."""
    how = " ".join(filter(None, (options.get("quantization"), options.get("factor_form"))))
    path = export.to_tflite(model, os.path.join(directory, f"{name}_{variant}_{how}.tflite"),
                            inputs=inputs, **options)
    report = export.size_report(model, path, latency_runs=runs)
    return Row(name, variant, how, report.nonzero, report.file_bytes, 1e6 * report.latency,
               max_abs_error=export.verify_tflite(path, model, inputs))


def exports(label, model):
    """``(label, model, to_tflite options)`` for every export of one model."""
    factor_forms = FACTOR_FORMS if label != "dense" else ("sequence",)
    for quantization in (None,) + QUANTIZATIONS:
        for factor_form in factor_forms[:2 if quantization else 3]:
            yield label, model, dict(quantization=quantization, factor_form=factor_form)


def variants(dense, max_iter, executor, other_methods):
    """``(label, model, to_tflite options)`` for every row of the benchmark."""
    yield from exports("dense", dense)
    psm_nonzero = {}
    grid = [(q, k, 1) for q, k in PSM_GRID] + [(q, k, 4) for q, k in BLOCK_GRID]
    for n_factors, sparsity, block in grid:
        model, report = keras_psm.compress(dense, "psm", n_factors=n_factors, sparsity=sparsity,
                                           block=block, max_iter=max_iter, executor=executor,
                                           verbose=0)
        label = f"psm Q={n_factors} K={sparsity}" + (f" block={block}" if block > 1 else "")
        psm_nonzero[label] = report
        yield from exports(label, model)
    if not other_methods:
        return
    if "hard-pruning" in keras_psm.available_methods():
        for label, report in psm_nonzero.items():
            kept = report.params_after / report.params_before
            model, _ = keras_psm.compress(dense, "hard-pruning", target_sparsity=1 - kept,
                                          verbose=0)
            yield f"hard-pruning @ {label}", model, {}
    for method_name in keras_psm.available_methods():
        if method_name == "psm":
            continue
        method = keras_psm.get_method(method_name)
        fields = {field.name for field in dataclasses.fields(method.config_class)}
        for preset, options in method.presets.items():
            options = dict(options)
            if "max_iter" in fields:
                options["max_iter"] = max_iter
            try:
                model, _ = keras_psm.compress(dense, method_name, executor=executor, verbose=0,
                                              **options)
            except (ValueError, TypeError, RuntimeError) as error:
                print(f"  {method_name} ({preset}) skipped: {error}")
                continue
            yield f"{method_name} ({preset})", model, {}


def run(models, runs, max_iter, workers, other_methods):
    rows = []
    with tempfile.TemporaryDirectory() as directory, \
            concurrent.futures.ProcessPoolExecutor(workers) as executor:
        for build in models:
            dense = build()
            inputs = np.random.default_rng(1).standard_normal(
                (4,) + tuple(dense.inputs[0].shape[1:])).astype("float32")
            base = None
            for label, model, options in variants(dense, max_iter, executor, other_methods):
                row = measure(dense.name, label.replace(" ", "_"), model, directory, runs,
                              inputs, **options)
                row.variant = label
                base = base or row
                row.size_ratio = base.file_bytes / row.file_bytes
                row.latency_ratio = row.latency_us / base.latency_us
                rows.append(row)
                print(f"  {dense.name} {label} {row.export}: {row.file_bytes:,} bytes "
                      f"(x{row.size_ratio:.1f} smaller), latency x{row.latency_ratio:.2f}")
    return rows


def table(rows):
    header = ("model", "variant", "export", "nonzero", "file KB", "x smaller", "latency us",
              "latency / dense", "max |tflite - keras|")
    lines = [header] + [
        (r.model, r.variant, r.export, f"{r.nonzero:,}", f"{r.file_bytes / 1024:.1f}",
         f"{r.size_ratio:.1f}", f"{r.latency_us:.0f}", f"{r.latency_ratio:.2f}",
         f"{r.max_abs_error:.1e}")
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "-" * len(text[0]))
    return "\n".join(text)


def plot(rows, path):
    names = list(dict.fromkeys(r.model for r in rows))
    figure, axes = plt.subplots(1, len(names), figsize=(7 * len(names), 5.5), squeeze=False)
    for axis, name in zip(axes[0], names):
        for r in (r for r in rows if r.model == name):
            family = r.variant.split(" ")[0]
            marker = {"dense": "*", "psm": "o", "hard-pruning": "s"}.get(family, "^")
            axis.scatter(r.file_bytes / 1024, r.latency_us, marker=marker,
                         s=140 if family == "dense" else 45)
            axis.annotate(f"{r.variant} {r.export}", (r.file_bytes / 1024, r.latency_us),
                          fontsize=6, xytext=(3, 3), textcoords="offset points")
        axis.set_xscale("log")
        axis.set_xlabel(".tflite file size (KB, log scale)")
        axis.set_ylabel("single-sample LiteRT latency (us, 1 thread)")
        axis.set_title(name)
        axis.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=130)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300, help="timed invocations per file")
    parser.add_argument("--max-iter", type=int, default=30, help="palm4MSA iterations")
    parser.add_argument("--workers", type=int, default=2, help="processes fitting layers")
    parser.add_argument("--models", nargs="+", default=["lenet5", "vgg_cifar", "dense_chain"],
                        choices=["lenet5", "vgg_cifar", "dense_chain"])
    parser.add_argument("--other-methods", action="store_true",
                        help="also hard pruning and every other registered method")
    args = parser.parse_args()
    builders = {
        "lenet5": demo.lenet5,
        "vgg_cifar": lambda: demo.vgg_small(widths=(32, 64, 128), units=512),
        "dense_chain": dense_chain,
    }
    rows = run([builders[name] for name in args.models], args.runs, args.max_iter, args.workers,
               args.other_methods)
    print()
    print(table(rows))
    os.makedirs(RESULTS, exist_ok=True)
    csv_path = os.path.join(RESULTS, "tflite_size_latency.csv")
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[f.name for f in dataclasses.fields(Row)])
        writer.writeheader()
        writer.writerows(dataclasses.asdict(r) for r in rows)
    png_path = os.path.join(RESULTS, "tflite_size_latency.png")
    plot(rows, png_path)
    print(f"\nwrote {csv_path} and {png_path}")


if __name__ == "__main__":
    main()
