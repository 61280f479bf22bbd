"""The step axis continues from the updates an optimizer was given before gradmon saw it.

An optimizer that trained first without gradmon (plain `fit` calls, or a checkpoint restored into
a custom loop) has `iterations` > 0; gradmon's step counter then starts there, so that its steps
are Keras' (the batch steps of Keras' `TensorBoard` callback) and a resumed run does not write
over the steps the earlier run wrote. Checked against `optimizer.iterations` (Keras' own count).
Runs on every backend; the checkpoint case needs TensorFlow.
"""

import keras
import numpy as np
import pytest

import gradmon
from gradmon.publish.writer import MemoryWriter

X = np.random.default_rng(0).normal(size=(32, 3)).astype("float32")
Y = np.random.default_rng(1).normal(size=(32, 2)).astype("float32")


def _model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(keras.optimizers.SGD(0.05), "mse")
    return model


def _iterations(optimizer):
    return int(optimizer.iterations.numpy())


def test_a_monitor_added_after_plain_fits_continues_keras_step_count():
    model = _model()
    model.fit(X[:24], Y[:24], batch_size=8, verbose=0)  # 3 updates without gradmon
    writer = MemoryWriter()
    model.fit(X[:16], Y[:16], batch_size=8, verbose=0, callbacks=[gradmon.GradientMonitor(writer=writer)])
    assert _iterations(model.optimizer) == 5
    assert sorted(dict(writer.scalars["gradients/raw/global_norm"])) == [4, 5]


def test_a_monitored_model_compiled_fresh_starts_at_one():
    model = gradmon.monitor(_model())
    model.compile(keras.optimizers.SGD(0.05), "mse")
    writer = MemoryWriter()
    model.fit(X[:16], Y[:16], batch_size=8, verbose=0, callbacks=[gradmon.GradientMonitor(writer=writer)])
    assert sorted(dict(writer.scalars["gradients/raw/global_norm"])) == [1, 2]


@pytest.mark.tensorflow_only
def test_observe_after_a_restored_checkpoint_continues_the_step_axis(tmp_path):
    import tensorflow as tf

    model = _model()

    def train(optimizer, steps):
        @tf.function
        def step():
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean((model(X) - Y) ** 2)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))

        for _ in range(steps):
            step()

    first = keras.optimizers.SGD(0.05)
    gradmon.observe(first, log_dir=str(tmp_path / "run"))
    train(first, 5)
    first.flush()
    saved = tf.train.Checkpoint(model=model, optimizer=first).save(str(tmp_path / "ckpt"))
    resumed = keras.optimizers.SGD(0.05)
    resumed.build(model.trainable_variables)
    tf.train.Checkpoint(model=model, optimizer=resumed).restore(saved)
    gradmon.observe(resumed)
    train(resumed, 3)
    writer = MemoryWriter()
    resumed.flush(writer)
    assert _iterations(resumed) == 8
    assert sorted(dict(writer.scalars["gradients/raw/global_norm"])) == [6, 7, 8]
