"""A small WGAN-GP on 2-D toy data, its two optimizers observed by gradmon side by side.

Real data: a mixture of 8 Gaussians on a ring of radius 2 (numpy). A
`keras.Model` subclass holds a generator and a critic, each with its own
optimizer, and a custom `train_step` does `--critic-steps` critic updates
then one generator update (Gulrajani et al. 2017, Algorithm 1). gradmon gives:

  - the gradients of both models, observed where each optimizer applies them:
        critic_opt = gradmon.observe(critic_opt, log_dir, name="critic")
        generator_opt = gradmon.observe(generator_opt, log_dir, name="generator",
                                        transform=gradmon.transforms.clip_by_global_norm(1.0))
    `name` prefixes every tag (`critic/gradients/raw/global_norm`,
    `generator/gradients/raw/global_norm`), so both sit in one run; the
    generator's observer also clips its gradient and logs what the clip did;
  - the penalty: `gradmon.penalties.InputGradientPenalty(10.0, kind="wgan-gp")
    .value(critic, real, fake)`, lambda * mean((||grad_x f(x_hat)|| - 1)^2)
    on random interpolates x_hat; it is differentiated exactly (the critic's
    gradient goes through the input gradient, double backpropagation);
  - the tag names and their descriptions: `gradmon.tags`.

`fit` runs `train_step` as a tf.function, so the measurements wait on the
device: a small callback calls `opt.flush()` on both optimizers every
`--update-freq` generator steps and writes the step's own numbers
(Wasserstein estimate, penalty, losses) into the same event file.

On JAX and PyTorch (`KERAS_BACKEND=jax|torch`, no TensorFlow needed) the same
training runs as a custom loop written the backend's way, with the same
observers, tags and descriptions (docs/guide/custom-loops.md): JAX, two
`jax.jit` steps calling `stateless_apply` and carrying each optimizer's
variables (handed to `opt.flush(optimizer_variables=...)`); PyTorch,
autograd then `opt.apply` under `no_grad`. The gradient penalty is written
here: its input gradient is a `jax.grad` inside the differentiated loss, or
`torch.autograd.grad(..., create_graph=True)`.

Run from the repository root (about 25 s on 2 CPUs):

    python examples/wgan_gp.py                         # writes runs/wgan_gp
    KERAS_BACKEND=jax python examples/wgan_gp.py       # the same on JAX (or torch)
    tensorboard --logdir runs/wgan_gp

In TensorBoard, Scalars (run `train`). Each model's tags count that model's
updates: `critic/...` steps are critic updates (`--critic-steps` per
generator step), `generator/...` steps are generator updates.
  - `critic/gradients/raw/global_norm`, `critic/gradients/raw/norm/<variable>`, ...:
    every `--update-freq`-th critic update;
  - `generator/gradients/raw/global_norm`, `generator/gradients/transformed/global_norm`,
    `generator/gradients/clip/ratio`, `generator/gradients/clip/fraction`: the
    generator's gradient and what the clip did;
  - `critic/wasserstein`: mean f(real) - mean f(fake), the critic's estimate of
    the Wasserstein-1 distance; it should fall towards 0 as the generator learns;
  - `critic/penalties/wgan_gp`: the gradient penalty (small means the critic is
    close to 1-Lipschitz on the interpolates);
  - `critic/loss` (-wasserstein + penalty), `generator/loss` (-mean f(fake)).
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
from gradmon.publish.writer import SummaryWriter  # noqa: E402

BACKEND = keras.backend.backend()
if BACKEND == "tensorflow":
    import tensorflow as tf

RADIUS, MODE_STD, NUM_MODES = 2.0, 0.05, 8
LATENT_DIM = 2


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--log-dir", default="runs/wgan_gp",
                        help="TensorBoard run directory (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=8, help="default: %(default)s")
    parser.add_argument("--steps", type=int, default=300,
                        help="generator steps per epoch (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=128, help="default: %(default)s")
    parser.add_argument("--critic-steps", type=int, default=5,
                        help="critic updates per generator update (default: %(default)s)")
    parser.add_argument("--gp-weight", type=float, default=10.0,
                        help="lambda of the gradient penalty (default: %(default)s)")
    parser.add_argument("--generator-clip", type=float, default=1.0,
                        help="global-norm clip of the generator's gradient, 0 = off "
                             "(default: %(default)s)")
    parser.add_argument("--update-freq", type=int, default=5,
                        help="measure each optimizer every this many of its updates, and write "
                             "every this many generator steps (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    return parser.parse_args(argv)


def ring_modes():
    angles = 2 * math.pi * np.arange(NUM_MODES) / NUM_MODES
    return RADIUS * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def sample_ring(n, rng):
    """n points from the mixture of 8 Gaussians, float32 [n, 2]."""
    modes = ring_modes()[rng.integers(NUM_MODES, size=n)]
    return (modes + MODE_STD * rng.standard_normal((n, 2))).astype("float32")


def mlp(name, inputs, outputs, width=64):
    return keras.Sequential([
        keras.Input((inputs,)),
        keras.layers.Dense(width, activation="relu", name="hidden_1"),
        keras.layers.Dense(width, activation="relu", name="hidden_2"),
        keras.layers.Dense(outputs, name="out"),
    ], name=name)


class WGANGP(keras.Model):
    """A generator and a critic trained as a WGAN-GP by `fit` on batches of real data.

    Each batch holds `critic_steps * batch` real points: one slice per critic update.
    """

    def __init__(self, generator, critic, critic_steps=5, gp_weight=10.0, **kwargs):
        super().__init__(**kwargs)
        self.generator, self.critic = generator, critic
        self.critic_steps = critic_steps
        self.penalty = gradmon.penalties.InputGradientPenalty(gp_weight, kind="wgan-gp")

    def compile(self, critic_optimizer, generator_optimizer, **kwargs):
        super().compile(**kwargs)
        self.critic_optimizer = critic_optimizer
        self.generator_optimizer = generator_optimizer

    def call(self, z, training=False):
        return self.generator(z, training=training)

    def sample(self, n):
        return self.generator(tf.random.normal([n, LATENT_DIM]), training=False)

    def critic_losses(self, real, fake):
        """(critic loss, Wasserstein estimate, penalty); differentiable in the critic's weights."""
        wasserstein = (tf.reduce_mean(self.critic(real, training=True))
                       - tf.reduce_mean(self.critic(fake, training=True)))
        penalty = self.penalty.value(self.critic, real, fake)
        return -wasserstein + penalty, wasserstein, penalty

    def train_step(self, real):
        critic_vars = self.critic.trainable_variables
        for real_slice in tf.split(real, self.critic_steps):
            fake = self.sample(tf.shape(real_slice)[0])  # outside the tape: the generator is fixed here
            with tf.GradientTape() as tape:
                critic_loss, wasserstein, penalty = self.critic_losses(real_slice, fake)
            critic_grads = tape.gradient(critic_loss, critic_vars)
            self.critic_optimizer.apply_gradients(zip(critic_grads, critic_vars))  # observed

        generator_vars = self.generator.trainable_variables
        with tf.GradientTape() as tape:
            fake = self.generator(tf.random.normal([tf.shape(real_slice)[0], LATENT_DIM]),
                                  training=True)
            generator_loss = -tf.reduce_mean(self.critic(fake, training=True))
        generator_grads = tape.gradient(generator_loss, generator_vars)
        # observed, and clipped there if the observer has a transform
        self.generator_optimizer.apply_gradients(zip(generator_grads, generator_vars))
        return {"critic_loss": critic_loss, "wasserstein": wasserstein, "gp": penalty,
                "generator_loss": generator_loss}


