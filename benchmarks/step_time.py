"""Fit-step time of dense and PSM models on the current Keras backend and device.

One run prints the median ``train_on_batch`` time (SGD with momentum, batch
128) of

- VGG19 for CIFAR-10 (16 3x3 convolutions 64-64-M-128-128-M-256x4-M-512x4-M-512x4-M,
  then Dense(10)), dense and compressed with PSM at Q=3 K=14 in float32;
- the same under the ``mixed_bfloat16`` policy;
- a transformer encoder (``MultiHeadAttention``, whose projections are
  ``EinsumDense`` layers, and a Dense feed-forward block), dense and PSM,

and the ratio PSM / dense of each pair. The two models of a pair take turns,
one step each, after warm-up steps (compilation), so that load from other
processes falls on both alike.

Weights are He-initialized, not trained, and palm4MSA runs ``--max-iter``
iterations only: the supports and sizes, which set the step time, do not
depend on the fit. The script imports no TensorFlow of its own, so it runs with
``KERAS_BACKEND=jax`` (or ``torch``) on a machine without TensorFlow:

    KERAS_BACKEND=jax python benchmarks/step_time.py
    python benchmarks/step_time.py --width 0.25 --tokens 32 --steps 5   # quick, CPU
"""

import argparse
import time

import numpy as np

import keras_psm
from keras_psm.backend import BACKEND, keras

#: VGG19's convolution widths ("M": 2x2 max pooling), Simonyan & Zisserman (2015).
VGG19 = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
         512, 512, 512, 512, "M", 512, 512, 512, 512, "M")
BATCH = 128
PSM = dict(n_factors=3, sparsity=14)


def vgg19_cifar(width=1.0, n_classes=10, seed=0, activation=None):
    """VGG19 for 32 x 32 x 3 inputs, every convolution ``width`` times as wide;
    ``activation`` of the classifier (None: logits)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((32, 32, 3))
    x = inputs
    for index, filters in enumerate(VGG19):
        if filters == "M":
            x = keras.layers.MaxPooling2D(name=f"pool{index}")(x)
        else:
            x = keras.layers.Conv2D(max(1, int(filters * width)), 3, padding="same",
                                    activation="relu", name=f"conv{index}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    outputs = keras.layers.Dense(n_classes, activation=activation, name="fc")(x)
    return keras.Model(inputs, outputs, name="vgg19")


def encoder(tokens=128, width=256, heads=4, blocks=2, n_classes=10, seed=0):
    """A transformer encoder classifier: ``blocks`` post-norm blocks of attention
    and a 4x-wide ReLU feed-forward, then mean pooling and Dense(n_classes)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((tokens, width))
    x = inputs
    for index in range(blocks):
        attention = keras.layers.MultiHeadAttention(heads, width // heads,
                                                    name=f"attention{index}")(x, x)
        x = keras.layers.LayerNormalization(name=f"norm{index}a")(x + attention)
        hidden = keras.layers.Dense(4 * width, activation="relu", name=f"ffn{index}a")(x)
        x = keras.layers.LayerNormalization(name=f"norm{index}b")(
            x + keras.layers.Dense(width, name=f"ffn{index}b")(hidden))
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    outputs = keras.layers.Dense(n_classes, name="fc")(x)
    return keras.Model(inputs, outputs, name="encoder")


def compiled(model):
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def step_seconds(models, steps, warmup=3):
    """Median ``train_on_batch`` seconds of each model, the models taking turns."""
    rng = np.random.default_rng(0)
    batches = [(rng.standard_normal((BATCH,) + tuple(model.inputs[0].shape[1:]))
                .astype("float32"), rng.integers(0, 10, BATCH)) for model in models]
    models = [compiled(model) for model in models]
    times = [[] for _ in models]
    for step in range(steps + warmup):
        for model, (x, y), spent in zip(models, batches, times):
            start = time.perf_counter()
            loss = model.train_on_batch(x, y)
            float(np.asarray(loss))   # wait for the device
            if step >= warmup:
                spent.append(time.perf_counter() - start)
    return [float(np.median(spent)) for spent in times]


def pair(build, policy, max_iter, steps):
    """(dense seconds, PSM seconds) of the model ``build()`` makes under ``policy``."""
    keras.mixed_precision.set_global_policy(policy)
    try:
        dense = build()
        psm, _ = keras_psm.compress(dense, "psm", max_iter=max_iter, verbose=0, **PSM)
        return step_seconds([dense, psm], steps)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def device():
    """The device the backend computes on, in words."""
    if BACKEND == "jax":
        import jax

        return str(jax.devices()[0].device_kind)
    if BACKEND == "torch":
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    import tensorflow as tf

    return "gpu" if tf.config.list_logical_devices("GPU") else "cpu"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=1.0,
                        help="VGG19 width multiplier (default 1: the full network)")
    parser.add_argument("--tokens", type=int, default=128, help="encoder sequence length")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model")
    parser.add_argument("--max-iter", type=int, default=3,
                        help="palm4MSA iterations per layer (supports do not depend on it)")
    args = parser.parse_args()
    print(f"backend {BACKEND}, device {device()}, batch {BATCH}, PSM Q=3 K=14, "
          f"median of {args.steps} steps")
    cases = [
        ("VGG19-CIFAR float32", lambda: vgg19_cifar(args.width), "float32"),
        ("VGG19-CIFAR mixed_bfloat16", lambda: vgg19_cifar(args.width), "mixed_bfloat16"),
        ("encoder float32", lambda: encoder(args.tokens), "float32"),
        ("encoder mixed_bfloat16", lambda: encoder(args.tokens), "mixed_bfloat16"),
    ]
    print(f"{'model':<28} {'dense ms':>9} {'PSM ms':>9} {'PSM / dense':>12}")
    for name, build, policy in cases:
        dense, psm = pair(build, policy, args.max_iter, args.steps)
        print(f"{name:<28} {dense * 1e3:9.1f} {psm * 1e3:9.1f} {psm / dense:12.2f}", flush=True)


if __name__ == "__main__":
    main()
