"""gradmon's own train step: the features that need the loss (penalties, noise scale).

Everything else is observed at the optimizer (`gradmon.observer`), whatever
computes the gradients. This step keeps the semantics of Keras' TensorFlow
`train_step` (training argument, loss scaling, loss tracker, sample weights,
regularization losses, metrics) and adds, before `apply_gradients`:
penalties differentiated on their own tapes, and the half-batch gradients of
the noise scale on logged steps. Their numbers reach the observer's
statistics through `Extras`.
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
