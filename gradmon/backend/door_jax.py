"""The optimizer's door on JAX (see `gradmon.backend.door`).

Keras' JAX `fit` is stateless: its jitted step calls
`optimizer.stateless_apply`, which runs the hooked `apply` in a
`StatelessScope` over the optimizer's variables and returns their new values.
The recorder's state is therefore made with the optimizer's `add_variable`:
it rides in the optimizer state the trainer threads through every step
(`steps_per_execution` included), and is left out of what the optimizer saves
and loads (a plain optimizer can load the files). Branches are `lax.cond`
with pure branches returning the row; the assignment is outside.

Between two steps the trainer holds the current state (its private
`_jax_state`) while the variables are stale (their buffers are purged):
host reads take the one array from there; a host write first syncs the
state back into the variables (`jax_state_sync`), so that the next step
starts from them.

In a custom loop (`gradmon.observe`) the user's jitted step calls
`stateless_apply` itself and keeps the optimizer variables it returns:
`observe` builds gradmon's state with the optimizer (`optimizer.build`), so
the `optimizer.variables` the loop takes after building hold it, and
`opt.flush(optimizer_variables=...)` reads it from the loop's list
(`Observer.carried`), writing the host's few writes (which non-finite steps
were reported) back into that list. An eager loop (`optimizer.apply` outside
jit, `on_host`) keeps the state in the variables and writes as it goes.
"""

import contextlib

import keras
import numpy as np

EAGER = False  # the hooked apply runs inside the jitted step (`on_host`: or outside jit)
_OWNERS = []
_STATE_IDS = "_gradmon_state_ids"


@contextlib.contextmanager
def owner(optimizer):
    _OWNERS.append(optimizer)
    try:
        yield
    finally:
        _OWNERS.pop()


def state_variable(initial, dtype=None, name=None):
    """A variable of the optimizer's state (`add_variable`), out of its saved variables."""
    from keras.src.backend.common.stateless_scope import in_stateless_scope

    from gradmon.backend.door import unsupported

    if not _OWNERS:
        raise RuntimeError("gradmon: a JAX state variable needs its optimizer (door.state_owner).")
    if in_stateless_scope():
        raise unsupported("a model first built inside `fit` (build it before: call it once on a "
                          "batch, or give it an `Input`)")
    optimizer = _OWNERS[-1]
    value = np.asarray(initial)
    variable = optimizer.add_variable(value.shape, initializer=lambda shape, dtype: value,
                                      dtype=dtype, name=name or "gradmon_state")
    _keep_out_of_saving(optimizer).add(id(variable))
    return variable


def _keep_out_of_saving(optimizer):
    ids = optimizer.__dict__.get(_STATE_IDS)
    if ids is not None:
        return ids
    ids = set()
    object.__setattr__(optimizer, _STATE_IDS, ids)
    for method in ("save_own_variables", "load_own_variables"):
        object.__setattr__(optimizer, method, _without_state(optimizer, getattr(optimizer, method)))
    return ids


def _without_state(optimizer, original):
    def call(store):
        held = optimizer._variables[:]
        optimizer._variables[:] = [v for v in held if id(v) not in optimizer.__dict__[_STATE_IDS]]
        try:
            return original(store)
        finally:
            optimizer._variables[:] = held

    return call


def weights(variables, pred):
    """The weights before the update (the scope's values: nothing is copied)."""
    return [v.value for v in variables]


def cond(pred, true_fn, width):
    import jax

    return jax.lax.cond(pred, true_fn, lambda: keras.ops.zeros([width], "float32"))


def _unsynced_state(observer):
    """`(model, state)` while the trainer of the observer's model (`Observer.watch_model`) holds
    state newer than the variables, else `(None, None)`."""
    ref = getattr(observer, "trainer", None)
    model = ref() if ref is not None else None
    returned = getattr(observer, "returned", None)
    if returned is not None and model is not None:
        observer.returned = None  # held once, by the first read of that execution's host work
        _hold(model, returned)
    state = getattr(model, "_jax_state", None) if model is not None else None
    if not state or getattr(model, "_jax_state_synced", True):
        return None, None
    return model, state


