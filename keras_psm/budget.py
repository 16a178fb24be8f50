"""Parameter budgets: ``compress(..., target_ratio=R)`` or ``target_params=N``.

The selected layers' nonzero parameters (biases included, as the report
counts them) must total at most ``N`` (``dense total / R``), as close to it
as the method's sizes allow. Methods declare how (``Method`` in
``keras_psm.methods.registry``):

- ``size_knob(kernel_shape, config)``: ladders of per-layer configs, each
  ladder from small to large (PSM: K for Q = 2 and for Q = 3; SVD: the rank;
  TT: the maximum TT rank; pruning: the kept fraction). Every layer's
  candidates are priced from the small end, stopping a ladder once it
  outgrows what the budget leaves that layer: by ``size_estimates`` where
  the method has it (one SVD, one sort, short warm-started palm4MSA; then
  only the chosen sizes are fitted in full), else by full fits (through
  ``executor`` when given), in waves. Then the allocation picks one
  candidate per layer to minimize the error sum ``sum_l e_l`` (``e_l`` the layer's relative error
  ``||R (W - W_hat)||_F / ||R W||_F``, ``R^T R`` its input covariance with
  calibration data, ``R = I`` without) subject to the budget, a
  multiple-choice knapsack that dynamic programming solves over the
  candidates (where ALDS and AIMET search greedily), among the choices that
  spend at least 96% of the budget where the sizes allow it, then spends
  what is left one upgrade at a time. The errors are not weighted by layer size: to first
  order, the relative errors of a chain of layers add up at its output
  whatever each layer's size (on LeNet-5 at 20x, weighting by size starves
  the small convolutions and loses most of the accuracy).
- ``size_target(config, kept_fraction)``: methods with a global target of
  their own (ALDS's ``target``, iterative pruning's ``target_sparsity``) get
  it from the fraction of the kernels' values the budget keeps.

With ``score_fn(model) -> float`` (higher is better, e.g. accuracy on
held-out data), the allocation minimizes the summed score drops instead
(AIMET's greedy per-layer selection): ``score_fn`` runs on the original
model and on ``score_candidates`` candidates per layer, each with only that
layer compressed; the drops of the other candidates are interpolated over
their parameter counts.
"""

import dataclasses
import math
import sys
import threading
import time

import numpy as np
from tqdm.auto import tqdm

from keras_psm import ops
from keras_psm.factorize.calibrated import weighted_relative_error, whitening_factor
from keras_psm.validation import check_float, check_int

#: Values per ladder that ``knob_grid`` spreads over a knob's range.
KNOB_COUNT = 24

#: Units of the budget in the allocation's dynamic programme (at least 40 per layer).
KNAPSACK_STEPS = 2000

#: The allocation prefers the least error among choices spending this much of the budget.
MIN_SPENT = 0.96

#: Candidates per layer scored by ``score_fn`` by default.
SCORE_CANDIDATES = 4

#: Seconds between two progress lines when standard error is not a terminal.
PROGRESS_SECONDS = 5.0


def knob_grid(maximum, count=KNOB_COUNT):
    """Integers from 1 to ``maximum``: all of them, or ``count`` spread geometrically."""
    maximum = max(1, int(maximum))
    if maximum <= count:
        return list(range(1, maximum + 1))
    return sorted({int(round(v)) for v in np.geomspace(1, maximum, count)})


def fraction_grid(size, count=3 * KNOB_COUNT):
    """Kept fractions of ``size`` entries, from one entry to all of them, geometrically."""
    kept = np.unique(np.round(np.geomspace(1, size, count)).astype(int))
    return [float(k) / size for k in kept]


def budget_params(target_ratio, target_params, layers, spec, score_fn=None):
    """The budget ``N`` over ``layers`` from ``target_ratio`` or ``target_params`` (None if
    neither); raises ValueError for both, a method without a knob, or ``score_fn`` alone."""
    if target_ratio is None and target_params is None:
        if score_fn is not None:
            raise ValueError("`score_fn` needs `target_ratio` or `target_params`.")
        return None
    if target_ratio is not None and target_params is not None:
        raise ValueError("pass `target_ratio` or `target_params`, not both.")
    if score_fn is not None and not callable(score_fn):
        raise TypeError(f"`score_fn` must be a callable model -> float, got {score_fn!r}.")
    if spec.size_knob is None and spec.size_target is None:
        raise ValueError(
            f"method {spec.name!r} has no size knob, so `target_ratio`/`target_params` "
            f"cannot set its size; use a method with one ({', '.join(_knob_methods())})."
        )
    dense = sum(int(layer.count_params()) for layer in layers.values())
    if target_ratio is not None:
        ratio = check_float(target_ratio, "target_ratio", minimum=1.0, where="compress")
        return int(math.floor(dense / ratio))
    return check_int(target_params, "target_params", minimum=1, maximum=dense, where="compress")


