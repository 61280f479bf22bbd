"""Composable gradient transforms (clipping) that report what they did.

A transform is called as `transform(grads, params) -> (grads, fractions)`:
`grads` and `params` are parallel lists (`None` gradients pass through
untouched), and `fractions` maps the transform's name to the share of units it
clipped in this step, a float32 scalar tensor. Units are tensors for
`clip_by_norm`, elements for `clip_by_value`, output units for
`adaptive_clip` and the whole gradient (1/0) for `clip_by_global_norm`.
Transforms are pure tensor functions, and compose with `chain`, in the
spirit of optax. A transform with state (`zclip`) creates its variables in
`build(params)`, which the observer calls outside any `tf.function` (a
chain builds its members); the others' `build` does nothing.

On JAX and PyTorch (`gradmon.backend.door`) every built-in transform runs in
`keras.ops` inside the step, and so does a plain callable (write it in
`keras.ops`); a subclass says it is written so with `keras_ops = True`.
`zclip`'s state there is the door's (JAX: variables of the optimizer state,
updated without a branch), in float32.

Example:
    >>> t = gradmon.transforms.chain(
    ...     gradmon.transforms.clip_by_value(5.0),
    ...     gradmon.transforms.clip_by_global_norm(1.0))
    >>> new_grads, fractions = t(grads, model.trainable_variables)
"""

import contextlib

import keras

from gradmon.backend import lazy_tf as _lazy_tf
from gradmon.measure import moments as stats
from gradmon._validation import check_positive

tf = _lazy_tf.tensorflow()
# JAX / PyTorch (`gradmon.backend.door`): dense gradients; the transforms it supports in `keras.ops`
_OPS = not _lazy_tf.is_tensorflow()


def _values(gradient):
    if _OPS:
        return gradient
    return gradient.values if isinstance(gradient, tf.IndexedSlices) else gradient


def _with_values(gradient, values):
    if _OPS:
        return values
    if isinstance(gradient, tf.IndexedSlices):
        return tf.IndexedSlices(values, gradient.indices, gradient.dense_shape)
    return values


def _dense(tensor):
    """A tensor of a gradient, variable or array (a `tf.IndexedSlices` made dense)."""
    if _OPS:
        return keras.ops.convert_to_tensor(tensor)
    return tf.convert_to_tensor(tensor)


def _fraction(clipped, total):
    return keras.ops.divide_no_nan(keras.ops.cast(clipped, "float32"), keras.ops.cast(total, "float32"))


class GradientTransform:
    """Base class: a named, serialisable gradient transform."""

    name = "transform"
    # written in `keras.ops` (and so run on JAX and PyTorch too, `gradmon.backend.door`)
    keras_ops = False

    def __call__(self, grads, params):
        raise NotImplementedError

    def build(self, params):
        """Creates state variables, outside any `tf.function` (stateless transforms: nothing)."""

    def members(self):
        """The transforms this one is made of (itself, for all but `chain`)."""
        return [self]

    def fraction_names(self):
        """Keys of the `fractions` dict this transform returns, in order."""
        return [self.name]

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class clip_by_value(GradientTransform):
    """Clips every gradient entry to `[-limit, limit]`.

    Args:
        limit: positive float, the largest absolute value kept.

    Reports the share of elements whose absolute value exceeded `limit`.
    """

    name = "clip_by_value"
    keras_ops = True

    def __init__(self, limit):
        self.limit = check_positive("limit", limit)

    def __call__(self, grads, params):
        out, clipped, total = [], [], []
        for g in grads:
            if g is None:
                out.append(None)
                continue
            v = _values(g)  # a `tf.IndexedSlices`' rows: clipped without densifying
            clipped.append(keras.ops.sum(keras.ops.cast(keras.ops.abs(v) > self.limit, "float32")))
            total.append(keras.ops.cast(keras.ops.size(v), "float32"))
            out.append(_with_values(g, keras.ops.clip(v, -self.limit, self.limit)))
        return out, {self.name: _fraction(sum(clipped) if clipped else 0.0, sum(total) if total else 0.0)}

    def get_config(self):
        return {"limit": self.limit}


