"""Gradient checking: autodiff against finite differences and a manual gradient.

`check_gradients` differentiates a scalar function (a Python callable of
tensors, or a compiled Keras model's loss) three ways and compares them:

- autodiff: the gradient Keras' backend would use in training, custom
  gradients included: `tf.GradientTape` (`@tf.custom_gradient`) on TensorFlow,
  `jax.value_and_grad` (`jax.custom_vjp`) on JAX, `torch.autograd.grad`
  (`torch.autograd.Function`) on PyTorch;
- finite differences (FD): central differences of the function's values;
- manual (optional): a gradient you derived by hand.

A wrong custom gradient shows up as autodiff disagreeing with FD; a wrong
hand derivation as autodiff disagreeing with the manual gradient.

Finite differences. For a tensor with at most `max_elementwise` elements,
every element `j` is perturbed on its own:
`(f(theta + h_j e_j) - f(theta - h_j e_j)) / (2 h_j)` against `grad[j]`, with
`h_j = eps * max(1, |theta_j|)`. For a larger tensor, `directions` random unit
directions `u` (Gaussian, normalised, from `numpy.random.default_rng(seed)`)
are used: `(f(theta + h u) - f(theta - h u)) / (2 h)` against `<grad, u>`,
with `h = eps * max(1, max_j |theta_j|)`. Each tensor is perturbed separately
so a failure names it. The default `eps` is the cube root of the working
dtype's machine epsilon (about 6.1e-6 in float64 and 4.9e-3 in float32),
which balances the O(h^2) truncation error of central differences against
the O(machine_eps / h) rounding error. The step actually taken is measured
after rounding (`theta_plus - theta_minus`), so the quotient is exact with
respect to it.

Pass criterion, like `numpy.allclose` with the FD (or manual) value as the
reference:

    |autodiff - reference| <= atol + rtol * |reference| (+ floor)

where, for FD only, `floor = 16 * machine_eps * max(|f(theta+)|, |f(theta-)|)
/ (theta_plus - theta_minus)` is the rounding floor of the difference quotient
(negligible for losses near unit scale; it keeps large losses from failing
spuriously). Defaults (`DEFAULT_TOLERANCES`): float64 `rtol=1e-5, atol=1e-8`;
float32 `rtol=1e-2, atol=1e-3` (float32 finite differences only catch errors
of a few percent or more). The reported errors are the maximum absolute error
`|a - b|` and the maximum relative error `|a - b| / max(|a|, |b|)` (in
`[0, 2]`, 0 where both are 0).

Models. For a compiled `keras.Model` the function is the loss that
`model.compute_loss` returns (compiled loss, reduced as Keras reduces it, with
sample weights, plus `model.losses`: regulariser and `add_loss` terms) after a
`training=False` forward pass (Dropout off, BatchNormalization in inference
mode), as a function of `model.trainable_variables`. It is evaluated inside a
`keras.StatelessScope`, so no variable of any model is ever assigned. When the
requested dtype differs from the model's, a copy of the model is built in that
dtype (its layers re-created from their configs under that dtype policy, its
loss re-created under that `floatx`, its weights copied from the model), and
checked to give the same loss as the model. When no such copy can be built (a
subclassed model without `get_config`, a layer whose config does not
round-trip, an overridden `compute_loss` on a Sequential/Functional subclass),
the check falls back to the model itself in its own dtype, with that dtype's
default tolerances, warns, and records why in `GradientCheckReport.notes`.

Backends. The framework is Keras' (`keras.backend.backend()`); its tensors and
autodiff live in `gradmon.backend.gradcheck_{tensorflow,jax,torch}`, imported
on first use (`import gradmon.gradcheck` imports no TensorFlow on JAX or
PyTorch). Off TensorFlow, Keras demotes float64 results to float32
(`keras.backend.result_type`: a float64 Dense layer is exact to 1e-8..1e-7, not
1e-16), and JAX keeps float64 as float32 unless `jax_enable_x64` is on. A
float64 check therefore lifts Keras' demotion and, on JAX, switches x64 on
(`jax.enable_x64`, local to the thread) for its own duration, and says so in
`notes`; on JAX the function is evaluated under `jax.jit` when it can be traced.
Where float64 cannot be had, it warns naming the backend and the fix and checks
in float32 with float32 tolerances.
"""

import contextlib
import dataclasses
import importlib
import math
import numbers
import typing
import warnings

import keras
import numpy as np

from gradmon._validation import check_positive_int, invalid

