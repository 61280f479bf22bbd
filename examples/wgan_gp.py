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

Run from the repository root (about 25 s on 2 CPUs):

    python examples/wgan_gp.py                         # writes runs/wgan_gp
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
import tensorflow as tf  # noqa: E402

import gradmon  # noqa: E402
from gradmon import tags  # noqa: E402
from gradmon.publish.writer import SummaryWriter  # noqa: E402

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


def main(argv=None):
    args = parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    real_pool = sample_ring(20_000, rng)
    dataset = (tf.data.Dataset.from_tensor_slices(real_pool)
               .shuffle(len(real_pool), seed=args.seed).repeat()
               .batch(args.critic_steps * args.batch_size, drop_remainder=True))

    gan = WGANGP(
        generator=mlp("generator", LATENT_DIM, 2),
        critic=mlp("critic", 2, 1),
        critic_steps=args.critic_steps,
        gp_weight=args.gp_weight,
    )
    # Both optimizers observed into one run, their tags prefixed by `name`. The critic makes
    # `critic_steps` measured updates per generator step at most: the buffer holds them
    # until the next flush.
    critic_opt = gradmon.observe(
        keras.optimizers.Adam(1e-3, beta_1=0.5, beta_2=0.9), log_dir=args.log_dir, name="critic",
        update_freq=args.update_freq, buffer_steps=max(16, 2 * args.critic_steps))
    generator_opt = gradmon.observe(
        keras.optimizers.Adam(1e-3, beta_1=0.5, beta_2=0.9), log_dir=args.log_dir, name="generator",
        update_freq=args.update_freq,
        transform=(gradmon.transforms.clip_by_global_norm(args.generator_clip)
                   if args.generator_clip > 0 else None))
    gan.compile(critic_optimizer=critic_opt, generator_optimizer=generator_opt)
    gan.fit(dataset, epochs=args.epochs, steps_per_epoch=args.steps, verbose=2,
            callbacks=[FlushObserved(args.log_dir, args.update_freq)])

    # Final check on fresh data.
    real = tf.constant(sample_ring(2048, rng))
    fake = gan.sample(2048)
    _, wasserstein, penalty = gan.critic_losses(real, fake)
    wasserstein, penalty = float(wasserstein), float(penalty)
    near, modes = mode_coverage(fake.numpy())
    finite = math.isfinite(wasserstein) and math.isfinite(penalty)
    print(f"\nafter {int(gan.generator_optimizer.iterations.numpy())} generator steps, "
          "on 2048 fresh real and generated points:")
    print(f"  critic's Wasserstein estimate  {wasserstein:.4f}")
    print(f"  gradient penalty (wgan-gp)     {penalty:.4f}")
    print(f"  generated points near a mode   {near:.1%}; modes covered {modes}/{NUM_MODES}")
    print(f"  Wasserstein estimate and penalty finite: {finite}")
    print(f"\nLogs written to {args.log_dir}. Look at them with:\n\n"
          f"    tensorboard --logdir {args.log_dir}\n")
    return 0 if finite else 1


if __name__ == "__main__":
    sys.exit(main())