# The train step's own numbers (log key -> TensorBoard tag), next to what gradmon observes.
CRITIC_TAGS = {
    "wasserstein": "critic/wasserstein",
    "gp": tags.prefixed("critic", tags.penalty("wgan_gp")),
    "critic_loss": "critic/loss",
}
GENERATOR_TAGS = {"generator_loss": "generator/loss"}
DESCRIPTIONS = {  # written with each tag's first value
    CRITIC_TAGS["wasserstein"]: "mean critic(real) - mean critic(fake): the critic's estimate of "
                                "the Wasserstein-1 distance (last critic update of the step).",
    CRITIC_TAGS["gp"]: tags.describe(tags.penalty("wgan_gp"))
    + " lambda * mean((||grad_x critic(x_hat)|| - 1)^2) on interpolates x_hat.",
    CRITIC_TAGS["critic_loss"]: "-wasserstein + gradient penalty.",
    GENERATOR_TAGS["generator_loss"]: "-mean critic(fake).",
}


class FlushObserved(keras.callbacks.Callback):
    """Every `update_freq` generator steps: `flush()` both observed optimizers (they write
    their measured steps to `<log_dir>/train`) and write the step's own numbers there too,
    the critic's at the critic's step, the generator's at the generator's."""

    def __init__(self, log_dir, update_freq=1):
        super().__init__()
        self.log_dir, self.update_freq = log_dir, update_freq

    def on_train_begin(self, logs=None):
        self._writer = SummaryWriter.shared(self.log_dir, "train").open()  # gradmon's file
        self._generator_step = self.model.generator_optimizer.gradmon.step

    def on_train_batch_end(self, batch, logs=None):
        self._generator_step += 1
        if self._generator_step % self.update_freq == 0:
            self._flush(logs)

    def on_train_end(self, logs=None):
        self._flush(None)
        self._writer.close()

    def _flush(self, logs):
        critic_opt, generator_opt = self.model.critic_optimizer, self.model.generator_optimizer
        critic_opt.flush()
        generator_opt.flush()
        if logs:
            self._writer.write_scalars(critic_opt.gradmon.step, {
                tag: float(logs[key]) for key, tag in CRITIC_TAGS.items()}, DESCRIPTIONS)
            self._writer.write_scalars(self._generator_step, {
                tag: float(logs[key]) for key, tag in GENERATOR_TAGS.items()}, DESCRIPTIONS)


