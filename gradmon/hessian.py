"""Hessian spectrum of a compiled Keras model's training loss.

Pure numerical code: it knows nothing of callbacks or TensorBoard. Every
function builds (or reuses) a compiled Hessian-vector product (HVP) of the
mean training loss and runs a matrix-free algorithm on it:

- `spectrum`: extreme eigenvalues (Lanczos with full reorthogonalisation, or
  power iteration with deflation), with honest residuals.
- `trace`: Hutchinson's estimator with Rademacher probes.
- `density`: stochastic Lanczos quadrature (SLQ) spectral density.
- `make_hvp`: the HVP operator itself.

The operator is the Hessian, with respect to `model.trainable_variables`, of

    L(w) = sum_b n_b * loss_b(w) / sum_b n_b,

where `loss_b` is what `model.compute_loss` returns for batch `b` (the
compiled loss, already reduced over the batch as Keras reduces it, with sample
weights, plus `model.losses`: weight regularisers and `add_loss` terms) after
a `training=False` forward pass, and `n_b` is the batch size (leading
dimension of the first input). For a single batch this is `loss_1`; for
equal-size batches it is the plain mean of the batch losses. Regularisation
terms do not depend on the batch, so they enter `L` exactly once.

Observing the Hessian changes nothing on the model: the loss runs inside a
`keras.StatelessScope` whose variable mapping supplies the trainable values,
so any assignment made while computing it (the per-output loss trackers of a
multi-output `CompileLoss`, for instance) is collected by the scope and thrown
away; `training=False` keeps BatchNormalization statistics and Dropout seed
generators untouched; the optimizer is never called; all randomness comes
from a NumPy generator seeded by `seed`.

All algorithm state (Lanczos vectors, tridiagonal matrices, probes) is float64
NumPy; only the HVPs themselves run in TensorFlow, in the variables' dtype.
A vector over the parameters is a flat float64 array of length `num_params`,
concatenating `model.trainable_variables` in order, each in C order;
`HessianVectorProduct.unflatten` turns one back into per-variable arrays.
"""

import math
import typing
import warnings
import weakref

import keras
import numpy as np
import scipy.linalg
import tensorflow as tf

HVP_MODES = ("reverse_over_reverse", "forward_over_reverse")
# benchmarks/hessian.py, 2-core CPU, HVP time / gradient time: 1.6x vs 1.8x
# (digits 64-128-10, batch 512) and 1.5x vs 2.3x (784-512-10, batch 512) for
# reverse-over-reverse vs forward-over-reverse.
DEFAULT_HVP_MODE = "reverse_over_reverse"
SPECTRUM_METHODS = ("lanczos", "power")


class Spectrum(typing.NamedTuple):
    """Extreme eigenpairs of the Hessian.

    Attributes:
        eigenvalues: float64 array `[k]`, the `top_k` largest algebraic
            eigenvalues, descending. `eigenvalues[0]` is the sharpness.
        eigenvectors: float64 array `[k, num_params]`, unit-norm eigenvectors
            (rows), flattened as described in the module docstring. Pass it
            (or the whole `Spectrum`) back as `init_vectors` for a warm start.
        residuals: float64 array `[k]`, the absolute residual norms
            `||H v - lambda v||_2` of the returned unit vectors, from
            explicit HVPs (Lanczos: one HVP of each returned vector, not the
            recurrence estimate; power: the HVPs of the iterates, combined
            linearly by the final Rayleigh-Ritz step). Divide by
            `abs(eigenvalues[0])` for a relative residual.
        hvp_count: number of HVPs used, verification HVPs included.
        converged: whether every returned pair met the tolerance.
        min_eigenvalue: smallest algebraic eigenvalue when `smallest=True`,
            else `None`.
        min_eigenvector: its unit eigenvector `[num_params]`, or `None`.
        min_residual: its absolute residual norm, or `None`.
    """

    eigenvalues: np.ndarray
    eigenvectors: np.ndarray
    residuals: np.ndarray
    hvp_count: int
    converged: bool
    min_eigenvalue: typing.Optional[float] = None
    min_eigenvector: typing.Optional[np.ndarray] = None
    min_residual: typing.Optional[float] = None


class TraceEstimate(typing.NamedTuple):
    """Hutchinson estimate of the Hessian trace.

    Attributes:
        value: the sample mean of `z^T H z` over the probes.
        stderr: standard error of `value` (sample standard deviation over
            sqrt(num_samples)); `nan` for a single probe.
        hvp_count: number of HVPs used (one per probe).
    """

    value: float
    stderr: float
    hvp_count: int


class Density(typing.NamedTuple):
    """Gaussian-smoothed spectral density from stochastic Lanczos quadrature.

    Attributes:
        grid: float64 array of evaluation points, increasing.
        values: float64 array, the density at `grid`; its trapezoidal
            integral over `grid` is 1 up to the Gaussian tails cut off at the
            grid ends (negligible for the default grid).
        nodes: float64 array, Ritz values of all probes concatenated.
        weights: float64 array, matching quadrature weights; they sum to 1.
        sigma: the Gaussian kernel's standard deviation.
        hvp_count: number of HVPs used.
    """

    grid: np.ndarray
    values: np.ndarray
    nodes: np.ndarray
    weights: np.ndarray
    sigma: float
    hvp_count: int


