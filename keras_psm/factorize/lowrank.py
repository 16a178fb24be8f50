"""Low-rank factorizations of Dense/Conv2D kernels and ALDS rank allocation.

ALDS supplement ("Compressing Neural Networks: Towards Determining the
Optimal Layer-wise Decomposition"), A.1-A.6.

Orientation. The paper writes a layer of f filters, c channels and a
kh x kw window as the matrix W (f x c kh kw); its rank-j SVD W ~ U V gives
V (j x c kh kw), a kh x kw convolution with j filters applied first, and
U (f x j), a 1 x 1 convolution applied second (A.1, Figure 9; A.3 folds the
singular values into V). Functions here take Keras kernels,
(kh, kw, cin, cout) for Conv2D or (in, out) for Dense (a 1 x 1 window), and
return the factors in Keras layouts:

    encoder (kh_e, kw_e, cin // groups, groups * rank)   V, applied first
    decoder (kh_d, kw_d, groups * rank, cout)            U, applied second

(Dense: encoder (in // groups, groups * rank), decoder (groups * rank, out)).

Schemes (A.6, ALDS+) choose how the window is shared between the two:

    scheme  matrix W          encoder   decoder
    0       f x c kh kw       kh x kw   1 x 1     (ALDS)
    1       f kh x c kw       1 x kw    kh x 1
    2       f kw x c kh       kh x 1    1 x kw
    3       f kh kw x c       1 x 1     kh x kw

Channel slicing (A.2): the input channels are cut into ``groups`` = k
consecutive chunks of c / k channels and each chunk's matrix gets its own
rank-j SVD, so the encoder is a grouped convolution (k groups of j filters)
and the decoder reads k j channels. A factored layer stores
j (kh_e kw_e c + k kh_d kw_d f) values.

ALDS (Algorithm 1, A.4-A.5) spreads a global parameter budget over the
layers: it alternates OPTIMALRANKS (for fixed k's, the ranks j that make
every layer's relative error equal, i.e. minimize the largest one) and
OPTIMALSUBSPACES (for each layer's budget, the k with the lowest error),
from several seeds, and keeps the best. Errors come from a table per layer
and k built from one SVD per chunk (A.4).
"""

import dataclasses
import math
from collections.abc import Mapping

import numpy as np

from keras_psm.validation import (
    check_bool, check_choice, check_finite_array, check_float, check_int,
)

__all__ = [
    "NORMS",
    "SCHEMES",
    "ALDSAllocation",
    "LayerAllocation",
    "LowRankFactors",
    "alds_allocation",
    "channel_chunks",
    "factor_kernel",
    "factored_size",
    "kernel_to_matrix",
    "low_rank_kernel",
    "matrix_to_kernel",
    "max_rank",
    "rank_for_ratio",
    "relative_error_table",
    "split_kernel_size",
    "truncated_svd",
    "valid_groups",
]

#: Flattening schemes of ALDS+ (A.6); 0 is the scheme of ALDS.
SCHEMES = (0, 1, 2, 3)

#: Relative error measures: ``||W - W_hat|| / ||W||`` in the Frobenius norm (what
#: ``compress`` reports), or the authors' operator-norm measure (see
#: ``relative_error_table``).
NORMS = ("frobenius", "operator")


def split_kernel_size(kernel_size, scheme=0):
    """((kh_e, kw_e), (kh_d, kw_d)): the encoder and decoder windows of a scheme."""
    kh, kw = kernel_size
    check_choice(scheme, "scheme", SCHEMES, where="split_kernel_size")
    return {
        0: ((kh, kw), (1, 1)),
        1: ((1, kw), (kh, 1)),
        2: ((kh, 1), (1, kw)),
        3: ((1, 1), (kh, kw)),
    }[scheme]


