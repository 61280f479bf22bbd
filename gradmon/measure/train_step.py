"""gradmon's own train step: the features that need the loss (penalties, noise scale).

Everything else is observed at the optimizer (`gradmon.observer`), whatever
computes the gradients. This step keeps the semantics of Keras' `train_step`
(training argument, loss scaling, loss tracker, sample weights,
regularization losses, metrics) and adds, before the optimizer's update:
penalties differentiated on their own (each part's gradient taken apart), and
the half-batch gradients of the noise scale on logged steps. Their numbers
reach the observer's statistics through `Extras`, taken by the hooked apply of
the same step.

- TensorFlow: `penalized_step` / `plain_step` (`tf.GradientTape`, a nested tape
  for the data gradient a penalty differentiates).
- JAX: `jax_train_step(model, state, data, ...)` replaces the stateless
  `train_step(state, data)` of Keras' JAX trainer: `jax.vjp` of the vector
  `[data loss, penalty 1, ...]` over `compute_loss_and_updates` (one forward
  pass, one backward pass per part), `jax.value_and_grad` inside it for the
  data gradient a penalty differentiates (double backward); then
  `optimizer.stateless_apply`.
- PyTorch: `torch_train_step(model, data, ...)`: `torch.autograd.grad` per part,
  `create_graph=True` for the data gradient a penalty differentiates.
"""

import contextlib

import keras

from gradmon.backend import lazy_tf as _lazy_tf
from gradmon.backend import distribute as _distribute
from gradmon.backend import keras_compat as kc
from gradmon.measure import penalties as penalties_module
from gradmon.measure import moments as stats
from gradmon.measure.pipeline import divided, multiplied

tf = _lazy_tf.tensorflow()


class Extras:
    """Numbers gradmon's train step hands to the observer of the same step.

    Set while tracing `train_step`, taken by the hooked `apply` of the same
    trace (so they are tensors of the same graph).
    """

    def __init__(self, penalty_names=(), noise_scale=False, loss=False):
        self.penalty_names, self.noise_scale = list(penalty_names), noise_scale
        # the batch loss is handed over (`"loss"`) for the spike detector's loss z-score
        self.loss = loss
        self.pending = {}

    def spec_extras(self):
        return {"penalty_names": tuple(self.penalty_names), "noise_scale": self.noise_scale}

    def take_extras(self):
        taken, self.pending = self.pending, {}
        return taken


def penalized_step(model, x, y, sample_weight, penalty_list):
    """`(y_pred, scaled gradients, numbers)` of data loss + penalties, each part on its own.

    `numbers` holds the data loss, total loss, penalty values and the norm of
    each penalty's own (unscaled) gradient. Under a strategy they are this
    replica's (the host reads the first replica's), and a penalty needing
    the data gradient sees its shard's gradient.
    """
    variables = model.trainable_weights
    need_gradients = any(p.needs_gradients for p in penalty_list)
    scale = kc.loss_scale(model.optimizer)
    replicas = _distribute.num_replicas()

    def scaled(loss):
        return model.optimizer.scale_loss(loss) if model.optimizer is not None else loss

    def unscaled(grads):
        return list(grads) if scale is None else [divided(g, scale) for g in grads]

    with tf.GradientTape(persistent=True) as outer:
        # A nested tape makes the data gradient differentiable (double backprop).
        inner = tf.GradientTape() if need_gradients else contextlib.nullcontext()
        with inner:
            y_pred = kc.call_with_training(model, x)
            data_loss = kc.compute_loss(model, x, y, y_pred, sample_weight)
            scaled_data = scaled(data_loss)
        context = penalties_module.PenaltyContext(model, x, y, sample_weight, y_pred, variables)
        if need_gradients:
            data_gradients = inner.gradient(scaled_data, variables)
            # a replica's loss is divided by the number of replicas: its shard's gradient
            context.data_gradients = [g if replicas == 1 else multiplied(g, replicas)
                                      for g in unscaled(data_gradients)]
        values = [tf.cast(p(context), data_loss.dtype) for p in penalty_list]
        # Keras divides each replica's loss by the number of replicas; so are the penalties.
        shares = [kc.scale_loss_for_distribution(v) for v in values]
        total = data_loss + tf.add_n(shares)
        kc.track_loss(model, total, x)
        scaled_values = [scaled(v) for v in shares]
    if not need_gradients:
        data_gradients = outer.gradient(scaled_data, variables)
    parts = [data_gradients] + [outer.gradient(v, variables) for v in scaled_values]
    del outer
    numbers = {
        "data_loss": kc.unscale_loss_for_distribution(data_loss),
        "total_loss": kc.unscale_loss_for_distribution(total),
        "values": values,
        "grad_norms": [stats.global_norm(unscaled(part)) * replicas for part in parts[1:]],
    }
    return y_pred, _summed(parts), numbers


