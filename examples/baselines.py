"""PSM against the PSM paper's baselines, each one ``compress`` call and the same ``fit``.

    python examples/baselines.py

Hard pruning and iterative pruning (Zhu & Gupta) keep about as many parameters
as PSM (Q=3, K=4); Tucker-SVD and tensor-train run at settings of the
paper. All are fine-tuned identically. Iterative pruning prunes during
``fit`` through the callbacks in ``report.callbacks``: pass them always,
they are empty for the other methods. About two minutes on a laptop CPU.
"""

import keras_psm
from keras_psm import demo

settings = demo.Settings(train_epochs=8, finetune_epochs=3)
data = demo.load_data(settings)
(x_train, y_train), (x_test, y_test) = data
model = demo.lenet5()
demo.train(model, data, settings)
layers = demo.conv_dense_names(model)
print(f"LeNet-5: {model.count_params():,} parameters, "
      f"accuracy {demo.accuracy(model, x_test, y_test):.4f}\n")

# The pruning baselines keep the fraction of parameters PSM keeps; iterative
# pruning reaches it after two thirds of the fine-tuning steps.
_, psm_report = keras_psm.compress(model, method="psm", n_factors=3, sparsity=4, verbose=0)
sparsity = 1 - psm_report.params_after / psm_report.params_before
steps = -(-len(x_train) // settings.batch_size) * settings.finetune_epochs
BASELINES = [
    ("psm", dict(n_factors=3, sparsity=4)),
    ("hard-pruning", dict(target_sparsity=sparsity)),
    ("iterative-pruning", dict(target_sparsity=sparsity, end_step=2 * steps // 3,
                               frequency=max(1, steps // 15))),
    ("tucker-svd", dict(dense_rank_ratio=0.1)),
    ("tt", dict(n_cores=4, max_rank=6)),
]

print(f"{'method':18s} {'params':>8s}  {'acc. after fine-tuning':>22s}")
for method, options in BASELINES:
    small, report = keras_psm.compress(model, method=method, verbose=0, **options)
    demo.compile_for_training(small, settings)
    small.fit(x_train, y_train, epochs=settings.finetune_epochs, batch_size=settings.batch_size,
              callbacks=report.callbacks, verbose=0)
    # Counted after fit: iterative pruning removes weights during training.
    params = demo.param_count(small, layers)
    print(f"{method:18s} {params:8,}  {demo.accuracy(small, x_test, y_test):22.4f}")
