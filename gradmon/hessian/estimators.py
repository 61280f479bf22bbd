"""What the Hessian side estimates: spectrum, trace, density, gradient overlap.

Each estimator takes a compiled model and data (or an operator from
`make_hvp`, to share it) and returns a small named tuple: `spectrum` ->
`Spectrum` (Lanczos or power iteration, checked for skipped eigenvalues),
`trace` -> `TraceEstimate` (Hutchinson), `density` -> `Density` (stochastic
Lanczos quadrature), `gradient_overlap` -> a float.
"""

import math
import numbers
import typing
import warnings

import numpy as np

from gradmon._validation import (
    check_bool,
    check_non_negative_int,
    check_positive,
    check_positive_int,
    invalid,
)
from gradmon.hessian.lanczos import _Lanczos, _lanczos_spectrum
from gradmon.hessian.operator import HessianVectorProduct, _operator
from gradmon.hessian.power import _power_spectrum
from gradmon.hessian.vectors import _dot64, _random_vector


SPECTRUM_METHODS = ("lanczos", "power")


class Spectrum(typing.NamedTuple):
    """Extreme eigenpairs of the Hessian.

    Attributes:
        eigenvalues: float64 array `[k]`, the `top_k` largest algebraic
            eigenvalues, descending. `eigenvalues[0]` is the sharpness.
        eigenvectors: float64 array `[k, num_params]`, unit-norm eigenvectors
            (rows), flattened as described in the module docstring. Pass it
            (or the whole `Spectrum`) back as `init_vectors` for a warm start.
        residuals: float64 array `[k]`, the absolute residual norms
            `||H v - lambda v||_2` of the returned unit vectors, from
            explicit HVPs (Lanczos: one HVP of each returned vector, not the
            recurrence estimate; power: the HVPs of the iterates, combined
            linearly by the final Rayleigh-Ritz step). Each value is within
            its residual of an eigenvalue of `H`.
        hvp_count: number of HVPs used, verification HVPs included (the
            complement check's too).
        converged: whether every returned pair met the tolerance (see
            `spectrum`: relative to the eigenvalue itself) and the check for
            skipped eigenvalues completed; when False, `spectrum` warned.
        min_eigenvalue: smallest algebraic eigenvalue when `smallest=True`,
            else `None`.
        min_eigenvector: its unit eigenvector `[num_params]`, or `None`.
        min_residual: its absolute residual norm, or `None`.
        check_vector: the unit top Ritz vector `[num_params]` of the last
            check for skipped eigenvalues (on the complement of the returned
            vectors: about the next eigenvector), or `None` when no check
            ran. A warm start from this `Spectrum` starts its check from it
            plus an equal share of a random vector.
    """

    eigenvalues: np.ndarray
    eigenvectors: np.ndarray
    residuals: np.ndarray
    hvp_count: int
    converged: bool
    min_eigenvalue: typing.Optional[float] = None
    min_eigenvector: typing.Optional[np.ndarray] = None
    min_residual: typing.Optional[float] = None
    check_vector: typing.Optional[np.ndarray] = None


class TraceEstimate(typing.NamedTuple):
    """Hutchinson estimate of the Hessian trace.

    Attributes:
        value: the sample mean of `z^T H z` over the probes.
        stderr: standard error of `value` (sample standard deviation over
            sqrt(num_samples)); `nan` for a single probe.
        hvp_count: number of HVPs used (one per probe).
    """

    value: float
    stderr: float
    hvp_count: int


class Density(typing.NamedTuple):
    """Gaussian-smoothed spectral density from stochastic Lanczos quadrature.

    Attributes:
        grid: float64 array of evaluation points, increasing.
        values: float64 array, the density at `grid`; its trapezoidal
            integral over `grid` is 1 up to the Gaussian tails cut off at the
            grid ends (negligible for the default grid).
        nodes: float64 array, Ritz values of all probes concatenated.
        weights: float64 array, matching quadrature weights; they sum to 1.
        sigma: the Gaussian kernel's standard deviation.
        hvp_count: number of HVPs used.
    """

    grid: np.ndarray
    values: np.ndarray
    nodes: np.ndarray
    weights: np.ndarray
    sigma: float
    hvp_count: int