def _summed(parts):
    out = []
    for per_part in zip(*parts):
        present = [tf.convert_to_tensor(g) for g in per_part if g is not None]
        out.append(tf.add_n(present) if present else None)
    return out


def plain_step(model, x, y, sample_weight, with_loss=False):
    """`(y_pred, scaled gradients)` exactly as Keras' own TensorFlow `train_step`
    (`with_loss`: and the batch loss as Keras' loss tracker gets it)."""
    with tf.GradientTape() as tape:
        y_pred = kc.call_with_training(model, x)
        loss = kc.compute_loss(model, x, y, y_pred, sample_weight)
        kc.track_loss(model, loss, x)
        unscaled = loss
        if model.optimizer is not None:
            loss = model.optimizer.scale_loss(loss)
    grads = tape.gradient(loss, model.trainable_weights)
    if not with_loss:
        return y_pred, grads
    return y_pred, grads, kc.unscale_loss_for_distribution(unscaled)


def half_size(batch):
    """The number of examples in each half of `(x, y, sample_weight)` (the first input's)."""
    return tf.shape(kc.tree.flatten(batch[0])[0])[0] // 2


def half_batch_moments(model, batch, segment_ids, num_groups):
    """Per group `[|g1|^2, |g2|^2, g1.g2]` for the gradients of the two batch halves
    (`half_size(batch)` examples each).

    Computed in a `keras.StatelessScope`, so the extra forward passes change
    no BatchNorm statistic, RNG state or loss tracker. Under a strategy, of
    this replica's shard (B_simple does not depend on the batch size).
    """
    x, y, sample_weight = batch
    variables = model.trainable_weights
    half = half_size(batch)
    replicas = float(_distribute.num_replicas())

    def part(start):
        def take(t):
            return None if t is None else t[start:start + half]
        xs, ys, ws = (kc.tree.map_structure(take, t) if t is not None else None
                      for t in (x, y, sample_weight))
        params = [tf.identity(v.value) for v in variables]
        with tf.GradientTape() as tape:
            tape.watch(params)
            with keras.StatelessScope(state_mapping=list(zip(variables, params)), collect_losses=True):
                pred = kc.call_with_training(model, xs)
                loss = kc.compute_loss(model, xs, ys, pred, ws)
        # Keras divides a replica's loss by the number of replicas: undo it
        return [None if g is None else tf.cast(tf.convert_to_tensor(g), tf.float32) * replicas
                for g in tape.gradient(loss, params)]

    rows = []
    for a, b in zip(part(0), part(half)):
        if a is None or b is None:
            rows.append(tf.zeros([3]))
        else:
            rows.append(tf.stack([tf.reduce_sum(a * a), tf.reduce_sum(b * b), tf.reduce_sum(a * b)]))
    moments = tf.math.unsorted_segment_sum(tf.stack(rows), tf.constant(segment_ids, tf.int32), num_groups)
    return moments


# -- JAX and PyTorch --------------------------------------------------------------------

