"""TFLite file size and single-sample LiteRT latency: dense vs compressed.

For a LeNet-5 (28 x 28 x 1) and a VGG-style CIFAR-size CNN (32 x 32 x 3),
every variant below is exported with ``keras_psm.export.to_tflite``
(float32, sparse encoding where it makes the file smaller; each file is
checked against its Keras model) and timed with the LiteRT interpreter on
one thread, one sample at a time (median of ``--runs`` invocations):

- dense: the model itself;
- psm Q=q K=k: ``compress(method="psm")`` for Q in {2, 3}, K in {2, 4, 8},
  exported with the default ``factor_form="auto"`` (per layer, the factors
  one op at a time unless LiteRT runs their product faster) and, as
  "... sequence", with every factor its own op (the smallest file);
- hard-pruning @ psm Q=q K=k: magnitude pruning keeping as many nonzeros in
  total as that PSM model;
- every other registered method at each of its presets (low-rank, tensor,
  Kronecker and butterfly ones included once they are registered).

Weights are He-initialized, not trained: size and speed depend on the
structure only. Run ``python benchmarks/tflite_size_latency.py`` (a few
minutes on 2 cores); it prints the table with ratios to the dense file and
writes ``benchmarks/results/tflite_size_latency.csv`` and ``.png``.
"""

import argparse
import concurrent.futures
import csv
import dataclasses
import os
import tempfile
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from ai_edge_litert.interpreter import Interpreter  # noqa: E402

import keras_psm  # noqa: E402
from keras_psm import demo, export  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PSM_GRID = [(q, k) for q in (2, 3) for k in (2, 4, 8)]


@dataclasses.dataclass
class Row:
    model: str
    variant: str
    nonzero: int
    file_bytes: int
    latency_us: float
    size_ratio: float = 1.0  # dense file bytes / file bytes
    latency_ratio: float = 1.0  # latency / dense latency
    max_abs_error: float = 0.0  # LiteRT vs Keras on the check samples


def latency_us(path, runs, warmup=20):
    """Median single-sample latency of the file at ``path`` (LiteRT, one thread)."""
    interpreter = Interpreter(model_path=path, num_threads=1)
    interpreter.allocate_tensors()
    detail = interpreter.get_input_details()[0]
    sample = np.random.default_rng(0).standard_normal(detail["shape"]).astype(detail["dtype"])
    interpreter.set_tensor(detail["index"], sample)
    for _ in range(warmup):
        interpreter.invoke()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        interpreter.invoke()
        times.append(time.perf_counter() - start)
    return 1e6 * float(np.median(times))


def measure(name, variant, model, directory, runs, inputs, factor_form="auto"):
    path = export.to_tflite(model, os.path.join(directory, f"{name}_{variant}.tflite"),
                            inputs=inputs, factor_form=factor_form)
    report = export.size_report(model, path)
    return Row(name, variant, report.nonzero, report.file_bytes, latency_us(path, runs),
               max_abs_error=export.verify_tflite(path, model, inputs))


def variants(dense, max_iter, executor):
    """``(label, compressed model, factor_form)`` for every variant of the benchmark."""
    psm_nonzero = {}
    for n_factors, sparsity in PSM_GRID:
        model, report = keras_psm.compress(dense, "psm", n_factors=n_factors, sparsity=sparsity,
                                           max_iter=max_iter, executor=executor, verbose=0)
        psm_nonzero[(n_factors, sparsity)] = report
        yield f"psm Q={n_factors} K={sparsity}", model, "auto"
        yield f"psm Q={n_factors} K={sparsity} sequence", model, "sequence"
    if "hard-pruning" in keras_psm.available_methods():
        for (n_factors, sparsity), report in psm_nonzero.items():
            kept = report.params_after / report.params_before
            model, _ = keras_psm.compress(dense, "hard-pruning", target_sparsity=1 - kept,
                                          verbose=0)
            yield f"hard-pruning @ psm Q={n_factors} K={sparsity}", model, "auto"
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
            yield f"{method_name} ({preset})", model, "auto"


def run(models, runs, max_iter, workers):
    rows = []
    with tempfile.TemporaryDirectory() as directory, \
            concurrent.futures.ProcessPoolExecutor(workers) as executor:
        for build in models:
            dense = build()
            inputs = np.random.default_rng(1).standard_normal(
                (4,) + tuple(dense.inputs[0].shape[1:])).astype("float32")
            base = measure(dense.name, "dense", dense, directory, runs, inputs)
            rows.append(base)
            print(f"{dense.name}: dense {base.file_bytes:,} bytes, {base.latency_us:.0f} us")
            for label, model, factor_form in variants(dense, max_iter, executor):
                row = measure(dense.name, label.replace(" ", "_"), model, directory, runs,
                              inputs, factor_form)
                row.variant = label
                row.size_ratio = base.file_bytes / row.file_bytes
                row.latency_ratio = row.latency_us / base.latency_us
                rows.append(row)
                print(f"  {label}: x{row.size_ratio:.1f} smaller, "
                      f"latency x{row.latency_ratio:.2f}")
    return rows


def table(rows):
    header = ("model", "variant", "nonzero", "file KB", "x smaller", "latency us",
              "latency / dense", "max |tflite - keras|")
    lines = [header] + [
        (r.model, r.variant, f"{r.nonzero:,}", f"{r.file_bytes / 1024:.1f}",
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
            axis.annotate(r.variant, (r.file_bytes / 1024, r.latency_us), fontsize=6,
                          xytext=(3, 3), textcoords="offset points")
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
    parser.add_argument("--models", nargs="+", default=["lenet5", "vgg_cifar"],
                        choices=["lenet5", "vgg_cifar"])
    args = parser.parse_args()
    builders = {
        "lenet5": demo.lenet5,
        "vgg_cifar": lambda: demo.vgg_small(widths=(32, 64, 128), units=512),
    }
    rows = run([builders[name] for name in args.models], args.runs, args.max_iter, args.workers)
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
