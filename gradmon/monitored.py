"""Keras glue: `monitor(model)`, `GradientMonitorMixin`, and observing any model in `fit`.

Gradients are observed at the optimizer (`gradmon.observer`), so a model's
own `train_step` is kept and observed as it is. gradmon's own train step
(`gradmon.own_step`) is used only for what needs the loss: penalties and
the noise scale; asking for them on a model with its own `train_step` is an
error before the first step.
"""

import contextlib
import weakref

import keras
import numpy as np

from gradmon.backend import keras_compat as kc
from gradmon.measure import train_step as own_step
from gradmon import saving
from gradmon.measure import penalties as penalties_module
from gradmon.measure import spikes, statistics, transforms
from gradmon._validation import invalid
from gradmon.measure.observer import Observer, observer_of, write_at_exit  # noqa: F401 (callbacks)
from gradmon.measure.settings import GradientSettings
from gradmon.publish import policy

STAT_NAMES = statistics.STAT_NAMES
_STEP_KEY = "gradmon_step"  # older files kept the step among the model's own variables


class GradientConfig:
    """What a monitored model does with its gradients: its `GradientSettings`, its observer
    and what gradmon's own train step hands over (penalties, noise scale, the loss)."""

    def __init__(self, settings=None):
        self.settings = settings = GradientSettings() if settings is None else settings
        self.observer = Observer(settings)
        # with on_spike, gradmon's own step (where the model has no train_step of its own)
        # hands the batch loss over for its z-score
        self.extras = own_step.Extras([p.name for p in settings.penalties], settings.noise_scale,
                                      loss=settings.on_spike is not None)
        if self.penalties or self.noise_scale or self.extras.loss:
            self.observer.extras_source = self.extras

    penalties = property(lambda self: self.settings.penalties)
    noise_scale = property(lambda self: self.settings.noise_scale)

    def without_loss(self):
        """A model with its own `train_step`: no loss reaches the observer (only the norm's z-score)."""
        self.extras.loss = False
        if not self.needs_own_step:
            self.observer.extras_source = None

    @property
    def needs_own_step(self):
        return bool(self.penalties) or self.noise_scale

    def fresh_settings(self):
        """The same settings with fresh state, for a copy (`keras.models.clone_model`): a
        built-in transform and the penalties rebuilt from their configs (a plain callable and
        custom statistics are shared)."""
        t = self.settings.transform
        if t is not None and saving.serializable(t):
            t = transforms.deserialize(transforms.serialize(t))
        return self.settings.replace(transform=t, penalties=[
            penalties_module.deserialize(penalties_module.serialize(p)) for p in self.penalties])

    def get_config(self):
        settings, t = self.settings, self.settings.transform
        config = settings.keywords("model")
        config["transform"] = None if t is None or not saving.serializable(t) else transforms.serialize(t)
        config["stats"] = list(settings.selected)
        config["penalties"] = [penalties_module.serialize(p) for p in self.penalties]
        return config


def _check_own_step(model, config):
    if not _uses_gradmon_step(model):
        config.without_loss()
    if config.needs_own_step and not _uses_gradmon_step(model):
        asked = [n for n, on in (("penalties", config.penalties), ("noise_scale", config.noise_scale)) if on]
        raise ValueError(
            f"{type(model).__name__} has its own `train_step`, which gradmon observes at the "
            f"optimizer; {' and '.join(asked)} need gradmon's own train step (they need the loss). "
            "Expected a model without its own train_step, or no penalties / noise_scale. "
            f"Received: {', '.join(asked)} on {type(model).__name__}")


def _uses_gradmon_step(model):
    """gradmon's step runs when nothing overrides it and nothing behind the mixin does either."""
    mro = type(model).__mro__
    if type(model).train_step is not GradientMonitorMixin.train_step:
        return False
    behind = mro[mro.index(GradientMonitorMixin) + 1:]
    owner = next((c for c in behind if "train_step" in c.__dict__), None)
    return owner is None or kc.is_keras_train_step(owner.__dict__["train_step"])


