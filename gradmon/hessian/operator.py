"""The Hessian-vector product operator of a model's mean training loss.

`make_hvp` builds a `HessianVectorProduct`: the HVP of the loss defined in
`gradmon.hessian` (the compiled loss plus `model.losses`, `training=False`,
inside a `keras.StatelessScope`, size-weighted over the probe batches), traced
once per model, mode and block of variables; `precondition` wraps one as
`P^-1/2 H P^-1/2` (`PreconditionedOperator`). Both map flat device vectors
(`apply`) and host vectors (`__call__`).
"""

import weakref

import keras
import numpy as np

from gradmon.backend import hvp as _backend
from gradmon.backend import keras_compat as _keras_compat
from gradmon._validation import check_positive_int, invalid
from gradmon.hessian.data import (
    _batch_size,
    _check_input_shapes,
    _chunked,
    _layout,
    _naming_data,
    DEFAULT_MAX_BATCH_SIZE,
    prepare_data,
)


HVP_MODES = ("reverse_over_reverse", "forward_over_reverse")


# benchmarks/hessian.py, 2-core CPU, HVP time / gradient time: 1.6x vs 1.8x
# (digits 64-128-10, batch 512) and 1.5x vs 2.3x (784-512-10, batch 512) for
# reverse-over-reverse vs forward-over-reverse.
DEFAULT_HVP_MODE = "reverse_over_reverse"


def _check_model(model):
    if not getattr(model, "compiled", False):
        raise ValueError(
            "Invalid value for argument `model`. Expected a model compiled "
            "with a loss (`model.compile(loss=...)`). Received: an "
            f"uncompiled model {getattr(model, 'name', model)!r}"
        )