class clip_by_norm(GradientTransform):
    """Rescales each gradient tensor whose L2 norm exceeds `max_norm` to `max_norm`.

    Same rule as a Keras optimizer's `clipnorm`: `g * max_norm / max(||g||, max_norm)`.

    Args:
        max_norm: positive float, the largest norm kept per tensor.

    Reports the share of tensors that were rescaled.
    """

    name = "clip_by_norm"
    keras_ops = True

    def __init__(self, max_norm):
        self.max_norm = check_positive("max_norm", max_norm)

    def __call__(self, grads, params):
        out, clipped = [], []
        for g in grads:
            if g is None:
                out.append(None)
                continue
            norm = keras.ops.sqrt(stats.squared_norm(g))
            clipped.append(keras.ops.cast(norm > self.max_norm, "float32"))
            v = _values(g)
            scale = self.max_norm / keras.ops.maximum(norm, self.max_norm)
            out.append(_with_values(g, v * keras.ops.cast(scale, v.dtype)))
        return out, {self.name: _fraction(sum(clipped) if clipped else 0.0, len(clipped))}

    def get_config(self):
        return {"max_norm": self.max_norm}


class clip_by_global_norm(GradientTransform):
    """Rescales all gradients together so that their global L2 norm is at most `max_norm`.

    Same rule as a Keras optimizer's `global_clipnorm`.

    Args:
        max_norm: positive float, the largest global norm kept.

    Reports 1.0 when the step was rescaled, else 0.0.
    """

    name = "clip_by_global_norm"
    keras_ops = True

    def __init__(self, max_norm):
        self.max_norm = check_positive("max_norm", max_norm)

    def __call__(self, grads, params):
        norm = stats.global_norm(grads)
        scale = self.max_norm / keras.ops.maximum(norm, self.max_norm)
        out = [None if g is None else _with_values(g, _values(g) * keras.ops.cast(scale, _values(g).dtype))
               for g in grads]
        return out, {self.name: keras.ops.cast(norm > self.max_norm, "float32")}

    def get_config(self):
        return {"max_norm": self.max_norm}


def unitwise_norm(x):
    """L2 norm per output unit, broadcastable against `x`.

    Vectors and scalars are one unit; a `[in, out]` kernel has `out` units
    (norm over axis 0); a convolution kernel `[..., in, out]` has `out` units
    (norm over all axes but the last). As in Brock et al. (2021).
    """
    rank = len(x.shape)
    if rank <= 1:
        return keras.ops.sqrt(keras.ops.sum(keras.ops.square(x)))
    return keras.ops.sqrt(keras.ops.sum(keras.ops.square(x), axis=tuple(range(rank - 1)), keepdims=True))


class adaptive_clip(GradientTransform):
    """Adaptive gradient clipping (AGC): clips each unit's gradient relative to its weight norm.

    For each output unit, if `||G|| > clip_factor * max(||W||, eps)` the unit's
    gradient is rescaled to that bound.

    Args:
        clip_factor: positive float, the largest allowed ||G|| / ||W|| per unit.
        eps: positive float, floor on ||W|| so that zero-initialised weights
            (biases) can still move. Defaults to `1e-3`.

    Reports the share of units that were clipped.

    References:
        Brock, De, Smith, Simonyan (2021). High-Performance Large-Scale Image
        Recognition Without Normalization. arXiv:2102.06171.
    """

    name = "adaptive_clip"
    keras_ops = True

    def __init__(self, clip_factor, eps=1e-3):
        self.clip_factor = check_positive("clip_factor", clip_factor)
        self.eps = check_positive("eps", eps)

    def __call__(self, grads, params):
        if len(grads) != len(params):
            raise ValueError(
                "adaptive_clip needs one parameter per gradient. Expected "
                f"{len(grads)} params. Received: {len(params)} params"
            )
        out, clipped, total = [], [], []
        for g, p in zip(grads, params):
            if g is None:
                out.append(None)
                continue
            g = _dense(g)
            w = keras.ops.cast(_dense(p), "float32")
            g32 = keras.ops.cast(g, "float32")
            max_norm = self.clip_factor * keras.ops.maximum(unitwise_norm(w), self.eps)
            g_norm = unitwise_norm(g32)
            trigger = g_norm > max_norm
            scale = keras.ops.where(trigger, max_norm / keras.ops.maximum(g_norm, 1e-6),
                                    keras.ops.ones_like(g_norm))
            out.append(keras.ops.cast(g32 * scale, g.dtype))
            clipped.append(keras.ops.sum(keras.ops.cast(trigger, "float32")))
            total.append(keras.ops.cast(keras.ops.size(g_norm), "float32"))
        return out, {self.name: _fraction(sum(clipped) if clipped else 0.0, sum(total) if total else 0.0)}

    def get_config(self):
        return {"clip_factor": self.clip_factor, "eps": self.eps}