def prepare_model(model):
    """Hooks the model's optimizer into its observer before a train function is built.

    Returns:
        True when the train function must be rebuilt (the hook is new).
    """
    observer = model._gradmon_observer
    if getattr(model, "optimizer", None) is None:
        return False
    observer.min_rows = int(getattr(model, "steps_per_execution", 1) or 1)
    observer.watch_model(model)  # JAX: the host reads the state its trainer holds
    spikes.watch_batches(model)  # on_spike judges only full batches: the step hands its size over
    rebuild = observer_of(model.optimizer) is not observer
    if rebuild:
        observer.hook(model.optimizer)
    if model.built and model.trainable_variables:
        # before tracing: variables created inside a trace make tf.function trace twice
        rebuild = observer.ensure_built(model.optimizer, model.trainable_variables) or rebuild
    return rebuild


# keras.Model.fit(x, y, batch_size, epochs, verbose, callbacks, ...)
_FIT_CALLBACKS_POSITION = 5


def watched_fit_arguments(model, args, kwargs):
    """`fit`'s `(args, kwargs)` with a `PolicyWatch` added when the model's policies need one
    (`"stop"`, `"skip"`, `on_spike`) and no `GradientMonitor` is among the callbacks: without
    it, a stopped model would go on fitting without updates, silently."""
    observer = getattr(model, "_gradmon_observer", None)
    if observer is None or not policy.PolicyWatch.needed(observer):
        return args, kwargs
    positional = len(args) > _FIT_CALLBACKS_POSITION
    given = args[_FIT_CALLBACKS_POSITION] if positional else kwargs.get("callbacks")
    if isinstance(given, keras.callbacks.CallbackList):
        return args, kwargs  # the user's own list: used as it is
    given = list(given or [])
    if any(policy.hears_policies(c) for c in given):
        return args, kwargs
    given.append(policy.PolicyWatch())
    if positional:
        args = args[:_FIT_CALLBACKS_POSITION] + (given,) + args[_FIT_CALLBACKS_POSITION + 1:]
    else:
        kwargs = {**kwargs, "callbacks": given}
    return args, kwargs


@contextlib.contextmanager
def _unread_written_if_interrupted(model):
    """A `fit` that an exception ends (a callback's, Ctrl-C) gets no `on_train_end`: the
    measured steps its `GradientMonitor` still holds in the ring are written on the way out.
    While it runs, the model is marked as fitting (its optimizer applied outside is warned of)."""
    object.__setattr__(model, "_gradmon_fitting", getattr(model, "_gradmon_fitting", 0) + 1)
    try:
        yield
    except BaseException:
        policy.write_unread(model._gradmon_observer)
        raise
    finally:
        object.__setattr__(model, "_gradmon_fitting", model._gradmon_fitting - 1)


def _own(model, observer):
    """Makes `model` the owner of `observer` (its `fit` writes), and guards the model's
    optimizer until `fit` hooks it: applied before (a custom loop), it warns once."""
    observer.fit_owner = weakref.ref(model)
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or observer_of(optimizer) is not None or "apply" in optimizer.__dict__:
        return
    owner = weakref.ref(model)

    def apply(grads, trainable_variables=None):
        if observer_of(optimizer) is None and owner() is not None:
            from gradmon.publish import alerts

            alerts.outside_fit(owner(), measured=False)
        return type(optimizer).apply(optimizer, grads, trainable_variables)

    object.__setattr__(optimizer, "apply", apply)


def instrument(model, observer):
    """Observes a model in place (a model with its own `train_step`, or any model
    a `GradientMonitor` meets): its optimizer is hooked whenever a train
    function is made."""
    object.__setattr__(model, "_gradmon_observer", observer)
    saving.attach(model)  # gradmon's state in the model's files, where plain Keras does not look
    if "_gradmon_make_train_function" in model.__dict__:
        return model  # already routed through prepare_model
    original = model.make_train_function
    object.__setattr__(model, "_gradmon_make_train_function", original)

    def make_train_function(force=False):
        return original(force=prepare_model(model) or force)

    object.__setattr__(model, "make_train_function", make_train_function)
    original_fit = model.fit

    def fit(*args, **kwargs):
        args, kwargs = watched_fit_arguments(model, args, kwargs)
        with _unread_written_if_interrupted(model):
            return original_fit(*args, **kwargs)

    fit.__doc__ = original_fit.__doc__
    object.__setattr__(model, "fit", fit)
    return model


