"""An optimizer's diagonal preconditioner and the edge of stability of its update.

Adaptive optimizers scale each coordinate of the step: their update is
`lr * u / P`, `u` a (momentum) gradient and `P` a positive diagonal read from
the optimizer's slots. On a quadratic with Hessian `H` and `P` frozen, such
an update is gradient descent (with momentum) on `P^-1/2 H P^-1/2`, so its
stability is decided by the *preconditioned sharpness* `lambda_1(P^-1 H)`
(Cohen et al. 2022), not by `lambda_1(H)`.

`diagonal(optimizer, variables)` returns `P` as the optimizer's **last
applied update** used it: the slots as they are now, and bias corrections at
`t = optimizer.iterations` (the update that just ran used `t`; Keras' update
increments `iterations` after computing with `iterations + 1`). The next
update's `P` would need the next gradient. Before the first update there is
no applied preconditioner (Adam's `P` would be 0), so it returns `None`.

| optimizer (Keras) | `P` | threshold on | threshold |
|---|---|---|---|
| SGD | - | `lambda_1(H)` | `2 / lr` |
| SGD, momentum `mu` | - | `lambda_1(H)` | `(2 + 2 mu) / lr` (heavy ball) |
| SGD, `nesterov=True` | - | `lambda_1(H)` | `(2 + 2 mu) / ((1 + 2 mu) lr)` |
| Adam, AdamW | `(1 - b1^t) / sqrt(1 - b2^t) * (sqrt(v) + eps)` (`v_hat` with amsgrad) | `lambda_1(P^-1 H)` | `(2 + 2 b1) / ((1 - b1) lr)` (38/lr at b1 = 0.9) |
| Adamax | `(1 - b1^t) * (u + eps)` | `lambda_1(P^-1 H)` | `(2 + 2 b1) / ((1 - b1) lr)` |
| Nadam | `sqrt(v / (1 - b2^t)) + eps` | `lambda_1(P^-1 H)` | `(2 + 2 b1) / ((1 - b1) (1 + 2 b1) lr)` |
| RMSprop | `sqrt(v + eps)`, centered `sqrt(v - mg^2 + eps)` | `lambda_1(P^-1 H)` | `2 / lr`; momentum `mu`: `(2 + 2 mu) / lr` |
| Adagrad | `sqrt(acc + eps)` | `lambda_1(P^-1 H)` | `2 / lr` |
| others (Adadelta, Adafactor, Ftrl, Lamb, Lion, Muon, ...) | - | - | none known: no ratio |

How the thresholds follow: on `f = a w^2 / 2` gradient descent
`w <- (1 - lr a) w` is stable iff `a < 2 / lr`. Heavy-ball momentum
`w_{t+1} = w_t - lr a w_t + mu (w_t - w_{t-1})` has characteristic polynomial
`z^2 - (1 + mu - lr a) z + mu`, whose root reaches -1 at `a = (2 + 2 mu) / lr`
(Cohen et al. 2021, appendix on momentum). Keras' Nesterov form
(`v <- mu v - lr g; w <- w + mu v - lr g`) has `z^2 - (1 + mu)(1 - lr a) z +
mu (1 - lr a)`, which reaches -1 at `a = (2 + 2 mu) / ((1 + 2 mu) lr)` (the
Nesterov threshold of Cohen et al. 2021). Adam's first moment is an EMA,
`m <- b1 m + (1 - b1) g`: heavy ball with momentum `b1` and step
`lr (1 - b1)` on the preconditioned problem, hence `(2 + 2 b1) / ((1 - b1)
lr)` (Cohen et al. 2022). Nadam's `m_hat` tends to `b1 m + (1 - b1) g` once
its momentum schedule (`1 - 0.5 * 0.96^t`) and bias corrections have settled:
Keras' Nesterov form with momentum `b1` and step `lr (1 - b1)`, hence the
Nesterov threshold with that step (derived here, asymptotic in `t`). RMSprop
and Adagrad without momentum are preconditioned gradient descent (`2 / lr`);
RMSprop's momentum accumulates `lr g / P` as heavy ball does. All assume the
update is not clipped (`clipnorm` and friends make it nonlinear); decoupled
weight decay (AdamW) is left out of `H`.

References:
    J. Cohen, S. Kaur, Y. Li, J. Z. Kolter, A. Talwalkar, "Gradient Descent on
    Neural Networks Typically Occurs at the Edge of Stability", ICLR 2021
    (appendix: momentum and Nesterov thresholds).
    J. Cohen, B. Ghorbani, S. Krishnan, N. Agarwal, S. Medapati, M. Badura,
    D. Suo, D. Cardoze, Z. Nado, G. Dahl, J. Gilmer, "Adaptive Gradient
    Methods at the Edge of Stability", arXiv:2207.14484, 2022.
"""

import typing

import keras
import numpy as np

from gradmon.backend import keras_compat as _keras_compat
from gradmon.backend.host import current_learning_rate, host_value


class StabilityThreshold(typing.NamedTuple):
    """The sharpness at which the optimizer's update becomes unstable.

    Attributes:
        value: the threshold in sharpness units (e.g. `38 / lr` for Adam).
        preconditioned: whether it applies to `lambda_1(P^-1 H)` (adaptive
            optimizers) rather than to `lambda_1(H)`.
        rule: the formula, e.g. `"(2 + 2 beta_1) / ((1 - beta_1) lr)"`.
    """

    value: float
    preconditioned: bool
    rule: str


def _number(value):
    """A hyperparameter (float, tensor, variable or callable) as a float."""
    if callable(value):
        value = value()
    return float(host_value(value))


def _slot(optimizer, name, variable):
    value = _keras_compat.optimizer_slot(optimizer, name, variable)
    return np.asarray(host_value(value), np.float64)


