"""Wall time of ``compress(model, "psm", n_factors=3, sparsity=14)`` on large
models, fitting the layers in this process, in a 2-process pool and on a
2-worker Dask cluster, all in one run.

Models (random weights: the time of palm4MSA does not depend on training):

- ResNet50 at 224 x 224 x 3, 1000 classes (25.6 M weights, 54 kernels);
- VGG19-CIFAR: VGG19's 16 convolutions at 32 x 32 x 3, then Dense 512 and
  Dense 10 (the PSM paper's CIFAR-10 network, 20.3 M weights, 18 kernels);
- a transformer encoder: 4 blocks of width 256, 8 heads, feed-forward 1024,
  on 128 tokens (5.2 M weights with the embedding; 25 kernels: 16
  attention projections, 8 feed-forward layers and the head).

Each executor gets its worker processes started and ``keras_psm`` imported
before it is timed. palm4MSA runs ``--max-iter`` iterations per layer
(``tol=0``: exactly that many); the paper's 300 on ResNet50 takes hours on a
2-core machine, so pick a small value there. Prints one table and the
speedups ``serial / parallel``.

    python benchmarks/scale.py --max-iter 5
    python benchmarks/scale.py --max-iter 5 --models transformer
"""

import argparse
import concurrent.futures
import importlib
import multiprocessing
import time

from keras_psm import compress
from keras_psm.backend import keras

MODELS = ("resnet50", "vgg19_cifar", "transformer")


def resnet50():
    return keras.applications.ResNet50(weights=None, input_shape=(224, 224, 3))


def vgg19_cifar():
    base = keras.applications.VGG19(weights=None, include_top=False, input_shape=(32, 32, 3))
    x = keras.layers.Flatten()(base.output)
    x = keras.layers.Dense(512, activation="relu", name="fc1")(x)
    outputs = keras.layers.Dense(10, name="predictions")(x)
    return keras.Model(base.input, outputs, name="vgg19_cifar")


def transformer(blocks=4, width=256, heads=8, hidden=1024, tokens=128, vocabulary=8000):
    inputs = keras.Input((tokens,), dtype="int32")
    x = keras.layers.Embedding(vocabulary, width)(inputs)
    for block in range(blocks):
        h = keras.layers.LayerNormalization()(x)
        h = keras.layers.MultiHeadAttention(heads, width // heads, name=f"attention_{block}")(
            h, h, use_causal_mask=True)
        x = keras.layers.Add()([x, h])
        h = keras.layers.LayerNormalization()(x)
        h = keras.layers.Dense(hidden, activation="gelu", name=f"ffn_in_{block}")(h)
        h = keras.layers.Dense(width, name=f"ffn_out_{block}")(h)
        x = keras.layers.Add()([x, h])
    outputs = keras.layers.Dense(2, name="head")(keras.layers.GlobalAveragePooling1D()(x))
    return keras.Model(inputs, outputs, name="transformer")


BUILDERS = {"resnet50": resnet50, "vgg19_cifar": vgg19_cifar, "transformer": transformer}


def _warm(_):
    """Run in a worker: import what the fits need, so the timing leaves it out."""
    importlib.import_module("keras_psm.compress")
    return True


def timed_compress(model, max_iter, executor=None):
    start = time.perf_counter()
    _, report = compress(model, "psm", n_factors=3, sparsity=14, max_iter=max_iter, tol=0.0,
                         executor=executor, verbose=0)
    return time.perf_counter() - start, report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-iter", type=int, default=300,
                        help="palm4MSA iterations per layer (default: the paper's 300)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    args = parser.parse_args(argv)

    from distributed import Client, LocalCluster

    context = multiprocessing.get_context("spawn")
    rows = []
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=context) as pool, \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                         dashboard_address=None) as cluster, Client(cluster) as client:
        list(pool.map(_warm, range(2)))
        client.run(_warm, None)
        executors = {"serial": None, "pool": pool, "dask": client.get_executor()}
        for name in args.models:
            model = BUILDERS[name]()
            seconds = {}
            for executor_name, executor in executors.items():
                seconds[executor_name], report = timed_compress(model, args.max_iter, executor)
            rows.append((name, model.count_params(), len(report.compressed), seconds))
            print(f"{name}: {seconds}", flush=True)

    print(f"\nPSM Q=3 K=14, {args.max_iter} palm4MSA iterations per layer, "
          f"{multiprocessing.cpu_count()} CPUs")
    header = ("model", "weights", "kernels", "1 worker s", "pool(2) s", "dask(2) s",
              "x pool", "x dask")
    lines = [header] + [
        (name, f"{weights / 1e6:.1f} M", str(kernels), f"{s['serial']:.1f}", f"{s['pool']:.1f}",
         f"{s['dask']:.1f}", f"{s['serial'] / s['pool']:.2f}", f"{s['serial'] / s['dask']:.2f}")
        for name, weights, kernels, s in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)))


if __name__ == "__main__":
    main()