def check_tol(tol, argument="tol"):
    """Returns `tol` as a float if it is a finite number in (0, 1)."""
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not (
        0 < tol < 1
    ):
        # tol >= 1 accepts any vector as converged (tol=inf returned a
        # wrong eigenvalue marked converged).
        raise invalid(argument, "a positive finite number below 1", tol)
    return float(tol)


def check_seed(seed):
    """Returns `seed` if it is `None` or a non-negative integer."""
    return None if seed is None else check_non_negative_int("seed", seed)


def _init_matrix(init_vectors, hvp):
    """Normalises `init_vectors` to a float64 array `[m, num_params]`."""
    if init_vectors is None:
        return np.zeros((0, hvp.num_params))
    if isinstance(init_vectors, Spectrum):
        rows = list(init_vectors.eigenvectors)
        if init_vectors.min_eigenvector is not None:
            rows.append(init_vectors.min_eigenvector)
        init_vectors = rows
    if isinstance(init_vectors, (list, tuple)) and init_vectors and (
        isinstance(init_vectors[0], (list, tuple))
    ):
        init_vectors = [hvp.flatten(v) for v in init_vectors]
    matrix = np.atleast_2d(np.asarray(init_vectors, np.float64))
    if matrix.ndim != 2 or matrix.shape[1] != hvp.num_params:
        raise ValueError(
            "Invalid value for argument `init_vectors`. Expected vectors of "
            f"length {hvp.num_params} (flat) or lists of per-variable arrays. "
            f"Received: an array of shape {matrix.shape}"
        )
    norms = np.linalg.norm(matrix, axis=1)
    return matrix[norms > 0] / norms[norms > 0, None]