def _conv_shape(shape):
    """A kernel shape as (kh, kw, cin, cout); a Dense (in, out) is a 1 x 1 window."""
    shape = tuple(int(d) for d in shape)
    if len(shape) == 2:
        return (1, 1) + shape
    if len(shape) != 4:
        raise ValueError(
            f"a kernel must be (in, out) or (kh, kw, cin, cout), got shape {shape}."
        )
    return shape


def kernel_to_matrix(kernel, scheme=0):
    """The paper's matrix W of a kernel under ``scheme``.

    Rows are (kh_d, kw_d, cout), columns (kh_e, kw_e, cin), row-major: scheme 0
    of a Conv2D kernel is the (f, c kh kw) matrix of A.1 with its columns in
    Keras's (kh, kw, c) order (the same singular values), and a Dense kernel
    (in, out) gives its transpose.
    """
    kernel = np.asarray(kernel)
    kh, kw, cin, cout = _conv_shape(kernel.shape)
    (kh_e, kw_e), (kh_d, kw_d) = split_kernel_size((kh, kw), scheme)
    # Window row a = a_e * kh_d + a_d: one of kh_e, kh_d is 1 in every scheme.
    six = kernel.reshape(kh_e, kh_d, kw_e, kw_d, cin, cout)
    return six.transpose(1, 3, 5, 0, 2, 4).reshape(kh_d * kw_d * cout, kh_e * kw_e * cin)


def matrix_to_kernel(matrix, kernel_shape, scheme=0):
    """Inverse of ``kernel_to_matrix``: the kernel of shape ``kernel_shape``."""
    kh, kw, cin, cout = _conv_shape(kernel_shape)
    (kh_e, kw_e), (kh_d, kw_d) = split_kernel_size((kh, kw), scheme)
    six = np.asarray(matrix).reshape(kh_d, kw_d, cout, kh_e, kw_e, cin)
    return six.transpose(3, 0, 4, 1, 5, 2).reshape(kernel_shape)


def truncated_svd(matrix, rank):
    """Rank-j SVD ``matrix ~ U @ V`` (A.3): U (rows, j), V (j, cols).

    With ``matrix = U~ S~ V~`` the first j columns of U~ form U and the first
    j rows of S~ V~ form V: the singular values are folded into V.
    """
    matrix = check_finite_array(matrix, "matrix", where="truncated_svd")
    if matrix.ndim != 2:
        raise ValueError(f"truncated_svd: `matrix` must be 2-D, got shape {matrix.shape}.")
    rank = check_int(rank, "rank", minimum=1, maximum=min(matrix.shape), where="truncated_svd")
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank], s[:rank, None] * vt[:rank]


def valid_groups(n_channels):
    """The numbers of chunks k that split ``n_channels`` evenly (its divisors)."""
    n_channels = check_int(n_channels, "n_channels", minimum=1, where="valid_groups")
    return [k for k in range(1, n_channels + 1) if n_channels % k == 0]


def _check_groups(groups, cin, where):
    groups = check_int(groups, "groups", minimum=1, where=where)
    if cin % groups:
        raise ValueError(
            f"{where}: `groups` must divide the {cin} input channels into equal "
            f"chunks (one of {valid_groups(cin)}), got {groups}."
        )
    return groups