def _diagonal_of(optimizer, variable, t):
    """`P` of one variable as the last update used it (`t` >= 1)."""
    eps = _number(optimizer.epsilon)
    if isinstance(optimizer, keras.optimizers.Adam):  # AdamW too
        b1, b2 = _number(optimizer.beta_1), _number(optimizer.beta_2)
        v = _slot(optimizer, "velocity_hats" if optimizer.amsgrad else "velocities", variable)
        return (1 - b1**t) / np.sqrt(1 - b2**t) * (np.sqrt(v) + eps)
    if isinstance(optimizer, keras.optimizers.Adamax):
        return (1 - _number(optimizer.beta_1) ** t) * (_slot(optimizer, "u", variable) + eps)
    if isinstance(optimizer, keras.optimizers.Nadam):
        v = _slot(optimizer, "velocities", variable)
        return np.sqrt(v / (1 - _number(optimizer.beta_2) ** t)) + eps
    if isinstance(optimizer, keras.optimizers.RMSprop):
        v = _slot(optimizer, "velocities", variable)
        if optimizer.centered:
            v = v - np.square(_slot(optimizer, "average_gradients", variable))
        return np.sqrt(v + eps)
    if isinstance(optimizer, keras.optimizers.Adagrad):
        return np.sqrt(_slot(optimizer, "accumulators", variable) + eps)
    return None


ADAPTIVE = (keras.optimizers.Adam, keras.optimizers.Adamax, keras.optimizers.Nadam,
            keras.optimizers.RMSprop, keras.optimizers.Adagrad)


def is_adaptive(optimizer):
    """Whether `diagonal` knows the optimizer's preconditioner (a `LossScaleOptimizer` is unwrapped)."""
    return isinstance(_keras_compat.base_optimizer(optimizer), ADAPTIVE)


def diagonal(optimizer, variables):
    """The diagonal preconditioner `P` of an adaptive optimizer's last update.

    The update of each variable was `lr * u / P` (`u`: Adam's first moment,
    RMSprop's gradient, ...): see the module docstring for `P` per optimizer.

    Args:
        optimizer: a Keras optimizer, or a `LossScaleOptimizer` around one.
        variables: the variables to read `P` for (e.g. a model's
            `trainable_variables`), each updated by `optimizer`.

    Returns:
        A list of float64 arrays shaped like `variables`, or `None` when the
        optimizer has no diagonal preconditioner (SGD, Lion, ...), is not
        built, or has applied no update yet.

    Raises:
        ValueError: naming `variables`, for a variable the optimizer does not update.
    """
    optimizer = _keras_compat.base_optimizer(optimizer)
    if not isinstance(optimizer, ADAPTIVE) or not optimizer.built:
        return None
    t = int(host_value(optimizer.iterations))
    if t < 1:
        return None
    out = []
    for variable in variables:
        try:
            out.append(_diagonal_of(optimizer, variable, t))
        except KeyError:
            raise ValueError(
                "Invalid value for argument `variables`. Expected variables the optimizer "
                f"updates. Received: a variable {getattr(variable, 'path', variable)!r} it does not "
                "update") from None
    return out


def stability_threshold(optimizer, learning_rate=None):
    """The sharpness at which the optimizer's update becomes unstable, if known.

    Args:
        optimizer: a Keras optimizer, or a `LossScaleOptimizer` around one.
        learning_rate: the learning rate to use. Defaults to `None`: the
            optimizer's current one (schedules evaluated).

    Returns:
        A `StabilityThreshold`, or `None` for an optimizer whose threshold is
        not known (see the table in the module docstring) or a learning rate
        that is not positive.

    References:
        Cohen et al., ICLR 2021, and Cohen et al., arXiv:2207.14484, 2022
        (see the module docstring).
    """
    optimizer = _keras_compat.base_optimizer(optimizer)
    lr = current_learning_rate(optimizer) if learning_rate is None else float(learning_rate)
    if not lr > 0:  # e.g. a warm-up at 0: every sharpness is stable
        return None
    if isinstance(optimizer, keras.optimizers.SGD):
        mu = _number(optimizer.momentum)
        if optimizer.nesterov and mu > 0:
            return StabilityThreshold((2 + 2 * mu) / ((1 + 2 * mu) * lr), False,
                                      "(2 + 2 momentum) / ((1 + 2 momentum) lr)")
        if mu > 0:
            return StabilityThreshold((2 + 2 * mu) / lr, False, "(2 + 2 momentum) / lr")
        return StabilityThreshold(2 / lr, False, "2 / lr")
    if isinstance(optimizer, (keras.optimizers.Adam, keras.optimizers.Adamax)):
        b1 = _number(optimizer.beta_1)
        return StabilityThreshold((2 + 2 * b1) / ((1 - b1) * lr), True,
                                  "(2 + 2 beta_1) / ((1 - beta_1) lr)")
    if isinstance(optimizer, keras.optimizers.Nadam):
        b1 = _number(optimizer.beta_1)
        return StabilityThreshold((2 + 2 * b1) / ((1 - b1) * (1 + 2 * b1) * lr), True,
                                  "(2 + 2 beta_1) / ((1 - beta_1) (1 + 2 beta_1) lr)")
    if isinstance(optimizer, keras.optimizers.RMSprop) and optimizer.momentum > 0:
        mu = _number(optimizer.momentum)
        return StabilityThreshold((2 + 2 * mu) / lr, True, "(2 + 2 momentum) / lr")
    if isinstance(optimizer, (keras.optimizers.RMSprop, keras.optimizers.Adagrad)):
        return StabilityThreshold(2 / lr, True, "2 / lr")
    return None
