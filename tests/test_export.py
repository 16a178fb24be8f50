"""TFLite export: files keep the compression, run in LiteRT and match Keras."""

import collections
import dataclasses
import importlib
import os

import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as schema

import keras_psm
from keras_psm import demo, export, litert_cost
from keras_psm.backend import LEGACY_KERAS, keras, tf
from keras_psm.layers import SparseFactorConv2D, SparseFactorDense

# Every test here converts a model to TFLite (seconds each).
pytestmark = pytest.mark.slow

OPERATOR_NAMES = {
    value: name for name, value in vars(schema.BuiltinOperator).items() if name.isupper()
}


def tflite_contents(path):
    """``(operator name -> count, number of sparse-encoded tensors)`` of a .tflite file."""
    with open(path, "rb") as handle:
        model = schema.Model.GetRootAs(handle.read(), 0)
    codes = [model.OperatorCodes(i) for i in range(model.OperatorCodesLength())]
    operators, sparse_tensors = collections.Counter(), 0
    for g in range(model.SubgraphsLength()):
        subgraph = model.Subgraphs(g)
        for i in range(subgraph.OperatorsLength()):
            code = codes[subgraph.Operators(i).OpcodeIndex()]
            operators[OPERATOR_NAMES[max(code.BuiltinCode(), code.DeprecatedBuiltinCode())]] += 1
        sparse_tensors += sum(
            subgraph.Tensors(i).Sparsity() is not None for i in range(subgraph.TensorsLength()))
    return operators, sparse_tensors


def model_of(layer, input_shape):
    inputs = keras.Input(input_shape)
    return keras.Model(inputs, layer(inputs))


def samples(shape, n=4, seed=1):
    return np.random.default_rng(seed).standard_normal((n,) + tuple(shape)).astype("float32")


def psm_mlp(seed=0):
    """784 -> 512 -> 512 -> 10 with random sparse supports (Q = 2, K = 4)."""
    inputs = keras.Input((784,))
    x = SparseFactorDense(512, n_factors=2, sparsity=4, seed=seed, activation="relu",
                          name="fc1")(inputs)
    x = SparseFactorDense(512, n_factors=2, sparsity=4, seed=seed + 1, activation="relu",
                          name="fc2")(x)
    return keras.Model(inputs, keras.layers.Dense(10, name="fc3")(x))


def dense_mlp():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((784,))
    x = keras.layers.Dense(512, activation="relu", name="fc1")(inputs)
    x = keras.layers.Dense(512, activation="relu", name="fc2")(x)
    return keras.Model(inputs, keras.layers.Dense(10, name="fc3")(x))


def small_cnn():
    """A small trained-shape CNN (16 x 16 x 1 inputs) with Conv2D and Dense layers."""
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((16, 16, 1)),
        keras.layers.Conv2D(8, 3, activation="relu", name="conv1"),
        keras.layers.MaxPooling2D(name="pool"),
        keras.layers.Conv2D(16, 3, activation="relu", name="conv2"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(64, activation="relu", name="fc1"),
        keras.layers.Dense(10, name="fc2"),
    ], name="small_cnn")


@pytest.fixture(scope="module")
def small_cnn_file(tmp_path_factory):
    """The dense small CNN and the size of its .tflite file."""
    model = small_cnn()
    path = export.to_tflite(model, tmp_path_factory.mktemp("dense") / "cnn.tflite",
                            sparse=False)
    return model, os.path.getsize(path)


# --- the factors stay apart in the file ---