def channel_chunks(kernel, groups):
    """Channel slicing (A.2): (groups, kh, kw, cin / groups, cout), consecutive chunks.

    A Dense kernel (in, out) is sliced along ``in`` as a 1 x 1 window.
    """
    kernel = np.asarray(kernel)
    kh, kw, cin, cout = _conv_shape(kernel.shape)
    groups = _check_groups(groups, cin, "channel_chunks")
    return kernel.reshape(kh, kw, groups, cin // groups, cout).transpose(2, 0, 1, 3, 4)


def max_rank(kernel_shape, groups=1, scheme=0):
    """Full rank of one chunk's matrix: min(kh_d kw_d cout, kh_e kw_e cin / groups)."""
    kh, kw, cin, cout = _conv_shape(kernel_shape)
    (kh_e, kw_e), (kh_d, kw_d) = split_kernel_size((kh, kw), scheme)
    return min(kh_d * kw_d * cout, kh_e * kw_e * (cin // groups))


def factored_size(kernel_shape, rank, groups=1, scheme=0):
    """Values stored by the factors: j (kh_e kw_e cin + groups kh_d kw_d cout).

    Figure 9 of the supplement: 20 filters, 6 channels, a 2 x 2 window and
    rank 7 (scheme 0, one chunk) give 7 (24 + 20) = 308.
    """
    kh, kw, cin, cout = _conv_shape(kernel_shape)
    (kh_e, kw_e), (kh_d, kw_d) = split_kernel_size((kh, kw), scheme)
    return int(rank) * (kh_e * kw_e * cin + int(groups) * kh_d * kw_d * cout)


def rank_for_ratio(ratio, full_rank):
    """The rank keeping a fraction ``ratio`` of ``full_rank``: ceil(ratio r), at least 1."""
    ratio = check_float(ratio, "ratio", minimum=0.0, maximum=1.0, exclusive_minimum=True,
                        where="rank_for_ratio")
    return max(1, min(int(full_rank), math.ceil(ratio * int(full_rank) - 1e-9)))


@dataclasses.dataclass
class LowRankFactors:
    """Result of ``factor_kernel``: ``kernel ~ low_rank_kernel(encoder, decoder, groups)``."""

    encoder: np.ndarray
    decoder: np.ndarray
    rank: int
    groups: int
    scheme: int

    @property
    def kernel(self):
        """The approximated kernel, in the shape of the original."""
        return low_rank_kernel(self.encoder, self.decoder, self.groups)

    @property
    def n_params(self):
        return int(self.encoder.size + self.decoder.size)


def factor_kernel(kernel, rank, groups=1, scheme=0):
    """Truncated SVD of each channel chunk of ``kernel`` under ``scheme``.

    Returns ``LowRankFactors`` with the encoder and decoder in the Keras
    layouts of the module docstring; at full rank (``max_rank``) the
    reconstruction is exact.
    """
    where = "factor_kernel"
    kernel = check_finite_array(kernel, "kernel", where=where)
    shape = _conv_shape(kernel.shape)
    kh, kw, cin, cout = shape
    scheme = check_choice(scheme, "scheme", SCHEMES, where=where)
    groups = _check_groups(groups, cin, where)
    rank = check_int(rank, "rank", minimum=1, maximum=max_rank(shape, groups, scheme),
                     where=where)
    (kh_e, kw_e), (kh_d, kw_d) = split_kernel_size((kh, kw), scheme)
    encoders, decoders = [], []
    for chunk in channel_chunks(kernel, groups):
        u, v = truncated_svd(kernel_to_matrix(chunk, scheme), rank)
        encoders.append(v.reshape(rank, kh_e, kw_e, cin // groups).transpose(1, 2, 3, 0))
        decoders.append(u.reshape(kh_d, kw_d, cout, rank).transpose(0, 1, 3, 2))
    encoder = np.concatenate(encoders, axis=-1)
    decoder = np.concatenate(decoders, axis=2)
    if kernel.ndim == 2:
        encoder, decoder = encoder[0, 0], decoder[0, 0]
    return LowRankFactors(encoder, decoder, rank, groups, scheme)


def low_rank_kernel(encoder, decoder, groups=1):
    """The kernel a pair of factors represents (NumPy).

        W[a_e + a_d, b_e + b_d, g c_g + c, o]
            = sum_r E[a_e, b_e, c, g j + r] D[a_d, b_d, g j + r, o]

    (one of each pair of window offsets is always 0).
    """
    encoder, decoder = np.asarray(encoder), np.asarray(decoder)
    dense = encoder.ndim == 2
    if dense:
        encoder, decoder = encoder[None, None], decoder[None, None]
    kh_e, kw_e, c_g, width = encoder.shape
    kh_d, kw_d, _, cout = decoder.shape
    rank = width // groups
    e = encoder.reshape(kh_e, kw_e, c_g, groups, rank)
    d = decoder.reshape(kh_d, kw_d, groups, rank, cout)
    kernel = np.einsum("xycgr,uvgro->xuyvgco", e, d).reshape(
        kh_e * kh_d, kw_e * kw_d, groups * c_g, cout)
    return kernel[0, 0] if dense else kernel


def relative_error_table(kernel, groups=1, scheme=0, norm="frobenius"):
    """Relative error of the rank-j factorization for every j = 0 .. ``max_rank`` (A.4).

    One SVD per chunk gives the whole table: with s_{g,t} the singular values
    of chunk g,

    - ``"frobenius"``: sqrt(sum_g sum_{t > j} s_{g,t}^2) / ||W||_F, exactly
      ``||W - W_hat||_F / ||W||_F`` (chunks are disjoint column blocks);
    - ``"operator"``: max_g s_{g,j+1} / ||W||_2 (W under ``scheme``), the
      measure of the authors' implementation (the largest chunk residual in
      operator norm).

    ``table[j]`` is the error at rank j; ``table[0]`` is that of W_hat = 0.
    """
    where = "relative_error_table"
    kernel = check_finite_array(kernel, "kernel", where=where)
    norm = check_choice(norm, "norm", NORMS, where=where)
    return _error_table(_chunk_singular_values(kernel, groups, scheme),
                        _kernel_norm(kernel, scheme, norm), norm)


def _chunk_singular_values(kernel, groups, scheme):
    """(groups, max_rank + 1): each chunk's singular values, then a 0."""
    chunks = channel_chunks(kernel, groups)
    singular = np.linalg.svd(np.stack([kernel_to_matrix(c, scheme) for c in chunks]),
                             compute_uv=False)
    return np.concatenate([singular, np.zeros((len(chunks), 1))], axis=1)


def _kernel_norm(kernel, scheme, norm):
    """||W||_F, or ||W||_2 of the kernel's matrix under ``scheme``."""
    if norm == "frobenius":
        return float(np.linalg.norm(kernel))
    return float(np.linalg.norm(kernel_to_matrix(kernel, scheme), 2))


def _error_table(singular, total, norm):
    """``relative_error_table`` from chunk singular values and the kernel's norm."""
    if norm == "frobenius":
        residual = np.sqrt(np.cumsum(singular[:, ::-1] ** 2, axis=1)[:, ::-1].sum(axis=0))
    else:
        residual = singular.max(axis=0)
    return residual / total if total > 0 else np.zeros_like(residual)


# ---------------------------------------------------------------------------
# ALDS allocation (Algorithm 1, A.4-A.6)


@dataclasses.dataclass(frozen=True)
class LayerAllocation:
    """One layer's share: rank j of each of ``groups`` chunks under ``scheme``."""

    rank: int
    groups: int
    scheme: int
    error: float
    n_params: int


@dataclasses.dataclass
class ALDSAllocation:
    """Result of ``alds_allocation``: per-layer choices within ``budget`` values."""

    layers: dict
    budget: int

    @property
    def n_params(self):
        return sum(layer.n_params for layer in self.layers.values())

    @property
    def max_error(self):
        return max(layer.error for layer in self.layers.values())


@dataclasses.dataclass
class _Option:
    """One (groups, scheme) of a layer: cost of one unit of rank, errors[j], j <= cap."""

    cost: int
    errors: np.ndarray

    @property
    def cap(self):
        return len(self.errors) - 1


def _layer_options(kernel, schemes, norm):
    """{(groups, scheme): _Option} for every k dividing cin and every distinct scheme.

    Ranks are capped so that no factored layer stores more values than the
    original kernel; options that cannot reach rank 1 under that cap are left
    out. Schemes that split the window identically (a 1 x 1 or 1 x kw window)
    are kept once, under the lowest scheme number.
    """
    shape = _conv_shape(kernel.shape)
    original = int(np.prod(shape))
    options, splits = {}, set()
    for scheme in schemes:
        split = split_kernel_size(shape[:2], scheme)
        if split in splits:
            continue
        splits.add(split)
        total = _kernel_norm(kernel, scheme, norm)
        for groups in valid_groups(shape[2]):
            cost = factored_size(shape, 1, groups, scheme)
            cap = min(max_rank(shape, groups, scheme), original // cost)
            if cap >= 1:
                singular = _chunk_singular_values(kernel, groups, scheme)
                errors = _error_table(singular, total, norm)[: cap + 1]
                options[(groups, scheme)] = _Option(cost, errors)
    return options


def _optimal_ranks(options, budget):
    """OPTIMALRANKS: ranks minimizing the largest error for fixed options, or None.

    For a common error bound e each layer takes the smallest rank with
    error <= e; the total size falls as e grows (A.5, remarks 1-2). The
    bound is searched by bisection over the finite set of errors the tables
    can take, which solves the discrete problem exactly: no allocation with
    at most ``budget`` values has a smaller largest error. (The authors'
    implementation runs a bracketing root finder, scipy's ``brentq``, on the
    continuous bound; on this step function the finite search is exact.)
    """
    decreasing = [-option.errors[1:] for option in options]  # ranks 1 .. cap, ascending

    def ranks_for(bound):
        return np.array([np.searchsorted(d, -bound, side="left") + 1 for d in decreasing])

    def size(ranks):
        return sum(int(r) * option.cost for r, option in zip(ranks, options))

    floor = max(option.errors[option.cap] for option in options)
    candidates = np.unique(np.concatenate([option.errors[1:] for option in options]))
    candidates = candidates[candidates >= floor]
    if size(ranks_for(candidates[-1])) > budget:
        return None
    low, high = 0, len(candidates) - 1  # size(candidates[high]) <= budget
    while low < high:
        middle = (low + high) // 2
        if size(ranks_for(candidates[middle])) <= budget:
            high = middle
        else:
            low = middle + 1
    ranks = ranks_for(candidates[high])
    return ranks, max(float(option.errors[r]) for r, option in zip(ranks, options))


def _optimal_subspaces(tables, choice, ranks):
    """OPTIMALSUBSPACES: per layer, the option with the lowest error for its budget.

    The budget is what the layer stores now; each option gets the largest
    rank that fits it, so the current option stays a candidate and no layer
    gets worse or larger.
    """
    new_choice = []
    for table, key, rank in zip(tables, choice, ranks):
        budget = int(rank) * table[key].cost
        best_key, best_error = key, table[key].errors[rank]
        for other, option in table.items():
            other_rank = min(budget // option.cost, option.cap)
            if other_rank >= 1 and option.errors[other_rank] < best_error:
                best_key, best_error = other, option.errors[other_rank]
        new_choice.append(best_key)
    return new_choice


def _search(tables, seeds, budget, n_iter):
    """Alternate the two steps from every seed; the best (error, size, choice, ranks)."""
    best = None
    for choice in seeds:
        solved = _optimal_ranks([t[k] for t, k in zip(tables, choice)], budget)
        if solved is None:
            continue
        ranks, error = solved
        for _ in range(n_iter):
            new_choice = _optimal_subspaces(tables, choice, ranks)
            if new_choice == choice:
                break
            choice = new_choice
            ranks, error = _optimal_ranks([t[k] for t, k in zip(tables, choice)], budget)
        size = sum(int(r) * t[k].cost for t, k, r in zip(tables, choice, ranks))
        if best is None or (error, size) < best[:2]:
            best = (error, size, list(choice), ranks)
    return best


def alds_allocation(kernels, target, *, plus=False, n_seeds=15, n_iter=4, norm="frobenius",
                    random_state=0):
    """ALDS (Algorithm 1): ranks j, chunks k (and schemes, ALDS+) for every layer.

    Args:
        kernels: {name: kernel} in Keras shape, (in, out) or (kh, kw, cin, cout).
        target: fraction of the kernels' values to remove, in (0, 1): the
            factored layers store at most ``(1 - target) * sum(kernel sizes)``.
        plus: ALDS+ (A.6): also search the flattening schemes 0-3 of each
            Conv2D. The ALDS solution is one of its seeds, so ALDS+ is never
            worse than ALDS.
        n_seeds: starting points. The first gives every layer its cheapest
            option (one chunk: plain SVD), the others a random k (and scheme)
            per layer.
        n_iter: alternations of OPTIMALSUBSPACES and OPTIMALRANKS per seed.
        norm: the relative error to equalize, ``"frobenius"`` or
            ``"operator"`` (see ``relative_error_table``).
        random_state: seed of the random starting points.

    Returns:
        ``ALDSAllocation``: per-layer ``LayerAllocation(rank, groups, scheme,
        error, n_params)``, the largest error being as small as the search
        found. Ranks never make a layer larger than its kernel.
    """
    where = "alds_allocation"
    if not isinstance(kernels, Mapping) or not kernels:
        raise ValueError(f"{where}: `kernels` must be a non-empty dict {{name: kernel}}.")
    target = check_float(target, "target", minimum=0.0, maximum=1.0, exclusive_minimum=True,
                         where=where)
    if target >= 1.0:
        raise ValueError(f"{where}: `target` must be < 1 (the fraction removed), got {target}.")
    n_seeds = check_int(n_seeds, "n_seeds", minimum=1, where=where)
    n_iter = check_int(n_iter, "n_iter", minimum=0, where=where)
    norm = check_choice(norm, "norm", NORMS, where=where)
    check_bool(plus, "plus", where=where)
    names = list(kernels)
    arrays = [check_finite_array(kernels[name], "kernel", where=f"{where}: layer {name!r}")
              for name in names]
    for name, array in zip(names, arrays):
        if array.ndim not in (2, 4):
            raise ValueError(
                f"{where}: layer {name!r}: a kernel must be (in, out) or "
                f"(kh, kw, cin, cout), got shape {array.shape}."
            )
    # floor, forgiving the rounding of 1 - target (1 - 0.8 = 0.19999999999999996)
    budget = math.floor((1.0 - target) * sum(array.size for array in arrays) + 1e-9)
    all_tables = [_layer_options(array, SCHEMES if plus else (0,), norm) for array in arrays]
    alds_tables = [{key: option for key, option in table.items() if key[1] == 0}
                   for table in all_tables]
    empty = [name for name, table in zip(names, alds_tables) if not table]
    if empty:
        raise ValueError(
            f"{where}: layers {empty} cannot be factored into fewer values than their "
            "kernels hold, even at rank 1; leave them out of the compressed layers."
        )
    rng = np.random.default_rng(random_state)

    def seeds(tables, first):
        keys = [sorted(table) for table in tables]
        yield from first
        yield [min(table, key=lambda key: table[key].cost) for table in tables]
        for _ in range(n_seeds - 1):
            yield [k[rng.integers(len(k))] for k in keys]

    best = _search(alds_tables, seeds(alds_tables, []), budget, n_iter)
    if plus:
        warm_start = [best[2]] if best is not None else []
        best = _search(all_tables, seeds(all_tables, warm_start), budget, n_iter)
    if best is None:
        smallest = sum(min(o.cost for o in table.values()) for table in all_tables)
        total = sum(array.size for array in arrays)
        raise ValueError(
            f"{where}: `target` {target} removes too much: rank 1 in every layer "
            f"already stores {smallest} of the {total} values, so `target` can be at "
            f"most {1 - smallest / total:.4f}."
        )
    _, _, choice, ranks = best
    layers = {}
    for name, table, key, rank in zip(names, all_tables, choice, ranks):
        option = table[key]
        layers[name] = LayerAllocation(
            rank=int(rank), groups=key[0], scheme=key[1],
            error=float(option.errors[rank]), n_params=int(rank) * option.cost,
        )
    return ALDSAllocation(layers=layers, budget=budget)