def spectrum(
    model,
    data=None,
    top_k=1,
    method="lanczos",
    smallest=False,
    tol=1e-4,
    max_hvps=None,
    init_vectors=None,
    seed=None,
    hvp_mode=None,
    max_vectors=None,
    preconditioner=None,
):
    """Computes the largest (and optionally smallest) Hessian eigenvalues.

    Eigenvalues are algebraic: `eigenvalues[0]` is the sharpness (the
    largest eigenvalue), not the eigenvalue of largest magnitude.

    A pair `(lambda, v)`, `||v|| = 1`, is converged when
    `||H v - lambda v|| <= max(tol * |lambda|, floor)`: the residual bounds
    the distance from `lambda` to the spectrum, so a converged value is
    within `tol` of an eigenvalue *relative to itself* (for an isolated
    eigenvalue the error is of order residual**2 / gap, far smaller).
    `floor = min(tol, 100 eps) * ||H||` (`eps` the machine epsilon of the
    operator's dtype, 1.2e-7 for float32; `||H||` the largest magnitude
    among the Ritz values seen) is the rounding level of the HVPs: an
    eigenvalue smaller than `floor / tol` (about `1.2e-5 ||H|| / tol` in
    float32) is accurate to `floor`, absolutely. The second and later
    eigenvalues, often 50-500x smaller than the first, are held to their
    own size, not to `||H||`.

    That the i-th value is the i-th eigenvalue (none was skipped) is then
    checked: the converged pairs are locked and Lanczos runs from a random
    vector orthogonal to them, on `P H P` (`P` projecting them out), until
    its largest Ritz value is resolved (to a tenth of its distance from
    the smallest reported eigenvalue plus that one's threshold, or to the
    tolerance above when it is not below). A value above that bound is an
    eigenvalue the first run skipped (a Ritz value never exceeds the
    largest eigenvalue): it is locked in turn, the `top_k` largest locked
    pairs are kept, and another pass runs until one finds nothing (the same
    for the smallest eigenvalue with `smallest=True`, from below). A random
    start has a component along every eigenvector, so a skipped eigenvalue
    rises first in that run; as with any Krylov method this is a
    check with high probability, not a proof. It costs a few HVPs (often
    as many as the first run), counted in `hvp_count` and `max_hvps`.

    `method="lanczos"` runs Lanczos with full reorthogonalisation (every new
    vector is orthogonalised, twice, against all stored ones) and thick
    restarts (Wu and Simon 2000): the vectors stay on the model's device in
    its dtype, at most `max_vectors` of them, and when they are all used the
    wanted Ritz vectors and about half the others are kept. Only the small
    projected matrix and its Ritz algebra are float64 NumPy. When the
    recurrence estimates say the wanted pairs have converged, their
    Rayleigh quotients and residuals are computed on the device from the
    stored vectors and the products `H q` they came from (exact linear
    combinations of the HVPs, to rounding), so the check costs no HVP.
    `method="power"` runs power iteration with projection deflation (each
    deflated run stops at `tol / 2` on the residual outside the deflated
    space, then one Rayleigh-Ritz step on the found vectors, using their
    HVPs, removes the coupling between them); if a negative eigenvalue
    dominates it shifts the operator so that the largest algebraic
    eigenvalues are found, and `smallest=True` runs power iteration on
    `H - lambda_max I`. Its vectors are float64 NumPy on the host.

    Args:
        model: a built, compiled Keras model (see `make_hvp`), or a
            `HessianVectorProduct` to reuse (then `data` must be `None`).
        data: a batch, list of batches, finite `tf.data.Dataset` or
            `ProbeData` (see `make_hvp`); the Hessian is that of the mean
            loss over it. Defaults to `None` (only with an operator).
        top_k: number of largest eigenvalues. Defaults to `1`.
        method: `"lanczos"` or `"power"`. Defaults to `"lanczos"`.
        smallest: also compute the smallest algebraic eigenvalue. Defaults
            to `False`.
        tol: residual tolerance relative to each eigenvalue (see above),
            in (0, 1). Defaults to `1e-4`. Float32 HVPs put a floor near
            `1e-6 ||H||` on residuals: below about `1e-5 ||H||`, values are
            accurate to `1.2e-5 ||H||` absolutely.
        max_hvps: HVP budget. Defaults to `None`:
            `200 + 20 * (top_k + smallest)` for Lanczos, `1000 * (top_k + 1)`
            for power iteration (shared among the eigenvalues).
        init_vectors: warm start: a previous `Spectrum`, or its
            `eigenvectors` (`[m, num_params]` or `[num_params]`), or a list of
            per-variable array lists. Lanczos starts from their normalised
            sum (for `m >= 1` its Krylov space holds all of them after `m`
            steps); power iteration starts eigenvector `i` from row `i`.
            Defaults to `None`: a random start.
        seed: seed of the NumPy generator used for random starts. Defaults
            to `None`.
        hvp_mode: see `make_hvp`. Defaults to `None`.
        max_vectors: Lanczos basis size (memory: this many vectors of
            `num_params` entries in the model's dtype). Defaults to `None`:
            `max(14, 2 * (top_k + smallest) + 8)`, at most
            `num_params + 1`.
        preconditioner: a positive diagonal `P` (flat, or per-variable
            arrays) or a Keras optimizer whose last update's `P` is read
            (see `precondition`): the spectrum is then that of the symmetric
            `P^-1/2 H P^-1/2` (the eigenvalues of `P^-1 H`, the
            preconditioned sharpness first), with residuals and eigenvectors
            of that operator, and `tol` relative to its norm. Warm-start it
            from a preconditioned `Spectrum` only. Defaults to `None`: `H`.

    Returns:
        A `Spectrum`. If the budget ran out first (the check for skipped
        eigenvalues included), `converged` is False and a warning is
        issued; the best pairs found are returned anyway.

    References:
        C. Lanczos, "An iteration method for the solution of the eigenvalue
        problem of linear differential and integral operators", J. Res.
        Nat. Bur. Standards 45 (1950).
        K. Wu and H. Simon, "Thick-restart Lanczos method for large
        symmetric eigenvalue problems", SIAM J. Matrix Anal. Appl. 22(2),
        2000.
        G. H. Golub and C. F. Van Loan, "Matrix Computations", 4th ed.,
        ch. 10 (Lanczos with full reorthogonalisation) and 8.2 (power
        method), 2013.
        Z. Yao, A. Gholami, K. Keutzer, M. Mahoney, "PyHessian: Neural
        Networks Through the Lens of the Hessian", IEEE BigData 2020.
        J. Cohen et al., "Adaptive Gradient Methods at the Edge of
        Stability", arXiv:2207.14484, 2022 (preconditioned sharpness).

    Example:

    ```python
    spec = spectrum(model, (x, y), top_k=3, smallest=True, seed=0)
    sharpness = spec.eigenvalues[0]
    later = spectrum(model, (x, y), top_k=3, init_vectors=spec)
    ```
    """
    _check_spectrum_args(method, top_k, smallest, tol, max_hvps, max_vectors)
    seed = check_seed(seed)
    hvp = _operator(model, data, hvp_mode, preconditioner)
    first = hvp.count
    if top_k > hvp.num_params:
        raise ValueError(
            "Invalid value for argument `top_k`. Expected at most the number "
            f"of trainable parameters ({hvp.num_params}). Received: top_k={top_k}"
        )
    rng = np.random.default_rng(seed)
    # The check for skipped eigenvalues draws from a stream of its own: with
    # one seed, a cold and a warm start check from the same vector.
    check_rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(1)[0])
    init, hint = _warm_start(init_vectors, hvp)
    if method == "lanczos":
        found = _lanczos_spectrum(hvp, top_k, smallest, tol, max_hvps,
                                  max_vectors, init, rng, check_rng, hint)
    else:
        budget = max_hvps or 1000 * (top_k + 1)
        found = _power_spectrum(hvp, top_k, smallest, tol, budget, init, rng,
                                check_rng, hint)
    if not found[4]:
        warnings.warn(
            f"Hessian spectrum ({method}) did not reach tol={tol} (relative "
            "to each eigenvalue), or could not finish checking that no "
            f"eigenvalue was skipped, within its HVP budget ({hvp.count - first}"
            " HVPs); returning the best estimates, marked converged=False. "
            "Pass a larger `max_hvps` or `tol`.",
            stacklevel=2,
        )
    return _as_spectrum(*found, hvp_count=hvp.count - first)


