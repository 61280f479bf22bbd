"""Adam's edge of stability: the preconditioned sharpness rises to 38 / lr.

Cohen et al. (2022), "Adaptive Gradient Methods at the Edge of Stability":
full-batch Adam does not stop at gradient descent's edge (lambda_1 = 2 / lr)
but at its own, on the *preconditioned* sharpness lambda_1(P^-1 H), P Adam's
diagonal preconditioner: (2 + 2 beta_1) / ((1 - beta_1) lr), 38 / lr at
beta_1 = 0.9. Measured against gradient descent's edge, lambda_1 * lr / 2
stays near 0.002 and says "far from the edge" while training sits on it.

This script trains a 64-100-100-10 tanh MLP with Keras' MSE on one-hot
targets, on 1,000 of scikit-learn's bundled digits (pixels standardised), with full-batch Adam
(lr 1e-3, beta_1 0.9), and probes the Hessian every few steps with
`gradmon.HessianMonitor`, which computes both spectra.

    python examples/adam_edge_of_stability.py [--log-dir runs/adam_edge_of_stability] [--steps 3000]
    tensorboard --logdir runs/adam_edge_of_stability

In TensorBoard compare `hessian/edge_of_stability` (lambda_1(P^-1 H) / (38 / lr),
1.0 = Adam's edge) with `hessian/gd_edge_of_stability` (lambda_1 * lr / 2).
Measured here (3,000 steps, a probe every 50, about 20 s on 2 CPUs): the
preconditioned sharpness rises from 0.05 x 38/lr (step 50) through 0.40
(step 1,250) to 0.96 at step 2,600 and then stays at 0.96-1.02 x 38/lr
(1.004 at step 3,000), while lambda_1 * lr / 2 creeps from 0.0013 to 0.0020:
"far from the edge" by gradient descent's measure. The script prints the
trajectory and the range over the last quarter of probes.
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import gradmon  # noqa: E402
from gradmon.hessian import preconditioner  # noqa: E402


class Trajectory(keras.callbacks.Callback):
    """Collects each probe's two sharpnesses (after the Hessian monitor ran), to print them."""

    def __init__(self, hessian_monitor):
        super().__init__()
        self.hessian_monitor = hessian_monitor
        self.rows = []  # (step, lambda_1(H), lambda_1(P^-1 H), threshold, loss)
        self._last = None

    def on_train_batch_end(self, batch, logs=None):
        pre = self.hessian_monitor.last_preconditioned
        if pre is None or pre is self._last:
            return
        self._last = pre
        optimizer = self.model.optimizer
        threshold = preconditioner.stability_threshold(optimizer).value
        self.rows.append((int(optimizer.iterations.numpy()), float(self.hessian_monitor.last_spectrum.eigenvalues[0]),
                          float(pre.eigenvalues[0]), threshold, float(logs["loss"])))


def load_data(examples):
    """The first `examples` digits, each pixel standardised (mean 0, std 1; constant pixels 0)."""
    digits = load_digits()
    x = digits.data[:examples]
    std = x.std(axis=0)
    x = ((x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)).astype("float32")
    y = keras.utils.to_categorical(digits.target[:examples], 10).astype("float32")
    return x, y


def build_model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((64,)), keras.layers.Dense(100, activation="tanh"),
                             keras.layers.Dense(100, activation="tanh"), keras.layers.Dense(10)])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-dir", default="runs/adam_edge_of_stability")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--probe-every", type=int, default=50)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--examples", type=int, default=1000)
    args = parser.parse_args()

    x, y = load_data(args.examples)
    model = build_model()
    model.compile(optimizer=keras.optimizers.Adam(args.lr, beta_1=0.9), loss="mse")
    hessian = gradmon.HessianMonitor(args.log_dir, data=(x, y), every_n_steps=args.probe_every, top_k=1)
    trajectory = Trajectory(hessian)
    full_batch = tf.data.Dataset.from_tensors((x, y)).repeat()  # one step = the whole data set
    model.fit(full_batch, epochs=1, steps_per_epoch=args.steps, verbose=0, shuffle=False,
              callbacks=[hessian, trajectory])

    threshold = preconditioner.stability_threshold(model.optimizer)
    print(f"full-batch Adam, lr={args.lr}, beta_1=0.9: Adam's edge of stability is "
          f"lambda_1(P^-1 H) = {threshold.rule} = {threshold.value:.0f}")
    print(f"{'step':>6} {'lambda_1(H)':>12} {'lambda_1*lr/2':>14} {'lambda_1(P^-1 H)':>17} "
          f"{'/ (38/lr)':>10} {'loss':>10}")
    shown = trajectory.rows[:: max(1, len(trajectory.rows) // 20)]
    for step, lam, pre, edge, loss in shown + [r for r in trajectory.rows[-1:] if r is not shown[-1]]:
        print(f"{step:>6} {lam:>12.3f} {lam * args.lr / 2:>14.5f} {pre:>17.1f} {pre / edge:>10.3f} {loss:>10.5f}")
    tail = trajectory.rows[-max(1, len(trajectory.rows) // 4):]
    ratios = np.array([pre / edge for _, _, pre, edge, _ in tail])
    gd = np.array([lam * args.lr / 2 for _, lam, _, _, _ in tail])
    print(f"last quarter of probes: lambda_1(P^-1 H) / (38/lr) mean {ratios.mean():.3f}, "
          f"min {ratios.min():.3f}, max {ratios.max():.3f}; lambda_1*lr/2 mean {gd.mean():.4f}")
    print(f"\ntensorboard --logdir {args.log_dir}")


if __name__ == "__main__":
    main()
