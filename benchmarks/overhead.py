"""Training-time overhead of gradmon's GradientMonitor, as ratios to a plain `fit`.

Runs in one process. For each model, each repeat times every configuration
once, in a shuffled order, on the same data (paired repeats); the printed
ratio is the median over repeats of `time(config) / time(plain fit)`.
Compilation is excluded: each configuration's model is fitted once before
timing starts.

    python benchmarks/overhead.py [--repeats 7] [--steps 300] [--single-thread]
"""

import argparse
import os
import random
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import gradmon  # noqa: E402


def mlp():
    return keras.Sequential([keras.Input((784,)), keras.layers.Dense(256, activation="relu"),
                             keras.layers.Dense(128, activation="relu"), keras.layers.Dense(10)])


def cnn():
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(16, 3, activation="relu"), keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(32, 3, activation="relu"), keras.layers.MaxPooling2D(),
        keras.layers.Flatten(), keras.layers.Dense(10)])


MODELS = {"mlp 784-256-128-10": (mlp, (784,)), "cnn 2 conv + dense": (cnn, (28, 28, 1))}


def configurations(logdir):
    return {
        "plain fit": (False, lambda: []),
        "gradmon scalars every step": (True, lambda: [gradmon.GradientMonitor(logdir + "/a")]),
        "+ histograms every 50 steps": (True, lambda: [gradmon.GradientMonitor(logdir + "/b", histogram_freq=50)]),
        "gradmon scalars every 10 steps": (True, lambda: [gradmon.GradientMonitor(logdir + "/d", update_freq=10)]),
        "keras TensorBoard(update_freq=1, histogram_freq=1)": (
            False, lambda: [keras.callbacks.TensorBoard(logdir + "/c", update_freq=1, histogram_freq=1)]),
    }


def build(factory, monitored):
    keras.utils.set_random_seed(0)
    model = factory()
    if monitored:
        model = gradmon.monitor(model)
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=300, help="training steps per timed fit")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--single-thread", action="store_true",
                        help="one intra-op and one inter-op thread: less noise on a shared machine")
    args = parser.parse_args()
    if args.single_thread:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as logdir:
        for model_name, (factory, shape) in MODELS.items():
            n = args.steps * args.batch_size
            x = rng.normal(size=(n,) + shape).astype("float32")
            y = rng.integers(0, 10, size=n)
            configs = configurations(logdir)
            models = {}
            for name, (monitored, callbacks) in configs.items():
                models[name] = build(factory, monitored)
                models[name].fit(x[:args.batch_size * 5], y[:args.batch_size * 5], batch_size=args.batch_size,
                                 verbose=0, callbacks=callbacks())  # compile, warm up
            times = {name: [] for name in configs}
            for _ in range(args.repeats):
                order = list(configs)
                random.Random(len(times["plain fit"])).shuffle(order)
                for name in order:
                    callbacks = configs[name][1]()
                    start = time.perf_counter()
                    models[name].fit(x, y, batch_size=args.batch_size, epochs=1, verbose=0, callbacks=callbacks)
                    times[name].append(time.perf_counter() - start)
            base = np.array(times["plain fit"])
            for name in configs:
                ratios = np.array(times[name]) / base
                rows.append((model_name, name, np.median(times[name]) / args.steps * 1e3, np.median(ratios)))
    print(f"\n{args.repeats} paired repeats, {args.steps} steps of batch {args.batch_size} per fit, "
          f"keras {keras.__version__}{', single-threaded TF' if args.single_thread else ''}\n")
    print(f"| model | configuration | ms/step (median) | ratio to plain fit (median) |")
    print(f"|---|---|---|---|")
    for model_name, name, ms, ratio in rows:
        print(f"| {model_name} | {name} | {ms:.2f} | {ratio:.3f}x |")


if __name__ == "__main__":
    main()
