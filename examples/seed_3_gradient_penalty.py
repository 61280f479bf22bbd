"""A gradient-norm penalty done right: exact double backpropagation, logged per part.

The recipe this replaces added `lambda * ||dL/dtheta||` to the loss by calling
`tape.gradient` twice on one non-persistent tape (a RuntimeError), applied
`tf.abs` to the list of differently shaped gradient tensors (an error: they
cannot be stacked into one tensor), and the article never defined its
optimizer. Here the penalty is one argument:

    gradmon.monitor(model, penalties=[
        gradmon.penalties.GradientNormPenalty(WEIGHT),   # WEIGHT * ||grad of the data loss||_2
        gradmon.penalties.WeightPenalty(l2=L2)])         # L2 * sum w^2

The data-loss gradient is taken on a nested tape, so the penalty's own
gradient includes the Hessian-vector product term (nothing is stopped or
approximated), and every part of the loss is differentiated and logged on
its own. The model is a small regression MLP on generated data.

Run from the repository root (about 8 s on 2 CPUs):

    python examples/seed_3_gradient_penalty.py         # writes runs/seed_3_gradient_penalty
    tensorboard --logdir runs/seed_3_gradient_penalty

In TensorBoard, Scalars:
  - `loss/data` (the MSE) against `loss/total` (MSE + penalties);
  - `penalties/grad_norm`: the penalty's value, WEIGHT * ||grad||;
  - `penalties/grad_norm/share`: its share of the total loss;
  - `penalties/grad_norm/grad_norm`: the norm of its own gradient contribution,
    to compare with `gradients/raw/global_norm` (all parts together);
  - the same three for `penalties/weight`.
"""

import argparse
import math
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import gradmon  # noqa: E402
from gradmon import tags  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--log-dir", default="runs/seed_3_gradient_penalty",
                        help="TensorBoard run directory (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=8, help="default: %(default)s")
    parser.add_argument("--weight", type=float, default=0.05,
                        help="GradientNormPenalty coefficient (default: %(default)s)")
    parser.add_argument("--l2", type=float, default=1e-4,
                        help="WeightPenalty L2 coefficient (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    return parser.parse_args(argv)


def make_data(seed, n=2048, features=8):
    """x ~ N(0, I) in R^8; y = sin(x . a) + 0.1 noise, shape [n, 1] like the model's output."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, features)).astype("float32")
    a = rng.standard_normal(features) / math.sqrt(features)
    y = np.sin(2.0 * x @ a) + 0.1 * rng.standard_normal(n)
    return x, y[:, None].astype("float32")


def main(argv=None):
    args = parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    x, y = make_data(args.seed)

    base = keras.Sequential([
        keras.Input((x.shape[1],)),
        keras.layers.Dense(32, activation="tanh", name="hidden"),
        keras.layers.Dense(1, name="out"),
    ], name="regressor")
    model = gradmon.monitor(base, penalties=[
        gradmon.penalties.GradientNormPenalty(args.weight),
        gradmon.penalties.WeightPenalty(l2=args.l2),
    ])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    model.fit(
        x, y, batch_size=64, epochs=args.epochs, validation_split=0.2, verbose=2,
        callbacks=[
            gradmon.GradientMonitor(args.log_dir),
            keras.callbacks.TensorBoard(args.log_dir),
        ],
    )

    # The latest measured step, read back from the model's observer.
    snapshot = model.gradient_observer.recorder.read()[-1]
    print(f"\nlast step ({snapshot.step}):")
    print(f"  {tags.LOSS_DATA}   {snapshot[tags.LOSS_DATA]:.5f}")
    print(f"  {tags.LOSS_TOTAL}  {snapshot[tags.LOSS_TOTAL]:.5f}")
    print(f"  raw global gradient norm (all parts) {snapshot[tags.global_norm(tags.RAW)]:.5f}")
    print(f"  {'penalty':<12}{'value':>10}{'share':>10}{'grad_norm':>12}")
    for name in ("grad_norm", "weight"):
        print(f"  {name:<12}{snapshot[tags.penalty(name)]:>10.5f}{snapshot[tags.penalty_share(name)]:>10.4f}"
              f"{snapshot[tags.penalty_grad_norm(name)]:>12.5f}")
    print(f"\nLogs written to {args.log_dir}. Look at them with:\n\n"
          f"    tensorboard --logdir {args.log_dir}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