DTYPES = ("float32", "float64")
# (rtol, atol) used when `rtol` / `atol` are not given, by working dtype.
DEFAULT_TOLERANCES = {"float64": (1e-5, 1e-8), "float32": (1e-2, 1e-3)}
DEFAULT_MAX_ELEMENTWISE = 64
# Rounding errors of one function value, in units of machine epsilon times
# its magnitude, allowed for in the difference quotient (see module docstring).
_FLOOR_ULPS = 16.0
# How closely a dtype-converted model copy must reproduce the model's loss
# (the model's own dtype sets the precision of this comparison).
_CLONE_LOSS_RTOL = {"float16": 1e-2, "bfloat16": 1e-2, "float32": 1e-4}


@dataclasses.dataclass(frozen=True)
class VariableCheck:
    """The gradient check of one input tensor or model variable.

    Attributes:
        name: `inputs[i]`, a dict key, or the model variable's `path`.
        shape: the tensor's shape.
        method: `"elementwise"` (every element perturbed) or `"directional"`
            (random unit directions).
        num_checks: elements or directions compared with finite differences.
        fd_max_abs_error: max `|autodiff - fd|`.
        fd_max_rel_error: max `|autodiff - fd| / max(|autodiff|, |fd|)`.
        fd_passed: whether every comparison met the tolerance.
        manual_max_abs_error: max `|autodiff - manual|` over all elements, or
            `None` without a manual gradient.
        manual_max_rel_error: the same, relative; or `None`.
        manual_passed: whether every element met the tolerance; or `None`.
    """

    name: str
    shape: tuple
    method: str
    num_checks: int
    fd_max_abs_error: float
    fd_max_rel_error: float
    fd_passed: bool
    manual_max_abs_error: typing.Optional[float] = None
    manual_max_rel_error: typing.Optional[float] = None
    manual_passed: typing.Optional[bool] = None

    @property
    def passed(self):
        return self.fd_passed and self.manual_passed is not False

    def failures(self):
        """Human-readable reasons this variable failed (empty if it passed)."""
        reasons = []
        if not self.fd_passed:
            reasons.append(
                "autodiff vs finite differences: max abs error "
                f"{self.fd_max_abs_error:.3e}, max rel error "
                f"{self.fd_max_rel_error:.3e}"
            )
        if self.manual_passed is False:
            reasons.append(
                "autodiff vs manual: max abs error "
                f"{self.manual_max_abs_error:.3e}, max rel error "
                f"{self.manual_max_rel_error:.3e}"
            )
        return reasons


@dataclasses.dataclass(frozen=True)
class GradientCheckReport:
    """Result of `check_gradients`: one `VariableCheck` per tensor.

    Attributes:
        variables: list of `VariableCheck`, in input / `trainable_variables`
            order.
        dtype: the dtype the check actually ran in.
        eps: the relative finite-difference step used.
        rtol: relative tolerance used.
        atol: absolute tolerance used.
        notes: remarks on how the check ran (e.g. a fallback dtype).
        passed: whether every variable passed.
        failed: names of the variables that failed.
    """

    variables: list
    dtype: str
    eps: float
    rtol: float
    atol: float
    notes: list = dataclasses.field(default_factory=list)

    @property
    def passed(self):
        return all(v.passed for v in self.variables)

    @property
    def failed(self):
        return [v.name for v in self.variables if not v.passed]

    def __getitem__(self, name):
        for variable in self.variables:
            if variable.name == name:
                return variable
        raise KeyError(name)

    def __str__(self):
        has_manual = any(v.manual_passed is not None for v in self.variables)
        header = ["variable", "shape", "fd check", "fd abs err", "fd rel err"]
        if has_manual:
            header += ["manual abs err", "manual rel err"]
        header.append("status")
        rows = []
        for v in self.variables:
            row = [
                v.name,
                "x".join(str(d) for d in v.shape) or "scalar",
                f"{v.method} x{v.num_checks}",
                f"{v.fd_max_abs_error:.2e}",
                f"{v.fd_max_rel_error:.2e}",
            ]
            if has_manual:
                row += [_format_optional(v.manual_max_abs_error),
                        _format_optional(v.manual_max_rel_error)]
            row.append("ok" if v.passed else "FAIL")
            rows.append(row)
        widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
        lines = [
            f"Gradient check ({self.dtype}, eps={self.eps:.1e}, "
            f"rtol={self.rtol:.0e}, atol={self.atol:.0e}): "
            + ("passed" if self.passed else f"FAILED for {', '.join(self.failed)}"),
            "  ".join(h.ljust(w) for h, w in zip(header, widths)),
            "  ".join("-" * w for w in widths),
        ]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _format_optional(value):
    return "-" if value is None else f"{value:.2e}"


