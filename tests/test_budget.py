"""compress(..., target_ratio=, target_params=): per-layer sizes meeting a parameter budget."""

import concurrent.futures

import numpy as np
import pytest

import keras_psm
from keras_psm.backend import keras
from keras_psm.budget import knob_grid
from keras_psm.methods import available_methods, get_method
from keras_psm.ops import convert_to_numpy as to_numpy

#: Methods whose size target_ratio can set (every registered one but butterfly).
KNOB_METHODS = [name for name in available_methods()
                if get_method(name).size_knob is not None
                or get_method(name).size_target is not None]
#: Options keeping the fits short.
FAST = {"psm": dict(max_iter=20), "psm-reinit": dict(max_iter=20),
        "psm-random": dict(max_iter=20), "alds": dict(n_seeds=3)}


def small_model(seed=0):
    """A Conv2D and three Dense layers, random weights (no training needed for sizes)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((10, 10, 3))
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv")(inputs)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(48, activation="relu", name="fc1")(x)
    x = keras.layers.Dense(32, activation="relu", name="fc2")(x)
    outputs = keras.layers.Dense(10, name="fc3")(x)
    return keras.Model(inputs, outputs, name="small")


def compressed_params(report):
    """Dense and reached nonzero parameters of the compressed layers."""
    return (sum(row.params_before for row in report.compressed),
            sum(row.params_after for row in report.compressed))


def test_every_method_but_butterfly_has_a_size_knob():
    assert set(available_methods()) - set(KNOB_METHODS) == {"butterfly"}


@pytest.mark.parametrize("method", KNOB_METHODS)
def test_budget_is_met_within_five_percent(method):
    model = small_model()
    _, report = keras_psm.compress(model, method, target_ratio=6, verbose=0,
                                   **FAST.get(method, {}))
    dense, reached = compressed_params(report)
    if method == "iterative-pruning":
        # The masks start full and reach the target during fit: count what its
        # callback's final sparsity keeps (tfmot's rounding, as the layers do).
        from keras_psm.methods.pruning import kept_count

        sparsity = report.callbacks[0].target_sparsity
        reached = sum(
            kept_count(model.get_layer(row.name).get_weights()[0].size, sparsity)
            + model.get_layer(row.name).get_weights()[1].size
            for row in report.compressed)
    budget = dense // 6
    # The budget is an upper bound, and the knobs' steps leave at most 5% unused.
    assert 0.95 * budget <= reached <= budget, (method, reached, budget)


def test_target_params_and_report_notes():
    model = small_model()
    _, report = keras_psm.compress(model, "psm", target_params=2000, max_iter=20, verbose=0)
    dense, reached = compressed_params(report)
    assert 0.95 * 2000 <= reached <= 2000
    for row in report.compressed:
        # Each row names the layer's chosen K (and Q when it differs from the config's).
        assert "sparsity=" in row.note
        sparsity = int(row.note.split("sparsity=")[1].split(",")[0])
        assert model.get_layer(row.name) is not None and sparsity >= 1


def test_allocation_spends_more_on_layers_whose_error_falls_faster():
    # Two Dense layers of the same size: a rank-2 kernel and a full-rank one.
    # At a budget of a few ranks, SVD gives the rank-2 kernel exactly rank 2
    # (zero error) and the rest to the full-rank one.
    rng = np.random.default_rng(0)
    inputs = keras.Input((40,))
    low = keras.layers.Dense(40, use_bias=False, name="low")
    full = keras.layers.Dense(40, use_bias=False, name="full")
    model = keras.Model(inputs, full(low(inputs)))
    low.set_weights([rng.standard_normal((40, 2)) @ rng.standard_normal((2, 40))])
    full.set_weights([rng.standard_normal((40, 40))])
    _, report = keras_psm.compress(model, "svd", target_params=11 * 80, verbose=0)
    rows = {row.name: row for row in report.compressed}
    assert rows["low"].params_after == 2 * 80
    assert rows["low"].relative_error < 1e-6  # exact up to float32 rounding of the layer
    assert rows["full"].params_after == 9 * 80  # rank 9: knob_grid(20) skips 10 and 11


def test_butterfly_has_no_knob():
    with pytest.raises(ValueError, match="'butterfly' has no size knob"):
        keras_psm.compress(small_model(), "butterfly", target_ratio=4, verbose=0)


@pytest.mark.parametrize("options, message", [
    (dict(target_ratio=4, target_params=100), "not both"),
    (dict(target_ratio=0.5), "target_ratio"),
    (dict(target_params=0), "target_params"),
    (dict(target_ratio=10_000), "cannot reach"),
])
def test_bad_budgets(options, message):
    with pytest.raises(ValueError, match=message):
        keras_psm.compress(small_model(), "svd", verbose=0, **options)


def test_score_fn_needs_a_target_and_is_called_on_few_candidates():
    model = small_model()
    with pytest.raises(ValueError, match="score_fn"):
        keras_psm.compress(model, "svd", score_fn=lambda m: 0.0, verbose=0)
    x = np.random.default_rng(0).random((64, 10, 10, 3)).astype("float32")
    reference = to_numpy(model(x))
    calls = []

    def score(candidate):
        calls.append(candidate)
        return -float(np.linalg.norm(to_numpy(candidate(x)) - reference))

    _, report = keras_psm.compress(model, "svd", target_ratio=6, score_fn=score, verbose=0)
    dense, reached = compressed_params(report)
    assert 0.95 * (dense // 6) <= reached <= dense // 6
    # The original model, then at most four candidates per layer.
    assert calls[0] is model and 1 + 4 <= len(calls) <= 1 + 4 * 4


def test_executor_gives_the_serial_allocation():
    model = small_model()
    serial, serial_report = keras_psm.compress(model, "psm", target_ratio=6, max_iter=10,
                                               verbose=0)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        parallel, parallel_report = keras_psm.compress(
            model, "psm", target_ratio=6, max_iter=10, executor=pool, verbose=0)
    assert [row.note for row in serial_report.rows] == [row.note for row in parallel_report.rows]
    for a, b in zip(serial.get_weights(), parallel.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_knob_grid():
    assert knob_grid(5) == [1, 2, 3, 4, 5]
    grid = knob_grid(1000, count=12)
    assert grid[0] == 1 and grid[-1] == 1000 and len(grid) == 12
    assert grid == sorted(set(grid))


def test_cli_target_ratio_and_calibration_file(tmp_path, capsys):
    from keras_psm import cli

    model = small_model()
    model_path, data_path = tmp_path / "small.keras", tmp_path / "calibration.npz"
    model.save(str(model_path))
    np.savez(data_path, np.random.default_rng(0).random((40, 10, 10, 3)).astype("float32"))
    output = tmp_path / "out.keras"
    status = cli.main(["compress", str(model_path), str(output), "--method", "svd",
                       "--target-ratio", "6", "--calibration", str(data_path), "16", "--quiet"])
    assert status == 0
    reloaded = keras.models.load_model(str(output))
    params = sum(reloaded.get_layer(name).count_nonzero_params()
                 for name in ("conv", "fc1", "fc2", "fc3"))
    dense = sum(model.get_layer(name).count_params() for name in ("conv", "fc1", "fc2", "fc3"))
    assert 0.95 * (dense // 6) <= params <= dense // 6
    capsys.readouterr()
    assert cli.main(["compress", str(model_path), str(output), "--overwrite", "--calibration",
                     str(data_path), "zero"]) == 1
    assert "sample count" in capsys.readouterr().err
    assert cli.main(["compress", str(model_path), str(output), "--overwrite", "--method",
                     "butterfly", "--target-ratio", "6"]) == 1
    assert "no size knob" in capsys.readouterr().err


def test_demo_budget_trials_cover_every_method_with_a_knob():
    from keras_psm import demo

    trials = demo.budget_trials(20, max_iter=30)
    assert [trial.method for trial in trials] == KNOB_METHODS
    for trial in trials:
        assert trial.options["target_ratio"] == 20 and trial.budget == "x20"
        assert trial.options.get("max_iter", 30) <= 30


def decaying_matrix(rows, cols, seed):
    """A matrix with singular values 1 / (1 + i)^0.7, like a trained layer's spectrum."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((rows, rows)))
    v, _ = np.linalg.qr(rng.standard_normal((cols, cols)))
    values = 1.0 / (1.0 + np.arange(min(rows, cols))) ** 0.7
    return (u[:, :values.size] * values) @ v[:, :values.size].T


