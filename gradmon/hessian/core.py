"""Hessian spectrum of a compiled Keras model's training loss.

Pure numerical code: it knows nothing of callbacks or TensorBoard. Every
function builds (or reuses) a compiled Hessian-vector product (HVP) of the
mean training loss and runs a matrix-free algorithm on it:

- `spectrum`: extreme eigenvalues (thick-restart Lanczos with full
  reorthogonalisation, or power iteration with deflation), with honest
  residuals: each value to `tol` relative to itself, and a Lanczos pass on
  the complement of the converged vectors that finds a skipped eigenvalue.
- `trace`: Hutchinson's estimator with Rademacher probes.
- `density`: stochastic Lanczos quadrature (SLQ) spectral density, on the
  same Lanczos routine (`_Lanczos`) as `spectrum`.
- `make_hvp`: the HVP operator itself, reusable by all three.
- `precondition`: `P^-1/2 H P^-1/2` for a positive diagonal `P` (an adaptive
  optimizer's, `gradmon.preconditioner`): its spectrum is the preconditioned
  sharpness that decides an adaptive optimizer's stability.
- `gradient_overlap`: the share of the gradient in the top eigenspace.

The operator is the Hessian, with respect to `model.trainable_variables` (or
a subset of them: a diagonal block, `make_hvp(variables=...)`), of

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
from generators seeded by `seed`.

Vectors over the parameters stay where the model is: the Lanczos basis is
one `tf.Variable` of a fixed number of rows (thick restarts bound it), in
the variables' dtype, and probes are drawn by stateless TensorFlow ops.
Only the small projected matrices and their Ritz algebra are float64 NumPy
(and power iteration, which keeps a few float64 host vectors). A flat
vector concatenates `model.trainable_variables` in order, each in C order;
`HessianVectorProduct.unflatten` turns one back into per-variable arrays.
One operator (`make_hvp`) can serve `spectrum`, `trace` and `density`: its
HVP is traced once per model and it reads the current weights at each call.
"""

import functools
import math
import numbers
import typing
import warnings
import weakref

import keras
import numpy as np
import tensorflow as tf

