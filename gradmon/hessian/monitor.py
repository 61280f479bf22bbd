"""`HessianMonitor`: Hessian spectrum probes during `fit`, written to TensorBoard.

The numerics live in `gradmon.hessian`; this callback only schedules probes
and writes their results.
"""

import warnings

import keras
import numpy as np

from gradmon import hessian
from gradmon.backend import hvp as _backend
from gradmon import tags
from gradmon.hessian import per_layer as layer_curvature, preconditioner
from gradmon.backend.host import current_learning_rate, host_value, training_step
from gradmon._validation import check_bool, check_log_dir, check_positive_int, invalid, warn_once
from gradmon.publish.writer import SummaryWriter


def density_buckets(density, buckets=60):
    """`[buckets, 3]` histogram rows (left, right, probability mass) of an SLQ density.

    Args:
        density: a `gradmon.hessian.Density`.
        buckets: number of equal-width buckets over its grid. Defaults to `60`.

    Returns:
        A float64 array `[buckets, 3]`, as `SummaryWriter.write_histograms` takes.
    """
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
    BatchNorm statistic, RNG state or step counter). One Hessian-vector
    product operator serves every probe of a fit: the probe data is
    converted once (here, which also checks it) and the HVP is traced once.
    For an adaptive optimizer (Adam, AdamW, Adamax, Nadam, RMSprop, Adagrad,
    also inside a `LossScaleOptimizer`) it also computes the top-`top_k`
    eigenvalues of `P^-1 H`, `P` the diagonal preconditioner of the
    optimizer's last update (`gradmon.preconditioner`), warm-started from
    the previous preconditioned probe. It writes
    `hessian/edge_of_stability` = sharpness / the optimizer's own stability
    threshold (`hessian/stability_threshold`, with the current learning
    rate): `lambda_1(H) / (2 / lr)` for SGD, `lambda_1(P^-1 H) / (38 / lr)`
    for Adam at `beta_1 = 0.9`, ... (table and references in
    `gradmon.preconditioner`); no ratio where no threshold is known or the
    preconditioned sharpness is not computed. `hessian/gd_edge_of_stability`
    = lambda_1 * lr / 2 (plain gradient descent's) is always written, and
    `hessian/gradient_overlap` (Gur-Ari et al. 2018) on each probe.

    Args:
        log_dir: directory of the TensorBoard run (summaries go to `<log_dir>/train`).
        data: the probe: a batch `(x, y)` / `(x, y, sample_weight)`, a list
            of batches or a finite `tf.data.Dataset`, with targets and finite values.
        every_n_steps: probe every this many training steps. Defaults to `100`.
        top_k: number of largest eigenvalues. Defaults to `1`.
        trace: also estimate the trace. Defaults to `False`.
        trace_samples: Hutchinson probes for the trace. Defaults to `50`.
        density: also estimate the spectral density. Defaults to `False`.
        smallest: also compute the smallest eigenvalue. Defaults to `False`.
        tol: residual tolerance for the eigenpairs, in (0, 1), relative
            to each eigenvalue itself (with a floor at float rounding, see
            `gradmon.hessian.spectrum`), after a check that none was
            skipped. Defaults to `1e-3`. A probe that does not reach it
            within `max_hvps` still writes its best estimates and residuals,
            and is warned once per callback, naming the quantities.
        max_hvps: HVP budget of each spectrum (`gradmon.hessian.spectrum`'s
            `max_hvps`), or `None` for its default. Defaults to `None`.
        seed: seed (a non-negative integer, or `None`) for the probes'
            random vectors. Defaults to `0`.
        preconditioned: compute the preconditioned spectrum for adaptive
            optimizers (doubles the HVPs of a probe). Defaults to `True`.
        gradient_overlap: write the share of the probe-data gradient's
            squared norm in the span of the top-`top_k` eigenvectors (one
            extra gradient per probe). Defaults to `True`.
        per_layer: also write the top eigenvalue of each layer's diagonal
            Hessian block and its residual (`gradmon.layer_curvature`;
            layers named as the per-layer gradient tags): `True` for every
            layer, or a list of layer names. Each layer has its own block
            HVP, cheaper than a full one; runs of consecutive layers share
            one compiled HVP (`gradmon.layer_curvature.LAYER_SEGMENTS` per
            model, traced once); a probe runs one Lanczos per layer.
            Defaults to `False`.

    Example:
        >>> probe = (x_val[:512], y_val[:512])
        >>> model.fit(x, y, callbacks=[gradmon.HessianMonitor("runs/exp1", data=probe, top_k=3)])
    """

    def __init__(self, log_dir, data, every_n_steps=100, top_k=1, trace=False, trace_samples=50,
                 density=False, smallest=False, tol=1e-3, seed=0, preconditioned=True,
                 gradient_overlap=True, per_layer=False, max_hvps=None):
        super().__init__()
        self.log_dir = check_log_dir(log_dir)
        if data is None:
            raise invalid("data", "a batch, a list of batches or a tf.data.Dataset", data)
        self.data = data
        self._probe_data = hessian.prepare_data(data)  # bad data fails here, not at step 100
        self.every_n_steps = check_positive_int("every_n_steps", every_n_steps)
        self.top_k = check_positive_int("top_k", top_k)
        self.trace = check_bool("trace", trace)
        self.trace_samples = check_positive_int("trace_samples", trace_samples)
        self.density = check_bool("density", density)
        self.smallest = check_bool("smallest", smallest)
        self.tol = hessian.check_tol(tol)
        self.max_hvps = None if max_hvps is None else check_positive_int("max_hvps", max_hvps)
        self.seed = hessian.check_seed(seed)
        self.preconditioned = check_bool("preconditioned", preconditioned)
        self.gradient_overlap = check_bool("gradient_overlap", gradient_overlap)
        self.per_layer = layer_curvature.check_per_layer(per_layer)
        self.last_layer_spectra = {}  # per-layer warm starts
        self._layer_operators = None
        self.last_preconditioned = None  # its own warm start: other coordinates
        self._writer = SummaryWriter.shared(self.log_dir, "train")
        self.last_spectrum = None
        self._operator = None
        self._next_probe = self.every_n_steps
        self._last_step, self._calls, self._steps_per_call = 0, 0, None
        self._active = True

    def on_train_begin(self, logs=None):
        # under multi-worker training only the chief probes and writes
        self._active = _backend.current().is_chief(self.model)
        if not self._active:
            return
        operator = self._build_operator()  # no compiled loss or too many eigenvalues: fail now
        if self.last_spectrum is not None and self.last_spectrum.eigenvectors.shape[1] != operator.num_params:
            self.last_spectrum = self.last_preconditioned = None
        if self.per_layer:
            self._build_layer_operators()  # a bad layer name fails now
        self._writer.open()
        self._read_step(training_step(self.model))
        spe = getattr(self.model, "steps_per_execution", 1)
        self._steps_per_call = spe if isinstance(spe, int) and spe >= 1 else None

    def _build_operator(self):
        """The fit's one HVP operator (checks the model against the arguments)."""
        operator = hessian.make_hvp(self.model, self._probe_data)
        if self.top_k + int(self.smallest) > operator.num_params:
            raise invalid("top_k", f"at most the number of parameters ({operator.num_params})"
                          + (" minus one (smallest=True)" if self.smallest else ""), self.top_k)
        self._operator = operator
        return operator

    def _read_step(self, step):
        self._last_step, self._calls = step, 0
        self._next_probe = (step // self.every_n_steps + 1) * self.every_n_steps

    def _may_be_due(self):
        # Reading the device step counter costs ~0.1 ms, 10 % of a small
        # model's step: read it only once the steps since the last reading
        # could have reached the next probe. A call runs at most
        # `steps_per_execution` steps (more only if a train step updates
        # twice: then a probe comes late, never early).
        if self._steps_per_call is None:
            return True
        return self._last_step + self._calls * self._steps_per_call >= self._next_probe

    def on_train_batch_end(self, batch, logs=None):
        if not self._active:
            return
        self._calls += 1
        if not self._may_be_due():
            return
        step = training_step(self.model)
        if step >= self._next_probe:
            self.probe(step)
            self._read_step(step)
        else:  # fewer steps than calls allowed (e.g. accumulated gradients)
            self._last_step, self._calls = step, 0

    def on_train_end(self, logs=None):
        if self._active:
            self._writer.close()
        self._operator = None  # holds the probe tensors; the next fit builds its own
        self._layer_operators = None

    def probe(self, step):
        """Runs the estimates now and writes them at `step`.

        Args:
            step: the summary step to write at.

        Returns:
            The dict of scalars written, by tag (empty when the probe was skipped).
        """
        # A probe must never end a run that would otherwise finish: non-finite weights
        # (a NaN step Keras applied) have no Hessian, and make the eigensolvers fail.
        if not all(np.all(np.isfinite(host_value(v)))
                   for v in self.model.trainable_variables):
            self._skip(step, "the model's weights are not finite (NaN/inf): no Hessian is defined")
            return {}
        try:
            return self._probe(step)
        except np.linalg.LinAlgError as error:  # e.g. NaN curvature from a NaN in the probe's loss
            self._skip(step, f"the eigensolver failed ({error})")
            return {}
        except Exception as error:  # e.g. a framework op with no second derivative
            self._skip(step, f"its Hessian-vector product raised {type(error).__name__} "
                             f"({str(error).splitlines()[0] if str(error) else 'no message'})")
            return {}

    def _skip(self, step, reason):
        warn_once(("hessian-probe-skipped", id(self), reason.split(" (")[0]),
                  f"gradmon: HessianMonitor skipped its probe at step {step}: {reason}. Training goes "
                  "on; later probes run as soon as they can (this is warned once).")

    def _probe(self, step):
        operator = self._operator or self._build_operator()
        first = operator.count
        spec = self._spectrum(tags.EIGENVALUE_PREFIX + "<i>", operator, top_k=self.top_k, smallest=self.smallest,
                              init_vectors=self.last_spectrum)
        self.last_spectrum = spec
        scalars = {}
        for i, (value, res) in enumerate(zip(spec.eigenvalues, spec.residuals), start=1):
            scalars[tags.eigenvalue(i)] = value
            scalars[tags.residual(i)] = res
        if self.smallest:
            scalars[tags.HESSIAN_MIN_EIGENVALUE] = spec.min_eigenvalue
        scalars.update(self._stability(operator, spec))
        if self.trace:
            estimate = hessian.trace(operator, num_samples=self.trace_samples, seed=self.seed)
            scalars[tags.HESSIAN_TRACE] = estimate.value
            scalars[tags.HESSIAN_TRACE_STDERR] = estimate.stderr
        if self.density:
            dens = hessian.density(operator, seed=self.seed)
            self._writer.write_histograms(step, {tags.HESSIAN_DENSITY: density_buckets(dens)})
        layer_hvps = self._probe_layers(scalars) if self.per_layer else 0
        scalars[tags.HESSIAN_HVP_COUNT] = operator.count - first + layer_hvps
        self._write_layout(scalars)
        self._writer.write_scalars(step, scalars)
        return scalars

    def _write_layout(self, scalars):
        """The "Curvature" charts of the tags written so far (`charts.curvature_layout`), again
        when a probe writes a tag the earlier ones did not; each layer's tags into its run."""
        from gradmon.publish import charts

        written = getattr(self, "_laid_out", {})
        if set(scalars) <= set(written):
            return
        written = {**written, **scalars}
        self._laid_out = written
        self._writer.assign_runs(charts.layer_runs(written))
        self._writer.write_layout(charts.curvature_layout(written))

    def _spectrum(self, quantity, operator, **kwargs):
        """`hessian.spectrum` at the callback's tolerance and budget; not converged: warned once."""
        with warnings.catch_warnings():  # one warning of the callback's own, below
            warnings.simplefilter("ignore", UserWarning)
            spec = hessian.spectrum(operator, tol=self.tol, max_hvps=self.max_hvps, seed=self.seed, **kwargs)
        if not spec.converged:
            self._not_converged(quantity, spec)
        return spec

    def _not_converged(self, quantity, spec):
        warn_once(("hessian-not-converged", id(self)),
                  f"gradmon: HessianMonitor's {quantity} did not converge to tol={self.tol} (relative to "
                  f"each eigenvalue) or its check for skipped eigenvalues did not finish within "
                  f"{spec.hvp_count} HVPs (residuals {np.array2string(spec.residuals, precision=3)}); its best "
                  "estimates are written with their residuals (the matching residual tags). Pass a larger "
                  "`max_hvps` or `tol` to HessianMonitor. This is warned once per callback.")

    def _stability(self, operator, spec):
        """The preconditioned spectrum, the edges of stability and the gradient overlap, by tag."""
        optimizer = self.model.optimizer
        lr = current_learning_rate(optimizer)
        scalars = {tags.GD_EDGE_OF_STABILITY: spec.eigenvalues[0] * lr / 2}
        sharpness = {False: spec.eigenvalues[0]}
        preconditioned = self._preconditioned(operator, optimizer)
        if preconditioned is not None:
            pre = self._spectrum(tags.PRECONDITIONED_EIGENVALUE_PREFIX + "<i>", preconditioned, top_k=self.top_k,
                                 init_vectors=self.last_preconditioned)
            self.last_preconditioned = pre
            for i, (value, res) in enumerate(zip(pre.eigenvalues, pre.residuals), start=1):
                scalars[tags.preconditioned_eigenvalue(i)] = value
                scalars[tags.preconditioned_residual(i)] = res
            sharpness[True] = pre.eigenvalues[0]
        threshold = preconditioner.stability_threshold(optimizer, lr)
        if threshold is not None:
            scalars[tags.STABILITY_THRESHOLD] = threshold.value
            if threshold.preconditioned in sharpness:
                scalars[tags.EDGE_OF_STABILITY] = sharpness[threshold.preconditioned] / threshold.value
        if self.gradient_overlap:
            overlap = hessian.gradient_overlap(spec, operator)
            if np.isfinite(overlap):  # undefined for a zero gradient
                scalars[tags.GRADIENT_OVERLAP] = overlap
        return scalars

    def _preconditioned(self, operator, optimizer):
        """`P^-1/2 H P^-1/2` of the optimizer's last update, or `None` (not adaptive, no update yet,
        `preconditioned=False`, or a `P` that `hessian.precondition` refuses: warned once)."""
        diagonal = preconditioner.diagonal(optimizer, operator.variables) if self.preconditioned else None
        if diagonal is None:
            return None
        try:
            return hessian.precondition(operator, diagonal)
        except ValueError:  # entries not positive and finite: epsilon=0 and no gradient, a NaN slot
            warn_once(("preconditioner-not-positive", id(self)),
                      "gradmon: HessianMonitor skipped the preconditioned spectrum: the optimizer's "
                      "preconditioner P has entries that are not positive and finite (epsilon=0 and a "
                      "variable without gradient, or a non-finite slot); hessian/edge_of_stability is "
                      "not written while it is so.")
            return None

    def _build_layer_operators(self):
        """One block HVP operator per layer (a few traces per model: cached by `hessian`)."""
        layers = None if self.per_layer is True else self.per_layer
        self._layer_operators = layer_curvature._operators(self.model, self._probe_data, layers, None,
                                                           "per_layer")
        self.last_layer_spectra = {  # a warm start only where the layer kept its shape
            name: spec for name, spec in self.last_layer_spectra.items()
            if name in self._layer_operators
            and spec.eigenvectors.shape[1] == self._layer_operators[name].num_params}
        return self._layer_operators

    def _probe_layers(self, scalars):
        """Adds each layer's top block eigenvalue and residual to `scalars`; returns the HVPs spent."""
        operators = self._layer_operators or self._build_layer_operators()
        with warnings.catch_warnings():  # one warning of the callback's own, below
            warnings.simplefilter("ignore", UserWarning)
            spectra = layer_curvature.layer_spectrum(operators, tol=self.tol, max_hvps=self.max_hvps,
                                                     init_vectors=self.last_layer_spectra, seed=self.seed)
        for name, spec in spectra.items():
            if not spec.converged:
                self._not_converged(tags.layer_eigenvalue(name), spec)
        self.last_layer_spectra = spectra
        for name, spec in spectra.items():
            scalars[tags.layer_eigenvalue(name)] = spec.eigenvalues[0]
            scalars[tags.layer_residual(name)] = spec.residuals[0]
        return sum(spec.hvp_count for spec in spectra.values())
