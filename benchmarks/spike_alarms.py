"""False alarms and detections of the spike detector (`on_spike`), on real training runs.

Healthy runs: `gradmon.monitor(model, on_spike="stop")` fitted as a user would
(`fit(x, y, batch_size=32, epochs=E, shuffle=True)`, Adam 1e-3), on four small
models and several seeds. Every alarm on them is false; a run that ends before
its last epoch was stopped by one.

Injected runs: the same models and seeds under `on_spike="skip"`, fed batches
made in advance (a new permutation each epoch, a partial last batch, as `fit`
makes them) of which a few, at known steps, are corrupted:

- `inputs x10`: the inputs multiplied by 10 (digits models),
- `labels`: every label replaced by a wrong one,
- `loss x10`, `loss x100`: a sample weight of 10 (100) on every example: the gradient
  exactly x10 (x100).

A detection is an alarm at the injected step; any other alarm is false (one may follow
an injected spike that was missed, and so applied).

    python benchmarks/spike_alarms.py [--seeds 1 2 3] [--models mlp cnn lstm transformer]
                                      [--threshold 6]

Models: an MLP (64-64-10) on scikit-learn's digits (1,797 images), a small CNN
on the same digits as 8x8 images, an LSTM after an Embedding on generated
token sequences (which of tokens 1-4 is the most frequent in 20 tokens drawn
from 30; 2,000 sequences) and a one-block Transformer encoder on the same
kind of data. Batch 32: every epoch ends on a partial batch (5 or 16 examples).
"""

import argparse
import os
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import gradmon  # noqa: E402

BATCH = 32
EPOCHS = {"mlp": 10, "cnn": 10, "lstm": 8, "transformer": 8}
KINDS = {"mlp": ("inputs x10", "labels", "loss x10", "loss x100"),
         "cnn": ("inputs x10", "labels", "loss x10", "loss x100"),
         "lstm": ("labels", "loss x10", "loss x100"), "transformer": ("labels", "loss x10", "loss x100")}
FIRST_INJECTION, EVERY = 60, 70  # injected steps: 60 + 7 * seed, then every 70 steps


def digits(images=False):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).astype("float32")
    return (x.reshape(-1, 8, 8, 1) if images else x), d.target.astype("int32")


def tokens(seed, n=2000, length=20, vocab=30, classes=4):
    """Sequences of `length` tokens; the label: which of tokens 1..classes is the most frequent."""
    rng = np.random.default_rng(1000 + seed)
    x = rng.integers(0, vocab, size=(n, length)).astype("int32")
    counts = np.stack([(x == t).sum(1) for t in range(1, classes + 1)], 1)
    return x, counts.argmax(1).astype("int32")


def data(kind, seed):
    return digits(images=kind == "cnn") if kind in ("mlp", "cnn") else tokens(seed)