@pytest.mark.slow
@pytest.mark.parametrize("n_factors", [1, 2, 3])
def test_dense_product_is_a_chain_of_sparse_fully_connected_ops(tmp_path, n_factors):
    layer = SparseFactorDense(256, n_factors=n_factors, sparsity=4, seed=0)
    model = model_of(layer, (256,))
    path = export.to_tflite(model, tmp_path / "psm.tflite", factor_form="sequence")
    # LiteRT and TensorFlow sum float32 in other orders: rounding, bounded on the outputs' scale.
    assert relative_difference(path, model, samples((256,))) < 1e-4
    operators, sparse_tensors = tflite_contents(path)
    # One op per factor, no product: fully connected, or a 1x1 convolution where
    # that stores the factor in fewer bytes (litert_cost.blocks_take_more_bytes).
    assert operators["FULLY_CONNECTED"] + operators["CONV_2D"] == n_factors
    assert "MUL" not in operators  # masks folded into the weights
    assert sparse_tensors == n_factors
    # The layer's own call (its product, for the batch of 1) ends as one dense weight.
    kernel = tf.constant(layer.kernel.numpy())
    folded = keras.Model(model.inputs, keras.layers.Lambda(
        lambda x: x @ kernel + layer.bias)(model.inputs[0]))
    folded_path = tmp_path / "folded.tflite"
    folded_path.write_bytes(export.convert(folded, sparse_encoding=False))
    assert os.path.getsize(path) * 3 < os.path.getsize(folded_path)


@pytest.mark.slow
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("n_factors", [1, 3])
@pytest.mark.parametrize("factor_form", ["sequence", "product", "auto"])
def test_conv_product_matches_keras(tmp_path, data_format, n_factors, factor_form):
    shape = (12, 12, 8) if data_format == "channels_last" else (8, 12, 12)
    layer = SparseFactorConv2D(32, 3, n_factors=n_factors, sparsity=2, seed=0, strides=2,
                               padding="same", data_format=data_format, activation="relu")
    model = model_of(layer, shape)
    path = export.to_tflite(model, tmp_path / "conv.tflite", inputs=samples(shape),
                            factor_form=factor_form)
    # LiteRT and TensorFlow sum float32 in other orders: rounding, bounded on the outputs' scale.
    assert relative_difference(path, model, samples(shape, seed=2)) < 1e-4
    operators, _ = tflite_contents(path)
    assert operators["CONV_2D"] == 1
    # With r = filters the first factor's convolution alone costs the dense
    # one in LiteRT, so "auto" takes the product kernel.
    chain = factor_form == "sequence"
    assert operators["FULLY_CONNECTED"] == (n_factors - 1 if chain else 0)


# --- the export form follows what LiteRT runs fast ---

def fully_connected_contents(weight, tmp_path):
    """``tflite_contents`` of a file computing ``x @ weight`` for one row."""
    model = model_of(keras.layers.Dense(weight.shape[1], use_bias=False), (weight.shape[0],))
    model.layers[-1].set_weights([weight])
    path = tmp_path / "fc.tflite"
    path.write_bytes(export.convert(model, sparse_encoding=True))
    return tflite_contents(path)


@pytest.mark.slow
def test_litert_cost_rule_matches_the_converter(tmp_path):
    rng = np.random.default_rng(0)
    gaussian = rng.standard_normal((512, 256)).astype("float32")
    blocks = np.repeat(rng.random((128, 256)) < 0.1, 4, axis=0)  # 1x4 blocks, 10% dense
    weights = {
        "random 0.5%": gaussian * (rng.random(gaussian.shape) < 0.005),
        "random 10%": gaussian * (rng.random(gaussian.shape) < 0.1),
        "1x4 blocks 10%": gaussian * blocks,
        "random 80%": gaussian * (rng.random(gaussian.shape) < 0.8),
    }
    # name -> (runs on the sparse encoding, stored in the sparse encoding)
    expected = {"random 0.5%": (True, True), "random 10%": (False, True),
                "1x4 blocks 10%": (True, True), "random 80%": (False, False)}
    for name, weight in weights.items():
        runs_sparse, encoded = expected[name]
        assert litert_cost.runs_sparse(weight) == runs_sparse, name
        operators, sparse_tensors = fully_connected_contents(weight, tmp_path)
        assert sparse_tensors == int(encoded), name
        assert ("DENSIFY" in operators) == (encoded and not runs_sparse), name
        dense_cost = float(weight.size)
        cost = litert_cost.cost_per_row(weight)
        assert (cost < dense_cost) if name == "random 0.5%" else (cost <= dense_cost), name
        assert litert_cost.cost_per_row(weight, fully_connected=False) == dense_cost