def observer_for(model):
    """The `Observer` of a model, instrumenting it with one if it has none: the observer of its
    optimizer (`gradmon.observe(opt, transform=...)`: its settings are kept), else a default one."""
    observer = getattr(model, "_gradmon_observer", None)
    if observer is None:
        observer = observer_of(getattr(model, "optimizer", None)) or Observer()
        observer = instrument(model, observer)._gradmon_observer
    return observer


def _guard_after_compile(model):
    """After each `compile`, the model's optimizer warns when applied before `fit` (`_own`).

    An instance attribute, not an override: Keras skips `compile` when loading a model
    whose class overrides it."""
    compile_, owner = model.compile, weakref.ref(model)

    def compile(*args, **kwargs):
        compile_(*args, **kwargs)
        _own(owner(), owner()._gradmon_observer)

    compile.__doc__ = compile_.__doc__
    object.__setattr__(model, "compile", compile)


class GradientMonitorMixin:
    """Observes (and optionally transforms) a subclassed model's gradients.

    Put it **before** `keras.Model` in the bases:

    ```python
    class Net(gradmon.GradientMonitorMixin, keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = keras.layers.Dense(10)
        def call(self, x):
            return self.dense(x)

    net = Net(gradient_transform=gradmon.transforms.clip_by_global_norm(1.0))
    ```

    A model with its own `train_step` keeps it: gradmon observes what it
    applies through `self.optimizer`. Constructor keywords (all optional):
    `gradient_transform`, `gradient_grouping`, `gradient_stats`,
    `gradient_penalties`, `gradient_noise_scale`, `gradient_on_nonfinite`,
    `gradient_on_spike`, `gradient_spike_threshold` (see `configure_gradients`).
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        if keras.Model in mro and mro.index(keras.Model) < mro.index(GradientMonitorMixin):
            raise TypeError(
                f"GradientMonitorMixin must come before keras.Model in the bases of {cls.__name__}. "
                f"Expected: class {cls.__name__}(gradmon.GradientMonitorMixin, keras.Model). "
                f"Received: bases {[b.__name__ for b in cls.__bases__]}")

    def __init__(self, *args, gradient_transform=None, gradient_grouping="layer",
                 gradient_stats=None, gradient_penalties=None, gradient_noise_scale=False,
                 gradient_on_nonfinite="warn", gradient_on_spike=None,
                 gradient_spike_threshold=spikes.DEFAULT_SPIKE_THRESHOLD, **kwargs):
        source = kc.cloning_source()
        if isinstance(source, GradientMonitorMixin) and type(source) is type(self):
            # keras.models.clone_model builds the clone from the graph alone: keep the settings
            config = GradientConfig(source._gradmon_config.fresh_settings())
        else:
            config = GradientConfig(GradientSettings.from_arguments(locals(), "model", "gradient_"))
        object.__setattr__(self, "_gradmon_config", config)
        object.__setattr__(self, "_gradmon_observer", config.observer)
        super().__init__(*args, **kwargs)
        saving.attach(self)
        config.observer.fit_owner = weakref.ref(self)
        _guard_after_compile(self)

    def configure_gradients(self, transform=None, grouping="layer", stats=None, penalties=None,
                            noise_scale=False, on_nonfinite="warn", on_spike=None,
                            spike_threshold=spikes.DEFAULT_SPIKE_THRESHOLD):
        """Sets what is done with the gradients; takes effect at the next `fit`.

        Args:
            transform: a `gradmon.transforms` transform, a callable
                `(grads, params) -> grads`, or `None`. Defaults to `None`.
            grouping: `"layer"` (one row per layer: its variables taken as one
                vector) or `"variable"` (one row per variable). Defaults to `"layer"`.
            stats: names from `gradmon.STAT_NAMES` and/or
                `gradmon.statistics.Statistic` instances, `None` for the defaults
                (`gradmon.statistics.DEFAULT_STATS`: norm, update ratio) or `"all"`.
                Defaults to `None`.
            penalties: `gradmon.penalties.Penalty` list added to the loss.
                Defaults to `None`.
            noise_scale: also estimate the gradient noise scale (one extra
                backward pass on logged steps). Defaults to `False`.
            on_nonfinite: what a step with NaN/inf gradients does: `"warn"`
                (apply it, as Keras would), `"skip"` (weights and optimizer
                state untouched) or `"stop"` (skip it and every later step,
                and end `fit`). Loss-scale overflows are left to the
                `LossScaleOptimizer` under every policy. Defaults to `"warn"`.
            on_spike: what a step whose raw global gradient norm is a spike
                does (z-score above `spike_threshold` against the running
                mean and std of the recent norms; see `gradmon.spikes`):
                `"warn"` (apply it), `"skip"`, `"stop"` (skip it and every later
                step, and end `fit`), or `None` (not tracked: no cost). Where
                gradmon's own train step runs (no `train_step` of the model's
                own) the loss's z-score is logged too. Defaults to `None`.
            spike_threshold: z-score of the log-norm above which a norm is a spike. Defaults to `5.0`.

        Returns:
            The model, for chaining.
        """
        config = GradientConfig(GradientSettings.from_arguments(locals(), "model"))
        _check_own_step(self, config)
        object.__setattr__(self, "_gradmon_config", config)
        _replace_observer(self, config.observer)
        return self

    def fit(self, *args, **kwargs):
        args, kwargs = watched_fit_arguments(self, args, kwargs)
        with _unread_written_if_interrupted(self):
            return super().fit(*args, **kwargs)

    def make_train_function(self, force=False):
        _check_own_step(self, self._gradmon_config)
        return super().make_train_function(force=prepare_model(self) or force)

    def train_step(self, *args):  # (data); on JAX (state, data)
        config = self._gradmon_config
        if not (config.needs_own_step or config.extras.loss):
            return super().train_step(*args)
        if not kc.is_tensorflow_backend():
            return self._gradmon_step_at_door(*args)
        (data,) = args
        x, y, sample_weight = kc.unpack_x_y_sample_weight(data)
        if not self.trainable_weights:
            return super().train_step(data)
        pending = {}
        if config.penalties:
            y_pred, grads, pending["penalties"] = own_step.penalized_step(
                self, x, y, sample_weight, config.penalties)
            pending["loss"] = pending["penalties"]["total_loss"]
        else:
            y_pred, grads, pending["loss"] = own_step.plain_step(self, x, y, sample_weight, with_loss=True)
        if not config.extras.loss:
            del pending["loss"]
        if config.noise_scale and self._gradmon_observer.measuring:
            pending["noise"] = self._gradmon_noise((x, y, sample_weight))
        config.extras.pending = pending
        self.optimizer.apply_gradients(zip(grads, self.trainable_weights))
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def _gradmon_step_at_door(self, *args):
        """gradmon's own train step on JAX (`(state, data)`) and PyTorch (`(data)`)."""
        config, observer = self._gradmon_config, self._gradmon_observer
        if not self.trainable_weights:
            return super().train_step(*args)
        backend = keras.backend.backend()
        if backend not in ("jax", "torch"):
            from gradmon.backend import door

            raise door.unsupported("gradmon's own train step (penalties, noise scale)")
        data = args[-1]
        noise = None
        if config.noise_scale:
            observer.ensure_built(self.optimizer, self.trainable_weights)
            batch = kc.unpack_x_y_sample_weight(data)
            if backend == "jax" and observer.measuring:  # under `lax.cond`: the due steps
                def noise(trainable, non_trainable, optimizer_variables):
                    return own_step.half_batch_moments_at_door(
                        self, batch, observer, trainable, non_trainable, optimizer_variables)
            elif observer.measuring:
                def noise():
                    return own_step.half_batch_moments_at_door(self, batch, observer)
        if backend == "jax":
            state, data = args
            return own_step.jax_train_step(self, state, data, config.penalties, config.extras, noise)
        return own_step.torch_train_step(self, data, config.penalties, config.extras, noise)

    def _gradmon_noise(self, batch):
        import tensorflow as tf

        observer = self._gradmon_observer
        observer.ensure_built(self.optimizer, self.trainable_weights)
        rec = observer.recorder
        g = rec.spec.num_groups
        half = own_step.half_size(batch)
        moments = tf.cond(rec.should_log(rec.step + 1),
                          lambda: own_step.half_batch_moments(self, batch, rec.spec.segment_ids, g),
                          lambda: tf.zeros([g, 3]))
        return {"moments": moments, "half_batch": half}

    def get_config(self):
        config = super().get_config()
        config["gradient_config"] = self._gradmon_config.get_config()
        if kc.cloning_source() is not self:  # clone_model keeps what the config cannot hold
            saving.warn_unsaved(self._gradmon_observer, f"model {self.name!r}'s config")
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        gradient_config = config.pop("gradient_config", None)
        model = super().from_config(config, custom_objects=custom_objects)
        if gradient_config is not None:
            _configure_loaded(model, gradient_config)
        return model

    # gradmon's state (the step axis, counters, spike statistics) is saved in the model's
    # `gradmon_state` slot (gradmon.saving), never among its own variables: the weights load
    # into the plain model, and the files open without gradmon.

    def load_own_variables(self, store):
        keys = list(store.keys())
        if _STEP_KEY in keys:  # a file written by an earlier gradmon
            self._gradmon_observer.restore_step(int(np.asarray(store[_STEP_KEY])))
        own = kc.own_variables(self)
        if len([k for k in keys if k != _STEP_KEY]) != len(own):
            raise ValueError(
                f"Layer '{self.name}' expected {len(own)} variables, but received "
                f"{len(keys)} variables during loading.")
        for i, v in enumerate(own):
            v.assign(store[f"{i}"])

    @property
    def gradient_config(self):
        return self._gradmon_config

    @property
    def gradient_observer(self):
        """The `gradmon.observer.Observer` measuring this model's updates."""
        return self._gradmon_observer


