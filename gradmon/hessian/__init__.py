"""Curvature of the loss: Hessian-vector products, spectra, trace and density.

The Hessian side knows nothing of callbacks or of the gradient side: it is given a
model and data. `gradmon.hessian.monitor.HessianMonitor` (also `gradmon.HessianMonitor`)
schedules probes during `fit` and writes them.
"""

from gradmon.hessian.core import (  # noqa: F401
    DEFAULT_HVP_MODE,
    HVP_MODES,
    SPECTRUM_METHODS,
    Density,
    HessianVectorProduct,
    PreconditionedOperator,
    ProbeData,
    Spectrum,
    TraceEstimate,
    check_seed,
    check_tol,
    density,
    gradient_overlap,
    make_hvp,
    precondition,
    prepare_data,
    spectrum,
    trace,
)