@pytest.mark.slow
def test_auto_form_keeps_a_large_sparse_dense_layer_as_a_chain(tmp_path):
    layer = SparseFactorDense(1024, n_factors=2, sparsity=2, seed=0)
    model = model_of(layer, (1024,))
    exported = export.export_model(model, factor_form="auto")
    assert exported.layers[-1].export_form.kind == "fully_connected"
    assert layer.export_form is None  # the model's own layer trains as before
    path = export.to_tflite(model, tmp_path / "fc.tflite", factor_form="auto")
    operators, sparse_tensors = tflite_contents(path)
    assert operators["FULLY_CONNECTED"] == 2 and "DENSIFY" not in operators
    assert sparse_tensors == 2
    # LiteRT and TensorFlow sum float32 in other orders: rounding, bounded on the outputs' scale.
    assert relative_difference(path, model, samples((1024,))) < 1e-4


@pytest.mark.slow
def test_product_form_is_one_op_with_the_product_kernel(tmp_path):
    layer = SparseFactorDense(256, n_factors=3, sparsity=4, seed=0)
    model = model_of(layer, (256,))
    path = export.to_tflite(model, tmp_path / "p.tflite", factor_form="product")
    operators, _ = tflite_contents(path)
    assert operators["FULLY_CONNECTED"] == 1
    # LiteRT and TensorFlow sum float32 in other orders: rounding, bounded on the outputs' scale.
    assert relative_difference(path, model, samples((256,))) < 1e-4


@pytest.fixture(scope="module")
def mlp_files(tmp_path_factory):
    """The PSM and dense MLPs with their float32 .tflite files."""
    directory = tmp_path_factory.mktemp("mlp")
    model, dense = psm_mlp(), dense_mlp()
    return (model, export.to_tflite(model, directory / "psm.tflite"),
            dense, export.to_tflite(dense, directory / "dense.tflite"))


@pytest.mark.slow
def test_psm_file_is_much_smaller_than_the_dense_one(mlp_files):
    model, path, _, dense_path = mlp_files
    ratio = os.path.getsize(dense_path) / os.path.getsize(path)
    assert ratio > 5, ratio
    report = export.size_report(model, path, dense_path=dense_path, latency_runs=0)
    assert report.file_bytes == os.path.getsize(path)
    assert report.file_ratio == pytest.approx(ratio)


@pytest.mark.slow
def test_size_report_counts_layers_against_the_dense_original(mlp_files):
    model, path, dense, _ = mlp_files
    report = export.size_report(model, path, dense_model=dense)
    rows = {row.name: row for row in report.layers}
    assert list(rows) == ["fc1", "fc2", "fc3"]
    fc1 = model.get_layer("fc1")
    assert rows["fc1"].nonzero == fc1.count_nonzero_params()
    assert rows["fc1"].params == fc1.count_params()
    assert rows["fc1"].dense_params == 784 * 512 + 512
    assert rows["fc3"].nonzero == np.count_nonzero(model.get_layer("fc3").get_weights()[0])
    assert report.dense_params == dense.count_params()
    assert report.dense_file_bytes > 5 * report.file_bytes
    assert "fc1" in str(report) and "smaller" in str(report)
    # One sample through a few hundred thousand multiply-adds: microseconds
    # to milliseconds, whatever the machine.
    assert 1e-7 < report.latency < 0.1 and 1e-7 < report.dense_latency < 0.1
    assert report.latency_ratio == pytest.approx(report.latency / report.dense_latency)
    assert "LiteRT latency" in str(report)
    assert export.size_report(model, path, latency_runs=0).latency is None


@pytest.mark.slow
def test_verify_detects_a_different_model(mlp_files):
    model, path, _, _ = mlp_files
    x = samples((784,))
    # LiteRT and TensorFlow sum float32 in other orders: rounding, bounded on the outputs' scale.
    assert relative_difference(path, model, x) < 1e-4
    assert export.verify_tflite(path, psm_mlp(seed=5), x) > 1e-2