def _warm_start(init_vectors, hvp):
    """`(init matrix, check hint or None)` of `spectrum`'s `init_vectors`."""
    init = _init_matrix(init_vectors, hvp)
    hint = getattr(init_vectors, "check_vector", None) if isinstance(
        init_vectors, Spectrum) else None
    if hint is not None and np.shape(hint) != (hvp.num_params,):
        hint = None
    return init, hint


def _as_spectrum(eigenvalues, eigenvectors, residuals, minimum, converged,
                 checked, hvp_count):
    """The `Spectrum` of a solver's `(values, vectors, residuals, minimum,
    converged, check_vector)`."""
    return Spectrum(
        eigenvalues=np.asarray(eigenvalues, np.float64),
        eigenvectors=np.asarray(eigenvectors, np.float64),
        residuals=np.asarray(residuals, np.float64),
        hvp_count=hvp_count,
        converged=bool(converged),
        min_eigenvalue=None if minimum is None else float(minimum[0]),
        min_eigenvector=None if minimum is None else minimum[1],
        min_residual=None if minimum is None else float(minimum[2]),
        check_vector=checked,
    )


def _check_spectrum_args(method, top_k, smallest, tol, max_hvps, max_vectors):
    if method not in SPECTRUM_METHODS:
        raise ValueError(
            "Invalid value for argument `method`. Expected one of "
            f"{SPECTRUM_METHODS}. Received: method={method!r}"
        )
    check_positive_int("top_k", top_k)
    check_bool("smallest", smallest)
    check_tol(tol)
    if max_hvps is not None:
        check_positive_int("max_hvps", max_hvps)
    if max_vectors is not None and (
        check_positive_int("max_vectors", max_vectors)
        < top_k + int(smallest) + 3
    ):
        raise invalid(
            "max_vectors", "at least top_k + smallest + 3 (the wanted pairs "
            "and room to grow between restarts)", max_vectors,
        )


