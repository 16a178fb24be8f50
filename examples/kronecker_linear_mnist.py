"""A block-wise sparse softmax classifier on MNIST (block-wise sparsity paper, Table 1).

The paper's linear-model experiment on the 5,000 real MNIST digits bundled
with keras_psm (4,000 to train, 1,000 to test; the paper trains on all
60,000): one ``KroneckerDense`` layer, 784 -> 10 with a softmax, rank 2,
blocks (2, 2), (4, 2), (8, 2) and (16, 2) of the (784, 10) kernel.

1. Table 1: each block shape trains with the l1 penalty on S (eq. 4), then
   ``sparsify`` zeroes the blocks whose |S| is at most ``--threshold``, and a
   short fine-tuning without the penalty follows. Printed: test accuracy,
   block sparsity, training parameters (S, A_i, B_i; the bias adds 10) and
   training FLOPs per example (Proposition 2), next to the paper's figures.
2. Pattern selection (section 5): one ``KroneckerPatternDense`` holds the
   four patterns at once; ``PenaltySchedule`` raises both strengths of
   eq. 7 (0.01, +0.002 every 5 epochs, as in the paper) under plain gradient
   descent until one pattern's kernel remains (the others below 1% of its
   norm; at most ``--pattern-epochs``). The factors carry weight decay
   (``--factor-decay``): without it S shrinks while A grows and two patterns
   stay. The remaining pattern is kept and fine-tuned for 5 epochs.

    python examples/kronecker_linear_mnist.py            # about two minutes on a laptop CPU
    python examples/kronecker_linear_mnist.py --quick    # fewer epochs
"""

import argparse


from keras_psm.backend import keras
from keras_psm.datasets import load_mnist_5k
from keras_psm.factorize.kronecker import (
    dense_training_flops,
    kronecker_param_count,
    kronecker_training_flops,
)
from keras_psm.layers import (
    KroneckerDense,
    KroneckerPatternDense,
    PenaltySchedule,
    keep_selected_patterns,
)

BLOCK_SHAPES = [(2, 2), (4, 2), (8, 2), (16, 2)]
RANK = 2
# Table 1, "Ours": accuracy, sparsity rate (%), training parameters.
PAPER_TABLE_1 = {(2, 2): (88.97, 86.43, "5.89K"), (4, 2): (81.75, 38.57, "2.96k"),
                 (8, 2): (75.08, 50.85, "1.96k"), (16, 2): (81.57, 50.85, "0.80k")}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20,
                        help="training epochs with the l1 penalty")
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--pattern-epochs", type=int, default=150,
                        help="most epochs of pattern selection")
    parser.add_argument("--factor-decay", type=float, default=0.03,
                        help="weight decay on the A_i, B_i during pattern selection")
    parser.add_argument("--l1", type=float, default=0.002, help="l1 strength on S (eq. 4)")
    parser.add_argument("--threshold", type=float, default=0.01,
                        help="sparsify: blocks with |S| <= threshold become zero")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="5 + 2 epochs, at most 20 for patterns")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.finetune_epochs, args.pattern_epochs = 5, 2, 20
    return args


def softmax_model(layer):
    return keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(), layer])


def compile_and_fit(model, optimizer, data, epochs, callbacks=()):
    (x, y), _ = data
    model.compile(optimizer, "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=epochs, batch_size=64, verbose=0, callbacks=list(callbacks))


def test_accuracy(model, data):
    _, (x_test, y_test) = data
    return 100 * model.evaluate(x_test, y_test, verbose=0)[1]


def table_1(data, args):
    dense_flops = sum(dense_training_flops(784, 10, 1))
    keras.utils.set_random_seed(args.seed)
    dense = softmax_model(keras.layers.Dense(10, activation="softmax"))
    compile_and_fit(dense, keras.optimizers.Adam(0.01), data, args.epochs)
    print(f"Dense softmax: accuracy {test_accuracy(dense, data):.2f}%, "
          f"7,840 training parameters, {dense_flops:,} training FLOPs per example\n")
    print(f"{'block':>7} {'accuracy':>8} {'block sparsity':>14} {'train params':>12} "
          f"{'FLOPs/example':>13} {'x fewer':>7} | paper: {'accuracy':>8} {'sparsity':>8} "
          f"{'params':>6}")
    for block in BLOCK_SHAPES:
        keras.utils.set_random_seed(args.seed)
        layer = KroneckerDense(10, block, rank=RANK, l1=args.l1, seed=args.seed,
                               activation="softmax")
        model = softmax_model(layer)
        compile_and_fit(model, keras.optimizers.Adam(0.01), data, args.epochs)
        sparsity = layer.sparsify(args.threshold)
        layer.set_penalty(0.0)
        compile_and_fit(model, keras.optimizers.Adam(0.001), data, args.finetune_epochs)
        flops = sum(kronecker_training_flops(784, 10, block, RANK, 1,
                                             blocks_first=layer.geometry.blocks_first))
        paper_accuracy, paper_sparsity, paper_params = PAPER_TABLE_1[block]
        print(f"{str(block):>7} {test_accuracy(model, data):>7.2f}% {100 * sparsity:>13.2f}% "
              f"{kronecker_param_count((784, 10), block, RANK):>12,} {flops:>13,} "
              f"{dense_flops / flops:>7.2f} | {paper_accuracy:>14.2f}% {paper_sparsity:>7.2f}% "
              f"{paper_params:>6}")


def pattern_selection(data, args):
    keras.utils.set_random_seed(args.seed)
    layer = KroneckerPatternDense(10, BLOCK_SHAPES, rank=RANK, factor_decay=args.factor_decay,
                                  seed=args.seed, activation="softmax")
    model = softmax_model(layer)
    schedule = PenaltySchedule(start=0.01, step=0.002, every=5, stop_when_one_remains=True)
    compile_and_fit(model, keras.optimizers.SGD(0.05), data, args.pattern_epochs, [schedule])
    print(f"\nPattern selection, ||S_k||_1 per pattern {BLOCK_SHAPES}:")
    history = schedule.history[layer.name]
    for epoch, norms in enumerate(history):
        if epoch % 5 == 4 or epoch in (0, len(history) - 1):
            print(f"  epoch {epoch + 1:>3} (strength {schedule.strength(epoch):.3f}): "
                  + "  ".join(f"{norm:9.3f}" for norm in norms))
    norms = layer.kernel_norms()
    print("kernel norm ||W_k||_F relative to the largest: "
          + "  ".join(f"{n / norms.max():.4f}" for n in norms))
    if schedule.stopped_epoch is None:
        print(f"after {args.pattern_epochs} epochs more than one pattern remains; "
              "the largest is kept")
    else:
        print(f"one pattern remains after {schedule.stopped_epoch} epochs")
    print(f"accuracy with all patterns {test_accuracy(model, data):.2f}%")
    selected = keep_selected_patterns(model)
    kept = selected.layers[-1]
    print(f"kept pattern {kept.block_shape}: accuracy {test_accuracy(selected, data):.2f}% "
          "before fine-tuning")
    compile_and_fit(selected, keras.optimizers.Adam(0.01), data, args.finetune_epochs)
    print(f"after {args.finetune_epochs} epochs of fine-tuning: accuracy "
          f"{test_accuracy(selected, data):.2f}% (paper: pattern (2, 2) kept, 88.86% after 5)")


def main():
    args = parse_args()
    data = load_mnist_5k(test_size=1000, seed=args.seed)
    table_1(data, args)
    pattern_selection(data, args)


if __name__ == "__main__":
    main()