def _replace_observer(model, new):
    """Gives `model` a new observer (new settings): the step axis, the writing monitor and the
    optimizer's hook carry over from the old one, if any."""
    old = getattr(model, "_gradmon_observer", None)
    if old is not None:
        new.restore_step(old.step)
        new.host.monitor, new.host.writer = old.host.monitor, old.host.writer
        optimizer = getattr(model, "optimizer", None)
        if optimizer is not None and observer_of(optimizer) is old:
            old.unhook(optimizer)
    if isinstance(model, GradientMonitorMixin):
        object.__setattr__(model, "_gradmon_observer", new)
    else:
        instrument(model, new)
    _own(model, new)
    if old is not None and old.host.monitor is not None:
        old.host.monitor.adopt(new)
    model.train_function = None


# Saved under plain Keras' names (`kc.serialize_as`): with gradmon imported a file loads as the
# monitored model (settings and state restored); without gradmon, as the plain Functional /
# Sequential model with the same layers, weights and predictions.

@kc.serialize_as(kc.Functional)
@keras.saving.register_keras_serializable(package="gradmon", name="MonitoredFunctional")
class _MonitoredFunctional(GradientMonitorMixin, kc.Functional):
    """A functional model over the layers of an existing one, with the monitored step."""


@kc.serialize_as(keras.Sequential)
@keras.saving.register_keras_serializable(package="gradmon", name="MonitoredWrapper")
class _MonitoredWrapper(GradientMonitorMixin, keras.Model):
    """Wraps a model that is not functional (a subclassed or unbuilt Sequential model).

    Saved as a `keras.Sequential` of the wrapped model (of its layers, for a
    Sequential one): plain Keras loads it as that, the weights at the same paths.
    """

    def __init__(self, inner=None, layers=None, **kwargs):
        if inner is None:  # a Sequential config (from_config)
            inner = layers[0] if layers is not None and len(layers) == 1 else keras.Sequential(layers)
        super().__init__(**kwargs)
        self.inner = inner

    def _obj_type(self):
        return "Sequential"  # Keras' saving walks `layers` first, as for a Sequential

    @property
    def layers(self):
        inner = self.inner
        return list(inner.layers) if isinstance(inner, keras.Sequential) else [inner]

    def call(self, inputs, training=None):
        return self.inner(inputs, training=training)

    def get_config(self):
        if kc.cloning_source() is not self:  # clone_model keeps what the config cannot hold
            saving.warn_unsaved(self._gradmon_observer, f"model {self.name!r}'s config")
        return {"name": self.name, "trainable": self.trainable,
                "layers": [keras.saving.serialize_keras_object(layer) for layer in self.layers],
                "gradient_config": self._gradmon_config.get_config()}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        if "inner" in config:  # written by an earlier gradmon
            layers = [config.pop("inner")]
        else:
            layers = config.pop("layers")
        layers = [keras.saving.deserialize_keras_object(c, custom_objects=custom_objects) for c in layers]
        gradient_config = config.pop("gradient_config")
        config.pop("build_input_shape", None)
        model = cls(layers=layers, **config)
        _configure_loaded(model, gradient_config)
        return model