# --------------------------------------------------------------------------
# Data.


def _batch_size(x):
    leaves = tf.nest.flatten(x)
    if not leaves or leaves[0].shape.rank == 0:
        raise ValueError(
            "Invalid value for argument `data`. Expected batches whose inputs "
            "have a leading batch dimension. Received: an input of shape "
            f"{leaves[0].shape if leaves else None}"
        )
    return int(leaves[0].shape[0])


def _to_batches(data):
    """Returns `[(x, y, sample_weight)]` of tensors and `[weight]`."""
    if isinstance(data, tf.data.Dataset):
        if data.cardinality() == tf.data.INFINITE_CARDINALITY:
            raise ValueError(
                "Invalid value for argument `data`. Expected a finite "
                "dataset (the Hessian is of the mean loss over all of it). "
                f"Received: data={data} with infinite cardinality"
            )
        # Materialised once so that every HVP sees the same batches, even
        # for a dataset that reshuffles on each iteration.
        raw = list(data)
    elif isinstance(data, list):
        raw = data
    elif isinstance(data, tuple):
        raw = [data]
    else:
        raise ValueError(
            "Invalid value for argument `data`. Expected a batch `(x, y)` or "
            "`(x, y, sample_weight)`, a list of such batches, or a "
            f"`tf.data.Dataset`. Received: data of type {type(data)}"
        )
    if not raw:
        raise ValueError(
            "Invalid value for argument `data`. Expected at least one batch. "
            f"Received: data={data!r}"
        )
    batches, sizes = [], []
    for batch in raw:
        if not isinstance(batch, (tuple, list)) or not 1 <= len(batch) <= 3:
            raise ValueError(
                "Invalid value for argument `data`. Expected each batch to be "
                "a tuple `(x, y)` or `(x, y, sample_weight)`. Received: a "
                f"batch of type {type(batch)}"
            )
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(tuple(batch))
        x, y, sample_weight = tf.nest.map_structure(
            lambda t: None if t is None else tf.convert_to_tensor(t),
            (x, y, sample_weight),
        )
        size = _batch_size(x)
        if size == 0:
            continue
        batches.append((x, y, sample_weight))
        sizes.append(size)
    if not batches:
        raise ValueError(
            "Invalid value for argument `data`. Expected at least one "
            "non-empty batch. Received: only empty batches"
        )
    total = float(sum(sizes))
    return batches, [s / total for s in sizes]


# --------------------------------------------------------------------------
# Loss and compiled derivatives.


def _check_model(model):
    if not getattr(model, "compiled", False):
        raise ValueError(
            "Invalid value for argument `model`. Expected a model compiled "
            "with a loss (`model.compile(loss=...)`). Received: an "
            f"uncompiled model {getattr(model, 'name', model)!r}"
        )


def _batch_loss(model, variables, params, x, y, sample_weight, initialize):
    # The stateless scope makes `params` the trainable values and swallows
    # every variable assignment made while computing the loss.
    with keras.StatelessScope(
        state_mapping=list(zip(variables, params)),
        collect_losses=True,
        initialize_variables=initialize,
    ):
        y_pred = model(x, training=False)
        compute = getattr(model, "_compute_loss", None) or model.compute_loss
        loss = compute(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
            training=False,
        )
    if loss is None:
        raise ValueError(
            "Invalid value for argument `model`. Expected `compute_loss` to "
            "return a scalar loss. Received: None"
        )
    return tf.cast(loss, params[0].dtype)


def _dense(g, like):
    if g is None:
        return tf.zeros_like(like)
    return tf.convert_to_tensor(g)


def _dot(a, b):
    return tf.add_n(
        [tf.reduce_sum(tf.cast(x, b_.dtype) * b_) for x, b_ in zip(a, b)]
    )


