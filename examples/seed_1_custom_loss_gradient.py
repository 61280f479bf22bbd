"""Verify a custom loss's gradient against a hand-derived one, in one call.

The recipe: a softplus loss `mean(log(1 + exp(z)))` on the output
`z = x @ w + b` of a small linear model. By hand, its gradient is
`dL/dw = mean(sigmoid(z) * x)` and `dL/db = mean(sigmoid(z))`: the mean over
the n examples carries a factor 1/n into the gradient.

The article's recipe 1 did the same comparison by hand and did not run as
written: it called `tf.debugging.assert_near(..., abs_tolerance=...)`, which
raises `TypeError` (the argument is `atol`), and its manual gradient summed
`sigmoid(z) * x` over the examples, missing the 1/n of the mean, so the
comparison could not have passed either.

`check_gradients` compares TensorFlow's autodiff gradient with central finite
differences and with the manual gradient, in float64, and prints a table. The
second half checks the article's manual gradient (the sum) and shows it
flagged for both `w` and `b`, each n times too large (relative error
|a - b| / max(|a|, |b|) = 1 - 1/n, 0.969 for n = 32).
Inputs passed as a dict are named by key and handed to the functions as
keyword arguments.

Run from the repository root (about 10 s, mostly importing TensorFlow):

    python examples/seed_1_custom_loss_gradient.py

It exits 0 when the correct gradient passes and the article's is caught.
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


def article_manual_gradient(w, b):
    s = sigmoid(x @ w.numpy() + b.numpy())
    return {"w": (s[:, None] * x).sum(axis=0), "b": s.sum()}  # the article's: no 1/n


def main():
    print("Softplus loss on a linear model: autodiff vs finite differences vs manual")
    report = check_gradients(softplus_loss, {"w": w, "b": b}, manual=manual_gradient)
    print(report)
    print()
    print(f"correct manual gradient: {'passed' if report.passed else 'FAILED'}")
    print()

    print(f"The same check with the article's manual gradient (summed over the {len(x)} examples):")
    try:
        assert_gradients_close(
            softplus_loss, {"w": w, "b": b}, manual=article_manual_gradient
        )
        caught = False
    except AssertionError as error:
        print(error)
        caught = str(error).startswith("Gradients disagree for w, b:")
    print()
    print(f"article's manual gradient: {'flagged for w and b' if caught else 'NOT flagged'}")
    return 0 if report.passed and caught else 1


if __name__ == "__main__":
    sys.exit(main())
