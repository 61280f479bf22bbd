"""Verify a custom loss's gradient against a hand-derived one, in one call.

The recipe: a softplus loss `mean(log(1 + exp(z)))` on the output
`z = x @ w + b` of a small linear model. By hand, its gradient is
`dL/dw = mean(sigmoid(z) * x)` and `dL/db = mean(sigmoid(z))`.
`check_gradients` compares TensorFlow's autodiff gradient with central finite
differences and with that manual gradient, in float64, and prints a table.
The second half shows a wrong manual gradient (the chain rule's `x` factor
forgotten) being flagged, naming the input it is wrong for. Inputs passed as
a dict are named by key and handed to the functions as keyword arguments.

Run from the repository root (about 10 s, mostly importing TensorFlow):

    python examples/seed_1_custom_loss_gradient.py

It exits 0 when the correct gradient passes and the wrong one is caught.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from gradmon.gradcheck import assert_gradients_close, check_gradients  # noqa: E402

rng = np.random.default_rng(0)
x = rng.standard_normal((32, 3))  # float64 features, 32 examples
w = 0.5 * rng.standard_normal(3)
b = np.array(0.1)


def softplus_loss(w, b):
    z = tf.linalg.matvec(x, w) + b
    return tf.reduce_mean(tf.math.log(1.0 + tf.exp(z)))


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def manual_gradient(w, b):
    s = sigmoid(x @ w.numpy() + b.numpy())  # dL/dz, one per example
    return {"w": (s[:, None] * x).mean(axis=0), "b": s.mean()}


def wrong_manual_gradient(w, b):
    s = sigmoid(x @ w.numpy() + b.numpy())
    return {"w": np.full(3, s.mean()), "b": s.mean()}  # forgot the chain rule's x


def main():
    print("Softplus loss on a linear model: autodiff vs finite differences vs manual")
    report = check_gradients(softplus_loss, {"w": w, "b": b}, manual=manual_gradient)
    print(report)
    print()
    print(f"correct manual gradient: {'passed' if report.passed else 'FAILED'}")
    print()

    print("The same check with a wrong manual gradient:")
    try:
        assert_gradients_close(
            softplus_loss, {"w": w, "b": b}, manual=wrong_manual_gradient
        )
        caught = False
    except AssertionError as error:
        print(error)
        caught = str(error).startswith("Gradients disagree for w:")
    print()
    print(f"wrong manual gradient: {'flagged for w' if caught else 'NOT flagged'}")
    return 0 if report.passed and caught else 1


if __name__ == "__main__":
    sys.exit(main())