def mode_coverage(points):
    """(share of points within 4 std of a mode, number of modes holding at least 2% of points)."""
    distances = np.linalg.norm(points[:, None, :] - ring_modes()[None], axis=2)
    nearest, closest = distances.argmin(axis=1), distances.min(axis=1)
    good = closest < 4 * MODE_STD
    counts = np.bincount(nearest[good], minlength=NUM_MODES)
    return good.mean(), int((counts >= 0.02 * len(points)).sum())


# -- JAX and PyTorch: the same training as a custom loop ------------------------


def penalty_of(gradients, weight):
    """The WGAN-GP penalty from the critic's input gradients at the interpolates:
    weight * mean((||grad_x critic(x_hat)|| - 1)^2)."""
    norms = keras.ops.sqrt(keras.ops.sum(keras.ops.square(gradients), axis=1))
    return weight * keras.ops.mean(keras.ops.square(norms - 1.0))


class JaxWGAN:
    """Two `jax.jit` steps over `stateless_call`, each optimizer's variables carried (gradmon's
    state among them); the penalty's input gradient is a `jax.grad` inside the critic's loss."""

    def __init__(self, generator, critic, critic_opt, generator_opt, gp_weight, seed):
        import jax

        self.jax, self.gp_weight = jax, gp_weight
        self.generator, self.critic = generator, critic
        self.opts = {"critic": critic_opt, "generator": generator_opt}
        self.models = {"critic": critic, "generator": generator}
        self.values, self.carried = {}, {}
        for name, model in self.models.items():
            self.opts[name].build(model.trainable_variables)  # gradmon's state with it
            self.values[name] = [v.value for v in model.trainable_variables]
            self.carried[name] = [v.value for v in self.opts[name].variables]
        self.key = jax.random.PRNGKey(seed)
        self._critic_step = jax.jit(self._critic_update)
        self._generator_step = jax.jit(self._generator_update, static_argnums=4)  # n: a shape

    def _call(self, name, values, x):
        return self.models[name].stateless_call(values, [], x, training=True)[0]

    def critic_losses(self, critic_values, real, fake, key):
        """(critic loss, (Wasserstein estimate, penalty))."""
        jax = self.jax
        wasserstein = (keras.ops.mean(self._call("critic", critic_values, real))
                       - keras.ops.mean(self._call("critic", critic_values, fake)))
        eps = jax.random.uniform(key, (real.shape[0], 1))
        x_hat = eps * real + (1.0 - eps) * fake
        # each output depends on its own row only: the gradient of the sum is per example
        grad_x = jax.grad(lambda x: keras.ops.sum(self._call("critic", critic_values, x)))(x_hat)
        penalty = penalty_of(grad_x, self.gp_weight)
        return -wasserstein + penalty, (wasserstein, penalty)

    def _critic_update(self, critic_values, carried, generator_values, real, key):
        z_key, eps_key = self.jax.random.split(key)
        fake = self._call("generator", generator_values, self.jax.random.normal(z_key, (real.shape[0], LATENT_DIM)))
        (loss, (wasserstein, penalty)), grads = self.jax.value_and_grad(self.critic_losses, has_aux=True)(
            critic_values, real, fake, eps_key)
        critic_values, carried = self.opts["critic"].stateless_apply(carried, grads, critic_values)
        return critic_values, carried, {"critic_loss": loss, "wasserstein": wasserstein, "gp": penalty}

    def _generator_update(self, generator_values, carried, critic_values, key, n):
        def loss(values):
            fake = self._call("generator", values, self.jax.random.normal(key, (n, LATENT_DIM)))
            return -keras.ops.mean(self._call("critic", critic_values, fake))

        value, grads = self.jax.value_and_grad(loss)(generator_values)
        generator_values, carried = self.opts["generator"].stateless_apply(carried, grads, generator_values)
        return generator_values, carried, {"generator_loss": value}

    def _key(self):
        self.key, key = self.jax.random.split(self.key)
        return key

    def train_step(self, real_slices):
        for real in real_slices:
            self.values["critic"], self.carried["critic"], logs = self._critic_step(
                self.values["critic"], self.carried["critic"], self.values["generator"], real, self._key())
        self.values["generator"], self.carried["generator"], generator_logs = self._generator_step(
            self.values["generator"], self.carried["generator"], self.values["critic"], self._key(),
            len(real_slices[-1]))
        return {**logs, **generator_logs}

    def flush(self, name):
        self.opts[name].flush(optimizer_variables=self.carried[name])

    def finish(self):
        """The loop's values back into the models' and optimizers' variables."""
        for name, model in self.models.items():
            for v, value in zip(model.trainable_variables, self.values[name]):
                v.assign(value)
            for v, value in zip(self.opts[name].variables, self.carried[name]):
                v.assign(value)

    def final_check(self, real, n):
        fake = self._call("generator", self.values["generator"], self.jax.random.normal(self._key(), (n, LATENT_DIM)))
        _, (wasserstein, penalty) = self.critic_losses(self.values["critic"], real, fake, self._key())
        return float(wasserstein), float(penalty), np.asarray(fake)