class chain(GradientTransform):
    """Applies transforms one after another.

    Each member's clip fraction is reported under its own name (suffixed
    `_2`, `_3`... when a name repeats).

    Args:
        *transforms: `GradientTransform`s or callables `(grads, params) -> grads`.
    """

    name = "chain"

    def __init__(self, *transforms):
        if not transforms:
            raise ValueError(
                "Invalid value for argument `transforms`. Expected at least one "
                "transform. Received: transforms=()"
            )
        self.transforms = tuple(as_transform(t, "transforms") for t in transforms)

    def __call__(self, grads, params):
        fractions = {}
        for t in self.transforms:
            grads, member = t(grads, params)
            fractions = merge_fractions(fractions, member)
        return grads, fractions

    def fraction_names(self):
        names = {}
        for t in self.transforms:
            names = merge_fractions(names, dict.fromkeys(t.fraction_names()))
        return list(names)

    def build(self, params):
        for t in self.transforms:
            t.build(params)

    def members(self):
        return [m for t in self.transforms for m in t.members()]

    @property
    def keras_ops(self):
        return all(getattr(m, "keras_ops", False) for m in self.members())

    def get_config(self):
        return {"transforms": [serialize(t) for t in self.transforms]}

    @classmethod
    def from_config(cls, config):
        return cls(*[deserialize(c) for c in config["transforms"]])


def check_like(name, grads, new, params):
    """Raises, naming the transform and the variable, unless each of `new` has the shape and
    dtype of the gradient it replaces (checked while tracing: before the first step)."""
    for g, n, p in zip(grads, new, params):
        if g is None or n is None:
            continue
        if _OPS:
            _check_dense_like(name, g, n, p)
            continue
        sparse = isinstance(g, tf.IndexedSlices), isinstance(n, tf.IndexedSlices)
        a = g.values if sparse[0] else tf.convert_to_tensor(g)
        b = n.values if sparse[1] else tf.convert_to_tensor(n)
        # a dense gradient for a sparse one (or back): only the dtype is compared
        same_shape = sparse[0] != sparse[1] or a.shape.is_compatible_with(b.shape)
        if b.dtype != a.dtype or not same_shape:
            path = getattr(p, "path", None) or getattr(p, "name", "?")
            raise ValueError(
                f"Invalid value for argument `transform`. Expected a transform returning each "
                f"gradient with the shape and dtype it was given. Received: transform={name!r}, "
                f"which returned shape {b.shape} dtype {b.dtype.name} for the gradient of "
                f"{path!r} (shape {a.shape} dtype {a.dtype.name})")


def _check_dense_like(name, g, n, p):
    a, b = keras.ops.convert_to_tensor(g), keras.ops.convert_to_tensor(n)
    if tuple(b.shape) != tuple(a.shape) or keras.backend.standardize_dtype(b.dtype) != \
            keras.backend.standardize_dtype(a.dtype):
        path = getattr(p, "path", None) or getattr(p, "name", "?")
        raise ValueError(
            f"Invalid value for argument `transform`. Expected a transform returning each "
            f"gradient with the shape and dtype it was given. Received: transform={name!r}, "
            f"which returned shape {tuple(b.shape)} dtype {keras.backend.standardize_dtype(b.dtype)} "
            f"for the gradient of {path!r} (shape {tuple(a.shape)} dtype "
            f"{keras.backend.standardize_dtype(a.dtype)})")