# --------------------------------------------------------------------------
# Argument checks.


_BACKEND_MODULES = {
    "tensorflow": "gradmon.backend.gradcheck_tensorflow",
    "jax": "gradmon.backend.gradcheck_jax",
    "torch": "gradmon.backend.gradcheck_torch",
}


def _framework():
    """The module doing tensors and autodiff for Keras' backend (imported on first use)."""
    name = keras.backend.backend()
    if name not in _BACKEND_MODULES:
        raise NotImplementedError(
            f"gradmon.check_gradients needs automatic differentiation: it runs with "
            f"Keras' TensorFlow, JAX and PyTorch backends. Received: backend {name!r}"
        )
    return importlib.import_module(_BACKEND_MODULES[name])


def _check_dtype(dtype):
    name = _framework().dtype_name(dtype)
    if name not in DTYPES:
        raise invalid("dtype", f"one of {list(DTYPES)}", dtype)
    return name


def _check_optional_float(argument, value, expected, positive):
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value < 0
        or (positive and value == 0)
    ):
        raise invalid(argument, expected, value)
    return float(value)


def _check_seed(seed):
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise invalid("seed", "a non-negative integer or None", seed)
    return int(seed)


# --------------------------------------------------------------------------
# The function under test: f(list of tensors) -> scalar, with names and the
# manual gradient adapted to the same list.


class _Problem(typing.NamedTuple):
    names: list
    values: list  # np arrays in the working dtype
    loss: typing.Callable  # list of tensors -> scalar tensor
    manual: typing.Optional[typing.Callable]  # () -> list of arrays
    dtype: str
    notes: list


_FRAMEWORK_NAMES = {"tensorflow": "TensorFlow", "jax": "JAX", "torch": "PyTorch"}


def _cast_floats(structure, dtype):
    """Casts the floating-point tensors / arrays in `structure` to `dtype`."""
    framework = _framework()

    def cast(value):
        return None if value is None else framework.cast_float(value, dtype)

    return keras.tree.map_structure(cast, structure)


def _scalar(value, argument):
    framework = _framework()
    if not framework.is_tensor(value):
        raise ValueError(
            f"Invalid value for argument `{argument}`. Expected a function "
            f"returning a scalar tensor computed with {_FRAMEWORK_NAMES[framework.NAME]} "
            f"or Keras ops. Received: a function returning {type(value).__name__}"
        )
    if framework.num_elements(value) != 1:
        raise ValueError(
            f"Invalid value for argument `{argument}`. Expected a function "
            "returning a scalar. Received: a function returning a tensor of "
            f"shape {tuple(value.shape)}"
        )
    return keras.ops.reshape(value, ())


def _manual_list(result, names, shapes, argument="manual"):
    """The manual gradient as a list of float64 arrays matching `names`."""
    if isinstance(result, dict):
        missing = [n for n in names if n not in result]
        if missing or len(result) != len(names):
            raise ValueError(
                f"Invalid value for argument `{argument}`. Expected a callable "
                f"returning gradients keyed by {names}. Received: keys "
                f"{list(result)}"
            )
        result = [result[n] for n in names]
    elif not isinstance(result, (list, tuple)) or (len(names) == 1 and len(result) != 1):
        result = [result]  # one input: a tensor, or a nested list read as one
    if len(result) != len(names):
        raise ValueError(
            f"Invalid value for argument `{argument}`. Expected a callable "
            f"returning {len(names)} gradient(s), one per variable "
            f"({', '.join(names)}). Received: {len(result)} gradient(s)"
        )
    arrays = []
    for name, shape, g in zip(names, shapes, result):
        g = np.zeros(tuple(shape)) if g is None else _framework().to_numpy(g).astype(np.float64)
        if g.shape != tuple(shape):
            raise ValueError(
                f"Invalid value for argument `{argument}`. Expected the gradient "
                f"of {name} to have shape {tuple(shape)}. Received: shape {g.shape}"
            )
        arrays.append(g)
    return arrays