def fitted_price(method, layer, kernel, layer_config, covariance):
    """Nonzeros (biases aside) and input-weighted error of the method's full fit."""
    from keras_psm.budget import _measure
    from keras_psm.factorize.calibrated import whitening_factor

    spec = get_method(method)
    fitted = spec.fit(kernel, layer_config, covariance)
    params, error = _measure(spec, layer, kernel, fitted, layer_config,
                             None if covariance is None else whitening_factor(covariance))
    return params - layer.count_params() + kernel.size, error


@pytest.mark.parametrize("method", ["svd", "hard-pruning"])
@pytest.mark.parametrize("calibrated", [False, True])
def test_svd_and_pruning_estimates_are_the_full_fits_prices(method, calibrated):
    rng = np.random.default_rng(1)
    kernel = rng.standard_normal((3, 3, 4, 6))
    layer = keras.layers.Conv2D(6, 3, name="conv")
    layer.build((None, 8, 8, 4))
    layer.set_weights([kernel.astype("float32"), np.zeros(6, "float32")])
    kernel = layer.get_weights()[0].astype(np.float64)
    inputs = rng.standard_normal((200, 36)) * rng.random(36)
    covariance = inputs.T @ inputs + 0.1 * np.eye(36) if calibrated else None
    spec = get_method(method)
    (ladder,) = spec.size_knob(kernel.shape, spec.make_config())
    estimates = spec.size_estimates(kernel, ladder, covariance)
    assert len(estimates) == len(ladder)
    for layer_config, estimate in zip(ladder, estimates):
        nonzeros, error = fitted_price(method, layer, kernel, layer_config, covariance)
        assert estimate.nonzeros == nonzeros
        # The fitted layer's kernel is float32: its error moves by ~1e-6 relative.
        assert estimate.error == pytest.approx(error, rel=1e-4, abs=1e-6)