from gradmon.backend import keras_compat as _keras_compat
from gradmon._validation import (
    check_bool,
    check_non_negative_int,
    check_positive,
    check_positive_int,
    invalid,
)

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
            linearly by the final Rayleigh-Ritz step). Each value is within
            its residual of an eigenvalue of `H`.
        hvp_count: number of HVPs used, verification HVPs included (the
            complement check's too).
        converged: whether every returned pair met the tolerance (see
            `spectrum`: relative to the eigenvalue itself) and the check for
            skipped eigenvalues completed; when False, `spectrum` warned.
        min_eigenvalue: smallest algebraic eigenvalue when `smallest=True`,
            else `None`.
        min_eigenvector: its unit eigenvector `[num_params]`, or `None`.
        min_residual: its absolute residual norm, or `None`.
        check_vector: the unit top Ritz vector `[num_params]` of the last
            check for skipped eigenvalues (on the complement of the returned
            vectors: about the next eigenvector), or `None` when no check
            ran. A warm start from this `Spectrum` starts its check from it
            plus an equal share of a random vector.
    """

    eigenvalues: np.ndarray
    eigenvectors: np.ndarray
    residuals: np.ndarray
    hvp_count: int
    converged: bool
    min_eigenvalue: typing.Optional[float] = None
    min_eigenvector: typing.Optional[np.ndarray] = None
    min_residual: typing.Optional[float] = None
    check_vector: typing.Optional[np.ndarray] = None


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
# Data and argument checks.


class ProbeData(typing.NamedTuple):
    """Probe data converted to tensors once, reusable by every operator.

    Attributes:
        batches: list of `(x, y, sample_weight)` tensor structures.
        weights: list of floats, each batch's share of the examples.
    """

    batches: list
    weights: list


def _invalid_data(expected, received):
    return ValueError(
        f"Invalid value for argument `data`. Expected {expected}. "
        f"Received: {received}"
    )


def _batch_size(x):
    leaves = tf.nest.flatten(x)
    if not leaves or leaves[0].shape.rank == 0:
        raise _invalid_data(
            "batches whose inputs have a leading batch dimension",
            f"an input of shape {leaves[0].shape if leaves else None}",
        )
    return int(leaves[0].shape[0])


# A `tf.data.Dataset` of unknown cardinality (a generator's, possibly
# endless) is read up to this many examples; the rest is ignored, warned.
MAX_UNKNOWN_LENGTH_EXAMPLES = 8192


def _element_size(batch):
    leaves = [t for t in tf.nest.flatten(batch) if t is not None]
    return int(leaves[0].shape[0]) if leaves and leaves[0].shape.rank else 1


def _bounded(data):
    """The batches of a dataset of unknown cardinality, at most
    `MAX_UNKNOWN_LENGTH_EXAMPLES` examples of them (warned if cut)."""
    batches, examples = [], 0
    iterator = iter(data)
    for batch in iterator:
        batches.append(batch)
        examples += _element_size(batch)
        if examples >= MAX_UNKNOWN_LENGTH_EXAMPLES:
            if next(iterator, None) is not None:
                warnings.warn(
                    "gradmon: argument `data` is a tf.data.Dataset of unknown "
                    "cardinality (a generator's, possibly endless): the "
                    f"Hessian probe uses its first {len(batches)} batches "
                    f"({examples} examples, the cap "
                    f"{MAX_UNKNOWN_LENGTH_EXAMPLES}) and ignores the rest. "
                    "Pass `data.take(n)` (known length) to choose the "
                    "probe yourself.", stacklevel=4,
                )
            break
    return batches


def _raw_batches(data):
    """The batches of `data` as a list, a dataset materialised once."""
    if isinstance(data, tf.data.Dataset):
        cardinality = int(data.cardinality())
        if cardinality == tf.data.INFINITE_CARDINALITY:
            raise _invalid_data(
                "a finite dataset (the Hessian is of the mean loss over all "
                "of it: bound it with `data.take(n)`)",
                f"data={data} with infinite cardinality",
            )
        # Materialised once so that every HVP sees the same batches, even
        # for a dataset that reshuffles on each iteration.
        if cardinality == tf.data.UNKNOWN_CARDINALITY:
            return _bounded(data)
        return list(data)
    if isinstance(data, list):
        return data
    if isinstance(data, tuple):
        return [data]
    raise _invalid_data(
        "a batch `(x, y)` or `(x, y, sample_weight)`, a list of such "
        "batches, or a `tf.data.Dataset`", f"data of type {type(data)}",
    )


def _check_finite(structure):
    for leaf in tf.nest.flatten(structure):
        if leaf is not None and leaf.dtype.is_floating and not bool(
            tf.reduce_all(tf.math.is_finite(leaf))
        ):
            # A NaN in the probe would make every HVP NaN, silently.
            raise _invalid_data(
                "finite inputs, targets and sample weights",
                "a batch with NaN or infinite values",
            )


def prepare_data(data):
    """Checks probe data and converts it to tensors, once.

    Args:
        data: a batch `(x, y)` or `(x, y, sample_weight)`, a list of such
            batches, a finite `tf.data.Dataset` of them, or a `ProbeData`
            (returned as is). An infinite dataset is refused; one of unknown
            cardinality (e.g. `from_generator`) is read up to
            `MAX_UNKNOWN_LENGTH_EXAMPLES` examples, with a warning if more
            were left (bound it with `data.take(n)` to choose).

    Returns:
        A `ProbeData`, accepted as `data` by `make_hvp`, `spectrum`, `trace`
        and `density`.

    Raises:
        ValueError: naming `data`, for an unsupported type, an infinite
            dataset, no non-empty batch, a batch without targets `y`, or
            NaN/inf values.
    """
    if isinstance(data, ProbeData):
        return data
    raw = _raw_batches(data)
    if not raw:
        raise _invalid_data("at least one batch", f"data={data!r}")
    batches, sizes = [], []
    for batch in raw:
        if not isinstance(batch, (tuple, list)) or not 1 <= len(batch) <= 3:
            raise _invalid_data(
                "each batch to be a tuple `(x, y)` or `(x, y, sample_weight)`",
                f"a batch of type {type(batch)}",
            )
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(tuple(batch))
        if y is None:
            raise _invalid_data(
                "batches `(x, y)` with targets (the compiled loss needs them)",
                "a batch without `y`",
            )
        x, y, sample_weight = tf.nest.map_structure(
            lambda t: None if t is None else tf.convert_to_tensor(t),
            (x, y, sample_weight),
        )
        _check_finite((x, y, sample_weight))
        size = _batch_size(x)
        if size == 0:
            continue
        batches.append((x, y, sample_weight))
        sizes.append(size)
    if not batches:
        raise _invalid_data(
            "at least one non-empty batch", "only empty batches"
        )
    total = float(sum(sizes))
    return ProbeData(batches, [s / total for s in sizes])


def check_tol(tol, argument="tol"):
    """Returns `tol` as a float if it is a finite number in (0, 1)."""
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not (
        0 < tol < 1
    ):
        # tol >= 1 accepts any vector as converged (tol=inf returned a
        # wrong eigenvalue marked converged).
        raise invalid(argument, "a positive finite number below 1", tol)
    return float(tol)


def check_seed(seed):
    """Returns `seed` if it is `None` or a non-negative integer."""
    return None if seed is None else check_non_negative_int("seed", seed)


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
        loss = _keras_compat.compute_loss(model, x, y, y_pred, sample_weight, training=False)
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


def _build_functions(model, variables, hvp_mode, dtype, block):
    # `block`: indices of the variables differentiated (all of them, or a
    # diagonal block of the Hessian); the others enter the loss as constants.
    model_ref = weakref.ref(model)  # the cache must not keep models alive
    wrt = [variables[i] for i in block]
    shapes = [tuple(v.shape) for v in wrt]
    sizes = [int(np.prod(s)) for s in shapes]

    def read_params():
        return [tf.convert_to_tensor(v.value) for v in variables]

    def watched(params):
        return [params[i] for i in block]

    def loss_and_gradient(params, x, y, sample_weight):
        # Recorded by any enclosing tape or accumulator: the HVPs differentiate it again.
        # Only the block is watched, so the backward pass stops where it ends.
        with tf.GradientTape() as tape:
            tape.watch(watched(params))
            loss = _batch_loss(
                model_ref(), variables, params, x, y, sample_weight, False
            )
        grads = tape.gradient(loss, watched(params))
        return loss, [_dense(g, p) for g, p in zip(grads, watched(params))]

    def gradient(x, y, sample_weight):
        return loss_and_gradient(read_params(), x, y, sample_weight)

    def hvp_reverse(x, y, sample_weight, vector):
        params = read_params()
        with tf.GradientTape() as outer:
            outer.watch(watched(params))
            _, grads = loss_and_gradient(params, x, y, sample_weight)
            grad_dot_v = _dot(grads, vector)
        hv = outer.gradient(grad_dot_v, watched(params))
        return [_dense(h, p) for h, p in zip(hv, watched(params))]

    def hvp_forward(x, y, sample_weight, vector):
        params = read_params()
        with tf.autodiff.ForwardAccumulator(watched(params), vector) as acc:
            _, grads = loss_and_gradient(params, x, y, sample_weight)
        hv = acc.jvp(grads, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return list(hv)

    hvp = hvp_reverse if hvp_mode == "reverse_over_reverse" else hvp_forward

    def flat_hvp(x, y, sample_weight, vector):
        # Flat in, flat out: the caller's vectors stay one device tensor each,
        # with no per-variable host conversion.
        parts = tf.split(vector, sizes)
        tangents = [
            tf.cast(tf.reshape(p, s), v.dtype)
            for p, s, v in zip(parts, shapes, wrt)
        ]
        hv = hvp(x, y, sample_weight, tangents)
        return tf.concat(
            [tf.cast(tf.reshape(h, [-1]), dtype) for h in hv], axis=0
        )

    return (
        tf.function(flat_hvp, reduce_retracing=True),
        tf.function(gradient, reduce_retracing=True),
    )


# model -> {(hvp_mode, variable ids): (hvp_fn, grad_fn)}; reusing the traced
# functions makes a periodic refresh (e.g. from a callback) cost no retrace.
_FUNCTION_CACHE = weakref.WeakKeyDictionary()


def _functions(model, variables, hvp_mode, dtype, block):
    key = (hvp_mode, dtype.name, tuple(id(v) for v in variables), block)
    try:
        per_model = _FUNCTION_CACHE.setdefault(model, {})
    except TypeError:  # not weak-referenceable: no caching
        return _build_functions(model, variables, hvp_mode, dtype, block)
    if key not in per_model:
        per_model[key] = _build_functions(model, variables, hvp_mode, dtype, block)
    return per_model[key]


def _block_indices(variables, trainable):
    """Indices into `trainable` of `variables` (`None`: all), in model order."""
    if variables is None:
        return tuple(range(len(trainable)))
    index = {id(v): i for i, v in enumerate(trainable)}
    chosen = list(variables) if isinstance(variables, (list, tuple)) else None
    if not chosen or any(id(v) not in index for v in chosen) or len(
            {id(v) for v in chosen}) != len(chosen):
        raise invalid(
            "variables", "None or a non-empty list of the model's trainable "
            "variables, each at most once",
            variables if chosen is None else [getattr(v, "path", v) for v in chosen],
        )
    return tuple(sorted(index[id(v)] for v in chosen))


def _vector_dtype(variables):
    """The widest floating dtype among the variables (float32 usually)."""
    widest = np.result_type(*[np.dtype(v.dtype) for v in variables])
    return tf.as_dtype(widest)


# A probe batch above this many examples is split into chunks of at most
# this many (`make_hvp(max_batch_size=)`): one 4,096-image batch peaked at
# 5.8 GB against 1.15 GB for the same examples in smaller batches.
DEFAULT_MAX_BATCH_SIZE = 1024

# Reductions under which a batch's loss is the mean of per-example terms
# (plus terms independent of the batch): the size-weighted mean of its
# chunks' losses is then the batch's loss, and its HVP the same.
_MEAN_REDUCTIONS = ("sum_over_batch_size", "mean")


def _layout(batch):
    """Shapes and dtypes of a batch's tensors (one eager check per layout)."""
    return tuple((None if t is None else (tuple(t.shape), t.dtype.name))
                 for t in tf.nest.flatten(batch))


def _shapes(structure):
    shapes = [None if t is None else tuple(t.shape)
              for t in tf.nest.flatten(structure)]
    return shapes[0] if len(shapes) == 1 else shapes


class _naming_data:
    """Re-raises an error of the model or its loss on a probe batch as an
    invalid `data` (Keras' wording), with the shapes it received."""

    def __init__(self, batch):
        self.batch = batch

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if error is None or not isinstance(error, (
                ValueError, TypeError, KeyError, IndexError,
                tf.errors.InvalidArgumentError)):
            return False
        if str(error).startswith("Invalid value for argument `data`"):
            return False
        x, y, sw = self.batch
        received = f"a batch with x of shape {_shapes(x)}, y of shape {_shapes(y)}"
        if sw is not None:
            received += f", sample_weight of shape {_shapes(sw)}"
        raise _invalid_data(
            "batches the model and its compiled loss accept (the shapes "
            "`fit` takes)", f"{received}, on which the model's loss failed: "
            f"{type(error).__name__}: {str(error).strip()[:500]}",
        ) from error


def _check_input_shapes(model, batches):
    """Each batch's `x` against the model's declared input, when it has
    one (functional and Sequential models built from an `Input`); other
    mismatches fail the eager loss in `HessianVectorProduct`, as `data`."""
    try:
        inputs = list(getattr(model, "inputs", None) or [])
    except (AttributeError, ValueError, TypeError):  # a subclassed model: none declared
        inputs = []
    if len(inputs) != 1:  # several: their order against `x`'s is the model's business
        return
    expected = [tuple(t.shape) for t in inputs]
    for batch in batches:
        leaves = tf.nest.flatten(batch[0])
        received = [tuple(t.shape) for t in leaves]
        ok = len(received) == len(expected) and all(
            len(r) == len(e) and all(a is None or a == b for a, b in zip(e[1:], r[1:]))
            for r, e in zip(received, expected))
        if not ok:
            raise _invalid_data(
                f"inputs x of shape {expected[0] if len(expected) == 1 else expected} "
                "(the model's `inputs`; the leading batch dimension free)",
                f"a batch with x of shape {received[0] if len(received) == 1 else received}",
            )


def _chunkable(model):
    """Whether every compiled loss averages over examples (see `_MEAN_REDUCTIONS`)."""
    compile_loss = getattr(model, "_compile_loss", None)
    if compile_loss is None:
        return False  # an own `compute_loss`: nothing says what it reduces
    user = getattr(compile_loss, "_user_loss", None)
    try:
        losses = [loss for loss in tf.nest.flatten(user) if loss is not None]
    except (TypeError, ValueError):
        return False
    return all(getattr(loss, "reduction", "sum_over_batch_size") in _MEAN_REDUCTIONS
               or (isinstance(loss, str) or callable(loss)) and not hasattr(loss, "reduction")
               for loss in losses)


def _chunked(model, probe, max_batch_size):
    """`(batches, weights)` with every batch above `max_batch_size` examples
    split into chunks, each weighted by its share of the examples: the mean
    loss, and so every HVP, is unchanged for a loss that averages over
    examples. Others (a `"sum"` reduction, an own `compute_loss`) run whole,
    warned."""
    if all(_batch_size(x) <= max_batch_size for x, _, _ in probe.batches):
        return probe.batches, probe.weights
    if not _chunkable(model):
        warnings.warn(
            f"gradmon: a probe batch in argument `data` has more than "
            f"{max_batch_size} examples, and is not split (the model's loss "
            "is not known to be a mean over examples: a `'sum'` reduction or "
            "an own `compute_loss`); its HVP needs the memory of the whole "
            "batch. Pass smaller batches.", stacklevel=4,
        )
        return probe.batches, probe.weights
    batches, weights = [], []
    for batch, weight in zip(probe.batches, probe.weights):
        size = _batch_size(batch[0])
        for start in range(0, size, max_batch_size):
            stop = min(size, start + max_batch_size)
            batches.append(tf.nest.map_structure(
                lambda t: None if t is None else t[start:stop], batch))
            weights.append(weight * (stop - start) / size)
    return batches, weights


class HessianVectorProduct:
    """Hessian-vector product of a model's mean training loss.

    Built by `make_hvp`. `apply` maps a flat vector tensor (on the model's
    device, in `dtype`) to `H v` as such a tensor; calling the operator with
    NumPy vectors does the same through the host. Each product counts as
    one HVP in `count`, however many batches the data holds. The operator
    reads the variables' current values at each product, so one operator
    serves every probe of a training run.

    Attributes:
        variables: the trainable variables differentiated (all of the
            model's, or the block given to `make_hvp`), in flattening order.
        shapes: their shapes.
        num_params: total number of trainable parameters.
        dtype: the `tf.DType` of flat vectors (the variables' widest).
        hvp_mode: `"reverse_over_reverse"` or `"forward_over_reverse"`.
        count: number of HVPs computed so far.
        batch_sizes: the examples of each batch the HVP runs on, in order
            (probe batches above `max_batch_size` split into chunks).
    """

    def __init__(self, model, data, hvp_mode=None, variables=None,
                 max_batch_size=None):
        _check_model(model)
        hvp_mode = DEFAULT_HVP_MODE if hvp_mode is None else hvp_mode
        if hvp_mode not in HVP_MODES:
            raise ValueError(
                f"Invalid value for argument `hvp_mode`. Expected one of "
                f"{HVP_MODES}. Received: hvp_mode={hvp_mode!r}"
            )
        max_batch_size = DEFAULT_MAX_BATCH_SIZE if max_batch_size is None \
            else check_positive_int("max_batch_size", max_batch_size)
        probe = prepare_data(data)
        _check_input_shapes(model, probe.batches)
        x0, y0, sw0 = probe.batches[0]
        if not model.built:
            with _naming_data(probe.batches[0]):
                model(x0, training=False)  # creates the weights, nothing else
        self._batches, self._weights = _chunked(model, probe, max_batch_size)
        self.batch_sizes = [_batch_size(b[0]) for b in self._batches]
        x0, y0, sw0 = self._batches[0]
        trainable = list(model.trainable_variables)
        if not trainable:
            raise ValueError(
                "Invalid value for argument `model`. Expected a model with "
                "trainable variables. Received: a model with none"
            )
        block = _block_indices(variables, trainable)
        self.variables = [trainable[i] for i in block]
        compile_loss = getattr(model, "_compile_loss", None)
        build = compile_loss is not None and not compile_loss.built
        # One eager loss per batch layout: data the model or its loss cannot
        # take fails here, naming `data`, not in the first probe. It also
        # builds CompileLoss' trackers as `fit`/`evaluate` would (their zero
        # state created here, outside any tf.function).
        params = [tf.convert_to_tensor(v.value) for v in trainable]
        seen = set()
        for batch in self._batches:
            layout = _layout(batch)
            if layout in seen:
                continue
            seen.add(layout)
            with _naming_data(batch):
                _batch_loss(model, trainable, params, *batch, build)
            build = False
        self.shapes = [tuple(v.shape) for v in self.variables]
        self._sizes = [int(np.prod(s)) for s in self.shapes]
        self.num_params = int(sum(self._sizes))
        self.dtype = _vector_dtype(self.variables)
        self.hvp_mode = hvp_mode
        self.count = 0
        self._hvp_fn, self._grad_fn = _functions(
            model, trainable, hvp_mode, self.dtype, block
        )
        self._concrete = {}  # batch index -> concrete HVP function

    @property
    def trace_count(self):
        """How many times the HVP `tf.function` has been traced (per model)."""
        return self._hvp_fn.experimental_get_tracing_count()

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

    def to_tensor(self, flat):
        """A flat host vector as a flat tensor in `dtype`."""
        return tf.constant(np.asarray(flat).reshape(-1), dtype=self.dtype)

    def apply(self, vector):
        """Returns `H v` for a flat tensor `v` of `num_params` entries.

        Args:
            vector: a flat `tf.Tensor` in `dtype`.

        Returns:
            `H v` as a flat `tf.Tensor` in `dtype`, where `v` lives.
        """
        result = None
        for index, ((x, y, sw), weight) in enumerate(
                zip(self._batches, self._weights)):
            hv = self._product(index, x, y, sw, vector)
            if len(self._batches) > 1:
                hv = hv * tf.constant(weight, self.dtype)
            result = hv if result is None else result + hv
        self.count += 1
        return result

    def _product(self, index, x, y, sw, vector):
        # The concrete function of each batch, called directly: a fifth
        # less call overhead than the `tf.function` (0.64 vs 0.81 ms an HVP
        # on the digits MLP), the same single trace.
        if index not in self._concrete:
            self._concrete[index] = self._hvp_fn.get_concrete_function(
                x, y, sw, vector
            )
        return self._concrete[index](x, y, sw, vector)

    def __call__(self, vector):
        """Returns `H v` through the host.

        Args:
            vector: a flat vector of length `num_params`, or a list of arrays
                or tensors shaped like the trainable variables.

        Returns:
            `H v` as a flat float64 array, or as a list of float64 arrays if
            `vector` was a list.
        """
        return _host_product(self, vector)

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


def _host_product(op, vector):
    """`op.apply` through the host: a flat vector in, a flat float64 array out (or a list of
    arrays shaped like `op.variables` in and out)."""
    as_list = isinstance(vector, (list, tuple))
    if as_list:
        flat = op.flatten([np.asarray(v) for v in vector])
    else:
        flat = np.asarray(vector, np.float64).reshape(-1)
        if flat.size != op.num_params:
            raise ValueError(
                "Invalid value for argument `vector`. Expected "
                f"{op.num_params} entries. Received: {flat.size}"
            )
    result = op.apply(op.to_tensor(flat)).numpy().astype(np.float64)
    return op.unflatten(result) if as_list else result


def make_hvp(model, data, hvp_mode=None, variables=None, max_batch_size=None):
    """Builds the compiled Hessian-vector product of a model's mean loss.

    Args:
        model: a built, compiled Keras model. Its loss is the compiled loss
            plus `model.losses`, from a `training=False` forward pass.
        data: a batch `(x, y)` or `(x, y, sample_weight)`, a list of such
            batches, a finite `tf.data.Dataset` of them (materialised in
            memory once), or a `ProbeData` from `prepare_data`. `x`/`y` may
            be nested (dicts, lists).
        hvp_mode: `"reverse_over_reverse"` (nested `tf.GradientTape`) or
            `"forward_over_reverse"` (`tf.autodiff.ForwardAccumulator` over
            a tape). Defaults to `None`, meaning `DEFAULT_HVP_MODE`.
        variables: a subset of `model.trainable_variables`: the operator is
            then the diagonal block of the Hessian for them (the others held
            at their values), flattened in the model's order, and both
            backward passes stop at the earliest of them (a layer near the
            output costs less than a full HVP). Defaults to `None`: all.
        max_batch_size: a batch of more examples is split into chunks of at
            most this many, each HVP summed over them with weights by size
            (the same operator for a loss that averages over examples,
            Keras' default; a `"sum"` reduction or an own `compute_loss` is
            not split, warned), so that its memory is a chunk's. Defaults
            to `None`: `DEFAULT_MAX_BATCH_SIZE` (1024).

    Returns:
        A `HessianVectorProduct`: `hvp.apply(t)` maps a flat device tensor to
        `H t`, `hvp(v)` does the same for host vectors (flat in, flat out;
        list in, list out), and `hvp.count` counts products. Pass it as
        `model` to `spectrum`, `trace` and `density` to share it. The traced
        `tf.function` is cached per model and mode, so building another one
        for new data of the same shapes does not retrace.

    Raises:
        ValueError: naming `data` (see `prepare_data`), also for batches
            the model or its loss cannot take: `x` against a model's
            declared input shape, then one eager loss per batch layout,
            here rather than in the first product.

    Example:

    ```python
    hvp = make_hvp(model, (x, y))
    hv = hvp(np.ones(hvp.num_params))
    spec = spectrum(hvp, top_k=3)
    tr = trace(hvp, num_samples=50)
    ```
    """
    return HessianVectorProduct(model, data, hvp_mode=hvp_mode, variables=variables,
                                max_batch_size=max_batch_size)


def _operator(model, data, hvp_mode, preconditioner=None):
    """`model` itself if it is an operator, else a new one on `data`;
    preconditioned by `preconditioner` if one is given."""
    if isinstance(model, (HessianVectorProduct, PreconditionedOperator)):
        if data is not None:
            raise invalid(
                "data", "None when `model` is a HessianVectorProduct (it "
                "holds its data)", type(data).__name__,
            )
        if hvp_mode is not None and hvp_mode != model.hvp_mode:
            raise invalid("hvp_mode", f"None or {model.hvp_mode!r}", hvp_mode)
        op = model
    elif data is None:
        raise invalid("data", "a batch, a list of batches or a dataset", data)
    else:
        op = make_hvp(model, data, hvp_mode=hvp_mode)
    return op if preconditioner is None else precondition(op, preconditioner)


class PreconditionedOperator:
    """`P^-1/2 H P^-1/2` for a positive diagonal `P`: symmetric, with the
    eigenvalues of `P^-1 H`.

    Built by `precondition`; accepted wherever a `HessianVectorProduct` is
    (`spectrum`, `trace`, `density`). An eigenvector `u` of this operator
    gives the eigenvector `P^-1/2 u` of `P^-1 H`. Each product is one HVP of
    the wrapped operator (and counts in its `count`).

    Attributes:
        hvp: the wrapped `HessianVectorProduct`.
        diagonal: `P` as a flat float64 array.
        num_params, dtype, hvp_mode, variables: those of `hvp`.
    """

    def __init__(self, hvp, diagonal):
        self.hvp = hvp
        self.diagonal = diagonal
        self.num_params, self.dtype = hvp.num_params, hvp.dtype
        self.hvp_mode, self.variables = hvp.hvp_mode, hvp.variables
        self._scale = hvp.to_tensor(1.0 / np.sqrt(diagonal))  # P^-1/2, on the device

    @property
    def count(self):
        return self.hvp.count

    def flatten(self, arrays):
        return self.hvp.flatten(arrays)

    def unflatten(self, vector):
        return self.hvp.unflatten(vector)

    def to_tensor(self, flat):
        return self.hvp.to_tensor(flat)

    def apply(self, vector):
        """`P^-1/2 H P^-1/2 v` for a flat device tensor `v` in `dtype`."""
        return self._scale * self.hvp.apply(self._scale * vector)

    def __call__(self, vector):
        """`P^-1/2 H P^-1/2 v` through the host (a flat vector, or arrays shaped like `variables`)."""
        return _host_product(self, vector)


def precondition(hvp, preconditioner):
    """The operator `P^-1/2 H P^-1/2`, whose eigenvalues are those of `P^-1 H`.

    Args:
        hvp: a `HessianVectorProduct` (from `make_hvp`).
        preconditioner: the positive diagonal `P`: a flat array of
            `hvp.num_params` entries, a list of arrays shaped like
            `hvp.variables`, or a Keras optimizer (or `LossScaleOptimizer`)
            whose last update's `P` is read from its slots
            (`gradmon.preconditioner.diagonal`).

    Returns:
        A `PreconditionedOperator`.

    Raises:
        ValueError: naming `preconditioner`, for an optimizer without a
            diagonal preconditioner or without an update yet, a wrong size,
            or entries that are not positive and finite.

    References:
        J. Cohen et al., "Adaptive Gradient Methods at the Edge of
        Stability", arXiv:2207.14484, 2022.
    """
    if isinstance(hvp, PreconditionedOperator):
        raise invalid("preconditioner", "None for an operator that is already preconditioned",
                      type(preconditioner).__name__)
    if isinstance(preconditioner, keras.optimizers.Optimizer):
        from gradmon.hessian import preconditioner as _preconditioner

        diagonal = _preconditioner.diagonal(preconditioner, hvp.variables)
        if diagonal is None:
            raise invalid("preconditioner", "an adaptive optimizer (Adam, AdamW, Adamax, Nadam, "
                          "RMSprop, Adagrad) that has applied an update, or a positive diagonal",
                          preconditioner)
        preconditioner = diagonal
    if isinstance(preconditioner, (list, tuple)):
        if len(preconditioner) != len(hvp.shapes):
            raise invalid("preconditioner", f"{len(hvp.shapes)} arrays, one per variable",
                          f"a list of {len(preconditioner)}")
        flat = hvp.flatten(preconditioner)
    else:
        flat = np.asarray(preconditioner, np.float64).reshape(-1)
    if flat.size != hvp.num_params or not np.all(np.isfinite(flat) & (flat > 0)):
        raise invalid("preconditioner", f"{hvp.num_params} positive finite entries",
                      f"an array of {flat.size} entries, min {flat.min() if flat.size else None}")
    return PreconditionedOperator(hvp, flat)


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


def _random_vector(rng, n, dtype, rademacher=False):
    """A device vector drawn by a stateless op seeded from `rng`.

    Stateless ops touch neither TensorFlow's global generator nor Keras'
    seed generators, and the vector never passes through the host.
    """
    seed = tf.constant(rng.integers(0, 2**31 - 1, size=2), tf.int64)
    if rademacher:
        bits = tf.random.stateless_uniform([n], seed, maxval=2, dtype=tf.int32)
        return tf.cast(2 * bits - 1, dtype)
    return tf.random.stateless_normal([n], seed, dtype=dtype)


class _Basis:
    """Orthonormal vectors as immutable device tensors, in blocks.

    Vectors are appended one by one and stacked into a `[block, n]` matrix
    every `block` appends, so projections are a few matrix-vector products
    and no tensor is ever written in place (a partly assigned `tf.Variable`
    switches to copy-on-read: every later read copied the whole basis, 0.3 s
    a step at 6.3 M parameters). Memory is the vectors plus, briefly, one
    block being stacked.
    """

    def __init__(self, block=4):
        self.block = block
        self.blocks, self.pending = [], []

    def __len__(self):
        return sum(int(b.shape[0]) for b in self.blocks) + len(self.pending)

    def __getitem__(self, index):
        for b in self.blocks:
            if index < b.shape[0]:
                return b[index]
            index -= int(b.shape[0])
        return self.pending[index]

    def append(self, vector):
        self.pending.append(vector)
        if len(self.pending) == self.block:
            self.blocks.append(tf.stack(self.pending))
            self.pending = []

    def combine(self, coefficients):
        """`coefficients @ basis` for a `[k, len(self)]` tensor, `[k, n]`."""
        parts = self.blocks + [p[None] for p in self.pending]
        starts = np.cumsum([0] + [int(b.shape[0]) for b in parts])
        terms = (tf.matmul(coefficients[:, a:z], b)
                 for a, z, b in zip(starts[:-1], starts[1:], parts))
        if coefficients.shape[0] == 1:
            return tf.add_n(list(terms))  # one pass over narrow terms
        out = next(terms)
        for term in terms:  # wide terms one at a time: bounded memory
            out = out + term
        return out

    def rebuilt(self, coefficients):
        """A new `_Basis` of the rows `coefficients @ basis`, built a block
        at a time so the temporaries stay a block wide."""
        new = _Basis(self.block)
        for start in range(0, int(coefficients.shape[0]), self.block):
            rows = self.combine(coefficients[start:start + self.block])
            for row in tf.unstack(rows):
                new.append(row)
        return new

    def project_out(self, w):
        """`w` minus its projection on the basis, in two passes.

        Returns `(w, coefficients, ||w||)`, `coefficients` float64 NumPy.
        """
        w, h, norm = _for_layout(_two_passes, self.blocks, self.pending, w)
        return w, h.numpy().astype(np.float64), float(norm)


def _project(blocks, pending, w):
    """One classical Gram-Schmidt pass (graph code): `(w - Q^T h, h = Q w)`."""
    h = tf.concat([tf.linalg.matvec(b, w) for b in blocks]
                  + [_vdot(p, w) for p in pending], 0)
    terms, start = [], 0
    for b in blocks:
        size = int(b.shape[0])
        terms.append(tf.linalg.matvec(b, h[start:start + size], transpose_a=True))
        start += size
    terms += [h[start + i] * p for i, p in enumerate(pending)]
    return w - tf.add_n(terms), h


def _vdot(a, b):
    # `[a.b]` as a matrix product: tf.tensordot of two long vectors is
    # single-threaded here (6.4 ms vs 1.5 ms at 6.3 M entries).
    return tf.matmul(a[None], b[None], transpose_b=True)[0]


# One tf.function per basis layout (number and sizes of blocks, pending
# vectors): each is traced once, for any vector length (the per-layer
# operators of a model have as many lengths as layers: per-length traces
# cost as much as their HVPs' own), where one function would retrace at
# every new layout and warn of frequent retracing.
_LAYOUT_FUNCTIONS = {}


def _any_length(t):
    """`t`'s `TensorSpec` with the vector length (last dimension) unknown."""
    shape = list(t.shape)
    if shape:
        shape[-1] = None
    return tf.TensorSpec(shape, t.dtype)


def _for_layout(fn, blocks, pending, w, *args):
    """Runs the graph of `fn` for this basis layout.

    Each layout gets a `tf.function` of its own, traced once, and its
    concrete function is called directly (a fifth less call overhead: it
    matters for small models).
    """
    key = (fn.__name__, tuple(int(b.shape[0]) for b in blocks), len(pending),
           w.dtype.name)
    if key not in _LAYOUT_FUNCTIONS:
        # A partial of its own: TensorFlow counts retraces per code object
        # (closures share one), a partial is counted by itself.
        _LAYOUT_FUNCTIONS[key] = tf.function(
            functools.partial(fn)
        ).get_concrete_function(
            *tf.nest.map_structure(_any_length, (blocks, pending, w, *args))
        )
    return _LAYOUT_FUNCTIONS[key](blocks, pending, w, *args)


def _norm(w):
    """`||w||` without underflow (graph code).

    A float32 sum of squares loses entries below ~1e-19 (their squares are
    subnormal): a tiny operator (a deep layer's Hessian block at
    initialisation, ~1e-20) then gave non-unit Lanczos vectors, a wrong
    eigenvalue and a residual of 0. Below the threshold the norm is
    recomputed on `w / max|w|`; above it a single `tf.norm`.
    """
    norm = tf.norm(w)
    # bfloat16 (no np.finfo) has float32's exponent range
    info = np.finfo({tf.float16: np.float16, tf.float64: np.float64}.get(w.dtype, np.float32))
    threshold = tf.constant(math.sqrt(info.tiny) / info.eps, w.dtype)

    def rescaled():
        scale = tf.reduce_max(tf.abs(w))
        safe = tf.where(scale > 0, scale, tf.ones_like(scale))
        return safe * tf.norm(w / safe)

    return tf.cond(norm < threshold, rescaled, lambda: norm)


def _two_passes(blocks, pending, w):
    w, first = _project(blocks, pending, w)
    w, second = _project(blocks, pending, w)
    return w, first + second, _norm(w)


def _lanczos_update(blocks, pending, w, q, previous, coupling):
    """Orthogonalises `w = H q` against the basis, in one graph call.

    The local recurrence first (`alpha q` and the known `coupling` to the
    previous vector), then one full pass, which removes only rounding-level
    components (folding the local terms into that pass instead leaves the
    dot-product errors of the large `H q`, ~eps ||H q||, along every
    vector: measured, it stalled residuals near 3e-4 ||H||). A second pass
    runs only when the first removed most of what was left ("twice is
    enough": Parlett, The Symmetric Eigenvalue Problem, 1980, sec. 6.9).
    Returns `(w, h, alpha, ||w||)` where `h` sums the full passes, so
    `H q = alpha q + coupling previous + Q^T h + w` to rounding. Graph code
    (see `_for_layout`).
    """
    alpha = _vdot(q, w)[0]
    w = w - alpha * q - coupling * previous
    w, h = _project(blocks, pending, w)
    norm = _norm(w)

    def again():
        w2, h2 = _project(blocks, pending, w)
        return w2, h + h2, _norm(w2)

    # ||w before the pass||^2 = norm^2 + ||h||^2 for an orthonormal basis, so
    # norm < ||w before|| / sqrt(2) is norm < ||h|| (no squares to underflow).
    w, h, norm = tf.cond(norm < _norm(h), again, lambda: (w, h, norm))
    return w, h, alpha, norm


def _ritz_pair(y, hy, theta):
    """A unit Ritz vector, its Rayleigh quotient and residual, on the device.

    `y` is a Ritz vector and `hy` its product `H y` (both combinations of
    stored vectors); `theta` is its Ritz value, so the quotient is computed
    as a small correction to it.
    """
    yy = tf.reduce_sum(y * y)
    theta = tf.constant(theta, y.dtype)
    quotient = theta + tf.reduce_sum(y * (hy - theta * y)) / yy
    residual = _norm(hy - quotient * y) / tf.sqrt(yy)
    return y / tf.sqrt(yy), quotient, residual


class _Lanczos:
    """Lanczos with full reorthogonalisation and thick restarts.

    The basis lives on the model's device, in its dtype, at most `capacity`
    vectors (`_Basis`): memory stays `capacity * num_params` whatever the
    number of steps. Only the small coefficient matrix `B` is float64 NumPy.
    The Arnoldi relation `H Q[:m] = Q[:m+1] B[:m+1, :m]` holds to rounding
    after every step (each column of `B` holds the exact Gram-Schmidt
    coefficients of one HVP), so Ritz residuals computed from it are those of
    the HVPs themselves, whatever the loss of orthogonality.
    `T = (B + B^T) / 2` on the first `m` rows and columns is the symmetric
    projected matrix (tridiagonal without restarts, arrow-shaped after one).
    Serves both `spectrum` (with restarts) and `density` (SLQ, without).
    """

    def __init__(self, op, capacity, start):
        self.op = op
        self.capacity = capacity
        self.basis = _Basis()
        self.basis.append(start / tf.norm(start))
        self.coeffs = np.zeros((capacity, capacity))
        self.m = 0  # basis[m], when it exists, is the next direction
        # basis[m] and basis[m - 1] held apart: no slicing of blocks per step
        self._current, self._previous = self.basis[0], None

    def step(self, relative_floor, rng=None):
        """One HVP: extends the basis by `H q_m`, orthogonalised.

        If the new direction is below `relative_floor` times the scale of
        `T` (an invariant subspace), its coupling is dropped and, given
        `rng`, a random direction continues the basis. Returns whether that
        happened.
        """
        m, q = self.m, self._current
        coupling = self.coeffs[m, m - 1] if m > 0 else 0.0
        w, h, alpha, beta = _for_layout(
            _lanczos_update, self.basis.blocks, self.basis.pending,
            self.op.apply(q), q,
            q if self._previous is None else self._previous,
            tf.constant(coupling, q.dtype),
        )
        self._previous = q
        if hasattr(self.op, "project"):
            # A deflated operator's: the recurrence's own terms bring back
            # the rounding-level components along the locked vectors that
            # `apply` removed, amplified at each step (measured: 2e-7 to
            # 4e-4 in 18 steps). The rounding removed leaves `beta` as is.
            w = self.op.project(w)
        h = h.numpy().astype(np.float64)
        h[m] += float(alpha)
        if m > 0:
            h[m - 1] += coupling
        beta = float(beta)
        self.coeffs[: h.size, m] = h
        self.m += 1
        scale = np.abs(self.coeffs[: self.m, : self.m]).max()
        if self.m >= self.capacity:
            return beta <= relative_floor * scale
        if beta > relative_floor * scale:
            self._current = w / beta
            self.basis.append(self._current)
            self.coeffs[self.m, self.m - 1] = beta
            return False
        if rng is not None and self.m < getattr(
                self.op, "dimension", self.op.num_params):
            w = _random_vector(rng, self.op.num_params, self.op.dtype)
            if hasattr(self.op, "project"):  # a deflated operator's complement
                w = self.op.project(w)
            w, _, norm = self.basis.project_out(w)
            self._current = w / norm
            self.basis.append(self._current)
        return True

    def ritz(self):
        """`(theta, s, estimates)`: Ritz values (ascending), vectors of `T`,
        and the residual norms the Arnoldi relation predicts."""
        m = self.m
        block = self.coeffs[:m, :m]
        theta, s = np.linalg.eigh(0.5 * (block + block.T))
        return theta, s, np.abs(self.coeffs[m, :m] @ s) if m < self.capacity \
            else np.zeros(m)

    def pairs(self, theta, s):
        """Unit Ritz vectors (device), Rayleigh quotients and residuals.

        Args:
            theta: Ritz values `[k]`.
            s: their eigenvectors of `T`, `[m, k]`.

        Returns:
            `(vectors, values [k], residuals [k])`: a list of `k` device
            tensors, and float64 NumPy numbers.
        """
        m, rows = self.m, len(self.basis)
        dtype = self.op.dtype
        vector_coeffs = np.zeros((s.shape[1], rows))
        vector_coeffs[:, :m] = s.T
        product_coeffs = (self.coeffs[:rows, :m] @ s).T
        vectors, values, residuals = [], [], []
        for i in range(s.shape[1]):  # one pair at a time: temporaries of one vector
            y = self.basis.combine(tf.constant(vector_coeffs[i:i + 1], dtype))
            hy = self.basis.combine(tf.constant(product_coeffs[i:i + 1], dtype))
            vector, value, residual = _ritz_pair(y[0], hy[0], theta[i])
            vectors.append(vector)
            values.append(float(value))
            residuals.append(float(residual))
        return vectors, np.array(values), np.array(residuals)

    def restart(self, s_keep):
        """Keeps the Ritz vectors `Q s_keep` and the next direction."""
        m, keep = self.m, s_keep.shape[1]
        combine = np.zeros((keep + 1, len(self.basis)))
        combine[:keep, :m] = s_keep.T
        combine[keep, m] = 1.0  # the pending next vector moves to row keep
        self.basis = self.basis.rebuilt(tf.constant(combine, self.op.dtype))
        self._current, self._previous = self.basis[keep], self.basis[keep - 1]
        coeffs = np.zeros_like(self.coeffs)
        coeffs[:keep, :keep] = s_keep.T @ self.coeffs[:m, :m] @ s_keep
        coeffs[keep, :keep] = self.coeffs[m, :m] @ s_keep
        self.coeffs, self.m = coeffs, keep


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


def _wanted(m, top_k, smallest):
    """Indices (into ascending Ritz values) of the wanted pairs."""
    wanted = list(range(m - 1, max(m - 1 - top_k, -1), -1))
    if smallest and 0 not in wanted:
        wanted.append(0)
    return wanted


def _kept(m, capacity, top_k, smallest):
    """Indices of the Ritz vectors a thick restart keeps: the wanted ends
    and about half the basis, so each cycle adds as many new directions."""
    wanted = top_k + int(smallest)
    keep = min(m - 1, max(wanted + 2, (capacity - 1) // 2))
    low = 1 + (keep - wanted) // 2 if smallest else 0
    return list(range(low)) + list(range(m - (keep - low), m))


# A residual below this many machine epsilons of ||H|| is rounding: the
# floor of `_thresholds` (float32: 1.2e-5 ||H||, above the ~1e-6 ||H|| that
# float32 HVPs reach).
ROUNDING_EPSILONS = 100


def _epsilon(dtype):
    """Machine epsilon of a floating `tf.DType` (bfloat16: 2**-8)."""
    if dtype == tf.bfloat16:
        return 2.0 ** -8
    return float(np.finfo(dtype.as_numpy_dtype).eps)


def _thresholds(values, norm_est, dtype, tol):
    """The residual each eigenvalue must reach to be reported converged.

    `tol * |lambda|`: the residual `r` of a unit vector bounds the distance
    from its Rayleigh quotient to the spectrum, so the value is then within
    `tol` of an eigenvalue relative to itself. Eigenvalues so small that this
    is below the operator's rounding level (`ROUNDING_EPSILONS` machine
    epsilons of `||H||`, `norm_est`) get that absolute floor instead, never
    more than `tol * ||H||`.
    """
    floor = min(tol, ROUNDING_EPSILONS * _epsilon(dtype)) * norm_est
    return np.maximum(tol * np.abs(np.asarray(values, np.float64)), floor)


def _lanczos(op, top_k, smallest, tol, max_steps, capacity, start, rng,
             norm_est=0.0, slack=None):
    """Thick-restart Lanczos for the extreme eigenpairs.

    Returns `(values, vectors, residuals, converged, norm_est)` for the
    wanted Ritz pairs (the `top_k` largest, then the smallest if
    `smallest`); `vectors` is a list of device tensors, `norm_est` the
    largest |Ritz value| seen (at least the given one). `slack`, given the
    wanted Ritz values, returns residuals to accept beyond `_thresholds`
    (`_complement_check`'s looser test).
    """

    def thresholds(values):
        limit = _thresholds(values, norm_est, op.dtype, tol)
        return limit if slack is None else np.maximum(limit, slack(values))

    n = getattr(op, "dimension", op.num_params)
    lanczos = _Lanczos(op, capacity, start)
    first = op.count
    wanted_count = min(top_k + int(smallest), n)
    # A new direction below this share of ||T|| is an invariant subspace:
    # its coupling is dropped from the Arnoldi relation, so it must stay
    # below every pair's threshold (at `tol` relative to ||H||, a dropped
    # coupling made a reported residual 5.8e-6 where the explicit one was
    # 1.2e-2).
    floor = 0.1 * min(tol, ROUNDING_EPSILONS * _epsilon(op.dtype))
    while True:
        lanczos.step(floor, rng)
        theta, s, estimates = lanczos.ritz()
        norm_est = max(norm_est, abs(theta[0]), abs(theta[-1]))
        wanted = _wanted(lanczos.m, top_k, smallest)
        exhausted = op.count - first >= max_steps or lanczos.m >= n
        if exhausted or (len(wanted) >= wanted_count and np.all(
                estimates[wanted] <= thresholds(theta[wanted]))):
            # The check costs no HVP: it combines stored vectors.
            vectors, values, residuals = lanczos.pairs(
                theta[wanted], s[:, wanted]
            )
            norm_est = max(norm_est, np.max(np.abs(values)))
            ok = bool(np.all(residuals <= thresholds(values)))
            if ok or exhausted:
                return values, vectors, residuals, ok, norm_est
        if lanczos.m >= capacity - 1:
            lanczos.restart(
                s[:, _kept(lanczos.m, capacity, top_k, smallest)]
            )


class _Deflated:
    """`P H P`, `P` the projector on the complement of locked unit vectors.

    The locked vectors are eigenvectors of this operator for the eigenvalue
    0, and its other eigenpairs are those of `H` on the complement (to the
    locked pairs' residuals squared). `dimension` is the complement's.
    """

    def __init__(self, op, locked):
        self.op = op
        self.num_params, self.dtype = op.num_params, op.dtype
        self.dimension = op.num_params - len(locked)
        # An orthonormal basis of their span: vectors orthogonal only to
        # rounding (power iteration's, float64 rounded to float32) would
        # leave `||H||` times their overlaps in every product.
        basis, _ = tf.linalg.qr(tf.transpose(tf.stack(locked)))
        self._locked = tf.transpose(basis)

    @property
    def count(self):
        return self.op.count

    def project(self, vector):
        """`P v` for a flat device tensor (twice: rounding stays out)."""
        for _ in range(2):
            vector = vector - tf.linalg.matvec(
                self._locked, tf.linalg.matvec(self._locked, vector),
                transpose_a=True)
        return vector

    def apply(self, vector):
        return self.project(self.op.apply(self.project(vector)))


# `_complement_check` resolves a Ritz value below its bound to this share of
# the distance (a skipped eigenvalue's Ritz value rises above it first).
_CHECK_SLACK = 0.1


def _complement_check(op, top, low, tol, budget, capacity, rng, norm_est,
                      hint=None):
    """Locks the converged pairs and looks for a skipped one in their complement.

    `top` is the list of the largest converged pairs `(value, device vector,
    residual)`, `low` the smallest one or `None`. Lanczos from a random
    vector orthogonal to all locked vectors runs on `P H P` until its
    largest (and smallest) Ritz pair is resolved: to `_CHECK_SLACK` of its
    distance from the bound (the smallest reported value plus its
    threshold; the reported minimum minus its threshold), or by the full
    test of `_thresholds` when it is not clear of the bound. A value beyond
    the bound is an eigenvalue the first run skipped. It is locked in turn
    (its residual for `H` from one explicit HVP), the reported pairs are
    chosen again among all locked ones, and a new pass runs, until a pass
    finds nothing. The first pass starts from `hint` (a previous check's
    vector, device) plus an equal share of the random vector, when given:
    an eigenvalue that rose past the reported ones since is usually that
    one, found at once. Returns `(top pairs, minimum pair or None,
    verified, norm_est, the last pass's top Ritz vector or None)`;
    `verified` is False if the budget ran out first.
    """
    n = op.num_params
    smallest = low is not None
    top_k = len(top)
    top = sorted(top, key=lambda p: -p[0])
    locked = top + ([low] if smallest else [])
    first = op.count
    checked = None
    while len(locked) < n:
        left = budget - (op.count - first)
        if left <= 0:
            return top, low, False, norm_est, checked
        deflated = _Deflated(op, [p[1] for p in locked])
        start = _random_vector(rng, n, op.dtype)
        if hint is not None:
            start = start / tf.norm(start) + hint / tf.norm(hint)
            hint = None
        start = deflated.project(start)
        high = top[-1][0] + _thresholds(top[-1][0], norm_est, op.dtype, tol)
        bounds = [high] + ([low[0] - _thresholds(
            low[0], norm_est, op.dtype, tol)] if smallest else [])

        def slack(values):
            # A pair whose value stands clear of its bound need only be
            # resolved to a tenth of the distance: enough to tell.
            return np.array([_CHECK_SLACK * max(0.0, (b - v) * sign)
                             for v, b, sign in zip(values, bounds, (1, -1))])

        values, vectors, residuals, ok, norm_est = _lanczos(
            deflated, 1, smallest, tol, left,
            min(capacity, deflated.dimension + 1), start, rng, norm_est,
            slack)
        if not ok:
            return top, low, False, norm_est, checked
        found = []
        if values[0] > high:
            found.append(0)
        if smallest and len(values) > 1 and values[-1] < bounds[1]:
            found.append(len(values) - 1)
        checked = vectors[0]
        if not found:
            return top, low, True, norm_est, checked
        for i in found:
            vector = vectors[i]
            residual = float(_norm(op.apply(vector) - values[i] * vector))
            pair = (float(values[i]), vector, residual)
            locked.append(pair)
            if i == 0:
                top = sorted(top + [pair], key=lambda p: -p[0])[:top_k]
            else:
                low = pair
    return top, low, True, norm_est, checked


def _power(hvp, shift, deflate, start, tol, norm_floor, max_hvps):
    """Power iteration on `P (H - shift I) P`, `P` projecting out `deflate`.

    Stops when the residual `||P H v - (v.Hv) v||` of the current unit
    vector (`v = P v`) falls below its threshold (`_thresholds`, with
    `max(norm_floor, |v.Hv|)` as the estimate of `||H||`). The part
    of `H v` inside the deflated space is left to the final Rayleigh-Ritz
    step of `_power_spectrum`.
    Returns `(eigenvalue, vector, H vector, hvps used, converged)`.
    """
    dtype = hvp.dtype
    v = _orthogonalise(start, deflate)
    v /= np.linalg.norm(v)
    value, hv = 0.0, None
    for used in range(1, max_hvps + 1):
        hv = hvp(v)
        value = float(v @ hv)
        projected = _orthogonalise(hv, deflate)
        residual = float(np.linalg.norm(projected - value * v))
        if residual <= _thresholds(value, max(norm_floor, abs(value)),
                                   dtype, tol):
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


def _power_spectrum(hvp, top_k, smallest, tol, max_hvps, init, rng,
                    check_rng=None, hint=None):
    """Top-k (and smallest) eigenpairs by deflated, shifted power iteration.

    Returns `(values, vectors, residuals, minimum, converged,
    check_vector)` (see `_checked`, which checks them for skipped ones);
    values are descending, `minimum` is `(value, vector, residual)` or
    `None`.
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
            remaining -= used
            low = (v, hv, ok)
        v, hv, ok = low
        value = float(v @ hv)
        minimum = (value, v, float(np.linalg.norm(hv - value * v)))
        converged &= ok
    norm_est = max(norm_floor, np.abs(values).max(),
                   abs(minimum[0]) if minimum else 0.0)
    converged &= bool(np.all(residuals <= _thresholds(
        values, norm_est, hvp.dtype, tol)))
    # The same check for skipped eigenvalues as Lanczos', on the device.
    pairs = [(value, hvp.to_tensor(vector), residual) for value, vector,
             residual in zip(values, vectors, residuals)]
    if minimum is not None:
        pairs.append((minimum[0], hvp.to_tensor(minimum[1]), minimum[2]))
    wanted = top_k + int(smallest)
    return _checked(hvp, pairs, top_k, smallest, tol, converged,
                    max(0, remaining), min(n + 1, max(14, 2 * wanted + 8)),
                    check_rng or rng, norm_est, hint)


def spectrum(
    model,
    data=None,
    top_k=1,
    method="lanczos",
    smallest=False,
    tol=1e-4,
    max_hvps=None,
    init_vectors=None,
    seed=None,
    hvp_mode=None,
    max_vectors=None,
    preconditioner=None,
):
    """Computes the largest (and optionally smallest) Hessian eigenvalues.

    Eigenvalues are algebraic: `eigenvalues[0]` is the sharpness (the
    largest eigenvalue), not the eigenvalue of largest magnitude.

    A pair `(lambda, v)`, `||v|| = 1`, is converged when
    `||H v - lambda v|| <= max(tol * |lambda|, floor)`: the residual bounds
    the distance from `lambda` to the spectrum, so a converged value is
    within `tol` of an eigenvalue *relative to itself* (for an isolated
    eigenvalue the error is of order residual**2 / gap, far smaller).
    `floor = min(tol, 100 eps) * ||H||` (`eps` the machine epsilon of the
    operator's dtype, 1.2e-7 for float32; `||H||` the largest magnitude
    among the Ritz values seen) is the rounding level of the HVPs: an
    eigenvalue smaller than `floor / tol` (about `1.2e-5 ||H|| / tol` in
    float32) is accurate to `floor`, absolutely. The second and later
    eigenvalues, often 50-500x smaller than the first, are held to their
    own size, not to `||H||`.

    That the i-th value is the i-th eigenvalue (none was skipped) is then
    checked: the converged pairs are locked and Lanczos runs from a random
    vector orthogonal to them, on `P H P` (`P` projecting them out), until
    its largest Ritz value is resolved (to a tenth of its distance from
    the smallest reported eigenvalue plus that one's threshold, or to the
    tolerance above when it is not below). A value above that bound is an
    eigenvalue the first run skipped (a Ritz value never exceeds the
    largest eigenvalue): it is locked in turn, the `top_k` largest locked
    pairs are kept, and another pass runs until one finds nothing (the same
    for the smallest eigenvalue with `smallest=True`, from below). A random
    start has a component along every eigenvector, so a skipped eigenvalue
    rises first in that run; as with any Krylov method this is a
    check with high probability, not a proof. It costs a few HVPs (often
    as many as the first run), counted in `hvp_count` and `max_hvps`.

    `method="lanczos"` runs Lanczos with full reorthogonalisation (every new
    vector is orthogonalised, twice, against all stored ones) and thick
    restarts (Wu and Simon 2000): the vectors stay on the model's device in
    its dtype, at most `max_vectors` of them, and when they are all used the
    wanted Ritz vectors and about half the others are kept. Only the small
    projected matrix and its Ritz algebra are float64 NumPy. When the
    recurrence estimates say the wanted pairs have converged, their
    Rayleigh quotients and residuals are computed on the device from the
    stored vectors and the products `H q` they came from (exact linear
    combinations of the HVPs, to rounding), so the check costs no HVP.
    `method="power"` runs power iteration with projection deflation (each
    deflated run stops at `tol / 2` on the residual outside the deflated
    space, then one Rayleigh-Ritz step on the found vectors, using their
    HVPs, removes the coupling between them); if a negative eigenvalue
    dominates it shifts the operator so that the largest algebraic
    eigenvalues are found, and `smallest=True` runs power iteration on
    `H - lambda_max I`. Its vectors are float64 NumPy on the host.

    Args:
        model: a built, compiled Keras model (see `make_hvp`), or a
            `HessianVectorProduct` to reuse (then `data` must be `None`).
        data: a batch, list of batches, finite `tf.data.Dataset` or
            `ProbeData` (see `make_hvp`); the Hessian is that of the mean
            loss over it. Defaults to `None` (only with an operator).
        top_k: number of largest eigenvalues. Defaults to `1`.
        method: `"lanczos"` or `"power"`. Defaults to `"lanczos"`.
        smallest: also compute the smallest algebraic eigenvalue. Defaults
            to `False`.
        tol: residual tolerance relative to each eigenvalue (see above),
            in (0, 1). Defaults to `1e-4`. Float32 HVPs put a floor near
            `1e-6 ||H||` on residuals: below about `1e-5 ||H||`, values are
            accurate to `1.2e-5 ||H||` absolutely.
        max_hvps: HVP budget. Defaults to `None`:
            `200 + 20 * (top_k + smallest)` for Lanczos, `1000 * (top_k + 1)`
            for power iteration (shared among the eigenvalues).
        init_vectors: warm start: a previous `Spectrum`, or its
            `eigenvectors` (`[m, num_params]` or `[num_params]`), or a list of
            per-variable array lists. Lanczos starts from their normalised
            sum (for `m >= 1` its Krylov space holds all of them after `m`
            steps); power iteration starts eigenvector `i` from row `i`.
            Defaults to `None`: a random start.
        seed: seed of the NumPy generator used for random starts. Defaults
            to `None`.
        hvp_mode: see `make_hvp`. Defaults to `None`.
        max_vectors: Lanczos basis size (memory: this many vectors of
            `num_params` entries in the model's dtype). Defaults to `None`:
            `max(14, 2 * (top_k + smallest) + 8)`, at most
            `num_params + 1`.
        preconditioner: a positive diagonal `P` (flat, or per-variable
            arrays) or a Keras optimizer whose last update's `P` is read
            (see `precondition`): the spectrum is then that of the symmetric
            `P^-1/2 H P^-1/2` (the eigenvalues of `P^-1 H`, the
            preconditioned sharpness first), with residuals and eigenvectors
            of that operator, and `tol` relative to its norm. Warm-start it
            from a preconditioned `Spectrum` only. Defaults to `None`: `H`.

    Returns:
        A `Spectrum`. If the budget ran out first (the check for skipped
        eigenvalues included), `converged` is False and a warning is
        issued; the best pairs found are returned anyway.

    References:
        C. Lanczos, "An iteration method for the solution of the eigenvalue
        problem of linear differential and integral operators", J. Res.
        Nat. Bur. Standards 45 (1950).
        K. Wu and H. Simon, "Thick-restart Lanczos method for large
        symmetric eigenvalue problems", SIAM J. Matrix Anal. Appl. 22(2),
        2000.
        G. H. Golub and C. F. Van Loan, "Matrix Computations", 4th ed.,
        ch. 10 (Lanczos with full reorthogonalisation) and 8.2 (power
        method), 2013.
        Z. Yao, A. Gholami, K. Keutzer, M. Mahoney, "PyHessian: Neural
        Networks Through the Lens of the Hessian", IEEE BigData 2020.
        J. Cohen et al., "Adaptive Gradient Methods at the Edge of
        Stability", arXiv:2207.14484, 2022 (preconditioned sharpness).

    Example:

    ```python
    spec = spectrum(model, (x, y), top_k=3, smallest=True, seed=0)
    sharpness = spec.eigenvalues[0]
    later = spectrum(model, (x, y), top_k=3, init_vectors=spec)
    ```
    """
    _check_spectrum_args(method, top_k, smallest, tol, max_hvps, max_vectors)
    seed = check_seed(seed)
    hvp = _operator(model, data, hvp_mode, preconditioner)
    first = hvp.count
    n = hvp.num_params
    if top_k > n:
        raise ValueError(
            "Invalid value for argument `top_k`. Expected at most the number "
            f"of trainable parameters ({n}). Received: top_k={top_k}"
        )
    rng = np.random.default_rng(seed)
    # The check for skipped eigenvalues draws from a stream of its own: with
    # one seed, a cold and a warm start check from the same vector.
    check_rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(1)[0])
    init = _init_matrix(init_vectors, hvp)
    hint = getattr(init_vectors, "check_vector", None) if isinstance(
        init_vectors, Spectrum) else None
    if hint is not None and np.shape(hint) != (n,):
        hint = None
    if method == "lanczos":
        eigenvalues, eigenvectors, residuals, minimum, converged, checked = (
            _lanczos_spectrum(hvp, top_k, smallest, tol, max_hvps,
                              max_vectors, init, rng, check_rng, hint)
        )
    else:
        budget = max_hvps or 1000 * (top_k + 1)
        eigenvalues, eigenvectors, residuals, minimum, converged, checked = (
            _power_spectrum(hvp, top_k, smallest, tol, budget, init, rng,
                            check_rng, hint)
        )
    if not converged:
        warnings.warn(
            f"Hessian spectrum ({method}) did not reach tol={tol} (relative "
            "to each eigenvalue), or could not finish checking that no "
            f"eigenvalue was skipped, within its HVP budget ({hvp.count - first}"
            " HVPs); returning the best estimates, marked converged=False. "
            "Pass a larger `max_hvps` or `tol`.",
            stacklevel=2,
        )
    return Spectrum(
        eigenvalues=np.asarray(eigenvalues, np.float64),
        eigenvectors=np.asarray(eigenvectors, np.float64),
        residuals=np.asarray(residuals, np.float64),
        hvp_count=hvp.count - first,
        converged=bool(converged),
        min_eigenvalue=None if minimum is None else float(minimum[0]),
        min_eigenvector=None if minimum is None else minimum[1],
        min_residual=None if minimum is None else float(minimum[2]),
        check_vector=checked,
    )


def _check_spectrum_args(method, top_k, smallest, tol, max_hvps, max_vectors):
    if method not in SPECTRUM_METHODS:
        raise ValueError(
            "Invalid value for argument `method`. Expected one of "
            f"{SPECTRUM_METHODS}. Received: method={method!r}"
        )
    check_positive_int("top_k", top_k)
    check_bool("smallest", smallest)
    check_tol(tol)
    if max_hvps is not None:
        check_positive_int("max_hvps", max_hvps)
    if max_vectors is not None and (
        check_positive_int("max_vectors", max_vectors)
        < top_k + int(smallest) + 3
    ):
        raise invalid(
            "max_vectors", "at least top_k + smallest + 3 (the wanted pairs "
            "and room to grow between restarts)", max_vectors,
        )


def _lanczos_spectrum(hvp, top_k, smallest, tol, max_hvps, max_vectors,
                      init, rng, check_rng=None, hint=None):
    """Runs `_lanczos` and sorts its pairs as `Spectrum` wants them.

    Returns `(eigenvalues, eigenvectors, residuals, minimum, converged,
    check_vector)`, eigenvectors as float64 NumPy, `minimum` as in
    `_power_spectrum`.
    """
    n = hvp.num_params
    first = hvp.count
    wanted = top_k + int(smallest)
    steps = max_hvps or 200 + 20 * wanted
    capacity = min(n + 1, max_vectors or max(14, 2 * wanted + 8))
    if len(init) and np.linalg.norm(init.sum(axis=0)) >= 1e-8:
        start = hvp.to_tensor(init.sum(axis=0))
    else:  # cold, or e.g. v and -v: a random start
        start = _random_vector(rng, n, hvp.dtype)
    values, vectors, residuals, converged, norm_est = _lanczos(
        hvp, top_k, smallest, tol, steps, capacity, start, rng
    )
    pairs = list(zip(values, vectors, residuals))
    return _checked(hvp, pairs, top_k, smallest, tol, converged,
                    steps - (hvp.count - first), capacity, check_rng or rng,
                    norm_est, hint)


def _checked(hvp, pairs, top_k, smallest, tol, converged, budget, capacity,
             rng, norm_est, hint=None):
    """Runs `_complement_check` on converged pairs (the `top_k` largest
    then the smallest if `smallest`, vectors on the device) and returns
    `(eigenvalues, eigenvectors, residuals, minimum, converged,
    check_vector)` as `_power_spectrum` does, eigenvectors as float64
    NumPy; `hint`: a previous check vector (host) or `None`."""
    n = hvp.num_params
    count = min(top_k, n, len(pairs))
    top, low = pairs[:count], None
    if smallest:  # no pair of its own when the wanted ones cover the basis
        low = pairs[count] if len(pairs) > count else min(top, key=lambda p: p[0])
    checked = None
    if converged and len(top) + int(smallest) < n:
        top, low, converged, norm_est, checked = _complement_check(
            hvp, top, low, tol, budget, capacity, rng, norm_est,
            None if hint is None else hvp.to_tensor(hint))
    top = sorted(top, key=lambda p: -p[0])
    minimum = None if low is None else (float(low[0]), _host(low[1]),
                                        float(low[2]))
    # One vector at a time to the host: no second copy of all of them.
    eigenvectors = np.empty((count, n))
    for row, pair in enumerate(top):
        eigenvectors[row] = pair[1].numpy()
    values = np.array([p[0] for p in top], np.float64)
    residuals = np.array([p[2] for p in top], np.float64)
    thresholds = _thresholds(np.append(values, [] if low is None else low[0]),
                             norm_est, hvp.dtype, tol)
    converged = converged and bool(np.all(np.append(
        residuals, [] if low is None else low[2]) <= thresholds))
    return (values, eigenvectors, residuals, minimum, converged,
            None if checked is None else _host(checked))


def _host(vector):
    return vector.numpy().astype(np.float64)


def gradient_overlap(eigenvectors, gradient):
    """The share of `|g|^2` in the span of the top Hessian eigenvectors.

    `sum_i (v_i . g)^2 / |g|^2` for orthonormal `v_i` (the vectors are
    orthonormalised first, so any basis of the span gives the same number):
    1 when the gradient lies in the top eigenspace, `k / n` on average for a
    random direction. Gur-Ari et al. found it close to 1 for the top-k
    eigenvectors (k = number of classes) after a short initial phase.

    Args:
        eigenvectors: a `Spectrum` of `H` (not a preconditioned one), or its
            `eigenvectors` (`[k, num_params]`, or `[num_params]`).
        gradient: the gradient as a flat vector, or the `HessianVectorProduct`
            the spectrum came from (its probe-data gradient, one backward
            pass).

    Returns:
        A float in [0, 1]; `nan` for a zero gradient.

    References:
        G. Gur-Ari, D. A. Roberts, E. Dyer, "Gradient Descent Happens in a
        Tiny Subspace", arXiv:1812.04754, 2018.
    """
    if isinstance(eigenvectors, Spectrum):
        eigenvectors = eigenvectors.eigenvectors
    if isinstance(gradient, HessianVectorProduct):
        gradient = gradient.gradient()[1]
    vectors = np.atleast_2d(np.asarray(eigenvectors, np.float64))
    g = np.asarray(gradient, np.float64).reshape(-1)
    if vectors.ndim != 2 or vectors.shape[1] != g.size:
        raise invalid("eigenvectors", f"vectors of length {g.size} (the gradient's)",
                      f"an array of shape {vectors.shape}")
    squared = float(g @ g)
    if squared == 0.0:
        return float("nan")
    basis, _ = np.linalg.qr(vectors.T)  # orthonormal columns spanning the vectors
    return float(np.sum(np.square(basis.T @ g)) / squared)


def trace(model, data=None, num_samples=100, seed=None, hvp_mode=None):
    """Estimates the Hessian trace with Hutchinson's estimator.

    `tr(H) = E[z^T H z]` for Rademacher `z` (entries +-1 with probability
    1/2), which has the smallest variance among i.i.d. probe distributions.
    The probes are drawn on the model's device (stateless ops seeded from a
    NumPy generator) and never pass through the host.

    Args:
        model: a built, compiled Keras model (see `make_hvp`), or a
            `HessianVectorProduct` to reuse (then `data` must be `None`).
        data: a batch, list of batches, finite dataset or `ProbeData` (see
            `make_hvp`). Defaults to `None` (only with an operator).
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
    check_positive_int("num_samples", num_samples)
    rng = np.random.default_rng(check_seed(seed))
    hvp = _operator(model, data, hvp_mode)
    samples = np.empty(num_samples)
    for i in range(num_samples):
        z = _random_vector(rng, hvp.num_params, hvp.dtype, rademacher=True)
        samples[i] = float(_dot64(z, hvp.apply(z)))
    stderr = (
        float(samples.std(ddof=1) / math.sqrt(num_samples))
        if num_samples > 1 else float("nan")
    )
    return TraceEstimate(float(samples.mean()), stderr, num_samples)


@tf.function(reduce_retracing=True)
def _dot64(a, b):
    # float64 accumulation: a float32 sum over millions of terms loses digits.
    return tf.reduce_sum(tf.cast(a, tf.float64) * tf.cast(b, tf.float64))


def _slq_probe(hvp, q, steps):
    """Gauss quadrature nodes and weights of one SLQ probe.

    Plain Lanczos from unit `q` (the same `_Lanczos` as `spectrum`, with
    room for all `steps` vectors and no restart, which would change the
    quadrature). Stops early on an invariant Krylov space, where the
    quadrature is exact. Returns `(nodes, weights)`.
    """
    lanczos = _Lanczos(hvp, steps + 1, q)
    for _ in range(steps):
        if lanczos.step(1e-6):
            break
    m = lanczos.m
    block = lanczos.coeffs[:m, :m]
    theta, s = np.linalg.eigh(0.5 * (block + block.T))
    return theta, s[0] ** 2


def _check_grid(grid):
    """`grid` as an int (>= 2 points) or a finite increasing float64 array."""
    expected = ("an integer >= 2 or an increasing array of at least 2 finite "
                "points")
    if np.ndim(grid) == 0:
        if check_positive_int("grid", grid) < 2:
            raise invalid("grid", expected, grid)
        return int(grid)
    try:
        points = np.asarray(grid, np.float64)
    except (TypeError, ValueError):
        raise invalid("grid", expected, grid) from None
    if points.ndim != 1 or points.size < 2 or not np.all(
            np.isfinite(points)) or not np.all(np.diff(points) > 0):
        raise invalid("grid", expected, grid)
    return points


def density(
    model,
    data=None,
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
    is then smoothed with a Gaussian kernel of width `sigma`. The Lanczos
    vectors (`num_steps + 1` of them) stay on the model's device.

    Args:
        model: a built, compiled Keras model (see `make_hvp`), or a
            `HessianVectorProduct` to reuse (then `data` must be `None`).
        data: a batch, list of batches, finite dataset or `ProbeData` (see
            `make_hvp`). Defaults to `None` (only with an operator).
        num_probes: number of random probes. Defaults to `4`.
        num_steps: Lanczos steps per probe (capped at the number of
            parameters). Defaults to `40`.
        seed: seed of the NumPy generator drawing the probes. Defaults to
            `None`.
        grid: number of evenly spaced grid points (>= 2), or an increasing
            array of at least 2 finite points. A generated grid spans the
            extreme nodes extended by `5 * sigma + 0.01 * width` on each
            side, so it covers the true `[lambda_min, lambda_max]` (extreme
            Ritz values converge first) and the kernel tails. Defaults to
            `1000`.
        sigma: Gaussian kernel standard deviation, a positive finite
            number. Defaults to `None`: 1% of the node range
            (`max(nodes) - min(nodes)`).
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
    check_positive_int("num_probes", num_probes)
    check_positive_int("num_steps", num_steps)
    if sigma is not None:
        sigma = check_positive("sigma", sigma)
    grid = _check_grid(grid)
    rng = np.random.default_rng(check_seed(seed))
    hvp = _operator(model, data, hvp_mode)
    first, n = hvp.count, hvp.num_params
    nodes, weights = [], []
    for _ in range(num_probes):
        z = _random_vector(rng, n, hvp.dtype, rademacher=True)
        theta, tau = _slq_probe(hvp, z, min(num_steps, n))
        nodes.append(theta)
        weights.append(tau / num_probes)
    nodes = np.concatenate(nodes)
    weights = np.concatenate(weights)
    return _smoothed(nodes, weights, grid, sigma, hvp.count - first)


def _smoothed(nodes, weights, grid, sigma, hvp_count):
    """The `Density` of quadrature `nodes`/`weights` on `grid`."""
    lo, hi = float(nodes.min()), float(nodes.max())
    width = hi - lo
    if sigma is None:
        sigma = 0.01 * width if width > 0 else 0.01 * max(abs(hi), 1e-12)
    if np.ndim(grid) == 0:
        pad = 5.0 * sigma + 0.01 * width
        points = np.linspace(lo - pad, hi + pad, int(grid))
    else:
        points = grid
    kernel = np.exp(-0.5 * ((points[:, None] - nodes[None, :]) / sigma) ** 2)
    values = kernel @ weights / (sigma * math.sqrt(2.0 * math.pi))
    return Density(points, values, nodes, weights, float(sigma), hvp_count)
