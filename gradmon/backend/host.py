"""The step axis and learning rate that callbacks report against."""

import keras
import numpy as np


def host_value(x):
    """A variable's or tensor's value as a numpy array (`.numpy()`: `keras.ops.convert_to_numpy`
    of a Keras variable warns of numpy 2's `copy` keyword)."""
    return np.asarray(x.numpy() if hasattr(x, "numpy") else keras.ops.convert_to_numpy(x))


def current_learning_rate(optimizer):
    """The optimizer's learning rate now, as a float (schedules evaluated)."""
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    return float(host_value(optimizer.learning_rate))


def training_step(model):
    """The step axis of gradmon's summaries: the observer's update count, else `optimizer.iterations`.

    (An observed optimizer counts every update it is given, also those a
    LossScaleOptimizer skips, which `optimizer.iterations` does not.)
    """
    observer = getattr(model, "_gradmon_observer", None)
    if observer is not None:
        return observer.step
    return int(model.optimizer.iterations.numpy())