def gradient_overlap(eigenvectors, gradient):
    """The share of `|g|^2` in the span of the top Hessian eigenvectors.

    `sum_i (v_i . g)^2 / |g|^2` for orthonormal `v_i` (the vectors are
    orthonormalised first, so any basis of the span gives the same number):
    1 when the gradient lies in the top eigenspace, `k / n` on average for a
    random direction. Gur-Ari et al. found it close to 1 for the top-k
    eigenvectors (k = number of classes) after a short initial phase.

    Args:
        eigenvectors: a `Spectrum` of `H` (not a preconditioned one), or its
            `eigenvectors` (`[k, num_params]`, or `[num_params]`).
        gradient: the gradient as a flat vector, or the `HessianVectorProduct`
            the spectrum came from (its probe-data gradient, one backward
            pass).

    Returns:
        A float in [0, 1]; `nan` for a zero gradient.

    References:
        G. Gur-Ari, D. A. Roberts, E. Dyer, "Gradient Descent Happens in a
        Tiny Subspace", arXiv:1812.04754, 2018.
    """
    if isinstance(eigenvectors, Spectrum):
        eigenvectors = eigenvectors.eigenvectors
    if isinstance(gradient, HessianVectorProduct):
        gradient = gradient.gradient()[1]
    vectors = np.atleast_2d(np.asarray(eigenvectors, np.float64))
    g = np.asarray(gradient, np.float64).reshape(-1)
    if vectors.ndim != 2 or vectors.shape[1] != g.size:
        raise invalid("eigenvectors", f"vectors of length {g.size} (the gradient's)",
                      f"an array of shape {vectors.shape}")
    squared = float(g @ g)
    if squared == 0.0:
        return float("nan")
    basis, _ = np.linalg.qr(vectors.T)  # orthonormal columns spanning the vectors
    return float(np.sum(np.square(basis.T @ g)) / squared)


def trace(model, data=None, num_samples=100, seed=None, hvp_mode=None):
    """Estimates the Hessian trace with Hutchinson's estimator.

    `tr(H) = E[z^T H z]` for Rademacher `z` (entries +-1 with probability
    1/2), which has the smallest variance among i.i.d. probe distributions.
    The probes are drawn on the model's device (stateless ops seeded from a
    NumPy generator) and never pass through the host.

    Args:
        model: a built, compiled Keras model (see `make_hvp`), or a
            `HessianVectorProduct` to reuse (then `data` must be `None`).
        data: a batch, list of batches, finite dataset or `ProbeData` (see
            `make_hvp`). Defaults to `None` (only with an operator).
        num_samples: number of probes (= HVPs). Defaults to `100`.
        seed: seed of the NumPy generator drawing the probes. Defaults to
            `None`.
        hvp_mode: see `make_hvp`. Defaults to `None`.

    Returns:
        A `TraceEstimate(value, stderr, hvp_count)`.

    References:
        M. F. Hutchinson, "A stochastic estimator of the trace of the
        influence matrix for Laplacian smoothing splines", Communications in
        Statistics - Simulation and Computation 18(3), 1989.
    """
    check_positive_int("num_samples", num_samples)
    rng = np.random.default_rng(check_seed(seed))
    hvp = _operator(model, data, hvp_mode)
    samples = np.empty(num_samples)
    for i in range(num_samples):
        z = _random_vector(rng, hvp.num_params, hvp.dtype, rademacher=True)
        samples[i] = float(_dot64(z, hvp.apply(z)))
    stderr = (
        float(samples.std(ddof=1) / math.sqrt(num_samples))
        if num_samples > 1 else float("nan")
    )
    return TraceEstimate(float(samples.mean()), stderr, num_samples)


def _slq_probe(hvp, q, steps):
    """Gauss quadrature nodes and weights of one SLQ probe.

    Plain Lanczos from unit `q` (the same `_Lanczos` as `spectrum`, with
    room for all `steps` vectors and no restart, which would change the
    quadrature). Stops early on an invariant Krylov space, where the
    quadrature is exact. Returns `(nodes, weights)`.
    """
    lanczos = _Lanczos(hvp, steps + 1, q)
    for _ in range(steps):
        if lanczos.step(1e-6):
            break
    m = lanczos.m
    block = lanczos.coeffs[:m, :m]
    theta, s = np.linalg.eigh(0.5 * (block + block.T))
    return theta, s[0] ** 2


def _check_grid(grid):
    """`grid` as an int (>= 2 points) or a finite increasing float64 array."""
    expected = ("an integer >= 2 or an increasing array of at least 2 finite "
                "points")
    if np.ndim(grid) == 0:
        if check_positive_int("grid", grid) < 2:
            raise invalid("grid", expected, grid)
        return int(grid)
    try:
        points = np.asarray(grid, np.float64)
    except (TypeError, ValueError):
        raise invalid("grid", expected, grid) from None
    if points.ndim != 1 or points.size < 2 or not np.all(
            np.isfinite(points)) or not np.all(np.diff(points) > 0):
        raise invalid("grid", expected, grid)
    return points