def _configure_loaded(model, gradient_config):
    """Configures a model made by `from_config`: from the saved config, or, inside
    `keras.models.clone_model`, from the model cloned (its very settings, fresh state)."""
    source = kc.cloning_source()
    if isinstance(source, GradientMonitorMixin) and type(source) is type(model):
        model.configure_gradients(**source._gradmon_config.fresh_settings().keywords("model"))
    else:
        model.configure_gradients(**gradient_config_args(gradient_config))


def gradient_config_args(config):
    """Keyword arguments of `configure_gradients` from `GradientConfig.get_config()`."""
    config = dict(config)
    if config.get("transform") is not None:
        config["transform"] = transforms.deserialize(config["transform"])
    config["penalties"] = [penalties_module.deserialize(p) for p in config.get("penalties", [])]
    return config


def monitor(model, transform=None, grouping="layer", stats=None, penalties=None,
            noise_scale=False, on_nonfinite="warn", on_spike=None,
            spike_threshold=spikes.DEFAULT_SPIKE_THRESHOLD):
    """Observes (and optionally transforms) the gradients a model's training applies.

    Fit the returned model as you would `model`. A model with Keras' own
    `train_step` comes back as a model sharing its layers and weights, with
    gradmon's step (penalties and the noise scale need it); if `model` was
    compiled, the new one is compiled with the same arguments and the same
    optimizer instance (else compile it as you would `model`). Fit the
    returned model: fitting `model` itself trains without the transform,
    penalties and policies (warned once). A model with
    its own `train_step` comes back *itself*, observed at its optimizer: its
    step, its losses and its history keys are kept.

    Under a `tf.distribute` strategy, call it inside `strategy.scope()`:
    statistics are those of the all-reduced gradient, and `transform` (and
    the optimizer's own clipping) act on that gradient, as on one device.

    Args:
        model: a `keras.Model` (Sequential, functional or subclassed).
        transform: a gradient transform from `gradmon.transforms`, a callable
            `(grads, params) -> grads`, or `None`. Defaults to `None`.
        grouping: `"layer"` (one row per layer: its variables taken as one vector)
            or `"variable"` (one row per variable). Defaults to `"layer"`.
        stats: names from `gradmon.STAT_NAMES` and/or
            `gradmon.statistics.Statistic` instances, `None` for the defaults
            (`gradmon.statistics.DEFAULT_STATS`: norm, update ratio) or `"all"`.
            Defaults to `None`.
        penalties: a list of `gradmon.penalties.Penalty` added to the loss,
            or `None`. Defaults to `None`.
        noise_scale: also log the gradient noise scale and per-group SNR.
            Defaults to `False`.
        on_nonfinite: `"warn"`, `"skip"` or `"stop"` (see
            `GradientMonitorMixin.configure_gradients`). Defaults to `"warn"`.
        on_spike: `None` (spikes not tracked), `"warn"`, `"skip"` or `"stop"`
            (see `GradientMonitorMixin.configure_gradients`). Defaults to `None`.
        spike_threshold: z-score of the log of the raw global norm above which it is a spike
            (full batches only). Defaults to `5.0`.

    Returns:
        The monitored `keras.Model`.

    Example:
        >>> m = gradmon.monitor(model, transform=gradmon.transforms.clip_by_global_norm(1.0))
        >>> m.compile(optimizer="adam", loss="mse")
        >>> m.fit(x, y, callbacks=[gradmon.GradientMonitor("runs/exp1")])
    """
    options = GradientSettings.pick(locals(), "model")
    if isinstance(model, GradientMonitorMixin):
        return model.configure_gradients(**options)
    if not isinstance(model, keras.Model):
        raise invalid("model", "a keras.Model", model)
    config = GradientConfig(GradientSettings(**options))
    if not kc.model_train_step_is_keras(model):
        _check_own_step(model, config)
        _replace_observer(model, config.observer)
        return model
    kwargs = dict(config.settings.keywords("model", "gradient_"), name=f"{model.name}_monitored")
    inputs, outputs = kc.functional_structure(model)
    if inputs is not None:
        monitored = _MonitoredFunctional(inputs=inputs, outputs=outputs, **kwargs)
    else:
        monitored = _MonitoredWrapper(model, **kwargs)
    compiled_with = kc.compile_arguments(model)
    if compiled_with is not None:  # monitor(compiled model) stays compiled, as a user expects
        monitored.compile(**compiled_with)
    _guard_original(model, monitored)
    return monitored


