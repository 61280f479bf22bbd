"""Curvature of the loss: Hessian-vector products, spectra, trace and density.

Pure numerical code: it knows nothing of callbacks or TensorBoard. Every
function builds (or reuses) a compiled Hessian-vector product (HVP) of the
mean training loss and runs a matrix-free algorithm on it:

- `spectrum`: extreme eigenvalues (thick-restart Lanczos with full
  reorthogonalisation, or power iteration with deflation), with honest
  residuals: each value to `tol` relative to itself, and a Lanczos pass on
  the complement of the converged vectors that finds a skipped eigenvalue.
- `trace`: Hutchinson's estimator with Rademacher probes.
- `density`: stochastic Lanczos quadrature (SLQ) spectral density, on the
  same Lanczos routine (`_Lanczos`) as `spectrum`.
- `make_hvp`: the HVP operator itself, reusable by all three.
- `precondition`: `P^-1/2 H P^-1/2` for a positive diagonal `P` (an adaptive
  optimizer's, `gradmon.preconditioner`): its spectrum is the preconditioned
  sharpness that decides an adaptive optimizer's stability.
- `gradient_overlap`: the share of the gradient in the top eigenspace.

The operator is the Hessian, with respect to `model.trainable_variables` (or
a subset of them: a diagonal block, `make_hvp(variables=...)`), of

    L(w) = sum_b n_b * loss_b(w) / sum_b n_b,

where `loss_b` is what `model.compute_loss` returns for batch `b` (the
compiled loss, already reduced over the batch as Keras reduces it, with sample
weights, plus `model.losses`: weight regularisers and `add_loss` terms) after
a `training=False` forward pass, and `n_b` is the batch size (leading
dimension of the first input). For a single batch this is `loss_1`; for
equal-size batches it is the plain mean of the batch losses. Regularisation
terms do not depend on the batch, so they enter `L` exactly once.

Observing the Hessian changes nothing on the model: the loss runs inside a
`keras.StatelessScope` whose variable mapping supplies the trainable values,
so any assignment made while computing it (the per-output loss trackers of a
multi-output `CompileLoss`, for instance) is collected by the scope and thrown
away; `training=False` keeps BatchNormalization statistics and Dropout seed
generators untouched; the optimizer is never called; all randomness comes
from generators seeded by `seed`.

Vectors over the parameters stay where the model is: the Lanczos basis is
a bounded number of device vectors (thick restarts bound it), in the
variables' dtype. Only the small projected matrices and their Ritz algebra
are float64 NumPy (and power iteration, which keeps a few float64 host
vectors). A flat vector concatenates `model.trainable_variables` in order,
each in C order; `HessianVectorProduct.unflatten` turns one back into
per-variable arrays. One operator (`make_hvp`) can serve `spectrum`, `trace`
and `density`: its HVP is compiled once per model and it reads the current
weights at each call.

Every Keras backend with second-order autodiff runs it: TensorFlow (tapes in
a `tf.function`, probes drawn by stateless ops on the device), JAX (`jax.jvp`
/ `jax.grad` over the stateless loss under `jax.jit`) and PyTorch (double
backward or `torch.func`, eager); what differs is in
`gradmon.backend.hvp`, and `import gradmon.hessian` imports no TensorFlow on
JAX or PyTorch. The same model and weights give the same eigenvalues on all
three to float32 precision, and `HessianMonitor` writes the same numbers in
the same `fit` (`tests/test_hessian_backends.py`).

Modules: `data` (probe data), `operator` (`make_hvp`, `precondition`),
`vectors` (device vector algebra of the Lanczos basis), `lanczos` and `power`
(the eigensolvers), `estimators` (`spectrum`, `trace`, `density`,
`gradient_overlap`), `preconditioner` (an optimizer's `P`), `per_layer`
(per-layer curvature) and `monitor` (`HessianMonitor`, which schedules probes
during `fit` and writes them; also `gradmon.HessianMonitor`). The Hessian side
knows nothing of callbacks or of the gradient side: it is given a model and
data.
"""

from gradmon.hessian.data import ProbeData, prepare_data  # noqa: F401
from gradmon.hessian.estimators import (  # noqa: F401
    SPECTRUM_METHODS,
    Density,
    Spectrum,
    TraceEstimate,
    check_seed,
    check_tol,
    density,
    gradient_overlap,
    spectrum,
    trace,
)
from gradmon.hessian.operator import (  # noqa: F401
    DEFAULT_HVP_MODE,
    HVP_MODES,
    HessianVectorProduct,
    PreconditionedOperator,
    make_hvp,
    precondition,
)
