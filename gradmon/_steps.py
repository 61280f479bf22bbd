"""The step axis and learning rate that callbacks report against."""

import keras
import numpy as np


def current_learning_rate(optimizer):
    """The optimizer's learning rate now, as a float (schedules evaluated)."""
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    return float(np.asarray(keras.ops.convert_to_numpy(optimizer.learning_rate)))


def training_step(model):
    """The step axis of gradmon's summaries: gradmon's own counter, else `optimizer.iterations`."""
    from gradmon import monitored

    if isinstance(model, monitored.GradientMonitorMixin):
        return int(model.gradient_state.step.numpy())
    return int(model.optimizer.iterations.numpy())
