"""The spike detector's batch sizes (`on_spike`): handed over by a monitored model's `fit`; where
nothing hands them over (an observed optimizer in a plain `fit`), every step is judged as a full
batch and gradmon says so once. Runs on every backend.
"""

import warnings

import keras
import numpy as np

import gradmon

X = np.random.default_rng(0).normal(size=(40, 4)).astype("float32")  # batches of 16, 16, 8
Y = np.random.default_rng(1).normal(size=(40, 1)).astype("float32")
SAID = "no batch size reaches the spike detector"


def model():
    keras.utils.set_random_seed(4)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])


def fit_warnings(m, epochs=2):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m.fit(X, Y, batch_size=16, epochs=epochs, verbose=0, shuffle=False)
    return [str(w.message) for w in caught if SAID in str(w.message)]


def test_an_observed_optimizer_in_a_plain_fit_warns_once_that_no_batch_size_arrives():
    m = model()
    m.compile(gradmon.observe(keras.optimizers.SGD(1e-2), on_spike="warn"), "mse")
    said = fit_warnings(m)
    assert len(said) == 1 and "on_spike='warn'" in said[0]
    assert fit_warnings(m) == []  # once per observer


def test_a_monitored_fit_hands_the_batch_sizes_over_and_does_not_warn():
    m = gradmon.monitor(model(), on_spike="warn")
    m.compile(keras.optimizers.SGD(1e-2), "mse")
    assert fit_warnings(m) == []
    # the partial batch (8 examples) was not judged: the largest batch seen is the full one
    tracker = m.gradient_observer.spikes
    assert int(keras.ops.convert_to_numpy(m.gradient_observer.recorder.host_read(tracker.largest_batch))) == 16