def budgeted_fits(model, spec, layers, kernels, config, budget, fit_all, *, covariances=None,
                  calibration_data=None, score_fn=None, verbose=1):
    """``(config, configs, fits)`` meeting ``budget`` for ``compress``.

    A method with a global target returns its config for the budget, with
    ``configs`` and ``fits`` None (``compress`` fits it as usual); one with a
    size knob returns ``allocate``'s per-layer configs and fits.
    ``fit_all(kernels, configs, covariances)`` runs fits keyed alike.
    """
    if spec.size_knob is None:
        biases = {name: int(layer.count_params()) - kernels[name].size
                  for name, layer in layers.items()}
        return target_config(spec, config, kernels, biases, budget), None, None

    def fit_many(jobs):
        return fit_all(*({key: job[part] for key, job in jobs.items()} for part in range(3)))

    score = None
    if score_fn is not None:
        from keras_psm.compress import compress  # compress calls this module

        baseline = float(score_fn(model))

        def score_loss(name, layer_config):
            candidate, _ = compress(
                model, spec.name, [name], config=layer_config, verbose=0,
                calibration_data=calibration_data if spec.calibrated else None)
            return baseline - float(score_fn(candidate))

        score = score_loss

    configs, fits, _ = allocate(spec, layers, kernels, config, budget, fit_many,
                                covariances=covariances, score=score, verbose=verbose)
    return config, configs, fits


def _knob_methods():
    from keras_psm.methods import available_methods, get_method

    return [name for name in available_methods()
            if get_method(name).size_knob is not None or get_method(name).size_target is not None]


def target_config(spec, config, kernels, biases, budget):
    """``spec.size_target``'s config keeping the kernel values the budget leaves.

    ``biases`` is the bias size per layer (kept as they are).
    """
    kernel_values = sum(int(np.size(kernel)) for kernel in kernels.values())
    kept = (budget - sum(biases.values())) / kernel_values
    if kept <= 0:
        raise ValueError(
            f"target of {budget:,} parameters is below the selected layers' "
            f"{sum(biases.values()):,} bias values; method {spec.name!r} cannot reach it."
        )
    return spec.size_target(config, min(kept, 1.0))


class Progress:
    """What a budgeted compress is doing, on standard error.

    On a terminal, a tqdm bar over the layers; otherwise (a pipe, a file) a
    line every ``PROGRESS_SECONDS`` from a background thread, so that a long
    fit in between still shows: the stage, layers done of all, candidates
    priced, elapsed seconds. Silent when ``verbose`` is 0.
    """

    def __init__(self, description, layers, verbose):
        self.description, self.layers, self.verbose = description, layers, bool(verbose)
        self.what, self.done, self.candidates = "pricing candidates", 0, 0
        self.start = time.perf_counter()
        self.bar, self.thread, self.stopped = None, None, threading.Event()

    def __enter__(self):
        if self.verbose and sys.stderr.isatty():
            self.bar = tqdm(total=self.layers, desc=self.description, unit="layer")
        elif self.verbose:
            self.thread = threading.Thread(target=self._lines, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.stopped.set()
        if self.thread is not None:
            self.thread.join()
            self._print()
        if self.bar is not None:
            self.bar.close()

    def line(self):
        return (f"{self.description}: {self.what}, {self.done}/{self.layers} layers, "
                f"{self.candidates} candidates, {time.perf_counter() - self.start:.0f} s")

    def stage(self, what, layers):
        """Start a new stage over ``layers`` layers."""
        self.what, self.done, self.layers = what, 0, layers
        if self.bar is not None:
            self.bar.reset(total=layers)
            self.bar.set_description(f"{self.description}: {what}")

    def update(self, layers=0, candidates=0):
        self.done += layers
        self.candidates += candidates
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.candidates} candidates", refresh=False)
            self.bar.update(layers)

    def _lines(self):
        while not self.stopped.wait(PROGRESS_SECONDS):
            self._print()

    def _print(self):
        print(self.line(), file=sys.stderr, flush=True)


@dataclasses.dataclass
class Estimate:
    """A candidate priced without its full fit (``Method.size_estimates``).

    ``nonzeros``: the kernel's nonzero parameters (biases aside); ``error``:
    its relative (input-weighted) error; ``quick_config``: the config that
    fits it as cheaply as it was priced (for ``score_fn``), None for its own.
    """

    nonzeros: int
    error: float
    quick_config: object = None