def _function_problem(fn, inputs, manual, dtype):
    if isinstance(inputs, dict):
        keys = list(inputs)
        names = [str(k) for k in keys]
        raw = [inputs[k] for k in keys]

        def call(f, tensors):
            return f(**dict(zip(keys, tensors)))
    elif isinstance(inputs, (list, tuple)):
        names = [f"inputs[{i}]" for i in range(len(inputs))]
        raw = list(inputs)

        def call(f, tensors):
            return f(*tensors)
    else:
        names = ["inputs"]
        raw = [inputs]

        def call(f, tensors):
            return f(tensors[0])

    if not raw:
        raise invalid("inputs", "a tensor or a non-empty list/tuple/dict of tensors", inputs)
    try:
        tensors = [_framework().to_tensor(v, dtype) for v in raw]
    except (TypeError, ValueError) as error:
        raise invalid("inputs", f"tensors convertible to {dtype}", inputs) from error

    def loss(params):
        return _scalar(call(fn, params), "fn_or_model")

    manual_fn = None
    if manual is not None:
        def manual_fn():
            return _manual_list(call(manual, tensors), names, [t.shape for t in tensors])

    values = [_framework().to_numpy(t) for t in tensors]
    return _Problem(names, values, loss, manual_fn, dtype, [])


# --------------------------------------------------------------------------
# Models.


class _DtypeScope:
    """Sets `floatx` and the global dtype policy, restoring both on exit."""

    def __init__(self, dtype):
        self.dtype = dtype

    def __enter__(self):
        self.floatx = keras.config.floatx()
        self.policy = keras.config.dtype_policy()
        keras.config.set_floatx(self.dtype)
        keras.config.set_dtype_policy(self.dtype)

    def __exit__(self, *exc_info):
        keras.config.set_floatx(self.floatx)
        keras.config.set_dtype_policy(self.policy)


def _clone_layer(layer, dtype, cache):
    if id(layer) in cache:  # shared layers stay shared
        return cache[id(layer)]
    if isinstance(layer, keras.Sequential):
        clone = _clone_sequential(layer, dtype, cache)
    elif isinstance(layer, keras.Model) and hasattr(layer, "_run_through_graph"):
        clone = _clone_functional(layer, dtype, cache)
    else:
        config = layer.get_config()
        if "dtype" in config:
            config["dtype"] = dtype
        clone = layer.__class__.from_config(config)
    cache[id(layer)] = clone
    return clone


def _input_like(tensor, dtype):
    is_float = np.dtype(tensor.dtype).kind == "f" if tensor.dtype else True
    return keras.Input(
        batch_shape=tensor.shape, dtype=dtype if is_float else tensor.dtype, name=tensor.name
    )


def _clone_sequential(model, dtype, cache):
    # Like keras.models.clone_model, but with inputs in `dtype` and without
    # re-compiling through serialisation (which rejects lambdas and
    # unregistered losses).
    layers = [_clone_layer(layer, dtype, cache) for layer in model.layers]
    inputs = [_input_like(model.inputs[0], dtype)]
    return keras.Sequential(inputs + layers, name=model.name, trainable=model.trainable)


def _clone_functional(model, dtype, cache):
    inputs = keras.tree.map_structure(lambda t: _input_like(t, dtype), model.input)
    outputs = model._run_through_graph(
        inputs, operation_fn=lambda layer: _clone_layer(layer, dtype, cache)
    )
    return keras.Model(inputs, outputs, name=model.name)


def _recreate_losses(loss, dtype):
    if isinstance(loss, dict):
        return {k: _recreate_losses(v, dtype) for k, v in loss.items()}
    if isinstance(loss, (list, tuple)):
        return type(loss)(_recreate_losses(v, dtype) for v in loss)
    if isinstance(loss, keras.losses.Loss):
        config = loss.get_config()
        config.pop("dtype", None)  # re-created under `floatx() == dtype`
        loss = loss.__class__.from_config(config)
        if loss.dtype != dtype:
            raise TypeError(f"loss {loss.name!r} computes in {loss.dtype}")
    return loss  # strings and functions are wrapped at compile time


def _clone_model(model, dtype, data):
    """A copy of `model` computing in `dtype`, compiled with the same loss.

    `data` (`x, y, sample_weight` in `dtype`) is used once, inside the dtype
    scope, because Keras builds the compiled loss (and the loss objects for
    string / function losses, whose dtype is `floatx()`) on first use.
    """
    if isinstance(model, keras.Sequential):
        build = _clone_sequential
    elif hasattr(model, "_run_through_graph"):
        build = _clone_functional
    else:
        build = None
    compile_config = model._compile_config.config
    with _DtypeScope(dtype), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if build is not None:
            clone = build(model, dtype, {})
        else:
            clone = model.__class__.from_config(model.get_config())
        clone.compile(
            optimizer="sgd",
            loss=_recreate_losses(compile_config.get("loss"), dtype),
            loss_weights=compile_config.get("loss_weights"),
        )
        if not clone.built:
            clone(data[0], training=False)
        clone_variables = list(clone.trainable_variables)
        _model_loss(clone, clone_variables, *data)([v.value for v in clone_variables])
    if type(clone).compute_loss is not type(model).compute_loss:
        raise TypeError(f"{type(model).__name__} overrides `compute_loss`")
    return clone