# --- quantization, encodings and the LiteRT check ---

@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["float16", "dynamic_int8"])
def test_quantized_files_keep_the_factors_compact(tmp_path, mlp_files, quantization):
    model, float32_path, _, _ = mlp_files
    x = samples((784,))
    path = export.to_tflite(model, tmp_path / "q.tflite", quantization=quantization, inputs=x)
    difference = export.verify_tflite(path, model, x)
    scale = max(1.0, float(np.abs(model(x).numpy()).max()))
    assert 0 < difference <= export.DEFAULT_TOLERANCES[quantization] * scale
    operators, _ = tflite_contents(path)
    assert operators["SCATTER_ND"] == 1  # all factors unpacked from one buffer
    assert operators["FULLY_CONNECTED"] == 5  # two per PSM layer, fc3
    # A factor folded back into a constant would be a dense 512 x 512 (or
    # 784 x 512) array, at least one byte per entry.
    assert max(buffer_sizes(path)) < 512 * 512
    size, float32_size = os.path.getsize(path), os.path.getsize(float32_path)
    assert size < (0.75 if quantization == "float16" else 0.5) * float32_size


@pytest.mark.slow
def test_quantized_product_form_keeps_constant_weights(tmp_path, mlp_files):
    model = mlp_files[0]
    x = samples((784,))
    path = export.to_tflite(model, tmp_path / "q.tflite", quantization="dynamic_int8",
                            factor_form="product", sparse=False, inputs=x)
    operators, _ = tflite_contents(path)
    # One op per layer with a constant int8 weight: nothing unpacked at run time.
    assert "SCATTER_ND" not in operators and operators["FULLY_CONNECTED"] == 3
    scale = max(1.0, float(np.abs(model(x).numpy()).max()))
    assert export.verify_tflite(path, model, x) <= export.DEFAULT_TOLERANCES["dynamic_int8"] * scale


def buffer_sizes(path):
    """Bytes of every constant tensor of a .tflite file."""
    with open(path, "rb") as handle:
        model = schema.Model.GetRootAs(handle.read(), 0)
    subgraph = model.Subgraphs(0)
    return [model.Buffers(subgraph.Tensors(i).Buffer()).DataLength()
            for i in range(subgraph.TensorsLength())]


def constant_types(path):
    """``(tensor type, bytes)`` of every constant tensor of a .tflite file."""
    with open(path, "rb") as handle:
        model = schema.Model.GetRootAs(handle.read(), 0)
    subgraph = model.Subgraphs(0)
    tensors = [subgraph.Tensors(i) for i in range(subgraph.TensorsLength())]
    return [(t.Type(), model.Buffers(t.Buffer()).DataLength()) for t in tensors
            if model.Buffers(t.Buffer()).DataLength()]


@pytest.mark.slow
def test_int8_positions_stay_one_byte_steps_in_a_small_model(tmp_path):
    # About 1,000 nonzeros: the running sum of their steps would be folded
    # into int32 positions (4 bytes each) without the padding of _running_sum.
    model = model_of(SparseFactorDense(64, n_factors=2, sparsity=2, seed=0), (256,))
    x = samples((256,))
    path = export.to_tflite(model, tmp_path / "q.tflite", quantization="dynamic_int8", inputs=x)
    nonzero = model.layers[-1].count_nonzero_params()
    constants = constant_types(path)
    assert max(size for kind, size in constants if kind == schema.TensorType.INT32) < 64
    assert any(kind == schema.TensorType.UINT8 and size > nonzero / 2 for kind, size in constants)
    scale = max(1.0, float(np.abs(model(x).numpy()).max()))
    assert export.verify_tflite(path, model, x) <= export.DEFAULT_TOLERANCES["dynamic_int8"] * scale