@dataclasses.dataclass
class Candidate:
    """One size of one layer: its config, fit (None if only estimated), parameters and error."""

    config: object
    fitted: object
    seconds: float
    params: int
    error: float
    cost: float = 0.0
    quick_config: object = None


def allocate(spec, layers, kernels, config, budget, fit_many, *, covariances=None,
             score=None, score_candidates=SCORE_CANDIDATES, verbose=1):
    """Per-layer configs and fits of ``spec`` meeting ``budget`` nonzero parameters.

    A method with ``size_estimates`` prices its candidates cheaply, and only
    the chosen configs are fitted (then, should a full fit hold more
    nonzeros than its estimate and overrun the budget, ``_settle`` steps
    layers down); any other method's candidates are all fitted.

    Args:
        spec: the ``Method`` (with ``size_knob``).
        layers, kernels: the selected layers and their kernels, by name.
        config: the user's config; its other fields are kept.
        budget: nonzero parameters allowed over the selected layers.
        fit_many: ``{key: (kernel, config, covariance)} -> {key: (fitted, seconds)}``,
            which runs the fits (in parallel when it can).
        covariances: ``{name: damped X^T X}`` or None.
        score: None, or ``(name, config) -> float``, the score drop of the
            model with only that layer compressed at ``config``.

    Returns:
        ``(configs, fits, candidates)``: ``{name: config}``,
        ``{name: (fitted, seconds)}`` and ``{name: [Candidate, ...]}``.
    """
    covariances = covariances or {}
    factors = {name: whitening_factor(covariances[name]) if name in covariances else None
               for name in kernels}
    ladders = {name: spec.size_knob(kernels[name].shape, config) for name in kernels}
    with Progress(f"{spec.name} budget", len(kernels), verbose) as progress:
        if spec.size_estimates is None:
            candidates, room = _fitted_candidates(spec, layers, kernels, ladders, budget,
                                                  fit_many, covariances, factors, progress)
        else:
            candidates, room = _estimated_candidates(spec, layers, kernels, ladders, budget,
                                                     covariances, progress)
        for name, found in candidates.items():
            found[:] = [c for c in found if c.params <= room[name]]
            for candidate in found:
                candidate.cost = candidate.error
        if score is not None:
            _score_costs(candidates, score, score_candidates, progress)
        choice = _allocation(candidates, budget)
        progress.stage("fitting the chosen sizes", len(choice))
        fits = {name: (candidates[name][index].fitted, candidates[name][index].seconds)
                for name, index in choice.items() if candidates[name][index].fitted is not None}
        if len(fits) < len(choice):
            fits.update(fit_many({
                name: (kernels[name], candidates[name][index].config,
                       covariances.get(name) if spec.calibrated else None)
                for name, index in choice.items() if name not in fits}))
            choice = _settle(spec, layers, kernels, candidates, choice, fits, budget,
                             fit_many, covariances)
        progress.update(layers=len(choice))
    configs = {name: candidates[name][index].config for name, index in choice.items()}
    return configs, {name: fits[name] for name in choice}, candidates


def _fitted_candidates(spec, layers, kernels, ladders, budget, fit_many, covariances,
                       factors, progress):
    """Every candidate fitted in full, in waves from the small end of each ladder, each
    ladder stopping once it outgrows what the budget leaves its layer."""
    candidates = {name: [] for name in kernels}
    position = {(name, index): 0 for name in kernels for index in range(len(ladders[name]))}
    done = set()
    while position:
        jobs = {(name, index, step): (kernels[name], ladders[name][index][step],
                                      covariances.get(name) if spec.calibrated else None)
                for (name, index), step in position.items()}
        for (name, index, step), (fitted, seconds) in fit_many(jobs).items():
            layer_config = ladders[name][index][step]
            params, error = _measure(spec, layers[name], kernels[name], fitted,
                                     layer_config, factors[name])
            candidates[name].append(Candidate(layer_config, fitted, seconds, params, error))
            position[(name, index)] = step + 1
        room = _room(spec, candidates, budget)
        position = {
            (name, index): step for (name, index), step in position.items()
            if step < len(ladders[name][index])
            and _last_params(candidates[name], ladders[name][index][step - 1]) <= room[name]
        }
        finished = {name for name in kernels if not any(key[0] == name for key in position)}
        progress.update(layers=len(finished - done), candidates=len(jobs))
        done |= finished
    return candidates, room