def _model_loss(model, variables, x, y, sample_weight):
    from gradmon.backend import keras_compat as _keras_compat

    def compute(**kwargs):
        return _keras_compat.compute_loss(model, **kwargs)

    def loss(params):
        with keras.StatelessScope(
            state_mapping=list(zip(variables, params)), collect_losses=True
        ):
            y_pred = model(x, training=False)
            value = compute(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=False
            )
        if value is None:
            raise ValueError(
                "Invalid value for argument `fn_or_model`. Expected "
                "`compute_loss` to return a scalar loss. Received: None"
            )
        return _scalar(value, "fn_or_model")

    return loss


def _compiled_loss_dtypes(model):
    """The dtypes the model's compiled loss computes in, once built; else empty.

    Keras builds the loss objects of `compile(loss="mse")` on first use, in the
    `floatx()` of that moment, so a float64 model can still compute its loss in
    float32. Read from Keras internals (`_compile_loss`), defensively.
    """
    compile_loss = getattr(model, "_compile_loss", None)
    entries = getattr(compile_loss, "_flat_losses", None)
    if not entries:
        return set()
    dtypes = {getattr(compile_loss, "dtype", None)}
    dtypes.update(getattr(getattr(entry, "loss", None), "dtype", None) for entry in entries)
    return dtypes


def _model_data(inputs):
    if not isinstance(inputs, (list, tuple)) or len(inputs) not in (2, 3):
        raise invalid(
            "inputs",
            "a tuple `(x, y)` or `(x, y, sample_weight)` for a model",
            type(inputs).__name__ if not isinstance(inputs, (list, tuple)) else f"a {len(inputs)}-tuple",
        )
    x, y, *rest = inputs
    return x, y, (rest[0] if rest else None)


def _model_problem(model, inputs, manual, dtype):
    if not getattr(model, "compiled", False):
        raise ValueError(
            "Invalid value for argument `fn_or_model`. Expected a model compiled "
            "with a loss (`model.compile(loss=...)`). Received: an uncompiled "
            f"model {model.name!r}"
        )
    variables = list(model.trainable_variables)
    if not variables:
        raise ValueError(
            "Invalid value for argument `fn_or_model`. Expected a built model "
            "with trainable variables (call it on a batch first). Received: "
            f"model {model.name!r} with no trainable variables"
        )
    x, y, sample_weight = _model_data(inputs)
    names = [v.path for v in variables]
    model_dtype = variables[0].dtype
    notes = []
    work, work_dtype = model, model_dtype
    same_dtype = (
        all(v.dtype == dtype for v in variables)
        and model.dtype_policy.compute_dtype == dtype
        and _compiled_loss_dtypes(model) == {dtype}
    )
    if not same_dtype:
        try:
            work = _clone_converted(model, variables, dtype, inputs)
            work_dtype = dtype
            notes.append(f"computed on a {dtype} copy of model {model.name!r}")
        except Exception as error:  # noqa: BLE001 - any failure means "no copy"
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            reason = f"{type(error).__name__}: {lines[0] if lines else ''}"[:200]
            message = (
                f"No {dtype} copy of model {model.name!r} could be built "
                f"({reason}); checking it in its own dtype {model_dtype} with "
                f"{model_dtype} default tolerances."
            )
            warnings.warn(message, stacklevel=4)
            notes.append(message)
    work_variables = list(work.trainable_variables)
    x, y, sample_weight = (_cast_floats(d, work_dtype) for d in (x, y, sample_weight))
    loss = _model_loss(work, work_variables, x, y, sample_weight)
    manual_fn = None
    if manual is not None:
        args = (work, x, y) if len(inputs) == 2 else (work, x, y, sample_weight)

        def manual_fn():
            return _manual_list(manual(*args), names, [tuple(v.shape) for v in variables])

    # In the variable's declared dtype: JAX without x64 holds float64 variables as float32.
    values = [_framework().to_numpy(v.value).astype(v.dtype) for v in work_variables]
    return _Problem(names, values, loss, manual_fn, work_dtype, notes)


def _float(value):
    """A scalar tensor's value (detached from any autodiff graph) as a Python float."""
    return float(_framework().to_numpy(value))


