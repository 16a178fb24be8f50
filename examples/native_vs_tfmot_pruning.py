"""Native magnitude pruning against tfmot's, on the same model, data, seed and schedule.

The PSM paper's pruning baselines (section 3.1) come from
tensorflow-model-optimization, which runs on tf_keras only. keras_psm also
prunes natively, with its masked layers, under Keras 3 and tf_keras. This
script trains a LeNet-5 on the bundled MNIST digits, then prunes it

- iteratively (Zhu & Gupta's polynomial schedule) with
  ``keras_psm.pruning.iterative_pruning`` (tfmot) and with
  ``compress(method="iterative-pruning")`` + ``report.callbacks`` (native);
- at once (hard pruning) with ``keras_psm.pruning.hard_pruning`` (tfmot) and
  ``compress(method="hard-pruning")`` (native);

fine-tunes each copy identically and prints the nonzero kernel weights and
the test accuracy of both. tfmot needs tf_keras, so the script sets
``TF_USE_LEGACY_KERAS=1`` before TensorFlow is imported (unless it is set).

    python examples/native_vs_tfmot_pruning.py --target-sparsity 0.9
"""

import argparse
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np  # noqa: E402

import keras_psm  # noqa: E402
from keras_psm.backend import keras  # noqa: E402
from keras_psm.datasets import load_mnist_5k  # noqa: E402
from keras_psm.pruning import hard_pruning, iterative_pruning, strip  # noqa: E402

KERNEL_LAYERS = ("conv1", "conv2", "fc1", "fc2", "fc3")


def lenet(seed):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((28, 28, 1))
    x = keras.layers.Conv2D(6, 5, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(16, 5, activation="relu", name="conv2")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(120, activation="relu", name="fc1")(x)
    x = keras.layers.Dense(84, activation="relu", name="fc2")(x)
    outputs = keras.layers.Dense(10, activation="softmax", name="fc3")(x)
    return keras.Model(inputs, outputs, name="lenet")


def fine_tune(model, callbacks, data, args):
    """Compile and fit with the same optimizer, seed and batches for every copy."""
    (x_train, y_train), (x_test, y_test) = data
    model.compile(keras.optimizers.Adam(args.learning_rate), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    keras.utils.set_random_seed(args.seed)
    model.fit(x_train, y_train, epochs=args.epochs, batch_size=args.batch_size,
              callbacks=callbacks, verbose=0)
    return model.evaluate(x_test, y_test, verbose=0)[1]


def nonzero_kernel_weights(model):
    """Nonzero entries of the effective kernels (``kernel`` of plain or masked layers)."""
    return {name: int(np.count_nonzero(np.asarray(model.get_layer(name).kernel)))
            for name in KERNEL_LAYERS}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target-sparsity", type=float, default=0.9)
    parser.add_argument("--pretrain-epochs", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=8, help="fine-tuning epochs")
    parser.add_argument("--frequency", type=int, default=25, help="steps between mask updates")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    data = load_mnist_5k(test_size=1000, seed=args.seed)
    (x_train, y_train), (x_test, y_test) = data
    model = lenet(args.seed)
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=args.pretrain_epochs, batch_size=args.batch_size,
              verbose=0)
    dense_accuracy = model.evaluate(x_test, y_test, verbose=0)[1]

    steps = args.epochs * int(np.ceil(len(x_train) / args.batch_size))
    end_step = (steps // 2 // args.frequency) * args.frequency  # prune over the first half
    schedule = dict(begin_step=0, end_step=end_step, frequency=args.frequency)
    print(f"Keras: {keras_psm.KERAS_NAME}; {len(x_train)} training digits, {steps} fine-tuning "
          f"steps, masks updated every {args.frequency} steps up to step {end_step}; "
          f"target sparsity {args.target_sparsity}.")
    print(f"dense model: test accuracy {dense_accuracy:.4f}\n")

    results = []
    pruned, callbacks = iterative_pruning(model, args.target_sparsity, **schedule)
    accuracy = fine_tune(pruned, callbacks, data, args)
    results.append(("iterative", "tfmot", nonzero_kernel_weights(strip(pruned)), accuracy))

    native, report = keras_psm.compress(model, "iterative-pruning", verbose=0,
                                        target_sparsity=args.target_sparsity, **schedule)
    accuracy = fine_tune(native, report.callbacks, data, args)
    results.append(("iterative", "native", nonzero_kernel_weights(native), accuracy))

    pruned, callbacks = hard_pruning(model, args.target_sparsity)
    accuracy = fine_tune(pruned, callbacks, data, args)
    results.append(("hard", "tfmot", nonzero_kernel_weights(strip(pruned)), accuracy))

    native, _ = keras_psm.compress(model, "hard-pruning", verbose=0,
                                   target_sparsity=args.target_sparsity)
    accuracy = fine_tune(native, [], data, args)
    results.append(("hard", "native", nonzero_kernel_weights(native), accuracy))

    total = sum(int(np.prod(model.get_layer(name).kernel.shape)) for name in KERNEL_LAYERS)
    print(f"{'pruning':<10} {'library':<7} {'nonzero kernel weights':>22} {'sparsity':>9} "
          f"{'test accuracy':>14}")
    for kind, library, counts, accuracy in results:
        kept = sum(counts.values())
        print(f"{kind:<10} {library:<7} {kept:>22,} {1 - kept / total:>9.4f} {accuracy:>14.4f}")
    print()
    for kind in ("iterative", "hard"):
        (_, _, tfmot_counts, tfmot_accuracy), (_, _, native_counts, native_accuracy) = [
            row for row in results if row[0] == kind]
        same = ("equal" if tfmot_counts == native_counts
                else f"different: tfmot {tfmot_counts}, native {native_counts}")
        print(f"{kind}: per-layer nonzeros {same}; accuracy native - tfmot = "
              f"{100 * (native_accuracy - tfmot_accuracy):+.2f} points")


if __name__ == "__main__":
    main()
