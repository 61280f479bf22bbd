"""Gradient clipping you can see: a value clip and a global-norm clip, chained.

The recipe this replaces clipped gradients in a hand-written train step whose
model produced a `[batch, 10]` output for `[batch, 2]` targets, so it never
ran. Here the shapes agree (10 logits, one-hot targets of width 10, checked
before training) and the clipping is one argument:

    gradmon.monitor(model, transform=gradmon.transforms.chain(
        gradmon.transforms.clip_by_value(VALUE), gradmon.transforms.clip_by_global_norm(NORM)))

The model is a small MLP on scikit-learn's bundled digits (8x8 images, no
download). `gradmon.GradientMonitor` logs, every step, how much each clip did.

Run from the repository root (about 10 s on 2 CPUs):

    python examples/seed_2_clipping.py                 # writes runs/seed_2_clipping
    tensorboard --logdir runs/seed_2_clipping

In TensorBoard, Scalars:
  - `gradients/clip/ratio`: ||clipped gradient|| / ||raw gradient|| (1.0 = untouched);
  - `gradients/clip/fraction/clip_by_value`: share of entries clamped to +-VALUE;
  - `gradients/clip/fraction/clip_by_global_norm`: 1 on steps rescaled to NORM, else 0;
  - `gradients/raw/global_norm` against `gradients/transformed/global_norm`;
  - `epoch_loss`, `epoch_accuracy` (from keras.callbacks.TensorBoard, same run).
Histograms / Distributions: `gradients/raw/hist/<variable>` against
`gradients/transformed/hist/<variable>`: the value clip cuts the tails.
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import gradmon  # noqa: E402
from gradmon import tags  # noqa: E402

NUM_CLASSES = 10


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--log-dir", default="runs/seed_2_clipping",
                        help="TensorBoard run directory (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=6, help="default: %(default)s")
    parser.add_argument("--clip-value", type=float, default=0.02,
                        help="clip_by_value limit on each gradient entry (default: %(default)s)")
    parser.add_argument("--clip-norm", type=float, default=0.5,
                        help="clip_by_global_norm bound (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    return parser.parse_args(argv)


def load_data(seed):
    """Digits as (x [n, 64] in [0, 1], one-hot y [n, 10]), shuffled."""
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = keras.utils.to_categorical(digits.target, NUM_CLASSES).astype("float32")
    order = np.random.default_rng(seed).permutation(len(x))
    return x[order], y[order]


def main(argv=None):
    args = parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    x, y = load_data(args.seed)

    base = keras.Sequential([
        keras.Input((x.shape[1],)),
        keras.layers.Dense(64, activation="relu", name="hidden"),
        keras.layers.Dense(NUM_CLASSES, name="logits"),
    ], name="digits_mlp")
    # The seed's bug, caught before training: output and targets must have the same shape.
    if base.output_shape[1:] != y.shape[1:]:
        raise SystemExit(f"output shape {base.output_shape} does not match targets {y.shape}")

    model = gradmon.monitor(base, transform=gradmon.transforms.chain(
        gradmon.transforms.clip_by_value(args.clip_value),
        gradmon.transforms.clip_by_global_norm(args.clip_norm),
    ))
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(
        x, y, batch_size=32, epochs=args.epochs, validation_split=0.2, verbose=2,
        callbacks=[
            gradmon.GradientMonitor(args.log_dir, histogram_freq=10),
            keras.callbacks.TensorBoard(args.log_dir),
        ],
    )

    # The latest measured step, read back from the model's observer.
    snapshot = model.gradient_observer.recorder.read()[-1]
    print(f"\nlast step ({snapshot.step}):")
    print(f"  raw global norm       {snapshot[tags.global_norm(tags.RAW)]:.4f}")
    print(f"  clipped global norm   {snapshot[tags.global_norm(tags.TRANSFORMED)]:.4f}")
    print(f"  clip ratio            {snapshot[tags.CLIP_RATIO]:.4f}   (1.0 = untouched)")
    print(f"  clip fraction         {snapshot[tags.CLIP_FRACTION]:.4f}   (largest member's share)")
    for member in ("clip_by_value", "clip_by_global_norm"):
        print(f"    {member:<20}{snapshot[tags.clip_fraction_of(member)]:.4f}")
    print(f"\nLogs written to {args.log_dir}. Look at them with:\n\n"
          f"    tensorboard --logdir {args.log_dir}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
