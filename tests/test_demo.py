"""The demo pipeline: trials from the registry, measured results, table, CSV, plot, the command."""

import csv
import dataclasses

import numpy as np
import pytest

import keras_psm
from keras_psm import demo
from keras_psm.methods import registry
from keras_psm.methods.pruning import kept_count
from keras_psm.methods.psm import PSM

from command_line import TENSORFLOW_LOG, run_command

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def failing_fit(kernel, config):
    raise ValueError("this method cannot fit a kernel of shape %s" % (kernel.shape,))


@pytest.fixture
def extra_methods(monkeypatch):
    """Two methods registered for one test: a working copy of psm and one whose fit fails."""
    copy = dataclasses.replace(PSM, name="psm-copy", presets={"tiny": dict(n_factors=2,
                                                                            sparsity=2)})
    failing = dataclasses.replace(PSM, name="always-fails", fit=failing_fit, presets={})
    for method in (copy, failing):
        monkeypatch.setitem(registry._METHODS, method.name, method)
    return copy, failing


def test_trials_come_from_the_registry_presets(extra_methods):
    trials = demo.preset_trials(budgets=("small", "large", "tiny"), max_iter=30)
    expected = []
    for name in keras_psm.available_methods():
        presets = keras_psm.get_method(name).presets
        budgets = [b for b in ("small", "large", "tiny") if b in presets] or ["default"]
        expected += [(name, budget) for budget in budgets]
    assert [(t.method, t.budget) for t in trials] == expected
    by_key = {(t.method, t.budget): t.options for t in trials}
    # palm4MSA methods get max_iter capped at 30; the others keep their preset untouched.
    assert by_key[("psm", "large")] == dict(n_factors=3, sparsity=14, max_iter=30)
    assert by_key[("psm-copy", "tiny")] == dict(n_factors=2, sparsity=2, max_iter=30)
    assert by_key[("always-fails", "default")] == dict(max_iter=30)
    for (name, budget), options in by_key.items():
        fields = {f.name for f in dataclasses.fields(keras_psm.get_method(name).config_class)}
        if "max_iter" not in fields and budget != "default":
            assert options == dict(keras_psm.get_method(name).presets[budget])
    assert demo.preset_trials(["psm"], max_iter=None)[1].options == dict(n_factors=3,
                                                                         sparsity=14)
    with pytest.raises(ValueError, match="`method` must be one of"):
        demo.preset_trials(["no-such-method"])


def test_pruning_schedule_is_fitted_to_the_fine_tuning():
    method = keras_psm.get_method("iterative-pruning")
    options = demo.fit_schedule(method, dict(target_sparsity=0.9, end_step=500, frequency=50),
                                total_steps=300)
    assert options == dict(target_sparsity=0.9, end_step=200, frequency=20)
    options = demo.fit_schedule(method, dict(begin_step=10), total_steps=30)
    assert options == dict(begin_step=10, end_step=20, frequency=1)
    psm_options = dict(n_factors=2, sparsity=4)
    assert demo.fit_schedule(PSM, psm_options, total_steps=300) == psm_options