def _hold(model, returned):
    """Hands the state a JAX train function returned, `(logs, state)`, to its model's trainer
    as the trainer itself does right after (`_jax_state`), for the host reads and
    writes of `GradientMonitor`'s work, which runs before the trainer gets it back.

    The state is the trainer's `(trainable, non_trainable, optimizer, metrics)` values; one
    of another layout is left alone (warned of once): the host then reads the state the
    trainer held before this execution.
    """
    from gradmon._validation import warn_once

    state = returned[1] if isinstance(returned, tuple) and len(returned) == 2 else None
    optimizer = getattr(model, "optimizer", None)
    if not (isinstance(state, (tuple, list)) and len(state) == 4 and optimizer is not None
            and isinstance(state[2], (tuple, list)) and len(state[2]) == len(optimizer.variables)):
        warn_once(("jax-state-layout", id(model)),
                  "gradmon: the state returned by Keras' JAX train function is not "
                  "(trainable, non_trainable, optimizer, metrics) values; gradmon reads its "
                  "numbers one execution late.")
        return
    names = ("trainable_variables", "non_trainable_variables", "optimizer_variables",
             "metrics_variables")
    model._jax_state = dict(zip(names, state))


def on_host(value):
    """Whether the hooked apply runs outside `jax.jit` (`value` is concrete, not a tracer):
    an eager loop calling `optimizer.apply`, whose state is in the variables themselves."""
    import jax

    return not isinstance(value, jax.core.Tracer)


def _index(optimizer, variable):
    return next(i for i, v in enumerate(optimizer.variables) if v is variable)


def read(variable, observer=None):
    carried = getattr(observer, "carried", None)
    if carried is not None:  # a functional loop's optimizer variables (`Observer.flush`)
        return np.asarray(carried[_index(observer.optimizer, variable)])
    model, state = _unsynced_state(observer)
    if state is not None:
        for i, v in enumerate(model.optimizer.variables):
            if v is variable:
                return np.asarray(state["optimizer_variables"][i])
    return np.asarray(keras.ops.convert_to_numpy(variable.value))


def assign(variable, value, observer=None):
    carried = getattr(observer, "carried", None)
    if isinstance(carried, list):  # the loop's next step carries the write (a tuple cannot)
        carried[_index(observer.optimizer, variable)] = keras.ops.convert_to_tensor(value, variable.dtype)
    model, state = _unsynced_state(observer)
    if state is not None:
        model.jax_state_sync()  # the next step starts from the variables again
    variable.assign(value)


def hook_loss_scale(optimizer):
    """Routes a `LossScaleOptimizer`'s `stateless_apply` through its (hooked) `apply`.

    Keras' JAX `fit` calls `stateless_apply`, which a `LossScaleOptimizer`
    overrides: it checks the gradients itself and calls its inner optimizer's
    `stateless_apply` only on finite steps, so its `apply` never runs there.
    Here its `stateless_apply` runs `optimizer.apply` (gradmon's hook: every
    step, overflows included, measured once) in a `StatelessScope` over its
    variables and the weights, as Keras' own `stateless_apply` does; the hook's
    update is the original `stateless_apply` on the scope's current values.

    Returns:
        The update for the hook, `(grads, variables) -> None`.
    """
    from keras.src.backend.common.stateless_scope import StatelessScope

    original = type(optimizer).stateless_apply.__get__(optimizer)

    def update(grads, variables=None):
        weights = optimizer._trainable_variables
        new_weights, new_state = original([v.value for v in optimizer.variables], list(grads),
                                          [v.value for v in weights])
        for v, value in zip(list(weights) + list(optimizer.variables), list(new_weights) + list(new_state)):
            v.assign(value)

    def stateless_apply(optimizer_variables, grads, trainable_variables):
        weights = optimizer._trainable_variables
        mapping = list(zip(weights, trainable_variables)) + list(zip(optimizer.variables, optimizer_variables))
        with StatelessScope(state_mapping=mapping) as scope:
            optimizer.apply(grads, weights)
        return ([scope.get_current_value(v) for v in weights],
                [scope.get_current_value(v) for v in optimizer.variables])

    object.__setattr__(optimizer, "stateless_apply", stateless_apply)
    return update
