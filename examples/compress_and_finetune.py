"""Compress a trained LeNet-5 with PSM, fine-tune it with model.fit, save and reload it.

    python examples/compress_and_finetune.py

Offline: the 5,000 MNIST digits bundled with keras_psm. About a minute on a laptop CPU.
"""

import os
import tempfile

import numpy as np

import keras_psm
from keras_psm import demo
from keras_psm.backend import keras

settings = demo.Settings(train_epochs=8, finetune_epochs=3)
data = demo.load_data(settings)
(x_train, y_train), (x_test, y_test) = data

model = demo.lenet5()
demo.train(model, data, settings)
print(f"trained LeNet-5: {model.count_params():,} parameters, "
      f"accuracy {demo.accuracy(model, x_test, y_test):.4f}")

# Every Dense/Conv2D kernel becomes a product of Q=3 sparse factors with at
# least K=4 nonzeros per row and column, fitted to the trained kernel by palm4MSA.
small, report = keras_psm.compress(model, method="psm", n_factors=3, sparsity=4)
print(f"after compression: accuracy {demo.accuracy(small, x_test, y_test):.4f}")

# Fine-tune with the supports fixed: only the nonzero entries are trained.
small.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
              metrics=["accuracy"])
small.fit(x_train, y_train, epochs=settings.finetune_epochs, batch_size=32,
          callbacks=report.callbacks, verbose=2)
print(f"after fine-tuning: accuracy {demo.accuracy(small, x_test, y_test):.4f} with "
      f"x{report.compression_ratio:.1f} fewer parameters")

# The .keras file reloads with no custom_objects: importing keras_psm registers the layers.
path = os.path.join(tempfile.mkdtemp(), "lenet_psm.keras")
small.save(path)
reloaded = keras.models.load_model(path)
np.testing.assert_allclose(reloaded.predict(x_test[:100], verbose=0),
                           small.predict(x_test[:100], verbose=0), rtol=1e-5, atol=1e-6)
print(f"saved {path} ({os.path.getsize(path):,} bytes); the reloaded model predicts the same")