@pytest.mark.slow
def test_results_are_measured_and_failures_reported(trained_lenet, mnist_small,
                                                    extra_methods):
    (x, y), (x_test, y_test) = mnist_small
    data = ((x[:500], y[:500]), (x_test, y_test))
    settings = demo.Settings(train_samples=500, test_samples=500, finetune_epochs=1,
                             max_iter=20)
    trials = [
        demo.Trial("psm-copy", "tiny", dict(n_factors=2, sparsity=2, max_iter=20)),
        demo.Trial("always-fails", "default", {}),
        demo.Trial("iterative-pruning", "large", dict(target_sparsity=0.9)),
    ]
    results = demo.run_trials(trained_lenet, trials, data, settings, progress=False,
                              keep_models=True)
    psm_result, failed, pruned = results

    base_params = trained_lenet.count_params()
    assert demo.param_count(trained_lenet, demo.conv_dense_names(trained_lenet)) == \
        base_params
    _, report = keras_psm.compress(trained_lenet, "psm", n_factors=2, sparsity=2, max_iter=20,
                                   verbose=0)
    assert psm_result.params == report.params_after  # supports fixed during fine-tuning
    assert psm_result.compression_ratio == pytest.approx(base_params / report.params_after)
    evaluated = psm_result.model.evaluate(x_test, y_test, verbose=0)[1]
    # evaluate() runs other batch sizes: float32 rounding may flip one near-tied argmax.
    assert psm_result.accuracy_after == pytest.approx(evaluated, abs=1.5 / len(y_test))
    assert 0.0 <= psm_result.accuracy_before <= 1.0
    assert psm_result.compress_seconds > 0 and psm_result.fit_seconds > 0

    assert failed.failed and failed.params is None and failed.model is None
    assert failed.error.startswith("ValueError: ")
    assert "cannot fit a kernel of shape" in failed.error and "\n" not in failed.error

    # report.callbacks reached fit: the schedule ran to its target sparsity.
    steps = -(-500 // settings.batch_size)
    assert pruned.options["end_step"] == round(demo.SCHEDULE_FRACTION * steps)
    kernels = [trained_lenet.get_layer(n).kernel for n in demo.conv_dense_names(trained_lenet)]
    biases = [trained_lenet.get_layer(n).bias for n in demo.conv_dense_names(trained_lenet)]
    most = sum(kept_count(int(np.prod(k.shape)), 0.9) for k in kernels) + \
        sum(int(b.shape[0]) for b in biases)
    assert most - 20 <= pruned.params <= most
    # The same kernels through another graph: float32 rounding may flip one near-tied argmax.
    assert pruned.accuracy_before == pytest.approx(
        demo.accuracy(trained_lenet, x_test, y_test), abs=1.5 / len(y_test))


def make_result(method, budget, params, ratio, accuracy, error=""):
    return demo.Result("lenet5", method, budget, {"option": 1}, params=params,
                       compression_ratio=ratio, accuracy_before=accuracy and accuracy / 2,
                       accuracy_after=accuracy, compress_seconds=1.0, fit_seconds=2.0,
                       error=error)


RESULTS = [
    make_result("base", "", 60000, 1.0, 0.98),
    make_result("psm", "small", 2000, 30.0, 0.90),
    make_result("psm", "large", 15000, 4.0, 0.97),
    make_result("svd", "small", 10000, 6.0, 0.93),
    make_result("tt", "small", None, None, None, error="ValueError: rank too large"),
]


def test_best_result_rule():
    assert demo.best_result(RESULTS, min_ratio=5.0).label == "svd (small)"
    assert demo.best_result(RESULTS, min_ratio=10.0).label == "psm (small)"
    assert demo.best_result(RESULTS, min_ratio=50.0).label == "psm (small)"  # most compressed
    assert demo.best_result([RESULTS[0], RESULTS[-1]]) is None


def test_table_csv_and_plot(tmp_path):
    table = demo.format_table(RESULTS)
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["method", "budget", "params", "ratio"]
    assert len(lines) == 2 + len(RESULTS)
    assert lines[4].split()[:6] == ["psm", "large", "15,000", "x4.0", "0.4850", "0.9700"]
    assert lines[-1].startswith("tt") and lines[-1].endswith("FAILED ValueError: rank too large")

    path = demo.write_csv(RESULTS, tmp_path / "results.csv")
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    assert [row["method"] for row in rows] == [r.method for r in RESULTS]
    # The CSV holds the Python float the table was given (no TensorFlow arithmetic),
    # and repr round-trips exactly.
    assert float(rows[3]["compression_ratio"]) == 6.0 and rows[3]["options"] == '{"option": 1}'
    assert rows[4]["params"] == "" and rows[4]["error"] == "ValueError: rank too large"

    png = demo.plot_tradeoff(RESULTS, tmp_path / "tradeoff.png", title="test")
    assert open(png, "rb").read(8) == PNG_SIGNATURE

    from matplotlib.figure import Figure

    axes = Figure().add_subplot()
    demo.plot_tradeoff(RESULTS, None, axes=axes)
    assert axes.get_xscale() == "log"
    series = {line.get_label(): line for line in axes.get_lines() if line.get_label()[0] != "_"}
    assert sorted(series) == ["base (uncompressed)", "psm", "svd"]  # the failure is left out
    np.testing.assert_array_equal(series["psm"].get_xdata(), [2000, 15000])
    np.testing.assert_array_equal(series["psm"].get_ydata(), [0.90, 0.97])


def test_settings_are_validated():
    with pytest.raises(ValueError, match="Settings: `train_samples` must be >= 1, got 0"):
        demo.Settings(train_samples=0)
    with pytest.raises(ValueError, match="`dataset` must be one of"):
        demo.Settings(dataset="imagenet")
    with pytest.raises(TypeError, match="`max_iter` must be an integer"):
        demo.Settings(max_iter=2.5)
    with pytest.raises(ValueError, match="`temperature` must be > 0.0"):
        demo.Settings(temperature=0.0)
    with pytest.raises(ValueError, match="`objective` must be one of 'correlation', 'kl'"):
        demo.Settings(objective="hint")
    with pytest.raises(TypeError, match="`distill` must be True or False"):
        demo.Settings(distill=1)
    with pytest.raises(ValueError, match=r"`ema_momentum` must be > 0.0 and <= 1.0, got 1.5"):
        demo.Settings(ema_momentum=1.5)
    with pytest.raises(ValueError, match="`distill_epochs` must be >= 1, got 0"):
        demo.Settings(distill_epochs=0)
    with pytest.raises(ValueError, match="`pick_steps` must be >= 1, got 0"):
        demo.Settings(pick_steps=0)
    assert demo.QUICK.train_samples < demo.FULL.train_samples


@pytest.mark.parametrize("distill, pick_rate", [(True, True), (False, False)])
def test_finetune_distills_at_the_picked_rate(distill, pick_rate, trained_lenet, mnist_small):
    (x, y), (x_test, y_test) = mnist_small
    data = ((x[:320], y[:320]), (x_test, y_test))
    teacher_weights = trained_lenet.get_weights()
    small, report = keras_psm.compress(trained_lenet, "psm", n_factors=2, sparsity=2,
                                       max_iter=10, verbose=0)
    start = small.get_weights()
    settings = demo.Settings(finetune_epochs=1, distill=distill, pick_rate=pick_rate,
                             pick_steps=5, learning_rate=3e-4)
    rate = demo.finetune(small, trained_lenet, data, settings, report.callbacks)
    assert rate in (1e-3, 1e-4, 1e-5) if pick_rate else rate == 3e-4
    assert float(small.optimizer.learning_rate.numpy()) == pytest.approx(rate)
    assert any(not np.array_equal(a, b) for a, b in zip(start, small.get_weights()))
    for before, after in zip(teacher_weights, trained_lenet.get_weights()):
        np.testing.assert_array_equal(before, after)
    description = demo.finetune_description(settings)
    assert "distilled from the uncompressed model" in description if distill \
        else "distilled" not in description
    assert "after 5 steps" in description if pick_rate \
        else "at learning rate 0.0003" in description


def test_finetune_description_names_the_distilled_epochs():
    assert "(kl, T=4, alpha=1, in the first 2 epoch(s))" in demo.finetune_description(
        demo.Settings(distill_epochs=2))
    assert "(kl, T=4, alpha=1)" in demo.finetune_description(demo.Settings())


@pytest.mark.parametrize("distill", [True, False])
def test_finetune_with_ema_ends_at_the_moving_average(distill, trained_lenet, mnist_small):
    (x, y), (x_test, y_test) = mnist_small
    data = ((x[:320], y[:320]), (x_test, y_test))
    small, report = keras_psm.compress(trained_lenet, "psm", n_factors=2, sparsity=2,
                                       max_iter=10, verbose=0)
    start = small.get_weights()
    moved = {}
    for momentum in (None, 1 - 1e-7):
        small.set_weights(start)
        settings = demo.Settings(finetune_epochs=1, distill=distill, pick_rate=False,
                                 learning_rate=1e-2, ema_momentum=momentum)
        demo.finetune(small, trained_lenet, data, settings, report.callbacks)
        moved[momentum] = max(float(np.max(np.abs(a - b)))
                              for a, b in zip(start, small.get_weights()))
    # Adam's first step moves each weight by at most the learning rate (|m / sqrt(v)|
    # is 1 there). The average starts from the weights after that step and keeps
    # 1 - 1e-7 of itself per step, so it ends within the rate of the start; the 10
    # plain steps move some weight further.
    assert moved[1 - 1e-7] <= 1e-2 * (1 + 1e-3)
    assert moved[None] > 2e-2


@pytest.mark.slow
def test_quick_demo_command(tmp_path):
    """``keras-psm demo --quick`` as a user runs it: table, CSV, PNG, TFLite, status 0.

    Piped, it prints only its own output: no TensorFlow log line, no progress bar.
    """
    output = tmp_path / "demo"
    completed = run_command("demo", "--quick", "--output", output, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    for printed in (completed.stdout, completed.stderr):
        assert not TENSORFLOW_LOG.search(printed), printed[-3000:]
        assert "\r" not in printed and "trial/s" not in printed and "s/trial" not in printed
    with open(output / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    expected = [("base", "")] + [(t.method, t.budget) for t in demo.preset_trials()]
    assert [(row["method"], row["budget"]) for row in rows] == expected
    assert {name for name, _ in expected} == {"base", *keras_psm.available_methods()}

    lines = completed.stdout.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("method ")))
    table = [line.split()[:2] for line in lines[start + 2:start + 2 + len(expected)]]
    assert [tuple(cells) for cells in table[1:]] == expected[1:]
    base = rows[0]
    assert int(base["params"]) == 61706 and float(base["accuracy_after"]) > 0.8
    for row in rows[1:]:
        assert row["error"] or 0.0 <= float(row["accuracy_after"]) <= 1.0
    assert open(output / "tradeoff.png", "rb").read(8) == PNG_SIGNATURE
    assert (output / "best.tflite").stat().st_size > 0
    assert "best model (" in completed.stdout


@pytest.mark.slow
def test_demo_on_the_bundled_fashion_mnist(tmp_path):
    """``keras-psm demo --quick --dataset fashion_mnist_5k`` runs offline on the bundled images."""
    output = tmp_path / "fashion"
    completed = run_command("demo", "--quick", "--dataset", "fashion_mnist_5k", "--output",
                            output, "--methods", "psm", "svd", "--no-export", timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert (f"lenet5 on fashion_mnist_5k ({demo.QUICK.train_samples} training samples)"
            in completed.stdout)
    with open(output / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["method"], row["budget"]) for row in rows] == [
        ("base", ""), ("psm", "small"), ("psm", "large"), ("svd", "small"), ("svd", "large")]
    assert not any(row["error"] for row in rows)
    # Ten balanced classes: chance is 0.1; a LeNet-5 after 5 epochs on 1,600 images is
    # near 0.8 and far from the digits' 0.97.
    assert 0.5 < float(rows[0]["accuracy_after"]) < 0.95
    assert open(output / "tradeoff.png", "rb").read(8) == PNG_SIGNATURE
    assert not (output / "best.tflite").exists()
