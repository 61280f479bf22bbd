"""Training-time overhead of gradmon's GradientMonitor, as ratios to a plain `fit`.

Runs in one process. For each model, each repeat times every configuration
once, in a shuffled order, on the same data (paired repeats); the printed
ratio is the median over repeats of `time(config) / time(plain fit)` of the
same repeat. Compilation is excluded: each configuration's model is fitted
once before timing starts. Targets (issue "Cheap enough to leave on"):
`update_freq=100` <= 1.05x (small MLP) and <= 1.03x (medium MLP); every
step <= 1.30x (small) and within 3 points of Keras' `TensorBoard(update_freq=1)`
(medium).

    python benchmarks/overhead.py [--repeats 9] [--steps 300] [--single-thread] [--cpu-time]
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


def mlp(*sizes):
    def build():
        layers = [keras.Input((sizes[0],))]
        layers += [keras.layers.Dense(n, activation="relu") for n in sizes[1:-1]]
        return keras.Sequential(layers + [keras.layers.Dense(sizes[-1])])
    return build


# name: (factory, input size, batch size)
MODELS = {
    "small mlp 64-64-10, batch 32": (mlp(64, 64, 10), 64, 32),
    "medium mlp 512-384-192-10, batch 64": (mlp(512, 384, 192, 10), 512, 64),
}


# configurations of a model made with `gradmon.monitor(model, **kwargs)` (`--spikes`)
MONITORED = {
    "gradmon update_freq=100 + on_spike='warn'": (dict(on_spike="warn"), dict(update_freq=100)),
    "gradmon update_freq=100 + transform=zclip()": (dict(transform="zclip"), dict(update_freq=100)),
}


def configurations(logdir, spikes=False):
    def monitor(**kwargs):
        return lambda: [gradmon.GradientMonitor(f"{logdir}/{sorted(kwargs.items())}", **kwargs)]

    extra = {}
    if spikes:
        extra = {name: monitor(**callback_kwargs) for name, (_, callback_kwargs) in MONITORED.items()}
    return extra | {
        "plain fit": lambda: [],
        "gradmon update_freq=100": monitor(update_freq=100),
        "gradmon update_freq=10": monitor(update_freq=10),
        "gradmon every step": monitor(update_freq=1),
        "gradmon every step + histograms every 50": monitor(update_freq=1, histogram_freq=50),
        "keras TensorBoard(update_freq=1)": lambda: [keras.callbacks.TensorBoard(f"{logdir}/k1", update_freq=1)],
        "keras TensorBoard(update_freq=1, histogram_freq=1)": lambda: [
            keras.callbacks.TensorBoard(f"{logdir}/k2", update_freq=1, histogram_freq=1)],
    }


def build(factory, name):
    keras.utils.set_random_seed(0)
    model = factory()
    if name in MONITORED:
        kwargs = dict(MONITORED[name][0])
        if kwargs.get("transform") == "zclip":
            kwargs["transform"] = gradmon.transforms.zclip()
        model = gradmon.monitor(model, **kwargs)
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def time_model(factory, inputs, batch_size, args, logdir):
    rng = np.random.default_rng(0)
    n = args.steps * batch_size
    x = rng.normal(size=(n, inputs)).astype("float32")
    y = rng.integers(0, 10, size=n)
    configs = configurations(logdir, args.spikes)
    models, callbacks = {}, {}
    for name, make in configs.items():
        models[name], callbacks[name] = build(factory, name), make()  # one callback per model, reused
        models[name].fit(x[:batch_size * 5], y[:batch_size * 5], batch_size=batch_size, verbose=0,
                         callbacks=callbacks[name])  # compile, warm up
    times = {name: [] for name in configs}
    for repeat in range(args.repeats):
        order = list(configs)
        random.Random(repeat).shuffle(order)
        for name in order:
            clock = time.process_time if args.cpu_time else time.perf_counter
            start = clock()
            models[name].fit(x, y, batch_size=batch_size, epochs=1, verbose=0, callbacks=callbacks[name])
            times[name].append(clock() - start)
    base = np.array(times["plain fit"])
    return [(name, np.median(times[name]) / args.steps * 1e3, np.median(np.array(times[name]) / base))
            for name in configs]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--steps", type=int, default=300, help="training steps per timed fit")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--spikes", action="store_true",
                        help="also on_spike='warn' and transform=zclip() (with update_freq=100)")
    parser.add_argument("--single-thread", action="store_true",
                        help="one intra-op and one inter-op thread: less noise on a shared machine")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time the process's CPU time instead of wall time (with --single-thread: "
                             "steadier where other processes share the cores)")
    args = parser.parse_args()
    if args.single_thread:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as logdir:
        for model_name in args.models:
            factory, inputs, batch_size = MODELS[model_name]
            rows += [(model_name,) + row for row in time_model(factory, inputs, batch_size, args, logdir)]
    print(f"\n{args.repeats} paired repeats, {args.steps} steps per fit, keras {keras.__version__}"
          f"{', single-threaded TF' if args.single_thread else ''}{', CPU time' if args.cpu_time else ''}\n")
    print("| model | configuration | ms/step (median) | ratio to plain fit (median) |")
    print("|---|---|---|---|")
    for model_name, name, ms, ratio in rows:
        print(f"| {model_name} | {name} | {ms:.2f} | {ratio:.3f}x |")


if __name__ == "__main__":
    main()