class _FunctionTransform(GradientTransform):
    """A user callable `(grads, params) -> grads`; reports the share of changed elements.

    On JAX and PyTorch the callable runs inside the step as it is: written in
    `keras.ops` it runs on every backend (`gradmon.backend.door`).
    """

    keras_ops = True

    def __init__(self, fn):
        self.fn = fn
        self.name = getattr(fn, "__name__", "custom")

    def __call__(self, grads, params):
        new = self.fn(list(grads), list(params))
        if new is None:
            raise ValueError(
                f"Invalid value for argument `transform`. Expected a callable returning one "
                f"gradient per variable. Received: transform={self.name!r}, which returned None")
        if isinstance(new, tuple) and len(new) == 2 and len(grads) != 2 and \
                isinstance(new[0], (list, tuple)) and len(new[0]) == len(grads):
            raise ValueError(
                f"Invalid value for argument `transform`. Expected a callable returning only the "
                f"gradients (one per variable); to report fractions of its own, subclass "
                f"`gradmon.transforms.GradientTransform`, whose `__call__` returns (gradients, "
                f"fractions). Received: transform={self.name!r}, which returned a pair "
                f"(gradients, {type(new[1]).__name__})")
        new = list(new)
        if len(new) != len(grads):
            raise ValueError(
                f"Transform `{self.name}` must return one gradient per variable. "
                f"Expected {len(grads)} gradients. Received: {len(new)}"
            )
        check_like(self.name, grads, new, params)
        changed, total = [], []
        for g, n in zip(grads, new):
            if g is None or n is None:
                continue
            a, b = _dense(g), _dense(n)
            changed.append(keras.ops.sum(keras.ops.cast(keras.ops.not_equal(a, b), "float32")))
            total.append(keras.ops.cast(keras.ops.size(a), "float32"))
        return new, {self.name: _fraction(sum(changed) if changed else 0.0, sum(total) if total else 0.0)}


class zclip(GradientTransform):
    """ZClip: clips the global norm when its z-score against the recent norms is too high.

    Keeps the running mean and variance of the global norm of the gradients it
    receives (`gradmon.spikes`: the first `warmup_steps` norms only collected,
    then exponential moving averages with decay `alpha`). From then on a step
    whose norm has `z = (norm - mean) / (std + eps) > z_threshold` is rescaled
    to the norm `mean + z_threshold**2 * std / z` (ZClip's default
    "reciprocal" rule: the larger the outlier, the harder it is clipped; below
    `mean + z_threshold * std`), and that clipped norm is folded into the
    averages, as in the paper. A non-finite norm is neither clipped nor
    folded in (the non-finite policy's business), and nothing is clipped
    while the variance is exactly 0 (all norms equal so far, e.g. zero
    gradients; the reference code would clip every later norm to the mean). The rescaling is exact
    (ZClip's reference code divides by `norm + 1e-6`).

    Reports the clip fraction (1.0 when the step was clipped, else 0.0) under
    its name and, through the observer, the threshold `mean + z_threshold *
    std` of each step (`gradients/zclip/threshold`, NaN during the warm-up).
    Its state lives on the device (replica-local under a strategy: every
    replica sees the same all-reduced gradient), created by `build`. On JAX
    it rides in the optimizer state the jitted step carries (compiling again
    with a new optimizer carries it into that one's), in float32 on JAX and
    PyTorch.

    Args:
        z_threshold: positive float, the z-score above which a step is clipped.
            Defaults to `2.5`.
        alpha: EMA decay of the mean and variance, in (0, 1). Defaults to `0.97`.
        warmup_steps: positive int, norms collected before the first clipping.
            Defaults to `25`.
        eps: non-negative float added to the std in the z-score. Defaults to `1e-6`.

    References:
        Kumar, Owen, Chowdhury, Güra (2025). ZClip: Adaptive Spike Mitigation
        for LLM Pre-Training. arXiv:2504.02507.

    Example:
        >>> opt = gradmon.observe(keras.optimizers.AdamW(3e-4), transform=gradmon.transforms.zclip())
    """

    name = "zclip"
    keras_ops = True

    def __init__(self, z_threshold=2.5, alpha=0.97, warmup_steps=25, eps=1e-6):
        from gradmon._validation import check_non_negative, check_positive_int, invalid

        self.z_threshold = check_positive("z_threshold", z_threshold)
        alpha = check_positive("alpha", alpha)
        if not alpha < 1:
            raise invalid("alpha", "a number in (0, 1)", alpha)
        self.alpha = alpha
        self.warmup_steps = check_positive_int("warmup_steps", warmup_steps)
        self.eps = check_non_negative("eps", eps)
        self.state = self.threshold = None

    def build(self, params):
        from gradmon.backend import distribute as _distribute
        from gradmon.measure import spikes

        initial = spikes.initial_state(), float("nan")
        if self.state is not None:
            # the running statistics carry over (e.g. a recompile). On JAX they ride in the
            # state of the optimizer the observer builds for (`door.state_owner`): a new build
            # (another optimizer, a recompile) makes new variables there, from their values
            if keras.backend.backend() != "jax":
                return
            initial = tuple(keras.ops.convert_to_numpy(v) for v in (self.state, self.threshold))
        # float64; on JAX / PyTorch the door's state variables, in float32 (JAX keeps 64-bit
        # variables in 32 bits without x64)
        with contextlib.nullcontext() if _OPS else tf.init_scope():
            self.state = _distribute.replica_local_variable(initial[0], spikes.STATE_DTYPE,
                                                            name="gradmon_zclip_state")
            self.threshold = _distribute.replica_local_variable(initial[1], spikes.STATE_DTYPE,
                                                                name="gradmon_zclip_threshold")

    def __call__(self, grads, params):
        """One step, without a branch: the new statistics are assigned whatever happened
        (unchanged where nothing is folded in), as a jitted JAX step needs."""
        from gradmon.measure import spikes

        if self.state is None:  # called alone, not by an observer
            self.build(params)
        ops, dtype = keras.ops, spikes.STATE_DTYPE
        state = spikes.read_state(self.state)
        norm = ops.cast(stats.global_norm(grads), dtype)
        z, clip = spikes.judged(state, norm, self.z_threshold, self.warmup_steps, self.eps)
        std = ops.sqrt(state[2])
        target = state[1] + ops.divide_no_nan(self.z_threshold ** 2 * std, z)
        scale = ops.where(clip, ops.divide_no_nan(target, norm), ops.cast(1.0, dtype))
        self.threshold.assign(ops.where(spikes.warmed_up(state, self.warmup_steps),
                                        spikes.upper_bound(state, self.z_threshold),
                                        ops.cast(float("nan"), dtype)))
        self.state.assign(spikes.folded(state, ops.where(clip, target, norm), self.warmup_steps, self.alpha))
        out = [None if g is None else _with_values(g, _values(g) * ops.cast(scale, _values(g).dtype))
               for g in grads]
        return out, {self.name: ops.cast(clip, "float32")}

    def get_config(self):
        return {"z_threshold": self.z_threshold, "alpha": self.alpha,
                "warmup_steps": self.warmup_steps, "eps": self.eps}