def _clone_converted(model, variables, dtype, inputs):
    """A checked copy of `model` in `dtype` with the model's weights."""
    x, y, sample_weight = _model_data(inputs)
    # The model's own loss first, so that nothing of it is built in `dtype`.
    model_dtype = variables[0].dtype
    data = [_cast_floats(d, model_dtype) for d in (x, y, sample_weight)]
    reference = _float(_model_loss(model, variables, *data)([v.value for v in variables]))
    data = [_cast_floats(d, dtype) for d in (x, y, sample_weight)]
    clone = _clone_model(model, dtype, data)
    clone_variables = list(clone.trainable_variables)
    if [tuple(v.shape) for v in clone_variables] != [tuple(v.shape) for v in variables]:
        raise TypeError("the copy's trainable variables differ in number or shape")
    if any(v.dtype != dtype for v in clone_variables):
        raise TypeError(f"some of the copy's variables are not {dtype}")
    clone.set_weights(model.get_weights())
    # The copy must compute the same loss as the model (to the model's precision).
    value = _model_loss(clone, clone_variables, *data)([v.value for v in clone_variables])
    value_dtype = keras.backend.standardize_dtype(value.dtype)
    if value_dtype != dtype:
        raise TypeError(f"the copy's loss is {value_dtype}")
    rtol = _CLONE_LOSS_RTOL.get(model_dtype, 1e-6)
    if not abs(_float(value) - reference) <= rtol * max(abs(reference), 1e-2):
        raise TypeError(
            f"the copy's loss {_float(value):.8g} differs from the model's {reference:.8g}"
        )
    return clone


# --------------------------------------------------------------------------
# The comparisons.


def _errors(a, b):
    """(abs errors, rel errors) with rel = |a - b| / max(|a|, |b|), 0 / 0 = 0."""
    abs_error = np.abs(a - b)
    scale = np.maximum(np.abs(a), np.abs(b))
    rel_error = np.divide(abs_error, scale, out=np.zeros_like(abs_error), where=scale > 0)
    rel_error = np.where(np.isnan(abs_error), np.nan, rel_error)
    return abs_error, rel_error


def _max(array):
    return float(np.max(array)) if array.size else 0.0


def _finite_differences(loss, values, index, grad, settings, rng, machine_eps):
    """(autodiff, fd, floor) arrays for one variable, and the method used."""
    theta = values[index]
    constant = _framework().constant
    params = [constant(v) for v in values]

    def evaluate(perturbed):
        params[index] = constant(perturbed.reshape(theta.shape))
        return float(loss(params))

    flat = theta.ravel()
    if flat.size <= settings.max_elementwise:
        pairs = _elementwise_pairs(flat, grad.ravel(), settings.eps)
        method = "elementwise"
    else:
        pairs = _directional_pairs(flat, grad.ravel(), settings, rng)
        method = "directional"
    autodiff, fd, floor = [], [], []
    for plus, minus, step, derivative in pairs:
        f_plus, f_minus = evaluate(plus), evaluate(minus)
        autodiff.append(derivative)
        fd.append((f_plus - f_minus) / step)
        floor.append(_FLOOR_ULPS * machine_eps * max(abs(f_plus), abs(f_minus)) / step)
    return method, np.array(autodiff, np.float64), np.array(fd), np.array(floor)


def _elementwise_pairs(flat, grad, eps):
    """(theta+, theta-, step after rounding, autodiff derivative) per element."""
    steps = (eps * np.maximum(1.0, np.abs(flat.astype(np.float64)))).astype(flat.dtype)
    for j in range(flat.size):
        plus, minus = flat.copy(), flat.copy()
        plus[j] += steps[j]
        minus[j] -= steps[j]
        yield plus, minus, float(plus[j]) - float(minus[j]), grad[j]


def _directional_pairs(flat, grad, settings, rng):
    """(theta+, theta-, step length after rounding, autodiff derivative) per direction."""
    h = settings.eps * max(1.0, float(np.max(np.abs(flat))))
    for _ in range(settings.directions):
        u = rng.standard_normal(flat.size)
        u /= np.linalg.norm(u)
        plus = (flat + h * u).astype(flat.dtype)
        minus = (flat - h * u).astype(flat.dtype)
        step = plus.astype(np.float64) - minus.astype(np.float64)  # after rounding
        length = float(np.linalg.norm(step))
        yield plus, minus, length, float(np.dot(grad, step)) / length