def _guard_original(original, monitored):
    """Warns when `original` (the model `monitor` wrapped) is fitted while `monitored` would
    change its gradients: that fit trains without the transform, penalties or policies.

    `monitor` returns a new model sharing the layers; fitting the original afterwards is an
    easy slip (a notebook cell) that trains unclipped. The original's `make_train_function`
    (run by every `fit`) checks, once per pair; nothing is added to its train step.
    """
    object.__setattr__(original, "_gradmon_monitored_as", weakref.ref(monitored))
    if "_gradmon_guarded_make_train_function" in original.__dict__:
        return
    make = original.make_train_function
    object.__setattr__(original, "_gradmon_guarded_make_train_function", make)

    def make_train_function(force=False):
        _warn_original_fitted(original)
        return make(force=force)

    object.__setattr__(original, "make_train_function", make_train_function)


def _warn_original_fitted(original):
    monitored = original.__dict__.get("_gradmon_monitored_as", lambda: None)()
    if monitored is None:
        return
    config = monitored._gradmon_config
    observer = config.observer
    changes = []
    if observer.transform is not None:
        changes.append(f"the gradient transform {saving.describe(observer.transform)}")
    if config.penalties:
        changes.append("the penalties")
    if observer.on_nonfinite != "warn":
        changes.append(f"on_nonfinite={observer.on_nonfinite!r}")
    if observer.on_spike in ("skip", "stop"):
        changes.append(f"on_spike={observer.on_spike!r}")
    optimizer = getattr(original, "optimizer", None)
    if not changes or (optimizer is not None and observer_of(optimizer) is observer):
        return  # nothing would differ, or the shared optimizer applies them anyway
    from gradmon._validation import warn_once

    warn_once(("original-fitted", id(original), id(monitored)),
              f"gradmon: fitting {original.name!r}, the model gradmon.monitor() wrapped: this fit "
              f"trains without {' and '.join(changes)} of the monitored model {monitored.name!r} "
              "(they share the layers and weights). Fit the model monitor() returned instead.")
