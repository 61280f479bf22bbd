"""The spike detector on real training: no alarm on healthy runs, injected spikes caught at their step.

A smaller version of `benchmarks/spike_alarms.py` (which measures the rates on more
models and seeds). Before the detector judged only full batches, and the log of the
norm, the digits MLP below stopped at step 57 (its first, partial batch of 5 examples:
z 10-12), the CNN there too (z 6.2), the LSTM at step 84 (its norms rising 10x from initialisation, with bursts: z 10),
and the injected run also flagged its partial batches (steps 57 and 114).
"""

import warnings

import keras
import numpy as np
import pytest

import gradmon

pytestmark = pytest.mark.tensorflow_only  # needs TensorFlow: skipped whole under JAX/PyTorch (conftest.py)


def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.data / 16.0).astype("float32"), d.target.astype("int32")


def tokens(n, length=20, vocab=30, classes=4, seed=1001):
    """Sequences of tokens; the label: which of tokens 1..classes is the most frequent."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, vocab, size=(n, length)).astype("int32")
    counts = np.stack([(x == t).sum(1) for t in range(1, classes + 1)], 1)
    return x, counts.argmax(1).astype("int32")


def mlp():
    return keras.Sequential([keras.Input((64,)), keras.layers.Dense(64, activation="relu"),
                             keras.layers.Dense(10)])


def lstm():
    return keras.Sequential([keras.Input((20,), dtype="int32"), keras.layers.Embedding(30, 16),
                             keras.layers.LSTM(32), keras.layers.Dense(4)])


def fitted(build, seed, x, y, epochs, policy, **fit_kwargs):
    keras.utils.set_random_seed(seed)
    model = gradmon.monitor(build(), on_spike=policy)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(x, y, batch_size=32, epochs=epochs, verbose=0, **fit_kwargs)
    messages = [str(c.message) for c in caught if str(c.message).startswith("gradmon:")]
    model.gradient_observer.read_spikes(report=False)
    return model, history, messages


@pytest.mark.parametrize("seed", [1, 2])
def test_digits_mlp_left_on_stop_trains_every_epoch(seed):
    """1,797 digits in batches of 32: each epoch ends on a batch of 5, whose norm is larger by
    nature; it is not judged, and no full batch of a healthy run is a spike."""
    x, y = digits()
    model, history, messages = fitted(mlp, seed, x, y, 4, "stop", shuffle=True)
    assert len(history.history["loss"]) == 4, messages
    assert model.gradient_observer.spikes_seen == [] and messages == []
    assert int(model.optimizer.iterations.numpy()) == 4 * 57  # every update applied
    assert not model.gradient_observer.stopped


def cnn():
    layers = keras.layers
    return keras.Sequential([keras.Input((8, 8, 1)), layers.Conv2D(8, 3, padding="same", activation="relu"),
                             layers.MaxPooling2D(), layers.Conv2D(16, 3, padding="same", activation="relu"),
                             layers.GlobalAveragePooling2D(), layers.Dense(10)])


def test_digits_cnn_left_on_stop_trains_every_epoch():
    x, y = digits()
    model, history, messages = fitted(cnn, 1, x.reshape(-1, 8, 8, 1), y, 4, "stop", shuffle=True)
    assert len(history.history["loss"]) == 4, messages
    assert model.gradient_observer.spikes_seen == [] and messages == []
    assert int(model.optimizer.iterations.numpy()) == 4 * 57


def test_lstm_norms_rising_from_initialisation_are_not_spikes():
    """2,048 sequences (no partial batch): the LSTM's norms rise about 10x in its first 80
    steps, with bursts; judged on the log-norm, none is a spike."""
    x, y = tokens(2048)
    model, history, messages = fitted(lstm, 1, x, y, 2, "stop", shuffle=True)
    assert len(history.history["loss"]) == 2, messages
    assert model.gradient_observer.spikes_seen == [] and messages == []
    assert int(model.optimizer.iterations.numpy()) == 128


def test_injected_spikes_are_caught_at_their_steps_and_nothing_else():
    """Batch 30's inputs x10 and batch 45's loss x10 (sample weight 10), in each of two epochs
    (no shuffling: steps 30, 45, 87, 102): refused under "skip", and no other step is a spike
    (the partial batches at steps 57 and 114 included)."""
    x, y = digits()
    x = x.copy()
    weights = np.ones(len(x), np.float32)
    x[29 * 32:30 * 32] *= 10.0
    weights[44 * 32:45 * 32] = 10.0
    model, history, messages = fitted(mlp, 1, x, y, 2, "skip", shuffle=False, sample_weight=weights)
    observer = model.gradient_observer
    assert [step for step, _ in observer.spikes_seen] == [30, 45, 87, 102]
    assert all(z > gradmon.spikes.DEFAULT_SPIKE_THRESHOLD for _, z in observer.spikes_seen)
    assert int(model.optimizer.iterations.numpy()) == 2 * 57 - 4  # the four refused
    assert any("30 (z = " in m and "skipped" in m for m in messages)