def _batch_loss(model, variables, params, x, y, sample_weight, initialize, others=()):
    # The stateless scope makes `params` the trainable values (and `others`,
    # `(variable, value)` pairs, the values of those variables) and swallows
    # every variable assignment made while computing the loss.
    with keras.StatelessScope(
        state_mapping=list(zip(variables, params)) + list(others),
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
    return keras.ops.cast(loss, params[0].dtype)


# model -> {(hvp_mode, dtype, variable ids, block): the backend's `Derivatives`};
# reusing the traced functions makes a periodic refresh (e.g. from a
# callback) cost no retrace.
_FUNCTION_CACHE = weakref.WeakKeyDictionary()


def _derivatives(model, variables, hvp_mode, dtype, block):
    """The backend's compiled HVP and gradient for this model, mode and block, cached."""
    key = (hvp_mode, _backend.dtype_name(dtype), tuple(id(v) for v in variables), block)

    def build():
        return _backend.current().Derivatives(
            model, variables, block, hvp_mode, dtype, _batch_loss)

    try:
        per_model = _FUNCTION_CACHE.setdefault(model, {})
    except TypeError:  # not weak-referenceable: no caching
        return build()
    if key not in per_model:
        per_model[key] = build()
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
    return _backend.current().vector_dtype(widest)


def _probe_batches(model, data, max_batch_size):
    """`(batches, weights)` of the probe data: checked against the model's
    input, the model built on it if it was not, large batches chunked."""
    probe = prepare_data(data)
    _check_input_shapes(model, probe.batches)
    if not model.built:
        with _naming_data(probe.batches[0]):
            model(probe.batches[0][0], training=False)  # creates the weights, nothing else
    return _chunked(model, probe, max_batch_size)


def _check_losses(model, trainable, batches):
    """One eager loss per batch layout: data the model or its loss cannot
    take fails here, naming `data`, not in the first probe. It also builds
    CompileLoss' trackers as `fit`/`evaluate` would (their zero state
    created here, outside any compiled function)."""
    compile_loss = getattr(model, "_compile_loss", None)
    build = compile_loss is not None and not compile_loss.built
    params = _backend.current().read_values(trainable)
    seen = set()
    for batch in batches:
        layout = _layout(batch)
        if layout in seen:
            continue
        seen.add(layout)
        with _naming_data(batch):
            _batch_loss(model, trainable, params, *batch, build)
        build = False


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
        dtype: the dtype of flat vectors (the variables' widest): a
            `tf.DType` on TensorFlow, Keras' name (`"float32"`) on JAX and
            PyTorch.
        hvp_mode: `"reverse_over_reverse"` or `"forward_over_reverse"`.
        count: number of HVPs computed so far.
        batch_sizes: the examples of each batch the HVP runs on, in order
            (probe batches above `max_batch_size` split into chunks).
    """

    def __init__(self, model, data, hvp_mode=None, variables=None,
                 max_batch_size=None, _within=None, _sibling=None):
        # Private: `_within`, variables around `variables` whose compiled
        # HVP serves this block (masked, `_Embedding`); `_sibling`, an
        # operator of the same model, mode and data whose checked batches
        # are taken as they are.
        _check_model(model)
        hvp_mode = DEFAULT_HVP_MODE if hvp_mode is None else hvp_mode
        if hvp_mode not in HVP_MODES:
            raise ValueError(
                f"Invalid value for argument `hvp_mode`. Expected one of "
                f"{HVP_MODES}. Received: hvp_mode={hvp_mode!r}"
            )
        max_batch_size = DEFAULT_MAX_BATCH_SIZE if max_batch_size is None \
            else check_positive_int("max_batch_size", max_batch_size)
        if _sibling is None:
            self._batches, self._weights = _probe_batches(model, data, max_batch_size)
        else:
            self._batches, self._weights = _sibling._batches, _sibling._weights
        self.batch_sizes = [_batch_size(b[0]) for b in self._batches]
        trainable = list(model.trainable_variables)
        if not trainable:
            raise ValueError(
                "Invalid value for argument `model`. Expected a model with "
                "trainable variables. Received: a model with none"
            )
        block = _block_indices(variables, trainable)
        self.variables = [trainable[i] for i in block]
        if _sibling is None:
            _check_losses(model, trainable, self._batches)
        self.shapes = [tuple(v.shape) for v in self.variables]
        self._sizes = [int(np.prod(s)) for s in self.shapes]
        self.num_params = int(sum(self._sizes))
        self.dtype = _vector_dtype(self.variables)
        self.hvp_mode = hvp_mode
        self.count = 0
        traced = block if _within is None else _block_indices(_within, trainable)
        self._embedding = None if traced == block else _Embedding(trainable, traced, block)
        self._derivatives = _derivatives(model, trainable, hvp_mode, self.dtype, traced)
        self._products = {}  # batch index -> the backend's product function for it

    @property
    def trace_count(self):
        """How many times the compiled HVP has been traced (per model; 0 on
        PyTorch, which runs it eagerly)."""
        return self._derivatives.trace_count

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
        return _backend.current().to_tensor(np.asarray(flat).reshape(-1), self.dtype)

    def apply(self, vector):
        """Returns `H v` for a flat tensor `v` of `num_params` entries.

        Args:
            vector: a flat tensor in `dtype` (a `tf.Tensor`, a JAX array,
                a `torch.Tensor`: Keras' backend's).

        Returns:
            `H v` as a flat tensor in `dtype`, where `v` lives.
        """
        if self._embedding is not None:
            vector = self._embedding.embed(vector)
        result = None
        for index, ((x, y, sw), weight) in enumerate(
                zip(self._batches, self._weights)):
            hv = self._product(index, x, y, sw, vector)
            if len(self._batches) > 1:
                hv = hv * weight
            result = hv if result is None else result + hv
        self.count += 1
        if self._embedding is not None:
            result = self._embedding.extract(result)
        return result

    def _product(self, index, x, y, sw, vector):
        # One function per batch (on TensorFlow its concrete function,
        # called directly: a fifth less call overhead than the `tf.function`,
        # 0.64 vs 0.81 ms an HVP on the digits MLP, the same single trace).
        if index not in self._products:
            self._products[index] = self._derivatives.product_function(
                x, y, sw, vector)
        return self._products[index](x, y, sw, vector)

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
            value, g = self._derivatives.gradient(x, y, sw)
            if self._embedding is not None:
                g = [g[i] for i in self._embedding.selected]
            loss += weight * float(value)
            grad += weight * np.concatenate(
                [_backend.to_host(t).reshape(-1) for t in g]
            )
        return loss, grad


class _Embedding:
    """A block of variables inside a wider traced block: flat vectors of the
    block are embedded in the wider one's (zeros elsewhere) and products
    read back at the block's entries, so `(H_WW e(v))_B = H_BB v`. Eager
    ops, one pass over the wider vector each: an operator per layer then
    shares its compiled HVP with its neighbours (`layer_operators`)."""

    def __init__(self, trainable, traced, block):
        sizes = {i: int(np.prod(trainable[i].shape)) for i in traced}
        offsets = dict(zip(traced, np.cumsum([0] + [sizes[i] for i in traced])))
        self.size = int(sum(sizes.values()))
        self.selected = [traced.index(i) for i in block]  # block variables among the traced
        positions = np.concatenate([np.arange(offsets[i], offsets[i] + sizes[i]) for i in block])
        contiguous = bool(np.all(np.diff(positions) == 1))
        self._range = (int(positions[0]), int(positions[-1]) + 1) if contiguous else None
        self._positions = None if contiguous else keras.ops.convert_to_tensor(positions[:, None], "int32")

    def embed(self, vector):
        if self._range is not None:
            start, stop = self._range
            return keras.ops.pad(vector, [[start, self.size - stop]])
        return keras.ops.scatter(self._positions, vector, (self.size,))

    def extract(self, vector):
        if self._range is not None:
            return vector[self._range[0]:self._range[1]]
        return keras.ops.take(vector, self._positions[:, 0])


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
    result = _backend.to_host(op.apply(op.to_tensor(flat)))
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
        hvp_mode: `"reverse_over_reverse"` (nested `tf.GradientTape`s; on
            JAX `jax.grad` of `<jax.grad, v>`; on PyTorch double backward) or
            `"forward_over_reverse"` (`tf.autodiff.ForwardAccumulator` over
            a tape; `jax.jvp` of `jax.grad`; `torch.func.jvp` of
            `torch.func.grad`). Defaults to `None`, meaning `DEFAULT_HVP_MODE`.
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
        `model` to `spectrum`, `trace` and `density` to share it. The
        compiled function (a `tf.function`, a `jax.jit`) is cached per model
        and mode, so building another one for new data of the same shapes
        does not retrace.

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
        import gradmon.hessian.preconditioner as _preconditioner

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