def _penalty_numbers(data_loss, values, penalty_grads, scale=None):
    """The `numbers` of `penalized_step` (one replica: no distribution on JAX / PyTorch here);
    `penalty_grads` of the scaled loss when `scale` is given (a loss-scaling optimizer)."""
    total = data_loss
    for v in values:
        total = total + v
    norms = [stats.global_norm(part) for part in penalty_grads]
    if scale is not None:
        norms = [n / scale for n in norms]
    return total, {"data_loss": data_loss, "total_loss": total, "values": values, "grad_norms": norms}


def _loss_scale_value(model, optimizer_variables=None):
    """The factor `optimizer.scale_loss` multiplies the loss by this step (a float32 tensor), or
    `None`: a `LossScaleOptimizer`'s `dynamic_scale` (JAX: its value in the carried
    `optimizer_variables`), a plain optimizer's `loss_scale_factor`."""
    scale = kc.loss_scale(model.optimizer)
    if scale is None:
        return None
    if isinstance(scale, keras.Variable):
        if optimizer_variables is not None:
            scale = next(v for ref, v in zip(model.optimizer.variables, optimizer_variables) if ref is scale)
        else:
            scale = scale.value
        if keras.backend.backend() == "torch":
            scale = scale.detach().clone()  # the optimizer assigns it in place
    return keras.ops.cast(scale, "float32")


def _iteration_key(model, optimizer_variables):
    """On JAX, a random key for this step: `fold_in` of a base seed (once per model: the seed
    of `keras.utils.set_random_seed` if one was set, else the system's randomness -- no global
    RNG is drawn from, so the data's shuffling stays as without penalties) and the optimizer's
    iteration count (in the state the jitted step carries)."""
    import random

    import jax
    from keras.src.utils import rng_utils

    base = model.__dict__.get("_gradmon_penalty_seed")
    if base is None:
        base = rng_utils.get_random_seed()
        if base is None:
            base = random.SystemRandom().randrange(2**31 - 1)
        object.__setattr__(model, "_gradmon_penalty_seed", int(base) % (2**31 - 1))
        base = model.__dict__["_gradmon_penalty_seed"]
    iterations = model.optimizer.iterations
    value = next(v for ref, v in zip(model.optimizer.variables, optimizer_variables) if ref is iterations)
    return jax.random.fold_in(jax.random.PRNGKey(base), value)