class TorchWGAN:
    """Autograd on the host, then `opt.apply` under `no_grad`; the penalty's input gradient is
    taken with `create_graph=True`, so the critic's gradient goes through it."""

    def __init__(self, generator, critic, critic_opt, generator_opt, gp_weight, seed):
        import torch

        self.torch, self.gp_weight = torch, gp_weight
        self.generator, self.critic = generator, critic
        self.opts = {"critic": critic_opt, "generator": generator_opt}
        torch.manual_seed(seed)

    def critic_losses(self, real, fake):
        torch = self.torch
        wasserstein = keras.ops.mean(self.critic(real)) - keras.ops.mean(self.critic(fake))
        eps = torch.rand(real.shape[0], 1)
        x_hat = (eps * real + (1.0 - eps) * fake).requires_grad_(True)
        (grad_x,) = torch.autograd.grad(keras.ops.sum(self.critic(x_hat)), x_hat, create_graph=True)
        penalty = penalty_of(grad_x, self.gp_weight)
        return -wasserstein + penalty, wasserstein, penalty

    def _apply(self, name, loss, model):
        variables = model.trainable_variables
        grads = self.torch.autograd.grad(loss, [v.value for v in variables])
        with self.torch.no_grad():
            self.opts[name].apply(list(grads), variables)  # observed

    def _sample(self, n):
        return self.generator(self.torch.randn(n, LATENT_DIM))

    def train_step(self, real_slices):
        for real in real_slices:
            real = self.torch.from_numpy(real)
            with self.torch.no_grad():  # the generator is fixed here
                fake = self._sample(real.shape[0])
            critic_loss, wasserstein, penalty = self.critic_losses(real, fake)
            self._apply("critic", critic_loss, self.critic)
        generator_loss = -keras.ops.mean(self.critic(self._sample(real.shape[0])))
        self._apply("generator", generator_loss, self.generator)
        return {"critic_loss": critic_loss.detach(), "wasserstein": wasserstein.detach(),
                "gp": penalty.detach(), "generator_loss": generator_loss.detach()}

    def flush(self, name):
        self.opts[name].flush()  # eager: written as it goes already

    def finish(self):
        pass

    def final_check(self, real, n):
        real = self.torch.from_numpy(real)
        with self.torch.no_grad():
            fake = self._sample(n)
        _, wasserstein, penalty = self.critic_losses(real, fake)
        return float(wasserstein.detach()), float(penalty.detach()), fake.detach().numpy()


