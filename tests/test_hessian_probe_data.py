"""Probe data of `HessianMonitor(data=...)` and `gradmon.hessian`: bounded, split, checked up front.

References: an explicit Hessian (`GradientTape.jacobian` of a hand-written loss, float64 numpy).
"""

import re
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradmon
from gradmon.hessian import data as hessian_data
from gradmon import hessian
from helpers import explicit_hessian

pytestmark = pytest.mark.tensorflow_only  # needs TensorFlow: skipped whole under JAX/PyTorch (conftest.py)


def classifier(loss=None):
    keras.utils.set_random_seed(3)
    model = keras.Sequential([
        keras.Input((5,)),
        keras.layers.Dense(6, activation="tanh", kernel_regularizer=keras.regularizers.L2(0.1)),
        keras.layers.Dense(3),
    ])
    model.compile(optimizer="sgd", loss=loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def data(n, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, 5)).astype("float32"), rng.integers(0, 3, n),
            rng.uniform(0.5, 2.0, n).astype("float32"))


def weighted_ce(m, x, y, sw):
    """Keras' sum_over_batch_size: sum of weighted per-example losses / number of examples."""
    per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=m(x, training=False))
    return tf.reduce_sum(per_example * sw) / x.shape[0] + 0.1 * tf.reduce_sum(tf.square(m.layers[0].kernel))


def test_chunked_hvp_equals_unchunked_and_the_explicit_hessian():
    model = classifier()
    batches = [data(100, 0), data(37, 1)]  # two batches: the mean loss weights them by size
    n = sum(b[0].shape[0] for b in batches)
    x, y, sw = (np.concatenate(parts) for parts in zip(*batches))
    # The mean loss over all examples: one explicit Hessian on the concatenation.
    matrix = explicit_hessian(model, lambda m, x, y: weighted_ce(m, x, y, sw), x, y)
    v = np.random.default_rng(5).standard_normal(matrix.shape[0])
    whole = hessian.make_hvp(model, batches, max_batch_size=1000)
    chunked = hessian.make_hvp(model, batches, max_batch_size=16)
    assert whole.batch_sizes == [100, 37]
    assert chunked.batch_sizes == [16] * 6 + [4] + [16, 16, 5]
    assert sum(chunked.batch_sizes) == n
    expected = matrix @ v
    atol = 1e-5 * np.abs(expected).max()
    np.testing.assert_allclose(chunked(v), whole(v), rtol=0, atol=atol)
    np.testing.assert_allclose(chunked(v), expected, rtol=0, atol=atol)
    assert chunked.count == 2  # one HVP a call, however many chunks


def test_a_huge_batch_is_split_by_default():
    model = classifier()
    x, y, sw = data(2500, 2)
    op = hessian.make_hvp(model, (x, y, sw))
    assert op.batch_sizes == [1024, 1024, 452]
    matrix = explicit_hessian(model, lambda m, x, y: weighted_ce(m, x, y, sw), x, y)
    v = np.random.default_rng(6).standard_normal(matrix.shape[0])
    np.testing.assert_allclose(op(v), matrix @ v, rtol=0, atol=1e-5 * np.abs(matrix @ v).max())


def test_a_sum_reduction_is_not_split_and_warned():
    model = classifier(keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum"))
    x, y, _ = data(40, 3)
    with pytest.warns(UserWarning, match=r"`data` has more than 16 examples, and is not split"):
        op = hessian.make_hvp(model, (x, y), max_batch_size=16)
    assert op.batch_sizes == [40]

    def summed(m, x, y):
        logits = m(x, training=False)
        return tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)) \
            + 0.1 * tf.reduce_sum(tf.square(m.layers[0].kernel))

    matrix = explicit_hessian(model, summed, x, y)
    v = np.random.default_rng(7).standard_normal(matrix.shape[0])
    np.testing.assert_allclose(op(v), matrix @ v, rtol=0, atol=1e-5 * np.abs(matrix @ v).max())