def test_psm_estimates_rank_candidates_as_full_fits_do():
    from scipy.stats import kendalltau

    from keras_psm.methods.psm import PSMConfig, fit_psm, psm_estimates, psm_sizes

    config = PSMConfig(max_iter=90)
    estimated, full = [], []
    for seed, shape in enumerate([(40, 24), (24, 32)]):
        matrix = decaying_matrix(*shape, seed)
        for ladder in psm_sizes(shape, config):
            estimated += [e.error for e in psm_estimates(matrix, ladder)]
            full += [fit_psm(matrix, layer_config).relative_error for layer_config in ladder]
    # Pooled over both matrices and Q = 2, 3 (40 candidates): short fits from warm starts
    # overrate large K's errors by up to ~0.15 but keep the candidates' order (tau ~0.9).
    assert kendalltau(estimated, full).statistic >= 0.8


def test_progress_lines_when_stderr_is_a_pipe(monkeypatch):
    import io
    import os
    import sys
    import threading

    from keras_psm import budget

    read, write = os.pipe()
    pipe = io.TextIOWrapper(os.fdopen(write, "wb"), write_through=True)
    received = []
    reader = threading.Thread(target=lambda: received.append(os.fdopen(read).read()))
    reader.start()  # drains the pipe, so a slow run cannot fill it
    monkeypatch.setattr(sys, "stderr", pipe)
    monkeypatch.setattr(budget, "PROGRESS_SECONDS", 0.05)
    keras_psm.compress(small_model(), "svd", target_ratio=6, verbose=1)
    pipe.close()
    reader.join()
    printed = [line for line in received[0].splitlines() if line.startswith("svd budget:")]
    assert printed, "no progress line on a pipe"
    # The last line: every layer done of the four, candidates counted, time elapsed.
    assert printed[-1].split(": ", 1)[1].split(", ")[1] == "4/4 layers"
    assert " candidates, " in printed[-1] and printed[-1].endswith(" s")
