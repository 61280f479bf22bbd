"""Monitoring cost on models with many variables: first-step tracing, per-step time, tags and
bytes written per logged step. Ratios are to a plain `fit` of the same model in the same process.

Models: Keras' MobileNetV2 (alpha 0.35, `weights=None`, 96x96 inputs, 158 variables) and a
stack of 500 small Dense layers (1,000 variables). Targets (issue "Cheap enough to leave on"):
first step <= 1.5x plain on the MobileNetV2; defaults of at most a few hundred tags and
<= 20 KB of event file per logged step; cost that does not grow faster than the model's own.

    python benchmarks/scale.py [--steps 20] [--repeats 3] [--models mobilenet dense1000]
"""

import argparse
import glob
import os
import random
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import gradmon  # noqa: E402


def mobilenet():
    return keras.applications.MobileNetV2(input_shape=(96, 96, 3), alpha=0.35, weights=None, classes=10), \
        (96, 96, 3), 16


def dense1000():
    layers = [keras.Input((8,))] + [keras.layers.Dense(8, activation="tanh") for _ in range(499)]
    return keras.Sequential(layers + [keras.layers.Dense(10)]), (8,), 32


MODELS = {"mobilenet": ("MobileNetV2 alpha 0.35 (158 variables)", mobilenet),
          "dense1000": ("500 Dense layers (1,000 variables)", dense1000)}
CONFIGS = {
    "plain fit": None,
    "GradientMonitor() defaults, every step": {},
    "GradientMonitor(update_freq=100)": {"update_freq": 100},
    "stats='all', grouping='variable', every step": {"monitor": dict(stats="all", grouping="variable")},
}


def event_bytes(logdir):
    return sum(os.path.getsize(p) for p in glob.glob(os.path.join(logdir, "train", "events.out.tfevents.*")))


def run(factory, config, steps, logdir):
    keras.utils.set_random_seed(0)
    model, shape, batch = factory()
    if config is not None and "monitor" in config:
        model = gradmon.monitor(model, **config["monitor"])
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch * (steps + 1),) + shape).astype("float32")
    y = rng.integers(0, 10, size=len(x))
    callbacks = []
    if config is not None:
        kwargs = {k: v for k, v in config.items() if k != "monitor"}
        callbacks = [gradmon.GradientMonitor(logdir, **kwargs)]
    start = time.perf_counter()
    model.fit(x[:batch], y[:batch], batch_size=batch, verbose=0, callbacks=callbacks)
    first = time.perf_counter() - start
    size_before = event_bytes(logdir)
    start = time.perf_counter()
    model.fit(x[batch:], y[batch:], batch_size=batch, verbose=0, callbacks=callbacks)
    per_step = (time.perf_counter() - start) / steps
    written = event_bytes(logdir) - size_before
    tags = 0
    if config is not None:
        observer = model._gradmon_observer
        tags = sum(len(t) for t in observer.recorder.tags.values()) if observer.recorder else 0
    logged = 0 if config is None else steps // config.get("update_freq", 1)
    return first, per_step, tags, written / logged if logged else 0.0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    print("| model | configuration | first step (s) | ratio | ms/step | ratio | tags per logged step | "
          "bytes per logged step |")
    print("|---|---|---|---|---|---|---|---|")
    for key in args.models:
        title, factory = MODELS[key]
        results = {name: [] for name in CONFIGS}
        with tempfile.TemporaryDirectory() as logdir:
            run(factory, None, 2, logdir)  # one-time costs (imports, first traces) out of the pairs
        for repeat in range(args.repeats):
            order = list(CONFIGS)
            random.Random(repeat).shuffle(order)
            for name in order:
                with tempfile.TemporaryDirectory() as logdir:
                    results[name].append(run(factory, CONFIGS[name], args.steps, logdir))
        base = np.array(results["plain fit"])
        for name in CONFIGS:
            r = np.array(results[name])
            first_ratio = np.median(r[:, 0] / base[:, 0])
            step_ratio = np.median(r[:, 1] / base[:, 1])
            print(f"| {title} | {name} | {np.median(r[:, 0]):.1f} | {first_ratio:.2f}x | "
                  f"{np.median(r[:, 1]) * 1e3:.1f} | {step_ratio:.2f}x | {int(r[0, 2])} | {r[0, 3]:.0f} |")


if __name__ == "__main__":
    main()