def _check_variable(problem, index, grad, manual_grad, settings, rng, machine_eps):
    """The `VariableCheck` of variable `index`."""
    method, ad, fd, floor = _finite_differences(
        problem.loss, problem.values, index, grad, settings, rng, machine_eps
    )
    abs_error, rel_error = _errors(ad, fd)
    fields = dict(
        name=problem.names[index],
        shape=tuple(grad.shape),
        method=method,
        num_checks=int(ad.size),
        fd_max_abs_error=_max(abs_error),
        fd_max_rel_error=_max(rel_error),
        fd_passed=bool(np.all(abs_error <= settings.atol + settings.rtol * np.abs(fd) + floor)),
    )
    if manual_grad is not None:
        abs_error, rel_error = _errors(grad, manual_grad)
        fields.update(
            manual_max_abs_error=_max(abs_error),
            manual_max_rel_error=_max(rel_error),
            manual_passed=bool(
                np.all(abs_error <= settings.atol + settings.rtol * np.abs(manual_grad))
            ),
        )
    return VariableCheck(**fields)


class _Settings(typing.NamedTuple):
    directions: int
    max_elementwise: int
    eps: typing.Optional[float]
    rtol: typing.Optional[float]
    atol: typing.Optional[float]


def _with_defaults(settings, dtype, machine_eps):
    """`settings` with the working dtype's defaults for what was not given."""
    # A model left in float16 / bfloat16 gets float32's (already loose) defaults.
    default_rtol, default_atol = DEFAULT_TOLERANCES.get(dtype, DEFAULT_TOLERANCES["float32"])
    return settings._replace(
        rtol=default_rtol if settings.rtol is None else settings.rtol,
        atol=default_atol if settings.atol is None else settings.atol,
        eps=machine_eps ** (1.0 / 3.0) if settings.eps is None else settings.eps,
    )


@contextlib.contextmanager
def _precision(framework, dtype):
    """Enters the framework's scope for `dtype`; yields `(dtype, notes)`.

    Where the framework cannot compute in float64 (see `gradmon.backend.
    gradcheck_jax` / `gradcheck_torch`), warns naming the backend and the fix
    and yields `"float32"`.
    """
    with contextlib.ExitStack() as stack:
        try:
            notes = stack.enter_context(framework.precision(dtype))
        except framework.Float64Unavailable as error:
            message = (
                f"check_gradients cannot compute in float64 on Keras' {framework.NAME} "
                f"backend: {error.reason}. Checking in float32 with float32 tolerances "
                f"instead; for a float64 check, {error.fix}."
            )
            warnings.warn(message, stacklevel=5)
            dtype, notes = "float32", [message]
        yield dtype, notes


def _run_check(fn_or_model, inputs, manual, dtype, settings, seed):
    framework = _framework()
    with _precision(framework, dtype) as (dtype, precision_notes):
        if isinstance(fn_or_model, keras.Model):
            problem = _model_problem(fn_or_model, inputs, manual, dtype)
        else:
            problem = _function_problem(fn_or_model, inputs, manual, dtype)
        machine_eps = float(np.finfo(problem.values[0].dtype).eps)
        settings = _with_defaults(settings, problem.dtype, machine_eps)
        _, grads = framework.value_and_grad(problem.loss, problem.values)
        manual_grads = problem.manual() if problem.manual is not None else [None] * len(grads)
        rng = np.random.default_rng(seed)
        # One compiled loss (on JAX: one jit) for every finite difference.
        evaluated = problem._replace(loss=framework.compile_loss(problem.loss))
        checks = [
            _check_variable(evaluated, index, grad, manual_grads[index], settings, rng, machine_eps)
            for index, grad in enumerate(grads)
        ]
    return GradientCheckReport(
        variables=checks, dtype=problem.dtype, eps=settings.eps, rtol=settings.rtol,
        atol=settings.atol,
        # What the precision scope did matters only if the check ran in that precision.
        notes=(precision_notes if problem.dtype == dtype else []) + problem.notes,
    )


