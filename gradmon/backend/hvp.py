"""What the Hessian side needs from a framework, chosen by `keras.backend.backend()`.

Everything else on the Hessian side is `keras.ops` on device vectors and float64
NumPy on the host. Per framework (`hvp_tensorflow`, `hvp_jax`, `hvp_torch`):

- `Derivatives(model, variables, block, hvp_mode, dtype, batch_loss)`: the
  compiled Hessian-vector product and gradient of `batch_loss` with respect to
  the variables `block` indexes: `product_function(x, y, sample_weight, v)`
  returns the function `(x, y, sample_weight, v) -> H v` (flat `v`) for
  arguments like these, `gradient(x, y, sample_weight)` the loss and gradient,
  `trace_count` the traces. Nested tapes or a forward accumulator in a
  `tf.function` on TensorFlow; `jax.grad` / `jax.jvp` over the stateless loss
  under `jax.jit` on JAX; double backward or `torch.func.jvp` over
  `torch.func.grad`, eager, on PyTorch;
- `compile_layout(fn, example_args)`: the function that runs the Lanczos
  basis algebra for one basis layout, any vector length: on TensorFlow a
  `tf.function`'s concrete function; on JAX and PyTorch `fn` itself, run op
  by op (a layout is used for a few steps only: jitting each of them cost
  more than it saved, 21 s of XLA compiles for a first 29-HVP spectrum), with
  `cond(pred, true_fn, false_fn)` and `switch(index, branches)` host branches
  there, `tf.cond` / `tf.switch_case` in a graph; `PADDED_LAYOUTS` (whether
  the basis parts are padded to a few sizes, so that few layouts are
  compiled: TensorFlow) and `layout_count(count)` (the number of filled parts
  as the compiled function takes it);
- `random_vector(rng, n, dtype, rademacher)`, `dot64(a, b)` (float64
  accumulation), `to_tensor(array, dtype)`, `host_array(tensor)` (the one
  device-to-host read), `vector_dtype(numpy_dtype)`, `read_values(variables)`;
- the products whose form matters for speed or precision: `matvec(matrix,
  vector, transpose)`, `matmul(a, b)`, `vdot(a, b)` (`[a.b]`), `add_n(tensors)`;
- `is_chief(model)`: whether this process probes and writes (`HessianMonitor`);
- `data_errors()` (the framework's errors a model raises on bad data) and
  `dataset_kind(data)` (`"finite"`, `"infinite"` or `"unknown"` for a
  `tf.data.Dataset`, else `None`).

The module of the running backend is imported on first use, so `import
gradmon.hessian` under JAX or PyTorch imports no TensorFlow.
"""

import importlib

import keras
import numpy as np

_MODULES = {
    "tensorflow": "gradmon.backend.hvp_tensorflow",
    "jax": "gradmon.backend.hvp_jax",
    "torch": "gradmon.backend.hvp_torch",
}
_LOADED = {}


def current():
    """The implementation module of Keras' backend.

    Raises:
        NotImplementedError: naming the backend, for one the Hessian side does not
            support (e.g. `"numpy"`, `"openvino"`: they have no autodiff).
    """
    name = keras.backend.backend()
    module = _LOADED.get(name)  # no import machinery while a graph is traced
    if module is not None:
        return module
    if name not in _MODULES:
        raise NotImplementedError(
            f"gradmon.hessian needs automatic differentiation of second order: it runs "
            f"when Keras runs on {', '.join(sorted(_MODULES))}. Received: the Keras "
            f"backend {name!r}"
        )
    _LOADED[name] = importlib.import_module(_MODULES[name])
    return _LOADED[name]


def to_host(tensor):
    """A device tensor as a float64 NumPy array."""
    return np.asarray(current().host_array(tensor), np.float64)


def dtype_name(dtype):
    """A framework's dtype (or a name) as Keras' standard name (`"float32"`)."""
    return keras.backend.standardize_dtype(dtype)


def seeds(rng):
    """Two integers drawn from a NumPy generator: the seed of one random vector."""
    return rng.integers(0, 2**31 - 1, size=2)


def host_random_vector(rng, n, rademacher):
    """A float64 NumPy vector seeded from `rng` (as many draws from it as
    TensorFlow's stateless ops take: the streams after it stay aligned)."""
    draw = np.random.default_rng(seeds(rng))
    if rademacher:
        return 2.0 * draw.integers(0, 2, size=n) - 1.0
    return draw.standard_normal(n)


def host_cond(pred, true_fn, false_fn):
    """The branch `pred` selects, run eagerly (`pred` read on the host)."""
    return true_fn() if bool(pred) else false_fn()


def host_switch(index, branches):
    """`branches[index]()`, run eagerly (`index` a Python int)."""
    return branches[int(index)]()


def add_in_turn(tensors):
    """The sum of a list of tensors, added one at a time."""
    tensors = list(tensors)
    total = tensors[0]
    for t in tensors[1:]:
        total = total + t
    return total


def data_errors():
    """Errors a model raises on data it cannot take, beside Python's own: none but TensorFlow's."""
    return ()


def dataset_kind(data):
    """`None`: only TensorFlow has `tf.data.Dataset`s."""
    return None
