"""Peak memory of monitoring a large Embedding (sparse, tf.IndexedSlices gradients).

Trains a 1,000,000 x 64 embedding (+ a small head) for a few steps, once plain
and once monitored with `GradientMonitor` (every statistic, every step), each
in a fresh subprocess, and prints both processes' peak RSS and their ratio.
gradmon computes norms of IndexedSlices without densifying them (repeated
indices are summed first).

    python benchmarks/sparse_memory.py [--rows 1000000] [--steps 20] [--stats all|norm]
"""

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, os, resource, sys, tempfile
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import keras, numpy as np
import gradmon
monitored, rows, steps, stats = sys.argv[1] == "1", int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
keras.utils.set_random_seed(0)
tokens = keras.Input((16,), dtype="int32")
h = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(rows, 64)(tokens))
model = keras.Model(tokens, keras.layers.Dense(1)(h))
callbacks = []
if monitored:
    model = gradmon.monitor(model, stats="all" if stats == "all" else (None if stats == "default" else [stats]))
    callbacks = [gradmon.GradientMonitor(tempfile.mkdtemp())]
model.compile(optimizer="adam", loss="mse")
rng = np.random.default_rng(0)
x = rng.integers(0, rows, size=(steps * 256, 16)).astype("int32")
y = rng.normal(size=(steps * 256, 1)).astype("float32")
model.fit(x, y, batch_size=256, epochs=1, verbose=0, callbacks=callbacks)
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def peak(monitored, args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-c", CHILD, "1" if monitored else "0", str(args.rows),
                          str(args.steps), args.stats], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--stats", default="all", help='"all", "default" or one statistic name, e.g. "norm"')
    args = parser.parse_args()
    plain, monitored = peak(False, args), peak(True, args)
    print(f"| embedding | plain fit peak RSS | monitored ({args.stats} stats) peak RSS | ratio |")
    print("|---|---|---|---|")
    print(f"| {args.rows:,} x 64, Adam | {plain:.0f} MB | {monitored:.0f} MB | {monitored / plain:.3f}x |")


if __name__ == "__main__":
    main()
