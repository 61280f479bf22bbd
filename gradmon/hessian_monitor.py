"""`HessianMonitor`: Hessian spectrum probes during `fit`, written to TensorBoard.

The numerics live in `gradmon.hessian`; this callback only schedules probes
and writes their results.
"""

import keras
import numpy as np

from gradmon import _distribute, hessian, tags
from gradmon._steps import current_learning_rate, training_step
from gradmon._validation import invalid
from gradmon.writer import SummaryWriter


def density_buckets(density, buckets=60):
    """`[buckets, 3]` histogram rows (left, right, probability mass) of an SLQ density."""
    edges = np.linspace(density.grid[0], density.grid[-1], buckets + 1)
    cumulative = np.concatenate([[0.0], np.cumsum(
        0.5 * (density.values[1:] + density.values[:-1]) * np.diff(density.grid))])
    mass = np.diff(np.interp(edges, density.grid, cumulative))
    return np.stack([edges[:-1], edges[1:], mass], axis=1)


class HessianMonitor(keras.callbacks.Callback):
    """Estimates the Hessian spectrum on probe data during training and writes it to TensorBoard.

    Every `every_n_steps` training steps it computes the top-`top_k`
    eigenvalues (Lanczos, warm-started from the previous probe's
    eigenvectors), their residuals, and optionally the Hutchinson trace and
    the SLQ spectral density, with `gradmon.hessian` (loss with
    `training=False`; the probe changes no weight, optimizer slot,
    BatchNorm statistic, RNG state or step counter). It also writes
    `hessian/edge_of_stability` = lambda_1 * lr / 2 with the optimizer's
    current learning rate (for plain gradient descent, 1.0 is the edge of
    stability; for adaptive optimizers it is only indicative).

    Args:
        log_dir: directory of the TensorBoard run (summaries go to `<log_dir>/train`).
        data: the probe: a batch `(x, y)` / `(x, y, sample_weight)`, a list
            of batches or a finite `tf.data.Dataset`.
        every_n_steps: probe every this many training steps. Defaults to `100`.
        top_k: number of largest eigenvalues. Defaults to `1`.
        trace: also estimate the trace. Defaults to `False`.
        trace_samples: Hutchinson probes for the trace. Defaults to `50`.
        density: also estimate the spectral density. Defaults to `False`.
        smallest: also compute the smallest eigenvalue. Defaults to `False`.
        tol: residual tolerance relative to ||H|| for the eigenpairs.
            Defaults to `1e-3`.
        seed: seed for the probes' random vectors. Defaults to `0`.

    Example:
        >>> probe = (x_val[:512], y_val[:512])
        >>> model.fit(x, y, callbacks=[gradmon.HessianMonitor("runs/exp1", data=probe, top_k=3)])
    """

    def __init__(self, log_dir, data, every_n_steps=100, top_k=1, trace=False, trace_samples=50,
                 density=False, smallest=False, tol=1e-3, seed=0):
        super().__init__()
        if data is None:
            raise invalid("data", "a batch, a list of batches or a tf.data.Dataset", data)
        self.log_dir = str(log_dir)
        self.data = data
        self.every_n_steps = _check_positive_int("every_n_steps", every_n_steps)
        self.top_k = _check_positive_int("top_k", top_k)
        self.trace = bool(trace)
        self.trace_samples = _check_positive_int("trace_samples", trace_samples)
        self.density = bool(density)
        self.smallest = bool(smallest)
        self.tol = float(tol)
        self.seed = seed
        self._writer = SummaryWriter.shared(f"{self.log_dir}/train")
        self.last_spectrum = None
        self._next_probe = every_n_steps
        self._active = True

    def on_train_begin(self, logs=None):
        # under multi-worker training only the chief probes and writes
        self._active = _distribute.is_chief(self.model.distribute_strategy)
        if not self._active:
            return
        self._writer.open()
        hvp = hessian.make_hvp(self.model, self.data)  # bad data or no compiled loss: fail now
        if self.top_k > hvp.num_params:
            raise invalid("top_k", f"at most the number of parameters ({hvp.num_params})", self.top_k)
        if self.last_spectrum is not None and self.last_spectrum.eigenvectors.shape[1] != hvp.num_params:
            self.last_spectrum = None
        self._next_probe = (training_step(self.model) // self.every_n_steps + 1) * self.every_n_steps

    def on_train_batch_end(self, batch, logs=None):
        if not self._active:
            return
        step = training_step(self.model)
        if step >= self._next_probe:
            self.probe(step)
            self._next_probe = (step // self.every_n_steps + 1) * self.every_n_steps

    def on_train_end(self, logs=None):
        if self._active:
            self._writer.close()

    def probe(self, step):
        """Runs the estimates now and writes them at `step`; returns the scalars written."""
        spec = hessian.spectrum(self.model, self.data, top_k=self.top_k, smallest=self.smallest,
                                tol=self.tol, init_vectors=self.last_spectrum, seed=self.seed)
        self.last_spectrum = spec
        scalars = {}
        for i, (value, res) in enumerate(zip(spec.eigenvalues, spec.residuals), start=1):
            scalars[tags.eigenvalue(i)] = value
            scalars[tags.residual(i)] = res
        if self.smallest:
            scalars[tags.HESSIAN_MIN_EIGENVALUE] = spec.min_eigenvalue
        hvps = spec.hvp_count
        scalars[tags.EDGE_OF_STABILITY] = spec.eigenvalues[0] * current_learning_rate(self.model.optimizer) / 2
        if self.trace:
            estimate = hessian.trace(self.model, self.data, num_samples=self.trace_samples, seed=self.seed)
            scalars[tags.HESSIAN_TRACE] = estimate.value
            scalars[tags.HESSIAN_TRACE_STDERR] = estimate.stderr
            hvps += estimate.hvp_count
        if self.density:
            dens = hessian.density(self.model, self.data, seed=self.seed)
            hvps += dens.hvp_count
            self._writer.write_histograms(step, {tags.HESSIAN_DENSITY: density_buckets(dens)})
        scalars[tags.HESSIAN_HVP_COUNT] = hvps
        self._writer.write_scalars(step, scalars)
        return scalars


def _check_positive_int(argument, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise invalid(argument, "a positive integer", value)
    return value
