"""`gradmon demo`: a small monitored training run on scikit-learn's bundled digits."""

import os

# Quiet TensorFlow's start-up chatter before it is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def load_digits_split(seed=0):
    """(x_train, y_train, x_val, y_val) from scikit-learn's bundled digits (no download)."""
    import numpy as np

    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise SystemExit(
            "gradmon demo needs scikit-learn for its bundled digits data: "
            "pip install 'gradmon[demo]'"
        ) from error
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int64")
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))
    return x[:split], y[:split], x[split:], y[split:]


def build_model():
    """The demo's monitored MLP, compiled: clipped by value then by global norm, an L2 penalty,
    the gradient noise scale, every statistic per variable (`gradmon.monitor`)."""
    import keras

    import gradmon

    base = keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(64, activation="relu", name="hidden1"),
        keras.layers.Dense(32, activation="relu", name="hidden2"),
        keras.layers.Dense(10, name="logits"),
    ], name="digits_mlp")
    model = gradmon.monitor(
        base,
        transform=gradmon.transforms.chain(
            gradmon.transforms.clip_by_value(0.5),
            gradmon.transforms.clip_by_global_norm(1.0),
        ),
        penalties=[gradmon.penalties.WeightPenalty(l2=1e-4)],
        noise_scale=True,
        # a small model: every statistic per variable is still browsable
        grouping="variable",
        stats="all",
    )
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


class EpochScalars:
    """Off TensorFlow, the epoch scalars Keras' TensorBoard callback writes (`epoch_loss`,
    `epoch_accuracy`, ... in `<log_dir>/train`, their `val_` twins in `<log_dir>/validation`),
    written by gradmon's own TensorFlow-free writer: that callback needs TensorFlow."""

    @staticmethod
    def callback(log_dir):
        import keras

        from gradmon.publish.writer import SummaryWriter

        class _EpochScalars(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                self.writers = {run: SummaryWriter.shared(log_dir, run).open()
                                for run in ("train", "validation")}

            def on_epoch_end(self, epoch, logs=None):
                runs = {"train": {}, "validation": {}}
                for key, value in (logs or {}).items():
                    run, name = ("validation", key[4:]) if key.startswith("val_") else ("train", key)
                    runs[run][f"epoch_{name}"] = float(value)
                for run, mapping in runs.items():
                    if mapping:
                        self.writers[run].write_scalars(epoch, mapping)

            def on_train_end(self, logs=None):
                for writer in self.writers.values():
                    writer.close()

        return _EpochScalars()


def run(log_dir="runs/demo", epochs=8, seed=0):
    """Trains a monitored MLP on digits; writes TensorBoard logs to `log_dir`.

    Gradient statistics every step (clipped by value then by global norm, an
    L2 penalty, the gradient noise scale), histograms every 20 steps, and the
    Hessian's top-3 eigenvalues, trace and density once per epoch. On JAX and
    PyTorch (no TensorFlow needed) the epoch scalars of Keras' TensorBoard
    callback, which needs TensorFlow, are written by gradmon's writer
    (`EpochScalars`); the rest is the same.
    """
    import keras

    import gradmon

    keras.utils.set_random_seed(seed)
    x, y, x_val, y_val = load_digits_split(seed)
    model = build_model()
    backend = keras.backend.backend()
    if backend == "tensorflow":
        scalars = keras.callbacks.TensorBoard(log_dir)
    else:
        scalars = EpochScalars.callback(log_dir)
        print(f"Keras backend {backend!r}: the epoch loss and accuracy are written by gradmon's "
              "TensorFlow-free writer (Keras' TensorBoard callback needs TensorFlow).")
    model.fit(
        x, y, batch_size=32, epochs=epochs, validation_data=(x_val, y_val), verbose=2,
        callbacks=[
            gradmon.GradientMonitor(log_dir, histogram_freq=20),
            gradmon.HessianMonitor(log_dir, data=(x_val[:256], y_val[:256]), every_n_steps=45,
                                   top_k=3, trace=True, density=True),
            scalars,
        ],
    )
    loss, accuracy = model.evaluate(x_val, y_val, verbose=0)
    print(f"validation accuracy {accuracy:.3f}, loss {loss:.3f}")
    print(f"\nLogs written to {log_dir}. Look at them with:\n\n"
          f"    tensorboard --logdir {log_dir}\n\n"
          "(CUSTOM SCALARS tab: gradmon's Gradients / Penalties / Optimizer / Curvature charts), "
          f"or get a health report with:\n\n    gradmon summary {log_dir}\n")
    return model