def endless_dataset(limit=20_000):
    rng = np.random.default_rng(4)
    yielded = []

    def endless():
        while True:
            yielded.append(1)
            if len(yielded) > limit:  # the old code read on forever: fail instead of hanging
                raise RuntimeError("the probe read an endless generator to the end")
            yield rng.standard_normal((8, 5)).astype("float32"), rng.integers(0, 3, 8)

    spec = (tf.TensorSpec((None, 5), tf.float32), tf.TensorSpec((None,), tf.int64))
    return tf.data.Dataset.from_generator(endless, output_signature=spec), yielded


def test_an_endless_generator_is_capped_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setattr(hessian_data, "MAX_UNKNOWN_LENGTH_EXAMPLES", 64)
    dataset, yielded = endless_dataset()
    with pytest.warns(UserWarning, match=r"argument `data` is a tf.data.Dataset of unknown cardinality.*"
                                         r"first 8 batches \(64 examples"):
        monitor = gradmon.HessianMonitor(str(tmp_path), data=dataset)
    assert [hessian_data._batch_size(b[0]) for b in monitor._probe_data.batches] == [8] * 8
    # the cap, one more to know there was more, and tf.data's autotuned read-ahead (14 seen under load)
    assert len(yielded) <= 32


def test_a_short_generator_is_read_whole_without_warning(monkeypatch):
    monkeypatch.setattr(hessian_data, "MAX_UNKNOWN_LENGTH_EXAMPLES", 64)
    dataset, _ = endless_dataset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probe = hessian.prepare_data(dataset.take(5).filter(lambda x, y: True))  # unknown, 40 examples
    assert len(probe.batches) == 5


def test_an_infinite_dataset_is_refused_naming_data_and_take():
    x, y, _ = data(16)
    with pytest.raises(ValueError, match=re.escape("Invalid value for argument `data`. Expected a finite "
                                                   "dataset") + r".*data\.take\(n\).*infinite cardinality"):
        gradmon.HessianMonitor("unused", data=tf.data.Dataset.from_tensors((x, y)).repeat())


@pytest.mark.parametrize("bad, expected, received", [
    ((np.zeros((16, 4), "float32"), np.zeros(16, "int64")), "inputs x of shape (None, 5)",
     "a batch with x of shape (16, 4)"),
    ((np.zeros((16, 5), "float32"), np.zeros((16, 7), "int64")), "batches the model and its compiled loss",
     "a batch with x of shape (16, 5), y of shape (16, 7)"),
])
def test_wrong_probe_shapes_fail_before_the_first_step_naming_data(tmp_path, bad, expected, received):
    model = classifier()
    x, y, _ = data(32)
    before = [v.numpy().copy() for v in model.trainable_variables]
    monitor = gradmon.HessianMonitor(str(tmp_path), data=bad, every_n_steps=1)
    with pytest.raises(ValueError) as caught:
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[monitor])
    message = str(caught.value)
    assert message.startswith("Invalid value for argument `data`. Expected ")
    assert expected in message and "Received: " + received in message
    assert int(model.optimizer.iterations.numpy()) == 0  # at on_train_begin, before any step
    for b, v in zip(before, model.trainable_variables):
        np.testing.assert_array_equal(b, v.numpy())


def test_wrong_probe_shapes_of_a_subclassed_model_name_data():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(3)

        def call(self, x):
            return self.dense(x)

    net = Net()
    net.compile(loss="mse")
    net(np.zeros((2, 5), "float32"))
    with pytest.raises(ValueError, match=r"Invalid value for argument `data`\. .*Received: a batch with x of "
                                         r"shape \(8, 4\), y of shape \(8, 3\), on which the model's loss failed"):
        hessian.spectrum(net, (np.zeros((8, 4), "float32"), np.zeros((8, 3), "float32")))
