"""Pure NumPy (and tensorly) factorizations of weight matrices.

Nothing here imports TensorFlow or Keras: arrays in, arrays out.
"""