def jax_train_step(model, state, data, penalty_list, extras, noise=None):
    """Keras' JAX `train_step(state, data)` with gradmon's penalties added to the loss.

    Returns `(logs, state)` as Keras' does. Sets `extras.pending` for the hooked apply
    that `optimizer.stateless_apply` runs in this trace: `"penalties"` (`numbers` of
    `penalized_step`), `"loss"` (the batch loss the loss tracker gets) and, with
    `noise(trainable, non_trainable, optimizer_variables)` (the step's values before the
    update), `"noise"`.
    """
    import jax
    import jax.numpy as jnp

    trainable, non_trainable, optimizer_variables, metrics_variables = state
    x, y, sample_weight = kc.unpack_x_y_sample_weight(data)
    need_gradients = any(p.needs_gradients for p in penalty_list)
    seed = _iteration_key(model, optimizer_variables) if penalty_list else None
    # the data loss comes scaled (compute_loss_and_updates); the penalties are scaled alike
    scale = _loss_scale_value(model, optimizer_variables)

    def data_part(weights):
        return model.compute_loss_and_updates(
            weights, non_trainable, metrics_variables, x, y, sample_weight,
            training=True, optimizer_variables=optimizer_variables)

    def parts(weights):
        if need_gradients:
            (scaled, aux), data_gradients = jax.value_and_grad(data_part, has_aux=True)(weights)
            if scale is not None:
                data_gradients = [g / keras.ops.cast(scale, g.dtype) for g in data_gradients]
        else:
            (scaled, aux), data_gradients = data_part(weights), None
        unscaled, y_pred, new_non_trainable, _ = aux
        mapping = (list(zip(model.trainable_variables, weights))
                   + list(zip(model.non_trainable_variables, new_non_trainable)))
        # the penalties read this step's weights; what their forward passes assign is dropped
        with keras.StatelessScope(state_mapping=mapping):
            context = penalties_module.PenaltyContext(
                model, x, y, sample_weight, y_pred, list(model.trainable_variables),
                data_gradients, seed)
            values = [keras.ops.cast(p(context), unscaled.dtype) for p in penalty_list]
        scaled_values = values if scale is None else [v * keras.ops.cast(scale, v.dtype) for v in values]
        return jnp.stack([scaled] + scaled_values), (aux, values)

    if penalty_list:
        vector, pullback, (aux, values) = jax.vjp(parts, trainable, has_aux=True)
        count = 1 + len(penalty_list)
        per_part = [pullback(jnp.eye(count, dtype=vector.dtype)[k])[0] for k in range(count)]
        grads = [_sum_present(per_variable) for per_variable in zip(*per_part)]
    else:
        (_, aux), grads = jax.value_and_grad(data_part, has_aux=True)(trainable)
        values, per_part = [], [grads]
    unscaled, y_pred, non_trainable, metrics_variables = aux
    pending = {}
    loss = unscaled
    if penalty_list:
        loss, pending["penalties"] = _penalty_numbers(unscaled, values, per_part[1:], scale)
    if extras.loss:
        pending["loss"] = loss
    if noise is not None:
        pending["noise"] = noise(trainable, non_trainable, optimizer_variables)
    extras.pending = pending
    trainable, optimizer_variables = model.optimizer.stateless_apply(
        optimizer_variables, grads, trainable)
    logs, metrics_variables = model._update_metrics_variables(
        metrics_variables, loss, x, y, y_pred, sample_weight)
    return logs, (trainable, non_trainable, optimizer_variables, metrics_variables)


def _sum_present(tensors):
    present = [t for t in tensors if t is not None]
    if not present:
        return None
    total = present[0]
    for t in present[1:]:
        total = total + t
    return total


def torch_train_step(model, data, penalty_list, extras, noise=None):
    """Keras' PyTorch `train_step(data)` with gradmon's penalties added to the loss.

    Each part's gradient by `torch.autograd.grad`; the data gradient a penalty
    differentiates with `create_graph=True` (double backward). Sets `extras.pending`
    as `jax_train_step` does, then applies under `torch.no_grad()`.
    """
    import torch

    x, y, sample_weight = kc.unpack_x_y_sample_weight(data)
    weights = model.trainable_weights[:]
    params = [v.value for v in weights]
    need_gradients = any(p.needs_gradients for p in penalty_list)
    y_pred = kc.call_with_training(model, x)
    model.zero_grad()
    data_loss = kc.compute_loss(model, x, y, y_pred, sample_weight)

    def scaled(loss):
        return model.optimizer.scale_loss(loss) if model.optimizer is not None else loss

    def gradients(loss, **kwargs):
        if not loss.requires_grad:  # e.g. a penalty of weight 0 on no weight
            return [None] * len(params)
        return list(torch.autograd.grad(scaled(loss), params, allow_unused=True, **kwargs))

    scale = _loss_scale_value(model)
    data_gradients = None
    if need_gradients:
        data_gradients = gradients(data_loss, create_graph=True)
    unscaled_data_gradients = data_gradients
    if need_gradients and scale is not None:
        unscaled_data_gradients = [None if g is None else g / scale.to(g.dtype) for g in data_gradients]
    context = penalties_module.PenaltyContext(model, x, y, sample_weight, y_pred, weights,
                                              unscaled_data_gradients)
    values = [keras.ops.cast(p(context), data_loss.dtype) for p in penalty_list]
    per_part = [data_gradients if need_gradients else None]
    per_part += [gradients(v, retain_graph=True) for v in values]
    if per_part[0] is None:
        per_part[0] = gradients(data_loss)
    per_part = [[None if g is None else g.detach() for g in part] for part in per_part]
    pending = {}
    loss = data_loss
    if penalty_list:
        loss, pending["penalties"] = _penalty_numbers(data_loss.detach(), [v.detach() for v in values],
                                                      per_part[1:], scale)
    model._loss_tracker.update_state(
        loss.detach(), sample_weight=next(i for i in kc.tree.flatten(x) if i is not None).shape[0])
    if extras.loss:
        pending["loss"] = loss.detach()
    if noise is not None:
        measured = noise()
        if measured is not None:
            pending["noise"] = measured
    extras.pending = pending
    grads = [_sum_present(per_variable) for per_variable in zip(*per_part)]
    with torch.no_grad():
        model.optimizer.apply(grads, weights)
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


