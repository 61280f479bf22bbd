"""What gradmon needs from `tf.distribute`: replica-local state, all-reduces, the chief.

Under `tf.distribute.MirroredStrategy` / `MultiWorkerMirroredStrategy` a Keras
train step runs once per replica, on that replica's shard of the global batch,
with the loss already divided by the number of replicas; the optimizer sums
the per-replica gradients (an all-reduce) inside `apply`, *after* its own
`clipnorm` / `global_clipnorm` / `clipvalue`, so Keras clips each replica's
gradient, not the global one. gradmon all-reduces once, before the
optimizer (which it tells not to all-reduce again), measures that global
gradient and transforms it (see `gradmon.pipeline`).

Outside a strategy every function here is the identity / a no-op.

On JAX, `keras.distribution` (`DataParallel`, `ModelParallel`) shards the
jitted step instead: the gradient reaching the door is the global one (its
all-reduce, for data parallelism, happens inside `jax.grad`), so gradmon adds
no all-reduce there, and XLA inserts what the norms of sharded tensors need.
Only process 0 writes (`is_chief`). Keras' PyTorch backend has no
`keras.distribution` (`gradmon.backend.door.check_supported` refuses it).
"""

import contextlib

from gradmon.backend import lazy_tf as _lazy_tf

tf = _lazy_tf.tensorflow()


def replica_local_variable(initial_value, dtype=None, name=None):
    """A non-trainable state variable each replica reads and writes on its own.

    Under a strategy's scope it is a `SyncOnReadVariable` with
    `ONLY_FIRST_REPLICA` aggregation: assignments in the train step touch the
    replica's own copy (no synchronisation point, so they may sit inside a
    `tf.cond`), and reading it on the host gives the first replica's copy.
    gradmon writes the same numbers on every replica (they are computed from
    all-reduced gradients), so that copy stands for all. Host-side
    assignments set every copy. Outside a strategy it is a plain variable.

    On JAX and PyTorch: the door's state variable (`gradmon.backend.door`).
    """
    if not _lazy_tf.is_tensorflow():
        from gradmon.backend import door

        return door.current().state_variable(initial_value, dtype, name)
    return tf.Variable(initial_value, dtype=dtype, name=name, trainable=False,
                       synchronization=tf.VariableSynchronization.ON_READ,
                       aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)


def strategy_scope(strategy):
    """`strategy.scope()`, or a null context when `strategy` is `None` or a scope is already entered."""
    if strategy is None or not _lazy_tf.is_tensorflow() or tf.distribute.has_strategy():
        return contextlib.nullcontext()
    return strategy.scope()


def in_replicas():
    """Whether this runs in the replica context of a (non-default) strategy, e.g. in its `run`."""
    return tf.distribute.has_strategy() and tf.distribute.in_cross_replica_context() is False


def num_replicas():
    """Replicas summing their gradients in this step (1 outside a strategy; on JAX and PyTorch
    the framework reduced them already, before the door)."""
    if not _lazy_tf.is_tensorflow():
        return 1
    context = tf.distribute.get_replica_context()
    if context is None:  # cross-replica context: not inside a train step
        return 1
    return int(context.num_replicas_in_sync)


def all_reduce_sum(values):
    """Sums a list of tensors / `tf.IndexedSlices` / `None` over the replicas.

    A synchronisation point: every replica must reach it, so it must not sit
    inside a `tf.cond` whose branch could differ between replicas (and, with
    merge calls, inside no `tf.cond` at all).
    """
    if num_replicas() == 1:
        return list(values)
    present = [i for i, v in enumerate(values) if v is not None]
    reduced = tf.distribute.get_replica_context().all_reduce(
        tf.distribute.ReduceOp.SUM, [values[i] for i in present])
    out = [None] * len(values)
    for i, r in zip(present, reduced):
        out[i] = r
    return out


def cond_apply(pred, apply_fn, args):
    """Runs `apply_fn(*args)` (an optimizer update) when `pred` holds, on every replica alike.

    `apply_gradients` synchronises the replicas (a merge call on CPU and in
    multi-worker setups), which a strategy does not allow inside a `tf.cond`
    in replica context. As Keras' `LossScaleOptimizer` does, the condition is
    taken in cross-replica context (from the first replica: callers pass a
    `pred` that is the same on all replicas) and the update re-enters the
    replicas. `args` are per-replica values (passed, not captured, so each
    replica gets its own).
    """
    context = tf.distribute.get_replica_context()
    if not in_replicas() or tf.__internal__.distribute.strategy_supports_no_merge_call():
        def run():
            apply_fn(*args)
            return tf.constant(True)
        return tf.cond(pred, run, lambda: tf.constant(False))

    def cross_replica(strategy, pred, args):
        first = strategy.experimental_local_results(pred)[0]

        def run():
            strategy.extended.call_for_each_replica(apply_fn, args=args)

        tf.cond(first, run, lambda: None)

    context.merge_call(cross_replica, args=(pred, tuple(args)))
    return pred


def is_chief(strategy):
    """Whether this process writes summaries: always, except on a non-chief multi-worker task
    (TensorFlow: the strategy's chief; JAX and PyTorch: process 0, see `process_index`)."""
    if not _lazy_tf.is_tensorflow():
        return process_index() == 0
    if strategy is None:
        return True
    return bool(getattr(strategy.extended, "should_checkpoint", True))


def process_index():
    """This process's index among those training together: JAX's `jax.process_index()` (every
    process of a multi-process `keras.distribution` sees the same reduced statistics, process 0
    writes them), PyTorch's rank in an initialised `torch.distributed` group; 0 otherwise."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.process_index()
    if backend == "torch":
        import torch.distributed

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank()
    return 0