def density(
    model,
    data=None,
    num_probes=4,
    num_steps=40,
    seed=None,
    grid=1000,
    sigma=None,
    hvp_mode=None,
):
    """Estimates the Hessian's spectral density by stochastic Lanczos quadrature.

    Each probe `q` (Rademacher, normalised) gives an `m`-node Gauss
    quadrature of the measure `sum_i (q.u_i)^2 delta(t - lambda_i)` from
    `m` Lanczos steps: nodes are the Ritz values, weights the squared first
    components of the Ritz vectors. Averaging over probes estimates the
    normalised eigenvalue density `(1/n) sum_i delta(t - lambda_i)`, which
    is then smoothed with a Gaussian kernel of width `sigma`. The Lanczos
    vectors (`num_steps + 1` of them) stay on the model's device.

    Args:
        model: a built, compiled Keras model (see `make_hvp`), or a
            `HessianVectorProduct` to reuse (then `data` must be `None`).
        data: a batch, list of batches, finite dataset or `ProbeData` (see
            `make_hvp`). Defaults to `None` (only with an operator).
        num_probes: number of random probes. Defaults to `4`.
        num_steps: Lanczos steps per probe (capped at the number of
            parameters). Defaults to `40`.
        seed: seed of the NumPy generator drawing the probes. Defaults to
            `None`.
        grid: number of evenly spaced grid points (>= 2), or an increasing
            array of at least 2 finite points. A generated grid spans the
            extreme nodes extended by `5 * sigma + 0.01 * width` on each
            side, so it covers the true `[lambda_min, lambda_max]` (extreme
            Ritz values converge first) and the kernel tails. Defaults to
            `1000`.
        sigma: Gaussian kernel standard deviation, a positive finite
            number. Defaults to `None`: 1% of the node range
            (`max(nodes) - min(nodes)`).
        hvp_mode: see `make_hvp`. Defaults to `None`.

    Returns:
        A `Density(grid, values, nodes, weights, sigma, hvp_count)`.

    References:
        B. Ghorbani, S. Krishnan, Y. Xiao, "An Investigation into Neural Net
        Optimization via Hessian Eigenvalue Density", ICML 2019.
        L. Lin, Y. Saad, C. Yang, "Approximating spectral densities of large
        matrices", SIAM Review 58(1), 2016.
        Z. Yao et al., "PyHessian", IEEE BigData 2020.
    """
    check_positive_int("num_probes", num_probes)
    check_positive_int("num_steps", num_steps)
    if sigma is not None:
        sigma = check_positive("sigma", sigma)
    grid = _check_grid(grid)
    rng = np.random.default_rng(check_seed(seed))
    hvp = _operator(model, data, hvp_mode)
    first, n = hvp.count, hvp.num_params
    nodes, weights = [], []
    for _ in range(num_probes):
        z = _random_vector(rng, n, hvp.dtype, rademacher=True)
        theta, tau = _slq_probe(hvp, z, min(num_steps, n))
        nodes.append(theta)
        weights.append(tau / num_probes)
    nodes = np.concatenate(nodes)
    weights = np.concatenate(weights)
    return _smoothed(nodes, weights, grid, sigma, hvp.count - first)


def _smoothed(nodes, weights, grid, sigma, hvp_count):
    """The `Density` of quadrature `nodes`/`weights` on `grid`."""
    lo, hi = float(nodes.min()), float(nodes.max())
    width = hi - lo
    if sigma is None:
        sigma = 0.01 * width if width > 0 else 0.01 * max(abs(hi), 1e-12)
    if np.ndim(grid) == 0:
        pad = 5.0 * sigma + 0.01 * width
        points = np.linspace(lo - pad, hi + pad, int(grid))
    else:
        points = grid
    kernel = np.exp(-0.5 * ((points[:, None] - nodes[None, :]) / sigma) ** 2)
    values = kernel @ weights / (sigma * math.sqrt(2.0 * math.pi))
    return Density(points, values, nodes, weights, float(sigma), hvp_count)
