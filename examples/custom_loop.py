"""The article's three recipes as custom training loops, observed with `gradmon.observe`.

"How can I calculate and adapt gradients in TensorFlow?" answers with a
custom loop: the forward pass on a `tf.GradientTape`, `tape.gradient`, then
`optimizer.apply_gradients`. gradmon observes such a loop at the optimizer,
with one line and no change to the loop:

    opt = gradmon.observe(keras.optimizers.Adam(1e-3), log_dir="runs/loop")

`opt` is the same Adam; every `apply_gradients` now measures the gradient
(global and per-variable norms, max |g|, RMS, update ratios ...). An eager
loop writes them to `<log_dir>/train` by itself; a `tf.function` (or XLA)
loop calls `opt.flush()` from Python now and then. The three recipes, on a
small MLP over scikit-learn's bundled digits (8x8 images, no download):

  1. gradients: the plain loop, eager (run `eager`) and in a `tf.function`
     with `opt.flush()` every `--flush-every` steps (run `tf_function`); same
     seed and batches, so the two runs show the same numbers;
  2. clipping: `observe(opt, transform=chain(clip_by_value(V), clip_by_global_norm(N)))`
     clips what the optimizer applies and logs how much each clip did (run
     `clipping`). The seed recipe's model gave 10 outputs for 2-wide targets;
     here targets are one-hot of width 10;
  3. penalty: `lambda * ||grad of the data loss||` added to the loss, done
     right (run `penalty`): the data-loss gradient is taken on a tape nested
     inside the outer one, so the outer gradient differentiates through it
     (double backpropagation). The seed recipe called `tape.gradient` twice
     on one non-persistent tape and took `tf.abs` of a list of differently
     shaped tensors.

The loop's own scalars (losses, the penalty) go into the same event file
through `gradmon.writer.SummaryWriter.shared(log_dir, "train")`.

The same three recipes run on JAX and PyTorch (`KERAS_BACKEND=jax|torch`, no
TensorFlow needed), each loop written the backend's way and writing the same
tags (docs/guide/custom-loops.md):

  - JAX: run `eager` takes `jax.grad` over `model.stateless_call` and calls
    `opt.apply` outside jit (written as it goes); run `jit` (and `clipping`,
    `penalty`) is a `jax.jit` step calling `opt.stateless_apply` and carrying
    the optimizer variables, handed to `opt.flush(optimizer_variables=...)`;
    the penalty's inner gradient is a `jax.grad` inside the differentiated loss;
  - PyTorch: `backward()` then `opt.apply` under `no_grad`, written as it goes
    (run `eager`; `clipping` and `penalty` likewise); the penalty's inner
    gradient is `torch.autograd.grad(..., create_graph=True)`.

Run from the repository root (about 12 s on 2 CPUs):

    python examples/custom_loop.py                     # writes runs/custom_loop/<run>/train
    KERAS_BACKEND=jax python examples/custom_loop.py   # the same on JAX (or torch)
    tensorboard --logdir runs/custom_loop

In TensorBoard, Scalars (run = eager, tf_function, clipping, penalty):
  - `gradients/raw/global_norm` (all runs), `gradients/raw/norm/<variable path>`,
    `gradients/update_ratio/<variable path>` (eager, tf_function; the other runs
    per layer or variable, as gradmon's `grouping` defaults);
  - `gradients/clip/ratio`, `gradients/clip/fraction/clip_by_value`,
    `gradients/clip/fraction/clip_by_global_norm`, `gradients/transformed/global_norm` (clipping);
  - `loss/data`; and for the penalty run `penalties/grad_norm`,
    `penalties/grad_norm/share`, `loss/total`.
Histograms (clipping): `gradients/raw/hist/<variable>` against `gradients/transformed/hist/<variable>`.
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
from gradmon.publish.writer import SummaryWriter  # noqa: E402

BACKEND = keras.backend.backend()
if BACKEND == "tensorflow":
    import tensorflow as tf

NUM_CLASSES = 10
# recipe 1's runs (name, compiled): PyTorch's loop is eager only
RUNS = {"tensorflow": (("eager", False), ("tf_function", True)), "jax": (("eager", False), ("jit", True)),
        "torch": (("eager", False),)}
RECIPES = ("gradients", "clipping", "penalty")
LOSS = keras.losses.CategoricalCrossentropy(from_logits=True)
PENALTY = "grad_norm"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--log-dir", default="runs/custom_loop",
                        help="TensorBoard log directory, one run per recipe (default: %(default)s)")
    parser.add_argument("--recipe", choices=("all",) + RECIPES, default="all", help="default: %(default)s")
    parser.add_argument("--steps", type=int, default=300,
                        help="training steps per run (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="default: %(default)s")
    parser.add_argument("--flush-every", type=int, default=10,
                        help="opt.flush() every this many steps in a tf.function loop (default: %(default)s)")
    parser.add_argument("--jit-compile", action="store_true", help="compile the tf.function loops with XLA")
    parser.add_argument("--clip-value", type=float, default=0.02, help="default: %(default)s")
    parser.add_argument("--clip-norm", type=float, default=0.5, help="default: %(default)s")
    parser.add_argument("--penalty-weight", type=float, default=0.05,
                        help="lambda of the gradient-norm penalty (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if not 1 <= args.flush_every <= 16:
        # an observer holds 16 measured steps between two flush() calls (observe's buffer_steps)
        parser.error("--flush-every must be between 1 and 16 (observe's buffer_steps)")
    return args


def load_data():
    """Digits as (x [1797, 64] in [0, 1], one-hot y [1797, 10]), float32."""
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = keras.utils.to_categorical(digits.target, NUM_CLASSES).astype("float32")
    return x, y


def batches(x, y, batch_size, steps, seed):
    """`steps` minibatches, reshuffled every epoch; the same for the same seed."""
    rng = np.random.default_rng(seed)
    order = np.empty(0, dtype=np.int64)
    for _ in range(steps):
        if len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(len(x))])
        index, order = order[:batch_size], order[batch_size:]
        if BACKEND == "tensorflow":
            yield tf.constant(x[index]), tf.constant(y[index])
        else:
            yield x[index], y[index]


def build_model(seed):
    """A 64-32-10 tanh MLP with seeded initial weights (every run starts from the same ones)."""
    return keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(32, activation="tanh", name="hidden",
                           kernel_initializer=keras.initializers.GlorotUniform(seed=seed)),
        keras.layers.Dense(NUM_CLASSES, name="logits",
                           kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 1)),
    ], name="digits_mlp")


# -- the train steps: the article's, unchanged by gradmon --------------------


def plain_step(model, optimizer):
    """Forward pass on a tape, `tape.gradient`, `optimizer.apply_gradients`."""
    variables = model.trainable_variables

    def step(x, y):
        with tf.GradientTape() as tape:
            loss = LOSS(y, model(x, training=True))
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(grads, variables))
        return {tags.LOSS_DATA: loss}

    return step


def penalized_step(model, optimizer, weight):
    """Data loss + `weight * ||grad of the data loss||_2`, differentiated exactly."""
    variables = model.trainable_variables

    def step(x, y):
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                data_loss = LOSS(y, model(x, training=True))
            # Taken while `outer` records: the gradient is itself differentiable,
            # so outer.gradient includes the penalty's Hessian-vector-product term.
            data_grads = inner.gradient(data_loss, variables)
            penalty = weight * tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(g)) for g in data_grads]))
            total = data_loss + penalty
        grads = outer.gradient(total, variables)
        optimizer.apply_gradients(zip(grads, variables))
        return {tags.LOSS_DATA: data_loss, tags.penalty(PENALTY): penalty,
                tags.penalty_share(PENALTY): penalty / total, tags.LOSS_TOTAL: total}

    return step


# -- the same steps on JAX and PyTorch ----------------------------------------


def gradient_norm(grads):
    return keras.ops.sqrt(sum(keras.ops.sum(keras.ops.square(g)) for g in grads))


class JaxStep:
    """The JAX steps: `jax.grad` over `model.stateless_call`; with `weight`, the loss adds
    `weight * ||grad of the data loss||_2`, its inner gradient a `jax.grad` inside the
    differentiated function (so the outer one differentiates through it).

    compiled: a functional `jax.jit` step calling `optimizer.stateless_apply` and carrying the
    values of the model's and the optimizer's variables (gradmon's state among the latter:
    `flush_arguments` hands them to `optimizer.flush`); else `optimizer.apply` outside jit.
    """

    def __init__(self, model, optimizer, compiled, weight=None):
        import jax

        self.jax, self.model, self.optimizer, self.weight = jax, model, optimizer, weight
        self.compiled = compiled
        optimizer.build(model.trainable_variables)  # gradmon's state is built with the optimizer's
        self.trainable = [v.value for v in model.trainable_variables]
        self.non_trainable = [v.value for v in model.non_trainable_variables]
        self.optimizer_variables = [v.value for v in optimizer.variables]
        self._jitted = jax.jit(self._functional_step)

    def _loss(self, trainable, non_trainable, x, y):
        def data_loss(trainable):
            y_pred, _ = self.model.stateless_call(trainable, non_trainable, x, training=True)
            return LOSS(y, y_pred)

        loss = data_loss(trainable)
        if self.weight is None:
            return loss, {tags.LOSS_DATA: loss}
        penalty = self.weight * gradient_norm(self.jax.grad(data_loss)(trainable))
        total = loss + penalty
        return total, {tags.LOSS_DATA: loss, tags.penalty(PENALTY): penalty,
                       tags.penalty_share(PENALTY): penalty / total, tags.LOSS_TOTAL: total}

    def _functional_step(self, trainable, non_trainable, optimizer_variables, x, y):
        (_, logs), grads = self.jax.value_and_grad(self._loss, has_aux=True)(trainable, non_trainable, x, y)
        trainable, optimizer_variables = self.optimizer.stateless_apply(optimizer_variables, grads, trainable)
        return trainable, optimizer_variables, logs

    def __call__(self, x, y):
        if self.compiled:
            self.trainable, self.optimizer_variables, logs = self._jitted(
                self.trainable, self.non_trainable, self.optimizer_variables, x, y)
            return logs
        variables = self.model.trainable_variables
        (_, logs), grads = self.jax.value_and_grad(self._loss, has_aux=True)(
            [v.value for v in variables], self.non_trainable, x, y)
        self.optimizer.apply(grads, variables)  # outside jit: the variables hold the state
        return logs

    def flush_arguments(self):
        return {"optimizer_variables": self.optimizer_variables} if self.compiled else {}

    def finish(self):
        """The loop's values back into the model's and the optimizer's variables."""
        if self.compiled:
            for v, value in zip(self.model.trainable_variables, self.trainable):
                v.assign(value)
            for v, value in zip(self.optimizer.variables, self.optimizer_variables):
                v.assign(value)


