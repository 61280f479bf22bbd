"""The step axis and learning rate that callbacks report against."""

import keras
import numpy as np


def current_learning_rate(optimizer):
    """The optimizer's learning rate now, as a float (schedules evaluated)."""
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    return float(np.asarray(keras.ops.convert_to_numpy(optimizer.learning_rate)))


def training_step(model):
    """The step axis of gradmon's summaries: the observer's update count, else `optimizer.iterations`.

    (An observed optimizer counts every update it is given, also those a
    LossScaleOptimizer skips, which `optimizer.iterations` does not.)
    """
    observer = getattr(model, "_gradmon_observer", None)
    if observer is not None:
        return observer.step
    return int(model.optimizer.iterations.numpy())
