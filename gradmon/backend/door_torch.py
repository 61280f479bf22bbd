"""The optimizer's door on PyTorch (see `gradmon.backend.door`).

Keras' torch trainer calls `optimizer.apply` eagerly after `backward()`,
under `torch.no_grad()`: state is plain non-trainable `keras.Variable`s,
branches are host branches (the schedule's predicate is a scalar read), and
the pre-update weights are copied only on logged steps. Under `jit_compile=True`
(`torch.compile`) the logged numbers and final weights were measured equal to the NumPy replay
of tests/test_backends_gradients.py (2e-6), once, by hand: compiling takes about 40 s there, so
the suite does not run it.
"""

import keras
import numpy as np

EAGER = True  # the hooked apply runs on the host: an observed custom loop writes as it goes


def state_variable(initial, dtype=None, name=None):
    return keras.Variable(np.asarray(initial), dtype=dtype, trainable=False, name=name)


def weights(variables, pred):
    """Copies of the weights before the update on a logged step (`pred`), else `None`."""
    if not bool(pred):
        return None
    return [keras.ops.copy(v.value) for v in variables]


def cond(pred, true_fn, width):
    """`true_fn()` when `pred` holds, else `None` (nothing to store)."""
    return true_fn() if bool(pred) else None


def read(variable, observer=None):
    return variable.value.detach().cpu().numpy()


def assign(variable, value, observer=None):
    variable.assign(value)