def build(kind):
    layers = keras.layers
    if kind == "mlp":
        return keras.Sequential([keras.Input((64,)), layers.Dense(64, activation="relu"), layers.Dense(10)])
    if kind == "cnn":
        return keras.Sequential([
            keras.Input((8, 8, 1)), layers.Conv2D(16, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(), layers.Conv2D(32, 3, padding="same", activation="relu"),
            layers.GlobalAveragePooling2D(), layers.Dense(10)])
    if kind == "lstm":
        return keras.Sequential([keras.Input((20,), dtype="int32"), layers.Embedding(30, 16),
                                 layers.LSTM(32), layers.Dense(4)])
    inputs = keras.Input((20,), dtype="int32")
    h = layers.Embedding(30, 32)(inputs)
    h = layers.LayerNormalization()(h + layers.MultiHeadAttention(2, 16)(h, h))
    h = layers.LayerNormalization()(h + layers.Dense(32)(layers.Dense(64, activation="relu")(h)))
    return keras.Model(inputs, layers.Dense(4)(layers.GlobalAveragePooling1D()(h)))


def compiled(kind, seed, **monitor_kwargs):
    keras.utils.set_random_seed(seed)
    model = gradmon.monitor(build(kind), **monitor_kwargs)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


class Batches(keras.utils.PyDataset):
    """The batches of `epochs` epochs made in advance, some corrupted: `{step: kind}`."""

    def __init__(self, x, y, epochs, seed, injected):
        super().__init__()
        rng = np.random.default_rng(seed)
        classes = int(y.max()) + 1
        self.items = []
        for _ in range(epochs):
            order = rng.permutation(len(x))
            for start in range(0, len(x), BATCH):
                index = order[start:start + BATCH]
                xb, yb, wb = x[index], y[index], np.ones(len(index), "float32")
                kind = injected.get(len(self.items) + 1)
                if kind == "inputs x10":
                    xb = xb * 10.0
                elif kind == "labels":
                    yb = (yb + rng.integers(1, classes, size=len(yb))) % classes
                elif kind in ("loss x10", "loss x100"):
                    wb = wb * float(kind[6:])
                self.items.append((xb, yb.astype("int32"), wb))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def alarms(model):
    observer = model.gradient_observer
    observer.read_spikes(report=False)
    return [step for step, _ in observer.spikes_seen]


def healthy(kind, seed, threshold):
    x, y = data(kind, seed)
    model = compiled(kind, seed, on_spike="stop", spike_threshold=threshold)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        history = model.fit(x, y, batch_size=BATCH, epochs=EPOCHS[kind], shuffle=True, verbose=0)
    return dict(steps=model.gradient_observer.step, alarms=alarms(model),
                epochs=len(history.history["loss"]), accuracy=history.history["accuracy"][-1])


def injected(kind, seed, threshold):
    x, y = data(kind, seed)
    steps = EPOCHS[kind] * -(-len(x) // BATCH)
    kinds = KINDS[kind]
    steps_at = range(FIRST_INJECTION + 7 * seed, steps, EVERY)
    at = {step: kinds[i % len(kinds)] for i, step in enumerate(steps_at)}
    model = compiled(kind, seed, on_spike="skip", spike_threshold=threshold)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(Batches(x, y, EPOCHS[kind], seed, at), epochs=1, shuffle=False, verbose=0)
    found = alarms(model)
    return dict(steps=model.gradient_observer.step, injected=at, alarms=found,
                detected=[s for s in at if s in found], false=[s for s in found if s not in at])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--models", nargs="+", default=list(EPOCHS), choices=list(EPOCHS))
    parser.add_argument("--threshold", type=float, default=gradmon.spikes.DEFAULT_SPIKE_THRESHOLD)
    args = parser.parse_args()
    print(f"spike_threshold={args.threshold:g}, batch {BATCH}, Adam 1e-3")
    print(f"{'model':12s} {'seed':>4s} | {'healthy: steps':>14s} {'epochs':>7s} {'acc':>5s} {'alarms':>6s} | "
          f"{'injected: steps':>15s} {'detected':>8s} {'false':>5s}  missed")
    totals = dict(steps=0, alarms=0, istep=0, injected=0, detected=0, false=0)
    by_kind = {}
    for kind in args.models:
        for seed in args.seeds:
            start = time.time()
            h, i = healthy(kind, seed, args.threshold), injected(kind, seed, args.threshold)
            missed = [f"{s} ({i['injected'][s]})" for s in i["injected"] if s not in i["detected"]]
            print(f"{kind:12s} {seed:4d} | {h['steps']:14d} {h['epochs']:3d}/{EPOCHS[kind]:<3d} "
                  f"{h['accuracy']:5.2f} {len(h['alarms']):6d} | {i['steps']:15d} "
                  f"{len(i['detected']):3d}/{len(i['injected']):<4d} {len(i['false']):5d}  "
                  f"{', '.join(missed) or '-'}  ({time.time() - start:.0f} s)", flush=True)
            if h["alarms"] or i["false"]:
                print(f"    false alarms at steps: healthy {h['alarms']}, injected run {i['false']}")
            totals["steps"] += h["steps"]
            totals["alarms"] += len(h["alarms"])
            totals["istep"] += i["steps"]
            totals["injected"] += len(i["injected"])
            totals["detected"] += len(i["detected"])
            totals["false"] += len(i["false"])
            for step, how in i["injected"].items():
                seen = by_kind.setdefault(how, [0, 0])
                seen[0] += step in i["detected"]
                seen[1] += 1
    print(f"\nhealthy runs: {totals['alarms']} false alarms in {totals['steps']} steps; "
          f"injected runs: {totals['detected']}/{totals['injected']} spikes detected at their step, "
          f"{totals['false']} false alarms in {totals['istep']} steps")
    print("detected by kind: " + ", ".join(f"{k} {d}/{n}" for k, (d, n) in sorted(by_kind.items())))


if __name__ == "__main__":
    main()