def _estimated_candidates(spec, layers, kernels, ladders, budget, covariances, progress):
    """Every candidate priced by ``spec.size_estimates``: first each layer's smallest (the
    first of its first ladder), then each ladder up to the first candidate past what the
    budget leaves its layer."""
    biases = {name: int(layers[name].count_params()) - kernels[name].size for name in kernels}

    def priced(name, layer_ladders, limit):
        found = []
        for ladder in layer_ladders:
            estimates = spec.size_estimates(kernels[name], ladder, covariances.get(name), limit)
            found += [Candidate(layer_config, None, 0.0, estimate.nonzeros + biases[name],
                                estimate.error, quick_config=estimate.quick_config)
                      for layer_config, estimate in zip(ladder, estimates)]
        return found

    candidates = {name: priced(name, ladders[name][:1], limit=-1) for name in kernels}
    progress.update(candidates=len(candidates))
    room = _room(spec, candidates, budget)
    for name in kernels:
        candidates[name] = priced(name, ladders[name], limit=room[name] - biases[name])
        progress.update(layers=1, candidates=len(candidates[name]))
    return candidates, _room(spec, candidates, budget)


def _room(spec, candidates, budget):
    """The most each layer may hold: the budget less the other layers' smallest candidates."""
    smallest = {name: min(c.params for c in found) for name, found in candidates.items()}
    if sum(smallest.values()) > budget:
        raise ValueError(
            f"method {spec.name!r} cannot reach {budget:,} parameters: its smallest "
            f"sizes of the selected layers total {sum(smallest.values()):,}."
        )
    return {name: budget - sum(smallest.values()) + smallest[name] for name in candidates}


def _settle(spec, layers, kernels, candidates, choice, fits, budget, fit_many, covariances):
    """``choice`` with its full fits within ``budget``, spending it as the estimates did.

    A full fit may hold a few more or fewer nonzeros than its estimate (a
    longer palm4MSA moves its supports). While the fits overrun the budget,
    the layer whose next smaller candidate costs the least added error per
    parameter saved (preferring one that saves the whole overrun) is refitted
    at that size. Then, while they spend less than ``MIN_SPENT`` of it, the
    upgrade that lowers the cost most per added parameter and fits in what
    is left is refitted (kept only if it still fits), one per layer at most.
    """
    choice, tried = dict(choice), set()

    def refit(name, index):
        layer_config = candidates[name][index].config
        fitted = fit_many({name: (kernels[name], layer_config,
                                  covariances.get(name) if spec.calibrated else None)})[name]
        return fitted, _measure(spec, layers[name], kernels[name], fitted[0], layer_config,
                                None)[0]

    params = {name: _measure(spec, layers[name], kernels[name], fits[name][0],
                             candidates[name][index].config, None)[0]
              for name, index in choice.items()}
    while sum(params.values()) > budget:
        overrun = sum(params.values()) - budget
        steps = [(candidate.cost - found[choice[name]].cost, saved, name, index)
                 for name, found in candidates.items()
                 for index, candidate in enumerate(found)
                 for saved in [params[name] - candidate.params] if saved > 0]
        if not steps:
            raise ValueError(f"method {spec.name!r} cannot reach {budget:,} parameters.")
        enough = [step for step in steps if step[1] >= overrun]
        _, _, name, index = (min(enough) if enough
                             else min(steps, key=lambda step: step[0] / step[1]))
        fits[name], params[name] = refit(name, index)
        choice[name] = index
    while sum(params.values()) < MIN_SPENT * budget:
        left = budget - sum(params.values())
        steps = [((found[choice[name]].cost - candidate.cost) / added, name, index)
                 for name, found in candidates.items() if name not in tried
                 for index, candidate in enumerate(found)
                 for added in [candidate.params - params[name]]
                 if 0 < added <= left and candidate.cost < found[choice[name]].cost]
        if not steps:
            break
        _, name, index = max(steps)
        tried.add(name)
        fitted, count = refit(name, index)
        if sum(params.values()) - params[name] + count <= budget:
            fits[name], params[name], choice[name] = fitted, count, index
    return choice


def _last_params(found, layer_config):
    return next(c.params for c in reversed(found) if c.config is layer_config)


def _measure(spec, layer, kernel, fitted, layer_config, factor):
    """Nonzero parameters and relative (input-weighted) error of one candidate."""
    built = spec.build(layer, fitted, layer_config)
    built.build(_input_shape(layer, kernel))
    approximation = np.asarray(ops.convert_to_numpy(built.kernel), dtype=np.float64)
    matrix = kernel.reshape(-1, kernel.shape[-1])
    error = weighted_relative_error(matrix, approximation.reshape(matrix.shape), factor)
    return int(built.count_nonzero_params()), error


