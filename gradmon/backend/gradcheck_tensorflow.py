"""`gradmon.gradcheck` on TensorFlow: `tf.GradientTape`; float64 is native.

The interface the check needs from a framework (`gradcheck_jax` and
`gradcheck_torch` provide the same names): `precision(dtype)` (the scope a
check runs in, yielding notes), `value_and_grad(loss, arrays)`,
`dtype_name`, `is_tensor`, `to_tensor`, `cast_float`, `constant`, `to_numpy`,
`num_elements`, `compile_loss(loss)` (the loss as finite differences evaluate
it), `Float64Unavailable` and `NAME` for messages.
"""

import contextlib

import numpy as np
import tensorflow as tf

from gradmon.backend.gradcheck_common import Float64Unavailable  # noqa: F401

NAME = "tensorflow"


@contextlib.contextmanager
def precision(dtype):
    """TensorFlow computes float64 as asked: nothing to change."""
    del dtype
    yield []


def dtype_name(dtype):
    try:
        return tf.as_dtype(dtype).name
    except TypeError:
        return None


def is_tensor(value):
    return tf.is_tensor(value) or isinstance(value, tf.Variable) or hasattr(value, "__tf_tensor__")


def to_tensor(value, dtype):
    if isinstance(value, (tf.Tensor, tf.Variable)) or hasattr(value, "__tf_tensor__"):
        return tf.cast(tf.convert_to_tensor(value), dtype)
    return tf.constant(np.asarray(value, dtype=dtype))


def cast_float(value, dtype):
    if is_tensor(value):
        tensor = tf.convert_to_tensor(value)
        return tf.cast(tensor, dtype) if tensor.dtype.is_floating else tensor
    array = np.asarray(value)
    return tf.constant(array.astype(dtype) if array.dtype.kind == "f" else array)


def constant(array):
    return tf.constant(array)


def to_numpy(value):
    return np.asarray(tf.convert_to_tensor(value))


def num_elements(tensor):
    return tensor.shape.num_elements()


def compile_loss(loss):
    """`loss` as it is: evaluated op by op."""
    return loss


def value_and_grad(loss, arrays):
    """(loss value, float64 gradients) at `arrays`; unconnected inputs get zeros."""
    params = [tf.constant(a) for a in arrays]
    with tf.GradientTape() as tape:
        tape.watch(params)
        value = loss(params)
    grads = tape.gradient(value, params, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return float(value), [np.asarray(tf.convert_to_tensor(g), dtype=np.float64) for g in grads]