def merge_fractions(first, second):
    """Merges two `fractions` dicts; a repeated name gets a suffix `_2`, `_3`..."""
    merged = dict(first)
    for key, value in second.items():
        unique, n = key, 1
        while unique in merged:
            n += 1
            unique = f"{key}_{n}"
        merged[unique] = value
    return merged


def as_transform(transform, argument="transform"):
    """Validates a transform argument; wraps a plain callable."""
    if isinstance(transform, GradientTransform):
        return transform
    if callable(transform):
        return _FunctionTransform(transform)
    raise ValueError(
        f"Invalid value for argument `{argument}`. Expected a gradmon transform "
        f"or a callable (grads, params) -> grads. Received: {argument}={transform!r}"
    )


_REGISTRY = {
    cls.__name__: cls
    for cls in (clip_by_value, clip_by_norm, clip_by_global_norm, adaptive_clip, zclip, chain)
}


def serialize(transform):
    """`{"class_name": ..., "config": ...}` for a built-in transform."""
    return {"class_name": type(transform).__name__, "config": transform.get_config()}


def deserialize(config):
    """Inverse of `serialize`."""
    cls = _REGISTRY.get(config.get("class_name"))
    if cls is None:
        raise ValueError(
            "Invalid value for argument `config`. Expected a serialized gradmon "
            f"transform ({sorted(_REGISTRY)}). Received: config={config!r}"
        )
    return cls.from_config(config["config"])


def from_optimizer(optimizer):
    """The built-in transform equal to a Keras optimizer's own clipping, or `None`.

    Keras optimizers apply at most one of `clipnorm`, `global_clipnorm`,
    `clipvalue` (in that order of precedence) to the unscaled gradients.
    """
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    if getattr(optimizer, "clipnorm", None):
        return clip_by_norm(optimizer.clipnorm)
    if getattr(optimizer, "global_clipnorm", None):
        return clip_by_global_norm(optimizer.global_clipnorm)
    if getattr(optimizer, "clipvalue", None):
        return clip_by_value(optimizer.clipvalue)
    return None