def half_batch_moments_at_door(model, batch, observer, trainable=None, non_trainable=None,
                               optimizer_variables=None):
    """The noise scale's extras on JAX and PyTorch: `{"moments", "half_batch"}` as
    `half_batch_moments` gives them on TensorFlow, computed on due steps only.

    JAX: in the jitted step, from the step's `trainable` / `non_trainable` values (the
    recorder's step read from `optimizer_variables`), under `lax.cond`; PyTorch: on the
    host, `None` on a step that is not due. The extra forward passes change no state
    (a `StatelessScope`: what they assign is dropped).
    """
    from gradmon.backend import door as _door

    door = _door.current()
    rec = observer.recorder
    groups = rec.spec.num_groups
    x, y, sample_weight = batch
    half = int(keras.ops.shape(kc.tree.flatten(x)[0])[0]) // 2
    jax_step = trainable is not None
    if jax_step:
        mapping = list(zip(model.optimizer.variables, optimizer_variables))
        with keras.StatelessScope(state_mapping=mapping):
            due = rec.should_log(rec.step.value + 1)
    else:
        due = rec.should_log(rec.step.value + 1)

    def part(start):
        def take(t):
            return None if t is None else t[start:start + half]

        xs, ys, ws = (kc.tree.map_structure(take, t) if t is not None else None
                      for t in (x, y, sample_weight))
        if jax_step:
            import jax

            def loss_of(weights):
                mapping = (list(zip(model.trainable_variables, weights))
                           + list(zip(model.non_trainable_variables, non_trainable)))
                with keras.StatelessScope(state_mapping=mapping, collect_losses=True):
                    pred = kc.call_with_training(model, xs)
                    return kc.compute_loss(model, xs, ys, pred, ws)

            return jax.grad(loss_of)(trainable)
        import torch

        params = [v.value for v in model.trainable_variables]
        mapping = [(v, v.value.detach()) for v in model.non_trainable_variables]
        # unseeded dropout draws from torch's global generator: given back as it was
        with torch.random.fork_rng(), keras.StatelessScope(state_mapping=mapping, collect_losses=True):
            pred = kc.call_with_training(model, xs)
            loss = kc.compute_loss(model, xs, ys, pred, ws)
        return torch.autograd.grad(loss, params, allow_unused=True)

    def moments():
        rows = []
        for a, b in zip(part(0), part(half)):
            if a is None or b is None:
                rows.append(keras.ops.zeros([3]))
                continue
            a, b = keras.ops.cast(a, "float32"), keras.ops.cast(b, "float32")
            rows.append(keras.ops.stack([keras.ops.sum(a * a), keras.ops.sum(b * b), keras.ops.sum(a * b)]))
        ids = keras.ops.convert_to_tensor(rec.spec.segment_ids, "int32")
        summed = keras.ops.segment_sum(keras.ops.stack(rows), ids, num_segments=groups)
        return keras.ops.reshape(summed, [-1])

    taken = door.cond(due, moments, 3 * groups)
    if taken is None:  # PyTorch, a step not due: nothing measured
        return None
    return {"moments": keras.ops.reshape(taken, [groups, 3]), "half_batch": half}