def torch_step(model, optimizer, weight=None):
    """The PyTorch step: autograd on the host, then `optimizer.apply` under `no_grad`; with
    `weight`, the penalty's inner gradient is taken with `create_graph=True`, so the outer
    gradient differentiates through it."""
    import torch

    variables = model.trainable_variables

    def step(x, y):
        data_loss = LOSS(torch.from_numpy(y), model(torch.from_numpy(x), training=True))
        params = [v.value for v in variables]
        logs, total = {tags.LOSS_DATA: data_loss}, data_loss
        if weight is not None:
            penalty = weight * gradient_norm(torch.autograd.grad(data_loss, params, create_graph=True))
            total = data_loss + penalty
            logs.update({tags.penalty(PENALTY): penalty, tags.penalty_share(PENALTY): penalty / total,
                         tags.LOSS_TOTAL: total})
        grads = torch.autograd.grad(total, params)
        with torch.no_grad():
            optimizer.apply(list(grads), variables)
        return {tag: value.detach() for tag, value in logs.items()}

    return step


def make_step(model, optimizer, compiled, jit_compile=False, weight=None):
    """The backend's step: the article's (TensorFlow: a `tf.function` when compiled), or
    `JaxStep` / `torch_step` (PyTorch: eager, whatever `compiled` says)."""
    if BACKEND == "jax":
        return JaxStep(model, optimizer, compiled, weight)
    if BACKEND == "torch":
        return torch_step(model, optimizer, weight)
    step = plain_step(model, optimizer) if weight is None else penalized_step(model, optimizer, weight)
    return tf.function(step, jit_compile=jit_compile) if compiled else step


