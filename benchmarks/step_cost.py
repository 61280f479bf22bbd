"""What a written step costs inside the compiled step, statistic by statistic (TensorFlow).

`benchmarks/overhead.py` times whole `fit` calls; this script takes the host
out: after one monitored `fit` it calls the model's two train functions
directly (`GradientMonitor`'s measuring one, which writes a row for every step
when `update_freq=1`, and the one that only updates and counts, which runs the
executions that hold no written step), and the train function of the same
model without gradmon (Keras' own step), on the same data, in alternating
blocks, and prints the paired medians of their per-step CPU time for each
`stats=` choice. With `--profile` it also prints the TensorFlow
profiler's busiest ops of each function (wall time per step, in the profiler's
own run), which is where "where the time goes" comes from.

    python benchmarks/step_cost.py [--stats norm update_ratio norm,update_ratio] [--repeats 15]
                                   [--profile]
"""

import argparse
import collections
import glob
import tempfile
import time

import numpy as np
import tensorflow as tf
import keras

import gradmon
from gradmon.publish import callbacks as _callbacks

BATCH, INPUTS = 64, 512


def medium_mlp():
    """The medium MLP of `benchmarks/overhead.py` (512-384-192-10, 271k parameters)."""
    return keras.Sequential([keras.Input((INPUTS,)), keras.layers.Dense(384, activation="relu"),
                             keras.layers.Dense(192, activation="relu"), keras.layers.Dense(10)])


def train_functions(stats, data, logdir):
    """The measuring and the plain train function of a monitored medium MLP, traced."""
    keras.utils.set_random_seed(0)
    model = gradmon.monitor(medium_mlp(), stats=stats)
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = data
    model.fit(x, y, batch_size=BATCH, verbose=0, callbacks=[gradmon.GradientMonitor(logdir, update_freq=1)])
    functions = getattr(model, _callbacks._TRAIN_FUNCTIONS)
    keras.utils.set_random_seed(0)
    unobserved = medium_mlp()  # Keras' own step, nothing of gradmon in it
    unobserved.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    unobserved.fit(x, y, batch_size=BATCH, verbose=0)
    return {"measuring": functions.measuring, "plain": functions.plain, "keras": unobserved.train_function}


def paired_cpu_ms(functions, iterator, repeats, calls=100):
    """Per-step CPU ms of each function, in alternating blocks of `calls` steps."""
    for function in functions.values():
        for _ in range(20):
            function(iterator)
    times = {name: [] for name in functions}
    for repeat in range(repeats):
        order = list(functions) if repeat % 2 else list(functions)[::-1]  # each block beside each
        for name in order:
            start = time.process_time()
            for _ in range(calls):
                functions[name](iterator)
            times[name].append((time.process_time() - start) / calls * 1e3)
    return {name: np.array(t) for name, t in times.items()}


def busiest_ops(function, iterator, steps=50, top=12):
    """`[(op name, microseconds per step)]` from the TensorFlow profiler, busiest first."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    logdir = tempfile.mkdtemp()
    tf.profiler.experimental.start(logdir)
    for _ in range(steps):
        function(iterator)
    tf.profiler.experimental.stop()
    space = xplane_pb2.XSpace()
    with open(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)[0], "rb") as f:
        space.ParseFromString(f.read())
    per_op = collections.Counter()
    for plane in space.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if ":" in name:  # an op ("scope/name:Type"), not the executor's own events
                    per_op[name] += event.duration_ps / 1e6 / steps
    return per_op.most_common(top)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stats", nargs="*", default=["norm", "update_ratio", "norm,update_ratio"],
                        help="stats= choices, comma-separated within one (default: each default statistic "
                             "alone, then both: gradmon's defaults)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64 * BATCH, INPUTS)).astype("float32")
    y = rng.integers(0, 10, size=64 * BATCH)
    iterator = iter(tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH).repeat())
    print("| stats | Keras' step, CPU ms | unwritten step: ratio | written step, CPU ms | written vs unwritten: "
          "extra ms (paired median) | ratio |")
    print("|---|---|---|---|---|---|")
    for stats in args.stats:
        functions = train_functions(stats.split(","), (x, y), tempfile.mkdtemp())
        times = paired_cpu_ms(functions, iterator, args.repeats)
        plain, measuring, own = times["plain"], times["measuring"], times["keras"]
        print(f"| {stats} | {np.median(own):.3f} | {np.median(plain / own):.3f}x | {np.median(measuring):.3f} | "
              f"{np.median(measuring - plain):.3f} | {np.median(measuring / plain):.3f}x |", flush=True)
        if args.profile:
            for name, function in list(functions.items())[:2]:
                print(f"\n{stats}, {name} function: busiest ops (profiler, us per step)")
                for op, micros in busiest_ops(function, iterator):
                    print(f"  {micros:8.1f}  {op}")
            print()


if __name__ == "__main__":
    main()
