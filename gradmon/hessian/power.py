"""Power iteration with deflation and a shift, on float64 host vectors.

`spectrum(method="power")`: each eigenvector by shifted, deflated power
iteration, one Rayleigh-Ritz step on all of them, then the same check for
skipped eigenvalues as Lanczos' (`gradmon.hessian.lanczos._checked`).
"""

import numpy as np

from gradmon.hessian.lanczos import _checked, _thresholds


def _orthogonalise(w, basis):
    """Classical Gram-Schmidt against `basis`, repeated once if needed.

    A second pass runs when the first removed most of `w` (its norm fell
    below 1/sqrt(2) of what it was): "twice is enough" (Parlett, The
    Symmetric Eigenvalue Problem, 1980, sec. 6.9) keeps `w` orthogonal to
    working precision at about the cost of one pass.
    """
    if not basis.shape[0]:
        return w
    before = np.linalg.norm(w)
    w = w - basis.T @ (basis @ w)
    if np.linalg.norm(w) < 0.7071 * before:
        w = w - basis.T @ (basis @ w)
    return w


def _power(hvp, shift, deflate, start, tol, norm_floor, max_hvps):
    """Power iteration on `P (H - shift I) P`, `P` projecting out `deflate`.

    Stops when the residual `||P H v - (v.Hv) v||` of the current unit
    vector (`v = P v`) falls below its threshold (`_thresholds`, with
    `max(norm_floor, |v.Hv|)` as the estimate of `||H||`). The part
    of `H v` inside the deflated space is left to the final Rayleigh-Ritz
    step of `_power_spectrum`.
    Returns `(eigenvalue, vector, H vector, hvps used, converged)`.
    """
    dtype = hvp.dtype
    v = _orthogonalise(start, deflate)
    v /= np.linalg.norm(v)
    value, hv = 0.0, None
    for used in range(1, max_hvps + 1):
        hv = hvp(v)
        value = float(v @ hv)
        projected = _orthogonalise(hv, deflate)
        residual = float(np.linalg.norm(projected - value * v))
        if residual <= _thresholds(value, max(norm_floor, abs(value)),
                                   dtype, tol):
            return value, v, hv, used, True
        w = projected - shift * v
        norm = np.linalg.norm(w)
        if norm == 0.0:  # v is in the null space of the shifted operator
            break
        v = w / norm
    return value, v, hv, used, False


def _rayleigh_ritz(vectors, products):
    """Best eigenpairs in span(vectors) given the exact products `H v`."""
    projected = vectors @ products.T
    theta, c = np.linalg.eigh(0.5 * (projected + projected.T))
    vectors, products = c.T @ vectors, c.T @ products
    residuals = np.linalg.norm(products - theta[:, None] * vectors, axis=1)
    return theta, vectors, residuals


def _power_spectrum(hvp, top_k, smallest, tol, max_hvps, init, rng,
                    check_rng=None, hint=None):
    """Top-k (and smallest) eigenpairs by deflated, shifted power iteration.

    Returns `(values, vectors, residuals, minimum, converged,
    check_vector)` (see `_checked`, which checks them for skipped ones);
    values are descending, `minimum` is `(value, vector, residual)` or
    `None`.
    """
    n = hvp.num_params
    values, vectors, residuals, low, converged, remaining, norm_floor = _power_top(
        hvp, top_k, smallest, tol, max_hvps, init, rng)
    minimum = None
    if smallest:
        if low is None:
            # H - lambda_max I is negative semi-definite: its dominant
            # eigenvalue is lambda_min - lambda_max.
            start = init[top_k] if len(init) > top_k else rng.standard_normal(n)
            _, v, hv, used, ok = _power(
                hvp, values[0], np.zeros((0, n)), start, tol, norm_floor,
                max(1, remaining),
            )
            remaining -= used
            low = (v, hv, ok)
        v, hv, ok = low
        value = float(v @ hv)
        minimum = (value, v, float(np.linalg.norm(hv - value * v)))
        converged &= ok
    norm_est = max(norm_floor, np.abs(values).max(),
                   abs(minimum[0]) if minimum else 0.0)
    converged &= bool(np.all(residuals <= _thresholds(
        values, norm_est, hvp.dtype, tol)))
    # The same check for skipped eigenvalues as Lanczos', on the device.
    pairs = [(value, hvp.to_tensor(vector), residual) for value, vector,
             residual in zip(values, vectors, residuals)]
    if minimum is not None:
        pairs.append((minimum[0], hvp.to_tensor(minimum[1]), minimum[2]))
    wanted = top_k + int(smallest)
    return _checked(hvp, pairs, top_k, smallest, tol, converged,
                    max(0, remaining), min(n + 1, max(14, 2 * wanted + 8)),
                    check_rng or rng, norm_est, hint)


def _power_top(hvp, top_k, smallest, tol, max_hvps, init, rng):
    """The `top_k` largest pairs: one deflated power run each, then one
    Rayleigh-Ritz step on all of them.

    Returns `(values descending, vectors, residuals, low, converged, HVPs
    left, norm floor)`; `low` is `(vector, H vector, converged)` of a
    negative eigenvalue that dominated in magnitude (the smallest), or
    `None`.
    """
    n = hvp.num_params
    starts = list(init[:top_k])

    def next_start():
        return starts.pop(0) if starts else rng.standard_normal(n)

    vectors, products = [], []
    converged = True
    shift, norm_floor = 0.0, 0.0
    low = None  # (vector, H vector, converged)
    remaining = max_hvps
    start = next_start()
    # Deflated runs stop at half the tolerance: the final Rayleigh-Ritz
    # step mixes their residuals.
    inner_tol = 0.5 * tol
    while len(vectors) < top_k:
        pairs_left = top_k - len(vectors) + (1 if smallest and low is None
                                             else 0)
        budget = max(1, remaining // pairs_left)
        deflate = np.array(vectors).reshape(-1, n)
        value, v, hv, used, ok = _power(
            hvp, shift, deflate, start, inner_tol, norm_floor, budget
        )
        remaining -= used
        norm_floor = max(norm_floor, abs(value))
        if value - shift < 0 and shift == 0.0:
            # A negative eigenvalue dominates in magnitude: it is the
            # smallest. Shift by it so the rest of the spectrum is >= 0 and
            # power iteration finds the largest algebraic eigenvalues.
            low = (v, hv, ok)
            shift = value
            continue  # same start vector, shifted operator
        vectors.append(v)
        products.append(hv)
        converged &= ok
        start = next_start()
    values, vectors, residuals = _rayleigh_ritz(
        np.array(vectors), np.array(products)
    )
    order = np.argsort(values)[::-1]
    return (values[order], vectors[order], residuals[order], low, converged,
            remaining, norm_floor)