# -- the loop ----------------------------------------------------------------


def train(step, optimizer, data, log_dir, flush_every):
    """Runs `step` over `data`; returns the measured snapshots and the last written logs.

    Eager: the observed optimizer writes each measured step itself.
    tf.function, JAX's jit: measurements wait on the device until `optimizer.flush()` (on JAX
    given the optimizer variables the loop carries). The loop's own scalars are written (at
    the flush points) into the same file.
    """
    writer = SummaryWriter.shared(log_dir, "train").open()
    carried = getattr(step, "flush_arguments", dict)
    snapshots, written = [], {}
    for i, (x, y) in enumerate(data, start=1):
        logs = step(x, y)
        if i % flush_every == 0 or i == len(data):
            # idempotent; eager: written already, returns []
            snapshots += optimizer.flush(**carried())
            written = {tag: float(value) for tag, value in logs.items()}
            writer.write_scalars(i, written)
    writer.close()
    if hasattr(step, "finish"):
        step.finish()
    if not snapshots:  # eager: read the latest measured steps back from the observer
        snapshots = optimizer.gradmon.recorder.read()
    return snapshots, written


def print_gradients(name, snapshot, model):
    print(f"\n[{name}] step {snapshot.step}: raw global norm {snapshot[tags.global_norm(tags.RAW)]:.5f}")
    for v in model.trainable_variables:
        print(f"    {v.path:<26} norm {snapshot[tags.group_stat(tags.RAW, 'norm', v.path)]:.5f}  "
              f"update/weight {snapshot[tags.update_ratio(v.path)]:.2e}")