def check_gradients(
    fn_or_model,
    inputs,
    manual=None,
    directions=16,
    dtype="float64",
    eps=None,
    rtol=None,
    atol=None,
    seed=0,
    max_elementwise=DEFAULT_MAX_ELEMENTWISE,
):
    """Compares autodiff gradients with finite differences and a manual gradient.

    See the module docstring for the finite-difference scheme, the step size
    and the pass criterion.

    Args:
        fn_or_model: either a callable returning a scalar tensor, called as
            `fn(*inputs)` for a list/tuple, `fn(**inputs)` for a dict and
            `fn(inputs)` for a single tensor, and differentiated with respect
            to every input; or a compiled, built `keras.Model`, whose loss
            (`compute_loss` after a `training=False` forward pass, regulariser
            terms included) is differentiated with respect to
            `model.trainable_variables`.
        inputs: for a callable, a tensor / array (named `inputs`), a
            list/tuple of them (named `inputs[0]`, `inputs[1]`, ...) or a dict
            of them (named by key); all are cast to `dtype`. For a model,
            `(x, y)` or `(x, y, sample_weight)`; floating-point entries are
            cast to the working dtype. Variables are named by `variable.path`.
        manual: optional hand-derived gradient. For a callable it is called
            like `fn` and returns one gradient per input (a tensor for a
            single input; a list/tuple in input order, or a dict for dict
            inputs). For a model it is called as `manual(model, x, y)` (or
            `manual(model, x, y, sample_weight)`), where `model` is the model
            actually differentiated (the `dtype` copy, if one was built) and
            the data are cast to its dtype, and returns a list with one
            gradient per trainable variable. `None` entries mean zero.
            Defaults to `None`.
        directions: number of random unit directions for tensors with more
            than `max_elementwise` elements. Defaults to `16`.
        dtype: `"float64"` or `"float32"`, the dtype to compute in. A model in
            another dtype is copied into it when possible (see module
            docstring). Defaults to `"float64"`.
        eps: relative finite-difference step: element `j` moves by
            `eps * max(1, |theta_j|)`, a direction by
            `eps * max(1, max|theta|)`. Defaults to `None`: the cube root of
            the working dtype's machine epsilon.
        rtol: relative tolerance. Defaults to `None`: `1e-5` in float64,
            `1e-2` in float32.
        atol: absolute tolerance. Defaults to `None`: `1e-8` in float64,
            `1e-3` in float32.
        seed: seed of the random directions. Defaults to `0`.
        max_elementwise: tensors with at most this many elements are checked
            element by element, larger ones along random directions.
            Defaults to `64`.

    Returns:
        A `GradientCheckReport`; `report.passed` says whether every variable
        passed, `print(report)` shows a table.

    Raises:
        ValueError: for an invalid argument (non-callable `fn_or_model`, an
            uncompiled or unbuilt model, `directions <= 0`, an unknown
            `dtype`, a negative tolerance, a `manual` returning the wrong
            number or shapes of gradients, a function that does not return a
            scalar tensor).

    Example:

    ```python
    import tensorflow as tf
    import gradmon

    def softplus_loss(z):
        return tf.reduce_sum(tf.math.softplus(z))

    report = gradmon.check_gradients(
        softplus_loss, tf.constant([-2.0, 0.5, 3.0]), manual=tf.sigmoid
    )
    print(report)
    assert report.passed
    ```
    """
    if not callable(fn_or_model):
        raise invalid("fn_or_model", "a callable or a compiled keras.Model", fn_or_model)
    if manual is not None and not callable(manual):
        raise invalid("manual", "a callable or None", manual)
    directions = check_positive_int("directions", directions)
    max_elementwise = check_positive_int("max_elementwise", max_elementwise)
    dtype = _check_dtype(dtype)
    settings = _Settings(
        directions=directions,
        max_elementwise=max_elementwise,
        eps=_check_optional_float("eps", eps, "a positive finite float or None", True),
        rtol=_check_optional_float("rtol", rtol, "a non-negative finite float or None", False),
        atol=_check_optional_float("atol", atol, "a non-negative finite float or None", False),
    )
    seed = _check_seed(seed)
    return _run_check(fn_or_model, inputs, manual, dtype, settings, seed)


def assert_gradients_close(fn_or_model, inputs, manual=None, **kwargs):
    """Raises `AssertionError` unless `check_gradients` passes.

    Args:
        fn_or_model: as for `check_gradients`.
        inputs: as for `check_gradients`.
        manual: as for `check_gradients`. Defaults to `None`.
        **kwargs: any other `check_gradients` argument (`directions`, `dtype`,
            `eps`, `rtol`, `atol`, `seed`, `max_elementwise`).

    Returns:
        The `GradientCheckReport`, when every variable passed.

    Raises:
        AssertionError: naming each variable that disagrees and how, followed
            by the report table.
        ValueError: for an invalid argument, as `check_gradients`.

    Example:

    ```python
    gradmon.assert_gradients_close(
        lambda z: tf.reduce_sum(tf.math.softplus(z)),
        tf.constant([-2.0, 0.5, 3.0]),
        manual=tf.sigmoid,
    )
    ```
    """
    report = check_gradients(fn_or_model, inputs, manual=manual, **kwargs)
    if not report.passed:
        lines = [f"Gradients disagree for {', '.join(report.failed)}:"]
        for variable in report.variables:
            lines += [f"  {variable.name}: {reason}" for reason in variable.failures()]
        raise AssertionError("\n".join(lines) + "\n\n" + str(report))
    return report
