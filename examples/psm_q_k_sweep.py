"""How the number of factors Q and the sparsity K trade parameters against accuracy.

    python examples/psm_q_k_sweep.py

PSM paper, section 3.2: K (nonzeros per row and column of each factor) sets
the approximation error and the parameter count; Q matters less. For each
(Q, K) the table shows the parameters kept, the mean relative error
||W - S_1...S_Q||_F / ||W||_F of the layers, and the accuracy before and after
one epoch of fine-tuning. About two minutes on a laptop CPU.
"""

import numpy as np

import keras_psm
from keras_psm import demo

settings = demo.Settings(train_epochs=8, finetune_epochs=1)
data = demo.load_data(settings)
(x_train, y_train), (x_test, y_test) = data
model = demo.lenet5()
demo.train(model, data, settings)
print(f"LeNet-5: {model.count_params():,} parameters, "
      f"accuracy {demo.accuracy(model, x_test, y_test):.4f}\n")

print(" Q   K   params   ratio  mean rel. error  acc. before  acc. after")
for n_factors in (2, 3):
    for sparsity in (2, 4, 8, 14):
        small, report = keras_psm.compress(model, method="psm", n_factors=n_factors,
                                           sparsity=sparsity, max_iter=100, verbose=0)
        error = np.mean([row.relative_error for row in report.compressed])
        before = demo.accuracy(small, x_test, y_test)
        demo.compile_for_training(small, settings)
        small.fit(x_train, y_train, epochs=settings.finetune_epochs,
                  batch_size=settings.batch_size, verbose=0)
        after = demo.accuracy(small, x_test, y_test)
        print(f"{n_factors:2d}  {sparsity:2d}  {report.params_after:7,}  "
              f"x{report.compression_ratio:5.1f}  {error:15.3f}  {before:11.4f}  {after:10.4f}")