def _build_functions(model, variables, hvp_mode):
    model_ref = weakref.ref(model)  # the cache must not keep models alive

    def read_params():
        return [tf.convert_to_tensor(v.value) for v in variables]

    def loss_and_gradient(params, x, y, sample_weight):
        # Recorded by any enclosing tape or accumulator: the HVPs differentiate it again.
        with tf.GradientTape() as tape:
            tape.watch(params)
            loss = _batch_loss(
                model_ref(), variables, params, x, y, sample_weight, False
            )
        grads = tape.gradient(loss, params)
        return loss, [_dense(g, p) for g, p in zip(grads, params)]

    def gradient(x, y, sample_weight):
        return loss_and_gradient(read_params(), x, y, sample_weight)

    def hvp_reverse(x, y, sample_weight, vector):
        params = read_params()
        with tf.GradientTape() as outer:
            outer.watch(params)
            _, grads = loss_and_gradient(params, x, y, sample_weight)
            grad_dot_v = _dot(grads, vector)
        hv = outer.gradient(grad_dot_v, params)
        return [_dense(h, p) for h, p in zip(hv, params)]

    def hvp_forward(x, y, sample_weight, vector):
        params = read_params()
        with tf.autodiff.ForwardAccumulator(params, vector) as acc:
            _, grads = loss_and_gradient(params, x, y, sample_weight)
        hv = acc.jvp(grads, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return list(hv)

    hvp = hvp_reverse if hvp_mode == "reverse_over_reverse" else hvp_forward
    return (
        tf.function(hvp, reduce_retracing=True),
        tf.function(gradient, reduce_retracing=True),
    )


# model -> {(hvp_mode, variable ids): (hvp_fn, grad_fn)}; reusing the traced
# functions makes a periodic refresh (e.g. from a callback) cost no retrace.
_FUNCTION_CACHE = weakref.WeakKeyDictionary()


def _functions(model, variables, hvp_mode):
    key = (hvp_mode, tuple(id(v) for v in variables))
    try:
        per_model = _FUNCTION_CACHE.setdefault(model, {})
    except TypeError:  # not weak-referenceable: no caching
        return _build_functions(model, variables, hvp_mode)
    if key not in per_model:
        per_model[key] = _build_functions(model, variables, hvp_mode)
    return per_model[key]


class HessianVectorProduct:
    """Hessian-vector product of a model's mean training loss.

    Built by `make_hvp`. Calling it with a vector returns `H v`; each call
    counts as one HVP in `count`, however many batches the data holds.

    Attributes:
        variables: the model's trainable variables, in flattening order.
        shapes: their shapes.
        num_params: total number of trainable parameters.
        hvp_mode: `"reverse_over_reverse"` or `"forward_over_reverse"`.
        count: number of HVPs computed so far.
    """

    def __init__(self, model, data, hvp_mode=None):
        _check_model(model)
        hvp_mode = DEFAULT_HVP_MODE if hvp_mode is None else hvp_mode
        if hvp_mode not in HVP_MODES:
            raise ValueError(
                f"Invalid value for argument `hvp_mode`. Expected one of "
                f"{HVP_MODES}. Received: hvp_mode={hvp_mode!r}"
            )
        self._batches, self._weights = _to_batches(data)
        x0, y0, sw0 = self._batches[0]
        if not model.built:
            model(x0, training=False)  # creates the weights, nothing else
        self.variables = list(model.trainable_variables)
        if not self.variables:
            raise ValueError(
                "Invalid value for argument `model`. Expected a model with "
                "trainable variables. Received: a model with none"
            )
        compile_loss = getattr(model, "_compile_loss", None)
        if compile_loss is not None and not compile_loss.built:
            # Builds CompileLoss' trackers as `fit`/`evaluate` would; their
            # (zero) state is created here, outside any tf.function.
            _batch_loss(
                model, self.variables,
                [tf.convert_to_tensor(v.value) for v in self.variables],
                x0, y0, sw0, True,
            )
        self.shapes = [tuple(v.shape) for v in self.variables]
        self._sizes = [int(np.prod(s)) for s in self.shapes]
        self._dtypes = [v.dtype for v in self.variables]
        self.num_params = int(sum(self._sizes))
        self.hvp_mode = hvp_mode
        self.count = 0
        self._hvp_fn, self._grad_fn = _functions(
            model, self.variables, hvp_mode
        )

    def flatten(self, arrays):
        """Concatenates per-variable arrays into a flat float64 vector."""
        if len(arrays) != len(self.shapes):
            raise ValueError(
                f"Expected {len(self.shapes)} arrays, one per trainable "
                f"variable. Received: {len(arrays)}"
            )
        return np.concatenate(
            [np.asarray(a, np.float64).reshape(-1) for a in arrays]
        )

    def unflatten(self, vector):
        """Splits a flat vector into float64 arrays shaped like the variables."""
        vector = np.asarray(vector, np.float64)
        splits = np.split(vector, np.cumsum(self._sizes)[:-1])
        return [s.reshape(shape) for s, shape in zip(splits, self.shapes)]

    def _to_tensors(self, flat):
        return [
            tf.constant(a, dtype=d)
            for a, d in zip(self.unflatten(flat), self._dtypes)
        ]

    def __call__(self, vector):
        """Returns `H v`.

        Args:
            vector: a flat vector of length `num_params`, or a list of arrays
                or tensors shaped like the trainable variables.

        Returns:
            `H v` as a flat float64 array, or as a list of float64 arrays if
            `vector` was a list.
        """
        as_list = isinstance(vector, (list, tuple))
        if as_list:
            flat = self.flatten([np.asarray(v) for v in vector])
        else:
            flat = np.asarray(vector, np.float64).reshape(-1)
            if flat.size != self.num_params:
                raise ValueError(
                    "Invalid value for argument `vector`. Expected "
                    f"{self.num_params} entries. Received: {flat.size}"
                )
        tensors = self._to_tensors(flat)
        result = np.zeros(self.num_params)
        for (x, y, sw), weight in zip(self._batches, self._weights):
            hv = self._hvp_fn(x, y, sw, tensors)
            result += weight * np.concatenate(
                [h.numpy().astype(np.float64).reshape(-1) for h in hv]
            )
        self.count += 1
        return self.unflatten(result) if as_list else result

    def gradient(self):
        """Returns `(loss, flat float64 gradient)` of the mean loss."""
        loss, grad = 0.0, np.zeros(self.num_params)
        for (x, y, sw), weight in zip(self._batches, self._weights):
            value, g = self._grad_fn(x, y, sw)
            loss += weight * float(value)
            grad += weight * np.concatenate(
                [t.numpy().astype(np.float64).reshape(-1) for t in g]
            )
        return loss, grad


def make_hvp(model, data, hvp_mode=None):
    """Builds the compiled Hessian-vector product of a model's mean loss.

    Args:
        model: a built, compiled Keras model. Its loss is the compiled loss
            plus `model.losses`, from a `training=False` forward pass.
        data: a batch `(x, y)` or `(x, y, sample_weight)`, a list of such
            batches, or a finite `tf.data.Dataset` of them (materialised in
            memory once). `x`/`y` may be nested (dicts, lists).
        hvp_mode: `"reverse_over_reverse"` (nested `tf.GradientTape`) or
            `"forward_over_reverse"` (`tf.autodiff.ForwardAccumulator` over
            a tape). Defaults to `None`, meaning `DEFAULT_HVP_MODE`.

    Returns:
        A `HessianVectorProduct`: `hvp(v)` returns `H v` (flat in, flat out;
        list in, list out) and `hvp.count` counts calls. The traced
        `tf.function` is cached per model and mode, so building another one
        for new data of the same shapes does not retrace.

    Example:

    ```python
    hvp = make_hvp(model, (x, y))
    hv = hvp(np.ones(hvp.num_params))
    ```
    """
    return HessianVectorProduct(model, data, hvp_mode=hvp_mode)


# --------------------------------------------------------------------------
# Eigenvalue algorithms (float64 NumPy).


def _orthogonalise(w, basis):
    """Classical Gram-Schmidt against `basis`, repeated once if needed.

    A second pass runs when the first removed most of `w` (its norm fell
    below 1/sqrt(2) of what it was): "twice is enough" (Parlett, The
    Symmetric Eigenvalue Problem, 1980, sec. 6.9) keeps `w` orthogonal to
    working precision at about the cost of one pass.
    """
    if not basis.shape[0]:
        return w
    before = np.linalg.norm(w)
    w = w - basis.T @ (basis @ w)
    if np.linalg.norm(w) < 0.7071 * before:
        w = w - basis.T @ (basis @ w)
    return w


def _random_unit(rng, n, basis):
    for _ in range(10):
        w = _orthogonalise(rng.standard_normal(n), basis)
        norm = np.linalg.norm(w)
        if norm > 1e-8:
            return w / norm
    raise RuntimeError("Could not draw a vector outside the Krylov basis.")


def _init_matrix(init_vectors, hvp):
    """Normalises `init_vectors` to a float64 array `[m, num_params]`."""
    if init_vectors is None:
        return np.zeros((0, hvp.num_params))
    if isinstance(init_vectors, Spectrum):
        rows = list(init_vectors.eigenvectors)
        if init_vectors.min_eigenvector is not None:
            rows.append(init_vectors.min_eigenvector)
        init_vectors = rows
    if isinstance(init_vectors, (list, tuple)) and init_vectors and (
        isinstance(init_vectors[0], (list, tuple))
    ):
        init_vectors = [hvp.flatten(v) for v in init_vectors]
    matrix = np.atleast_2d(np.asarray(init_vectors, np.float64))
    if matrix.ndim != 2 or matrix.shape[1] != hvp.num_params:
        raise ValueError(
            "Invalid value for argument `init_vectors`. Expected vectors of "
            f"length {hvp.num_params} (flat) or lists of per-variable arrays. "
            f"Received: an array of shape {matrix.shape}"
        )
    norms = np.linalg.norm(matrix, axis=1)
    return matrix[norms > 0] / norms[norms > 0, None]


def _lanczos(hvp, top_k, smallest, tol, max_steps, start, rng):
    """Lanczos with full reorthogonalisation for the extreme eigenpairs.

    Returns `(values, vectors, residuals, converged)` for the wanted Ritz
    pairs: the `top_k` largest, then the smallest if `smallest`.
    """
    n = hvp.num_params
    basis = np.empty((min(max_steps, n) + 1, n))
    alphas, betas = [], []
    q = start / np.linalg.norm(start)
    m = 0
    norm_est = 0.0
    strictness = 1.0
    wanted_count = min(top_k + (1 if smallest else 0), n)
    while True:
        basis[m] = q
        w = hvp(q)
        alpha = float(q @ w)
        w = w - alpha * q
        if m > 0 and betas[-1] > 0:
            w = w - betas[-1] * basis[m - 1]
        w = _orthogonalise(w, basis[: m + 1])
        beta = float(np.linalg.norm(w))
        alphas.append(alpha)
        m += 1
        theta, s = scipy.linalg.eigh_tridiagonal(
            np.array(alphas), np.array(betas)
        )
        norm_est = max(norm_est, abs(theta[0]), abs(theta[-1]))
        wanted = list(range(m - 1, max(m - 1 - top_k, -1), -1))
        if smallest and 0 not in wanted:
            wanted.append(0)
        estimates = np.abs(beta * s[-1, wanted])
        exhausted = m >= min(max_steps, n)
        ready = len(wanted) >= wanted_count and np.all(
            estimates <= strictness * tol * norm_est
        )
        if ready or exhausted:
            vectors = s[:, wanted].T @ basis[:m]
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            products = np.stack([hvp(v) for v in vectors])
            values = np.einsum("ij,ij->i", vectors, products)
            residuals = np.linalg.norm(
                products - values[:, None] * vectors, axis=1
            )
            ok = bool(np.all(residuals <= tol * max(norm_est, np.max(
                np.abs(values)))))
            if ok or exhausted:
                return values, vectors, residuals, ok
            # The recurrence estimate was optimistic (loss of orthogonality
            # or float32 HVP noise): continue, asking for more before the
            # next (paid) explicit check.
            strictness *= 0.1
        if beta <= 0.1 * tol * norm_est:
            # Invariant subspace (e.g. repeated eigenvalues): restart with a
            # fresh direction; the dropped coupling is below the tolerance.
            q = _random_unit(rng, n, basis[:m])
            betas.append(0.0)
        else:
            q = w / beta
            betas.append(beta)


def _power(hvp, shift, deflate, start, tol, norm_floor, max_hvps):
    """Power iteration on `P (H - shift I) P`, `P` projecting out `deflate`.

    Stops when the residual `||P H v - (v.Hv) v||` of the current unit
    vector (`v = P v`) falls below `tol * max(norm_floor, |v.Hv|)`. The part
    of `H v` inside the deflated space is left to the final Rayleigh-Ritz
    step of `_power_spectrum`.
    Returns `(eigenvalue, vector, H vector, hvps used, converged)`.
    """
    v = _orthogonalise(start, deflate)
    v /= np.linalg.norm(v)
    value, hv = 0.0, None
    for used in range(1, max_hvps + 1):
        hv = hvp(v)
        value = float(v @ hv)
        projected = _orthogonalise(hv, deflate)
        residual = float(np.linalg.norm(projected - value * v))
        if residual <= tol * max(norm_floor, abs(value)):
            return value, v, hv, used, True
        w = projected - shift * v
        norm = np.linalg.norm(w)
        if norm == 0.0:  # v is in the null space of the shifted operator
            break
        v = w / norm
    return value, v, hv, used, False


def _rayleigh_ritz(vectors, products):
    """Best eigenpairs in span(vectors) given the exact products `H v`."""
    projected = vectors @ products.T
    theta, c = np.linalg.eigh(0.5 * (projected + projected.T))
    vectors, products = c.T @ vectors, c.T @ products
    residuals = np.linalg.norm(products - theta[:, None] * vectors, axis=1)
    return theta, vectors, residuals


def _power_spectrum(hvp, top_k, smallest, tol, max_hvps, init, rng):
    """Top-k (and smallest) eigenpairs by deflated, shifted power iteration.

    Returns `(values, vectors, residuals, minimum, converged)`; values are
    descending, `minimum` is `(value, vector, residual)` or `None`.
    """
    n = hvp.num_params
    starts = list(init[:top_k])

    def next_start():
        return starts.pop(0) if starts else rng.standard_normal(n)

    vectors, products = [], []
    converged = True
    shift, norm_floor = 0.0, 0.0
    low = None  # (vector, H vector, converged)
    remaining = max_hvps
    start = next_start()
    # Deflated runs stop at half the tolerance: the final Rayleigh-Ritz
    # step mixes their residuals.
    inner_tol = 0.5 * tol
    while len(vectors) < top_k:
        pairs_left = top_k - len(vectors) + (1 if smallest and low is None
                                             else 0)
        budget = max(1, remaining // pairs_left)
        deflate = np.array(vectors).reshape(-1, n)
        value, v, hv, used, ok = _power(
            hvp, shift, deflate, start, inner_tol, norm_floor, budget
        )
        remaining -= used
        norm_floor = max(norm_floor, abs(value))
        if value - shift < 0 and shift == 0.0:
            # A negative eigenvalue dominates in magnitude: it is the
            # smallest. Shift by it so the rest of the spectrum is >= 0 and
            # power iteration finds the largest algebraic eigenvalues.
            low = (v, hv, ok)
            shift = value
            continue  # same start vector, shifted operator
        vectors.append(v)
        products.append(hv)
        converged &= ok
        start = next_start()
    values, vectors, residuals = _rayleigh_ritz(
        np.array(vectors), np.array(products)
    )
    order = np.argsort(values)[::-1]
    values, vectors, residuals = values[order], vectors[order], residuals[order]
    minimum = None
    if smallest:
        if low is None:
            # H - lambda_max I is negative semi-definite: its dominant
            # eigenvalue is lambda_min - lambda_max.
            start = init[top_k] if len(init) > top_k else rng.standard_normal(n)
            _, v, hv, used, ok = _power(
                hvp, values[0], np.zeros((0, n)), start, tol, norm_floor,
                max(1, remaining),
            )
            low = (v, hv, ok)
        v, hv, ok = low
        value = float(v @ hv)
        minimum = (value, v, float(np.linalg.norm(hv - value * v)))
        converged &= ok
    scale = max(np.abs(values).max(), abs(minimum[0]) if minimum else 0.0)
    converged &= bool(np.all(residuals <= tol * scale))
    return values, vectors, residuals, minimum, converged


def spectrum(
    model,
    data,
    top_k=1,
    method="lanczos",
    smallest=False,
    tol=1e-4,
    max_hvps=None,
    init_vectors=None,
    seed=None,
    hvp_mode=None,
):
    """Computes the largest (and optionally smallest) Hessian eigenvalues.

    Eigenvalues are algebraic: `eigenvalues[0]` is the sharpness (the
    largest eigenvalue), not the eigenvalue of largest magnitude.

    A pair `(lambda, v)`, `||v|| = 1`, is converged when
    `||H v - lambda v|| <= tol * ||H||`, with `||H||` estimated as the largest
    magnitude among the Ritz values/eigenvalues seen. This residual bounds the
    distance from `lambda` to the spectrum; for an isolated eigenvalue the
    error is of order residual**2 / gap. Measuring the residual against
    `||H||` (not `|lambda|`) lets near-zero eigenvalues converge.

    `method="lanczos"` runs Lanczos with full reorthogonalisation (every new
    vector is orthogonalised, twice, against all previous ones), checks the
    recurrence residual estimates `|beta_m s_mi|` after each step, and then
    verifies the wanted Ritz pairs with one explicit HVP each; the reported
    residuals and eigenvalues (Rayleigh quotients) come from those HVPs, which
    are counted in `hvp_count`. Memory is `(steps + 1) * num_params` float64.
    `method="power"` runs power iteration with projection deflation (each
    deflated run stops at `tol / 2` on the residual outside the deflated
    space, then one Rayleigh-Ritz step on the found vectors, using their
    HVPs, removes the coupling between them); if a negative eigenvalue
    dominates it shifts the operator so that the largest algebraic
    eigenvalues are found, and `smallest=True` runs power iteration on
    `H - lambda_max I`. Its residuals need no extra HVP.

    Args:
        model: a built, compiled Keras model (see `make_hvp`).
        data: a batch, list of batches, or finite `tf.data.Dataset` (see
            `make_hvp`); the Hessian is that of the mean loss over it.
        top_k: number of largest eigenvalues. Defaults to `1`.
        method: `"lanczos"` or `"power"`. Defaults to `"lanczos"`.
        smallest: also compute the smallest algebraic eigenvalue. Defaults
            to `False`.
        tol: relative residual tolerance (see above). Defaults to `1e-4`.
            Float32 HVPs put a floor near `1e-6`.
        max_hvps: HVP budget. For Lanczos it caps the Lanczos steps, to
            which the explicit checks (`top_k` (+1) per check) are added;
            for power iteration it is shared among the eigenvalues. Defaults
            to `None`: `min(num_params, 100 + 10 * top_k)` Lanczos steps, or
            `1000 * (top_k + 1)` power-iteration HVPs.
        init_vectors: warm start: a previous `Spectrum`, or its
            `eigenvectors` (`[m, num_params]` or `[num_params]`), or a list of
            per-variable array lists. Lanczos starts from their normalised
            sum (for `m >= 1` its Krylov space holds all of them after `m`
            steps); power iteration starts eigenvector `i` from row `i`.
            Defaults to `None`: a random start.
        seed: seed of the NumPy generator used for random starts. Defaults
            to `None`.
        hvp_mode: see `make_hvp`. Defaults to `None`.

    Returns:
        A `Spectrum`. If the budget ran out first, `converged` is False and
        a warning is issued; the best pairs found are returned anyway.

    References:
        C. Lanczos, "An iteration method for the solution of the eigenvalue
        problem of linear differential and integral operators", J. Res.
        Nat. Bur. Standards 45 (1950).
        G. H. Golub and C. F. Van Loan, "Matrix Computations", 4th ed.,
        ch. 10 (Lanczos with full reorthogonalisation) and 8.2 (power
        method), 2013.
        Z. Yao, A. Gholami, K. Keutzer, M. Mahoney, "PyHessian: Neural
        Networks Through the Lens of the Hessian", IEEE BigData 2020.

    Example:

    ```python
    spec = spectrum(model, (x, y), top_k=3, smallest=True, seed=0)
    sharpness = spec.eigenvalues[0]
    later = spectrum(model, (x, y), top_k=3, init_vectors=spec)
    ```
    """
    if method not in SPECTRUM_METHODS:
        raise ValueError(
            "Invalid value for argument `method`. Expected one of "
            f"{SPECTRUM_METHODS}. Received: method={method!r}"
        )
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) \
            or top_k <= 0:
        raise ValueError(
            "Invalid value for argument `top_k`. Expected a positive "
            f"integer. Received: top_k={top_k!r}"
        )
    if not tol > 0:
        raise ValueError(
            "Invalid value for argument `tol`. Expected a positive float. "
            f"Received: tol={tol!r}"
        )
    if max_hvps is not None and max_hvps < 1:
        raise ValueError(
            "Invalid value for argument `max_hvps`. Expected a positive "
            f"integer or None. Received: max_hvps={max_hvps!r}"
        )
    hvp = make_hvp(model, data, hvp_mode=hvp_mode)
    n = hvp.num_params
    if top_k > n:
        raise ValueError(
            "Invalid value for argument `top_k`. Expected at most the number "
            f"of trainable parameters ({n}). Received: top_k={top_k}"
        )
    rng = np.random.default_rng(seed)
    init = _init_matrix(init_vectors, hvp)
    minimum = None
    if method == "lanczos":
        steps = max_hvps or min(n, 100 + 10 * top_k)
        steps = max(steps, min(n, top_k + int(smallest)))
        start = init.sum(axis=0) if len(init) else rng.standard_normal(n)
        if np.linalg.norm(start) < 1e-8:  # e.g. v and -v: fall back
            start = rng.standard_normal(n)
        values, vectors, residuals, converged = _lanczos(
            hvp, top_k, smallest, tol, steps, start, rng
        )
        count = min(top_k, n)
        top = np.argsort(values[:count])[::-1]
        if smallest:
            low = int(np.argmin(values))
            minimum = (values[low], vectors[low], residuals[low])
        eigenvalues = values[:count][top]
        eigenvectors = vectors[:count][top]
        residuals = residuals[:count][top]
    else:
        budget = max_hvps or 1000 * (top_k + 1)
        eigenvalues, eigenvectors, residuals, minimum, converged = (
            _power_spectrum(hvp, top_k, smallest, tol, budget, init, rng)
        )
    if not converged:
        warnings.warn(
            f"Hessian spectrum ({method}) did not reach tol={tol} within its "
            f"HVP budget ({hvp.count} HVPs); returning the best estimates. "
            "Pass a larger `max_hvps` or `tol`.",
            stacklevel=2,
        )
    return Spectrum(
        eigenvalues=np.asarray(eigenvalues, np.float64),
        eigenvectors=np.asarray(eigenvectors, np.float64),
        residuals=np.asarray(residuals, np.float64),
        hvp_count=hvp.count,
        converged=bool(converged),
        min_eigenvalue=None if minimum is None else float(minimum[0]),
        min_eigenvector=None if minimum is None else minimum[1],
        min_residual=None if minimum is None else float(minimum[2]),
    )


def trace(model, data, num_samples=100, seed=None, hvp_mode=None):
    """Estimates the Hessian trace with Hutchinson's estimator.

    `tr(H) = E[z^T H z]` for Rademacher `z` (entries +-1 with probability
    1/2), which has the smallest variance among i.i.d. probe distributions.

    Args:
        model: a built, compiled Keras model (see `make_hvp`).
        data: a batch, list of batches or finite dataset (see `make_hvp`).
        num_samples: number of probes (= HVPs). Defaults to `100`.
        seed: seed of the NumPy generator drawing the probes. Defaults to
            `None`.
        hvp_mode: see `make_hvp`. Defaults to `None`.

    Returns:
        A `TraceEstimate(value, stderr, hvp_count)`.

    References:
        M. F. Hutchinson, "A stochastic estimator of the trace of the
        influence matrix for Laplacian smoothing splines", Communications in
        Statistics - Simulation and Computation 18(3), 1989.
    """
    if isinstance(num_samples, bool) or not isinstance(
        num_samples, (int, np.integer)
    ) or num_samples < 1:
        raise ValueError(
            "Invalid value for argument `num_samples`. Expected a positive "
            f"integer. Received: num_samples={num_samples!r}"
        )
    hvp = make_hvp(model, data, hvp_mode=hvp_mode)
    rng = np.random.default_rng(seed)
    samples = np.empty(num_samples)
    for i in range(num_samples):
        z = rng.integers(0, 2, size=hvp.num_params) * 2.0 - 1.0
        samples[i] = z @ hvp(z)
    stderr = (
        float(samples.std(ddof=1) / math.sqrt(num_samples))
        if num_samples > 1 else float("nan")
    )
    return TraceEstimate(float(samples.mean()), stderr, hvp.count)


def _slq_probe(hvp, q, steps):
    """Plain Lanczos (full reorthogonalisation) from unit `q`: (nodes, weights)."""
    n = hvp.num_params
    basis = np.empty((steps, n))
    alphas, betas = [], []
    for m in range(steps):
        basis[m] = q
        w = hvp(q)
        alpha = float(q @ w)
        w = w - alpha * q
        if m > 0:
            w = w - betas[-1] * basis[m - 1]
        w = _orthogonalise(w, basis[: m + 1])
        alphas.append(alpha)
        beta = float(np.linalg.norm(w))
        scale = max(abs(a) for a in alphas) + (max(betas) if betas else 0.0)
        if m + 1 == steps or beta <= 1e-6 * scale:
            break  # done, or the Krylov space is invariant: quadrature exact
        betas.append(beta)
        q = w / beta
    theta, s = scipy.linalg.eigh_tridiagonal(
        np.array(alphas), np.array(betas)
    )
    return theta, s[0] ** 2


def density(
    model,
    data,
    num_probes=4,
    num_steps=40,
    seed=None,
    grid=1000,
    sigma=None,
    hvp_mode=None,
):
    """Estimates the Hessian's spectral density by stochastic Lanczos quadrature.

    Each probe `q` (Rademacher, normalised) gives an `m`-node Gauss
    quadrature of the measure `sum_i (q.u_i)^2 delta(t - lambda_i)` from
    `m` Lanczos steps: nodes are the Ritz values, weights the squared first
    components of the Ritz vectors. Averaging over probes estimates the
    normalised eigenvalue density `(1/n) sum_i delta(t - lambda_i)`, which
    is then smoothed with a Gaussian kernel of width `sigma`.

    Args:
        model: a built, compiled Keras model (see `make_hvp`).
        data: a batch, list of batches or finite dataset (see `make_hvp`).
        num_probes: number of random probes. Defaults to `4`.
        num_steps: Lanczos steps per probe (capped at the number of
            parameters). Defaults to `40`.
        seed: seed of the NumPy generator drawing the probes. Defaults to
            `None`.
        grid: number of evenly spaced grid points, or an increasing array of
            points. A generated grid spans the extreme nodes extended by
            `5 * sigma + 0.01 * width` on each side, so it covers the true
            `[lambda_min, lambda_max]` (extreme Ritz values converge first)
            and the kernel tails. Defaults to `1000`.
        sigma: Gaussian kernel standard deviation. Defaults to `None`:
            1% of the node range (`max(nodes) - min(nodes)`).
        hvp_mode: see `make_hvp`. Defaults to `None`.

    Returns:
        A `Density(grid, values, nodes, weights, sigma, hvp_count)`.

    References:
        B. Ghorbani, S. Krishnan, Y. Xiao, "An Investigation into Neural Net
        Optimization via Hessian Eigenvalue Density", ICML 2019.
        L. Lin, Y. Saad, C. Yang, "Approximating spectral densities of large
        matrices", SIAM Review 58(1), 2016.
        Z. Yao et al., "PyHessian", IEEE BigData 2020.
    """
    for name, value in (("num_probes", num_probes), ("num_steps", num_steps)):
        if isinstance(value, bool) or not isinstance(
            value, (int, np.integer)
        ) or value < 1:
            raise ValueError(
                f"Invalid value for argument `{name}`. Expected a positive "
                f"integer. Received: {name}={value!r}"
            )
    if sigma is not None and not sigma > 0:
        raise ValueError(
            "Invalid value for argument `sigma`. Expected a positive float "
            f"or None. Received: sigma={sigma!r}"
        )
    hvp = make_hvp(model, data, hvp_mode=hvp_mode)
    n = hvp.num_params
    rng = np.random.default_rng(seed)
    nodes, weights = [], []
    for _ in range(num_probes):
        z = rng.integers(0, 2, size=n) * 2.0 - 1.0
        theta, tau = _slq_probe(hvp, z / math.sqrt(n), min(num_steps, n))
        nodes.append(theta)
        weights.append(tau / num_probes)
    nodes = np.concatenate(nodes)
    weights = np.concatenate(weights)
    lo, hi = float(nodes.min()), float(nodes.max())
    width = hi - lo
    if sigma is None:
        sigma = 0.01 * width if width > 0 else 0.01 * max(abs(hi), 1e-12)
    if np.ndim(grid) == 0:
        pad = 5.0 * sigma + 0.01 * width
        points = np.linspace(lo - pad, hi + pad, int(grid))
    else:
        points = np.asarray(grid, np.float64)
    kernel = np.exp(-0.5 * ((points[:, None] - nodes[None, :]) / sigma) ** 2)
    values = kernel @ weights / (sigma * math.sqrt(2.0 * math.pi))
    return Density(points, values, nodes, weights, float(sigma), hvp.count)