@pytest.mark.parametrize("count", [1, 600, 2048, 2049, 5000])
def test_running_sum_of_steps_is_their_cumsum(count):
    steps = np.random.default_rng(count).integers(0, 256, count).astype(np.uint8)
    visited = export.CompactFactors._running_sum(steps).numpy()
    assert visited.shape == (count, 1)
    # Integer sums, exact: int32 holds these (below 1.3 M; buffers stay below 2**24 units).
    np.testing.assert_array_equal(visited[:, 0], np.cumsum(steps.astype(np.int64)))


def test_compact_position_steps_visit_every_position():
    rng = np.random.default_rng(0)
    positions = np.sort(rng.choice(100_000, 300, replace=False))
    positions[0] = 0  # a first position at 0 is a first step of 0
    for case in (positions, positions[1:], positions[:1], positions[:0], np.array([1000])):
        steps, index = export.CompactFactors.steps(case)
        visited = np.cumsum(steps.astype(np.int64))
        np.testing.assert_array_equal(visited[index], case)
        assert steps.dtype == np.uint8
        # Extra positions (zero values) only where a step would exceed 255:
        # at most gap / 255 of them per gap.
        gaps = np.diff(case, prepend=0)
        assert steps.size == case.size + int(np.sum(np.maximum(0, (gaps - 1) // 255)))
        assert np.all(np.diff(visited) > 0)


@pytest.mark.parametrize("quantization", ["float16", "dynamic_int8"])
@pytest.mark.parametrize("blocks, unit", [(False, 1), (True, 4)])
def test_compact_factors_rebuild_each_factor(quantization, blocks, unit):
    rng = np.random.default_rng(0)
    if blocks:  # whole 1x4 blocks along the input axis (4 consecutive rows of a column)
        support = np.repeat(rng.random((16, 48)) < 0.1, 4, axis=0)
    else:
        support = rng.random((64, 48)) < 0.05
    factors = [(rng.standard_normal((64, 48)) * support).astype("float32"),
               (rng.standard_normal((16, 8)) * (rng.random((16, 8)) < 0.5)).astype("float32"),
               np.zeros((8, 4), "float32")]
    store = export.CompactFactors(quantization)
    key = object()
    store.add(key, factors)
    rebuilt = [factor.numpy() for factor in store.factors(key, "float32")]
    assert [buffer[0] for buffer in store._buffers] == [unit]  # one buffer, blocks by block
    # int8: factor i holds q_i = F_i / s_i, and the last one also the product
    # of the scales, so that F_1 ... F_Q = q_1 ... q_Q s_1 ... s_Q.
    scales = [1.0 if scale is None else scale for *_, scale in store._pieces[id(key)]]
    carried = [1.0] * (len(scales) - 1) + [float(np.prod(scales))]
    for factor, values, scale, common in zip(factors, rebuilt, scales, carried):
        values = values / common * scale
        # int8 rounds values below half a step to zero; nothing appears elsewhere.
        assert np.all(factor[values != 0] != 0)
        # float16: the values stay float32 until the converter; int8: half a
        # quantization step (max |v| / 254) per value.
        bound = 0 if quantization == "float16" else np.abs(factor).max() / 254 * 1.0001
        assert np.abs(values - factor).max() <= bound


def small_psm_model():
    return model_of(SparseFactorDense(256, n_factors=2, sparsity=4, seed=0), (256,))


@pytest.mark.slow
def test_sparse_int8_that_litert_cannot_run_is_a_clear_error(tmp_path):
    # A pruned Dense layer has no factors to keep compact: only TFLite's sparse
    # encoding, which LiteRT 2.3 cannot run with int8 weights.
    layer = keras.layers.Dense(256, use_bias=False)
    model = model_of(layer, (256,))
    kernel = layer.get_weights()[0]
    layer.set_weights([kernel * (np.random.default_rng(0).random(kernel.shape) < 0.02)])
    with pytest.raises(RuntimeError, match="sparse encoding (does not run|differs)"):
        export.to_tflite(model, tmp_path / "q.tflite", quantization="dynamic_int8",
                         sparse=True)
    assert not (tmp_path / "q.tflite").exists()


@pytest.mark.slow
def test_exceeding_the_tolerance_fails_loudly_and_writes_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="more than the tolerance"):
        export.to_tflite(small_psm_model(), tmp_path / "q.tflite", quantization="float16",
                         sparse=False, tolerance=0.0)
    assert not (tmp_path / "q.tflite").exists()


@pytest.mark.slow
def test_dynamic_batch_and_two_inputs(tmp_path):
    left, right = keras.Input((6,)), keras.Input((4,))
    joined = keras.layers.Concatenate()([
        SparseFactorDense(5, n_factors=2, sparsity=2, seed=0)(left), right])
    model = keras.Model([left, right], [SparseFactorDense(3, n_factors=2, sparsity=2,
                                                          seed=1)(joined), joined])
    x = [samples((6,), n=5), samples((4,), n=5, seed=3)]
    path = export.to_tflite(model, tmp_path / "two.tflite", inputs=x, batch_size=None)
    # LiteRT and TensorFlow sum float32 in other orders: rounding, bounded on the outputs' scale.
    scale = max(1.0, max(float(np.abs(output).max()) for output in model(x)))
    assert export.verify_tflite(path, model, x) < 1e-4 * scale
    outputs = export.run_tflite(path, x)
    assert [o.shape for o in outputs] == [(5, 3), (5, 9)]


@pytest.mark.slow
def test_export_never_mutates_the_model(tmp_path, mlp_files):
    model = mlp_files[0]
    before = [w.copy() for w in model.get_weights()]
    config = model.get_config()
    nodes = [len(getattr(layer, "_inbound_nodes", [])) for layer in model.layers]
    export.to_tflite(model, tmp_path / "m.tflite", sparse=True)
    for a, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(a, b)
    assert model.get_config() == config
    assert [len(getattr(layer, "_inbound_nodes", [])) for layer in model.layers] == nodes
    assert type(model.layers[1]) is SparseFactorDense


def test_bad_arguments_name_the_parameter(tmp_path):
    model = small_psm_model()
    with pytest.raises(ValueError, match="quantization"):
        export.to_tflite(model, tmp_path / "m.tflite", quantization="int4")
    with pytest.raises(ValueError, match="sparse"):
        export.to_tflite(model, tmp_path / "m.tflite", sparse="yes")
    with pytest.raises(ValueError, match="factor_form.*'auto', 'sequence', 'product'"):
        export.to_tflite(model, tmp_path / "m.tflite", factor_form="chain")
    with pytest.raises(ValueError, match="inputs"):
        export.to_tflite(model, tmp_path / "m.tflite", inputs=samples((10,)))
    with pytest.raises(ValueError, match="batch_size"):
        export.to_tflite(model, tmp_path / "m.tflite", batch_size=2, inputs=samples((256,), 3))

    class Subclassed(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(ValueError, match="functional or Sequential"):
        export.to_tflite(Subclassed(), tmp_path / "m.tflite")


# --- the default file keeps the compression, quantized ones too ---

def with_logits(model, name):
    """A copy of ``model`` whose layer ``name`` has no activation (logits, not
    probabilities, so that the relative tolerance of the check means something)."""
    def clone(layer):
        config = layer.get_config()
        if layer.name == name:
            config["activation"] = "linear"
        return type(layer).from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy


def wrapped_layers_model():
    """Conv1D (causal), SeparableConv1D and EinsumDense: the layers PSM reaches
    through wrappers (``keras_psm.layers.adapters``), and a Dense head."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 32))
    x = keras.layers.Conv1D(256, 3, padding="causal", activation="relu", name="conv1d")(inputs)
    x = keras.layers.SeparableConv1D(256, 3, activation="relu", name="separable")(x)
    x = keras.layers.EinsumDense("abc,cde->abde", output_shape=(None, 4, 64), bias_axes="de",
                                 name="einsum")(x)
    x = keras.layers.GlobalAveragePooling1D()(keras.layers.Reshape((14, 256))(x))
    return keras.Model(inputs, keras.layers.Dense(10, name="head")(x))


DEMO_MODELS = {
    "lenet5": (lambda: with_logits(demo.lenet5(), "fc3"), (28, 28, 1)),
    "vgg_small": (lambda: with_logits(demo.vgg_small(), "fc2"), (32, 32, 3)),
    "wrapped": (wrapped_layers_model, (16, 32)),
}


@pytest.fixture(scope="module", params=sorted(DEMO_MODELS))
def demo_files(request, tmp_path_factory):
    """``(name, PSM model (Q=2, K=4), its float32 file, the dense file, check inputs)``."""
    build, input_shape = DEMO_MODELS[request.param]
    directory = tmp_path_factory.mktemp(request.param)
    dense = build()
    model, report = keras_psm.compress(dense, "psm", n_factors=2, sparsity=4, max_iter=20,
                                       verbose=0)
    x = samples(input_shape, n=8)
    return (request.param, model, report, export.to_tflite(model, directory / "psm.tflite",
                                                           inputs=x),
            export.to_tflite(dense, directory / "dense.tflite", inputs=x, sparse=False), x)


def relative_difference(path, model, x):
    return export.verify_tflite(path, model, x) / max(1.0, float(np.abs(model(x)).max()))


@pytest.mark.slow
def test_default_export_keeps_the_compression(demo_files):
    _, model, report, path, dense_path, x = demo_files
    assert report.params_before >= 10 * report.params_after
    ratio = os.path.getsize(dense_path) / os.path.getsize(path)
    assert ratio >= 5, ratio
    # float32 products of a few factors, summed in another order: rounding only.
    assert relative_difference(path, model, samples(x.shape[1:], seed=5)) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["float16", "dynamic_int8"])
def test_quantized_export_is_smaller_than_float32(tmp_path, demo_files, quantization):
    _, model, _, float32_path, _, x = demo_files
    path = export.to_tflite(model, tmp_path / "q.tflite", quantization=quantization, inputs=x)
    operators, _ = tflite_contents(path)
    assert operators["SCATTER_ND"] == 1  # every factor, wrapped ones too, stored compactly
    size, float32_size = os.path.getsize(path), os.path.getsize(float32_path)
    assert size <= (1.0 if quantization == "float16" else 0.5) * float32_size, (size,
                                                                               float32_size)
    assert (relative_difference(path, model, samples(x.shape[1:], seed=5))
            <= export.DEFAULT_TOLERANCES[quantization])


# --- every layer family ---

def _family_cases():
    """family -> (layer class name in keras_psm.layers, builder(cls) -> model, input shape).

    Each layer keeps at most about a tenth of the parameters of the dense
    kernel it stands for, so a file that folded it back would be larger.
    """
    conv = (16, 16, 32)
    return {
        "psm-dense": ("SparseFactorDense", lambda cls: model_of(
            cls(256, n_factors=3, sparsity=4, seed=0, activation="relu"), (256,)), (256,)),
        "psm-conv": ("SparseFactorConv2D", lambda cls: model_of(
            cls(64, 3, n_factors=2, sparsity=2, seed=0, padding="same"), conv), conv),
        "pruned-dense": ("SparseFactorDense", lambda cls: model_of(
            cls(256, n_factors=1, sparsity=8, seed=0), (256,)), (256,)),
        "lowrank-dense": ("LowRankDense", lambda cls: model_of(cls(256, rank=8), (256,)),
                          (256,)),
        "lowrank-conv": ("LowRankConv", lambda cls: model_of(
            cls(64, 3, rank=6, padding="same"), conv), conv),
        "tucker-conv": ("TuckerConv", lambda cls: model_of(
            cls(64, 3, ranks=(8, 8), padding="same"), conv), conv),
        "tt-dense": ("TTDense", lambda cls: model_of(
            cls(256, input_factors=(4, 8, 8), output_factors=(4, 8, 8), ranks=(1, 4, 4, 1)),
            (256,)), (256,)),
        "tt-conv": ("TTConv2D", lambda cls: model_of(
            cls(64, 3, channel_factors=(4, 8), filter_factors=(8, 8), ranks=(1, 4, 4, 1),
                padding="same"), conv), conv),
        "kronecker-dense": ("KroneckerDense", lambda cls: model_of(
            cls(256, block_shape=(16, 16), rank=2, compute="materialized"), (256,)), (256,)),
    }


FAMILY_CASES = _family_cases()


def layer_class(name):
    """The layer class from ``keras_psm.layers`` (or its family module), or skip."""
    for module_name in ("keras_psm.layers", "keras_psm.layers.lowrank",
                        "keras_psm.layers.tensor", "keras_psm.layers.kronecker"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if hasattr(module, name):
            return getattr(module, name)
    pytest.skip(f"keras_psm.layers has no {name} yet")


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILY_CASES))
def test_every_layer_family_exports_compressed_and_exact(tmp_path, family):
    class_name, build, input_shape = FAMILY_CASES[family]
    model = build(layer_class(class_name))
    x = samples(input_shape)
    path = export.to_tflite(model, tmp_path / f"{family}.tflite", inputs=x)
    scale = max(1.0, float(np.abs(model(x).numpy()).max()))
    assert export.verify_tflite(path, model, samples(input_shape, seed=7)) < 1e-4 * scale
    layer = model.layers[-1]
    dense_kernel_bytes = 4 * int(np.prod(layer.kernel.shape))
    assert layer.count_nonzero_params() < 0.15 * dense_kernel_bytes / 4
    assert os.path.getsize(path) < dense_kernel_bytes / 2


def _method_names():
    expected = ["psm", "psm-reinit", "psm-random", "butterfly", "kpd", "svd", "alds",
                "tucker-svd", "tt", "hard-pruning", "iterative-pruning"]
    return expected + [name for name in keras_psm.available_methods() if name not in expected]


def _small_options(method):
    """The method's "small" preset, with palm4MSA-style iterations capped for speed."""
    options = dict(method.presets.get("small", {}))
    fields = {field.name for field in dataclasses.fields(method.config_class)}
    if "max_iter" in fields:
        options["max_iter"] = 30
    return options


@pytest.mark.slow
@pytest.mark.parametrize("method_name", _method_names())
def test_every_method_exports_smaller_and_exact(tmp_path, small_cnn_file, method_name):
    if method_name not in keras_psm.available_methods():
        pytest.skip(f"method {method_name!r} is not registered yet")
    dense, dense_bytes = small_cnn_file
    model, report = keras_psm.compress(dense, method_name, verbose=0,
                                       **_small_options(keras_psm.get_method(method_name)))
    x = samples((16, 16, 1))
    # The sequence form keeps every factor as stored; "auto" may trade file
    # bytes for speed (tested above).
    path = export.to_tflite(model, tmp_path / "c.tflite", inputs=x, factor_form="sequence")
    assert export.verify_tflite(path, model, samples((16, 16, 1), seed=4)) < 1e-4
    if report.params_after < report.params_before:
        assert os.path.getsize(path) < dense_bytes
    else:  # iterative pruning starts with full masks and prunes during fit
        assert os.path.getsize(path) < 1.1 * dense_bytes


@pytest.mark.slow
@pytest.mark.skipif(not LEGACY_KERAS, reason="tfmot's pruning wrappers need tf_keras")
def test_tfmot_pruned_model_is_stripped_with_masks_folded(tmp_path):
    from keras_psm import pruning

    dense = dense_mlp()
    wrapped, _ = pruning.hard_pruning(dense, target_sparsity=0.95)
    x = samples((784,))
    path = export.to_tflite(wrapped, tmp_path / "pruned.tflite", inputs=x)
    assert export.verify_tflite(path, wrapped, x) < 1e-4
    operators, sparse_tensors = tflite_contents(path)
    assert sparse_tensors >= 2
    dense_path = export.to_tflite(dense, tmp_path / "dense.tflite")
    assert os.path.getsize(path) * 4 < os.path.getsize(dense_path)
    assert any("prune_low_magnitude" in layer.name for layer in wrapped.layers)