def run_gradients(args, x, y):
    """Recipe 1: compute and log the gradients of a custom loop, eager and compiled."""
    for name, compiled in RUNS[BACKEND]:
        log_dir = os.path.join(args.log_dir, name)
        model = build_model(args.seed)
        # grouping="variable": one row per variable, tagged by its path (`v.path`)
        opt = gradmon.observe(keras.optimizers.Adam(1e-3), log_dir=log_dir, grouping="variable")
        data = list(batches(x, y, args.batch_size, args.steps, args.seed))
        step = make_step(model, opt, compiled, args.jit_compile)
        snapshots, logs = train(step, opt, data, log_dir, args.flush_every)
        print_gradients(name, snapshots[-1], model)
        print(f"    {tags.LOSS_DATA} {logs[tags.LOSS_DATA]:.5f}")


def run_clipping(args, x, y):
    """Recipe 2: a value clip then a global-norm clip on what the optimizer applies."""
    log_dir = os.path.join(args.log_dir, "clipping")
    model = build_model(args.seed)
    opt = gradmon.observe(
        keras.optimizers.Adam(3e-3), log_dir=log_dir,
        transform=gradmon.transforms.chain(gradmon.transforms.clip_by_value(args.clip_value),
                                           gradmon.transforms.clip_by_global_norm(args.clip_norm)),
        histogram_freq=2 * args.flush_every)  # histograms: the latest one is kept until flush()
    if model.output_shape[1:] != y.shape[1:]:  # the seed's bug, caught before training
        raise SystemExit(f"output shape {model.output_shape} does not match targets {y.shape}")
    data = list(batches(x, y, args.batch_size, args.steps, args.seed))
    snapshots, logs = train(make_step(model, opt, True, args.jit_compile), opt, data, log_dir,
                            args.flush_every)
    s = snapshots[-1]
    print(f"\n[clipping] step {s.step}: raw global norm {s[tags.global_norm(tags.RAW)]:.4f}, "
          f"clipped {s[tags.global_norm(tags.TRANSFORMED)]:.4f}, clip ratio {s[tags.CLIP_RATIO]:.4f}")
    for member in ("clip_by_value", "clip_by_global_norm"):
        fractions = [snap[tags.clip_fraction_of(member)] for snap in snapshots]
        print(f"    {member:<20} clip fraction: last {fractions[-1]:.4f}, mean over "
              f"{len(snapshots)} steps {np.mean(fractions):.4f}, steps with any clipping "
              f"{sum(f > 0 for f in fractions)}")
    print(f"    {tags.LOSS_DATA} {logs[tags.LOSS_DATA]:.5f}")


def run_penalty(args, x, y):
    """Recipe 3: a gradient-norm penalty on nested tapes, the optimizer observed."""
    log_dir = os.path.join(args.log_dir, "penalty")
    model = build_model(args.seed)
    opt = gradmon.observe(keras.optimizers.Adam(3e-3), log_dir=log_dir)
    data = list(batches(x, y, args.batch_size, args.steps, args.seed))
    step = make_step(model, opt, True, args.jit_compile, weight=args.penalty_weight)
    snapshots, logs = train(step, opt, data, log_dir, args.flush_every)
    s = snapshots[-1]
    print(f"\n[penalty] step {s.step}: raw global norm (data loss + penalty) "
          f"{s[tags.global_norm(tags.RAW)]:.5f}")
    for tag in (tags.LOSS_DATA, tags.penalty(PENALTY), tags.penalty_share(PENALTY), tags.LOSS_TOTAL):
        print(f"    {tag:<26}{logs[tag]:.5f}")


def main(argv=None):
    args = parse_args(argv)
    x, y = load_data()
    recipes = RECIPES if args.recipe == "all" else (args.recipe,)
    for recipe in recipes:
        {"gradients": run_gradients, "clipping": run_clipping, "penalty": run_penalty}[recipe](args, x, y)
    print(f"\nLogs written to {args.log_dir}. Look at them with:\n\n"
          f"    tensorboard --logdir {args.log_dir}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