def _input_shape(layer, kernel):
    try:
        return tuple(layer.input.shape)
    except (AttributeError, ValueError, RuntimeError):
        if kernel.ndim == 2:
            return (None, kernel.shape[0])
        return (None, None, None, kernel.shape[2])


def _score_costs(candidates, score, count, progress):
    """Replace each candidate's cost by its score drop (measured or interpolated).

    A candidate that was only estimated is scored at its ``quick_config``, as
    cheaply as it was priced.
    """
    progress.stage("score_fn", len(candidates))
    for name, found in candidates.items():
        order = sorted(range(len(found)), key=lambda i: found[i].params)
        picked = sorted({order[int(round(i))] for i in
                         np.linspace(0, len(order) - 1, min(count, len(order)))},
                        key=lambda i: found[i].params)
        params = [found[i].params for i in picked]
        drops = [max(0.0, float(score(name, found[index].quick_config or found[index].config)))
                 for index in picked]
        for candidate in found:
            candidate.cost = float(np.interp(candidate.params, params, drops))
        progress.update(layers=1, candidates=len(picked))


def _allocation(candidates, budget):
    """Index of one candidate per layer minimizing the summed cost within ``budget``.

    A multiple-choice knapsack, solved exactly by dynamic programming over the
    budget in ``KNAPSACK_STEPS`` units (parameters rounded up, so the choice
    always fits): the least cost among the choices that spend at least
    ``MIN_SPENT`` of the budget if there are any (a lower error that leaves
    more unspent is not what a budget asks for), else among all; then
    completed by ``_fill``.
    """
    names = list(candidates)
    steps = max(KNAPSACK_STEPS, 40 * len(names))
    unit = max(1.0, budget / steps)
    capacity = int(budget // unit)
    best = np.full(capacity + 1, np.inf)
    best[0] = 0.0  # best[b]: the least cost of the layers so far in exactly b units
    picks = []
    for name in names:
        found = candidates[name]
        weights = [math.ceil(c.params / unit) for c in found]
        options = np.full((len(found), capacity + 1), np.inf)
        for index, (weight, candidate) in enumerate(zip(weights, found)):
            if weight <= capacity:
                options[index, weight:] = best[:capacity + 1 - weight] + candidate.cost
        picks.append(np.argmin(options, axis=0))
        best = options.min(axis=0)
    spent = best[int(MIN_SPENT * capacity):]
    left = (int(MIN_SPENT * capacity) + int(np.argmin(spent)) if np.isfinite(spent).any()
            else int(np.argmin(best)))
    choice = {}
    for name, pick in zip(reversed(names), reversed(picks)):
        index = int(pick[left])
        choice[name] = index
        left -= math.ceil(candidates[name][index].params / unit)
    return _fill(candidates, budget, choice)


def _fill(candidates, budget, choice):
    """Spend what ``choice`` leaves of the budget, one upgrade at a time.

    First the upgrades that lower the cost, by cost reduction per added
    parameter; then, so that the budget is spent as far as the sizes allow
    (a method whose error does not fall with size, like re-initialised
    weights), the larger candidates that still fit, by least cost increase
    per added parameter.
    """
    choice = dict(choice)
    used = sum(candidates[name][index].params for name, index in choice.items())
    for improving in (True, False):
        while True:
            best, best_rate = None, -math.inf
            for name, found in candidates.items():
                current = found[choice[name]]
                for index, candidate in enumerate(found):
                    added = candidate.params - current.params
                    gain = current.cost - candidate.cost
                    if used + added > budget or (gain <= 0 if improving else added <= 0):
                        continue
                    rate = gain / added if added > 0 else math.inf
                    if rate > best_rate:
                        best, best_rate = (name, index), rate
            if best is None:
                break
            name, index = best
            used += candidates[name][index].params - candidates[name][choice[name]].params
            choice[name] = index
    return choice


def knob_label(layer_config, config):
    """The fields of a layer's config that differ from the user's config, as ``k=v``."""
    if type(layer_config) is not type(config):
        fields = dataclasses.asdict(layer_config)
    else:
        fields = {f.name: getattr(layer_config, f.name) for f in dataclasses.fields(config)
                  if getattr(layer_config, f.name) != getattr(config, f.name)}
    return ", ".join(f"{key}={_short(value)}" for key, value in fields.items())


def _short(value):
    return f"{value:.4g}" if isinstance(value, float) else str(value)