def train_loop(args, gan, real_pool, rng):
    """`--epochs` x `--steps` generator steps of `gan` (`JaxWGAN` / `TorchWGAN`), writing as
    `FlushObserved` does in `fit`: both observers and the step's own numbers every
    `--update-freq` generator steps (the critic's at the critic's step)."""
    writer = SummaryWriter.shared(args.log_dir, "train").open()
    per_step = args.critic_steps * args.batch_size
    order, generator_step = np.empty(0, np.int64), 0
    for epoch in range(args.epochs):
        for _ in range(args.steps):
            if len(order) < per_step:
                order = np.concatenate([order, rng.permutation(len(real_pool))])
            batch, order = real_pool[order[:per_step]], order[per_step:]
            logs = gan.train_step(np.split(batch, args.critic_steps))
            generator_step += 1
            if generator_step % args.update_freq == 0 or generator_step == args.epochs * args.steps:
                gan.flush("critic")
                gan.flush("generator")
                critic_step = generator_step * args.critic_steps
                writer.write_scalars(critic_step, {
                    tag: float(logs[key]) for key, tag in CRITIC_TAGS.items()}, DESCRIPTIONS)
                writer.write_scalars(generator_step, {
                    tag: float(logs[key]) for key, tag in GENERATOR_TAGS.items()}, DESCRIPTIONS)
        print(f"epoch {epoch + 1}/{args.epochs}: " + ", ".join(f"{k} {float(v):.4f}" for k, v in logs.items()))
    writer.close()
    gan.finish()
    for opt in gan.opts.values():
        opt.gradmon.close()
    return generator_step


def observed_optimizers(args):
    """Both optimizers observed into one run, their tags prefixed by `name`. The critic makes
    `critic_steps` measured updates per generator step at most: the buffer holds them
    until the next flush."""
    critic_opt = gradmon.observe(
        keras.optimizers.Adam(1e-3, beta_1=0.5, beta_2=0.9), log_dir=args.log_dir, name="critic",
        update_freq=args.update_freq, buffer_steps=max(16, 2 * args.critic_steps))
    generator_opt = gradmon.observe(
        keras.optimizers.Adam(1e-3, beta_1=0.5, beta_2=0.9), log_dir=args.log_dir, name="generator",
        update_freq=args.update_freq,
        transform=(gradmon.transforms.clip_by_global_norm(args.generator_clip)
                   if args.generator_clip > 0 else None))
    return critic_opt, generator_opt


def fit_tensorflow(args, real_pool, rng):
    """TensorFlow: `WGANGP.fit` with `FlushObserved`; the final check's numbers."""
    dataset = (tf.data.Dataset.from_tensor_slices(real_pool)
               .shuffle(len(real_pool), seed=args.seed).repeat()
               .batch(args.critic_steps * args.batch_size, drop_remainder=True))

    gan = WGANGP(
        generator=mlp("generator", LATENT_DIM, 2),
        critic=mlp("critic", 2, 1),
        critic_steps=args.critic_steps,
        gp_weight=args.gp_weight,
    )
    critic_opt, generator_opt = observed_optimizers(args)
    gan.compile(critic_optimizer=critic_opt, generator_optimizer=generator_opt)
    gan.fit(dataset, epochs=args.epochs, steps_per_epoch=args.steps, verbose=2,
            callbacks=[FlushObserved(args.log_dir, args.update_freq)])

    # Final check on fresh data.
    real = tf.constant(sample_ring(2048, rng))
    fake = gan.sample(2048)
    _, wasserstein, penalty = gan.critic_losses(real, fake)
    return (int(gan.generator_optimizer.iterations.numpy()), float(wasserstein), float(penalty),
            fake.numpy())


def main(argv=None):
    args = parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    real_pool = sample_ring(20_000, rng)
    if BACKEND == "tensorflow":
        steps, wasserstein, penalty, fake = fit_tensorflow(args, real_pool, rng)
    else:
        generator, critic = mlp("generator", LATENT_DIM, 2), mlp("critic", 2, 1)
        critic_opt, generator_opt = observed_optimizers(args)
        loop = JaxWGAN if BACKEND == "jax" else TorchWGAN
        gan = loop(generator, critic, critic_opt, generator_opt, args.gp_weight, args.seed)
        train_loop(args, gan, real_pool, rng)
        steps = int(keras.ops.convert_to_numpy(generator_opt.iterations))
        wasserstein, penalty, fake = gan.final_check(sample_ring(2048, rng), 2048)
    near, modes = mode_coverage(fake)
    finite = math.isfinite(wasserstein) and math.isfinite(penalty)
    print(f"\nafter {steps} generator steps, on 2048 fresh real and generated points:")
    print(f"  critic's Wasserstein estimate  {wasserstein:.4f}")
    print(f"  gradient penalty (wgan-gp)     {penalty:.4f}")
    print(f"  generated points near a mode   {near:.1%}; modes covered {modes}/{NUM_MODES}")
    print(f"  Wasserstein estimate and penalty finite: {finite}")
    print(f"\nLogs written to {args.log_dir}. Look at them with:\n\n"
          f"    tensorboard --logdir {args.log_dir}\n")
    return 0 if finite else 1


if __name__ == "__main__":
    sys.exit(main())
