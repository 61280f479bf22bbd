"""Lanczos eigensolvers: thick restarts, honest residuals, the check for skipped eigenvalues.

`_Lanczos` is the recurrence (full reorthogonalisation, thick restarts) that
both `spectrum` and `density` run; `_lanczos` iterates it to the wanted
extreme pairs; `_complement_check` locks converged pairs and looks for a
skipped eigenvalue on the complement (`_Deflated`); `_thresholds` says which
residual each eigenvalue must reach. The basis lives on the device
(`gradmon.hessian.vectors`); the projected matrix is float64 NumPy.
"""

import numpy as np
from keras import ops

from gradmon.backend import hvp as _backend
from gradmon.hessian.vectors import (
    ORTHOGONAL_ENOUGH,
    _Basis,
    _compiled,
    _for_layout,
    _lanczos_update,
    _norm,
    _random_vector,
    _vdot,
    _ritz_pair,
)


# A residual below this many machine epsilons of ||H|| is rounding: the
# floor of `_thresholds` (float32: 1.2e-5 ||H||, above the ~1e-6 ||H|| that
# float32 HVPs reach).
ROUNDING_EPSILONS = 100


def _epsilon(dtype):
    """Machine epsilon of a floating dtype (bfloat16: 2**-8)."""
    name = _backend.dtype_name(dtype)
    if name == "bfloat16":
        return 2.0 ** -8
    return float(np.finfo(name).eps)


def _thresholds(values, norm_est, dtype, tol):
    """The residual each eigenvalue must reach to be reported converged.

    `tol * |lambda|`: the residual `r` of a unit vector bounds the distance
    from its Rayleigh quotient to the spectrum, so the value is then within
    `tol` of an eigenvalue relative to itself. Eigenvalues so small that this
    is below the operator's rounding level (`ROUNDING_EPSILONS` machine
    epsilons of `||H||`, `norm_est`) get that absolute floor instead, never
    more than `tol * ||H||`.
    """
    floor = min(tol, ROUNDING_EPSILONS * _epsilon(dtype)) * norm_est
    return np.maximum(tol * np.abs(np.asarray(values, np.float64)), floor)


class _Lanczos:
    """Lanczos with full reorthogonalisation and thick restarts.

    The basis lives on the model's device, in its dtype, at most `capacity`
    vectors (`_Basis`): memory stays `capacity * num_params` whatever the
    number of steps. Only the small coefficient matrix `B` is float64 NumPy.
    The Arnoldi relation `H Q[:m] = Q[:m+1] B[:m+1, :m]` holds to rounding
    after every step (each column of `B` holds the exact Gram-Schmidt
    coefficients of one HVP), so Ritz residuals computed from it are those of
    the HVPs themselves, whatever the loss of orthogonality.
    `T = (B + B^T) / 2` on the first `m` rows and columns is the symmetric
    projected matrix (tridiagonal without restarts, arrow-shaped after one).
    Serves both `spectrum` (with restarts) and `density` (SLQ, without).
    """

    def __init__(self, op, capacity, start, orthogonal_enough=ORTHOGONAL_ENOUGH):
        self.op = op
        # the level of `vectors._lanczos_update`'s test for leaving a
        # correction out, relative to the new vector's norm
        self._orthogonal_enough = _backend.current().to_tensor(
            min(orthogonal_enough, ORTHOGONAL_ENOUGH), op.dtype)
        self.capacity = capacity
        self.basis = _Basis()
        self.basis.append(start / ops.norm(start))
        self.coeffs = np.zeros((capacity, capacity))
        self.m = 0  # basis[m], when it exists, is the next direction
        self.skipped = 0  # steps whose full pass needed no correction
        # basis[m] and basis[m - 1] held apart: no slicing of blocks per step
        self._current, self._previous = self.basis[0], None

    def step(self, relative_floor, rng=None):
        """One HVP: extends the basis by `H q_m`, orthogonalised.

        If the new direction is below `relative_floor` times the scale of
        `T` (an invariant subspace), its coupling is dropped and, given
        `rng`, a random direction continues the basis. Returns whether that
        happened.
        """
        m, q = self.m, self._current
        coupling = self.coeffs[m, m - 1] if m > 0 else 0.0
        w, h, alpha, beta = _for_layout(
            _lanczos_update, self.basis, self.op.apply(q), q,
            q if self._previous is None else self._previous,
            _backend.current().to_tensor(coupling, q.dtype), self._orthogonal_enough,
        )
        self._previous = q
        if hasattr(self.op, "project"):
            # A deflated operator's: the recurrence's own terms bring back
            # the rounding-level components along the locked vectors that
            # `apply` removed, amplified at each step (measured: 2e-7 to
            # 4e-4 in 18 steps). The rounding removed leaves `beta` as is.
            w = self.op.project(w)
        h = _backend.to_host(h)
        self.skipped += not h.any()  # `_lanczos_update` left the correction out
        h[m] += float(alpha)
        if m > 0:
            h[m - 1] += coupling
        beta = float(beta)
        self.coeffs[: h.size, m] = h
        self.m += 1
        scale = np.abs(self.coeffs[: self.m, : self.m]).max()
        if self.m >= self.capacity:
            return beta <= relative_floor * scale
        if beta > relative_floor * scale:
            self._current = w / beta
            self.basis.append(self._current)
            self.coeffs[self.m, self.m - 1] = beta
            return False
        if rng is not None and self.m < getattr(
                self.op, "dimension", self.op.num_params):
            w = _random_vector(rng, self.op.num_params, self.op.dtype)
            if hasattr(self.op, "project"):  # a deflated operator's complement
                w = self.op.project(w)
            w, _, norm = self.basis.project_out(w)
            self._current = w / norm
            self.basis.append(self._current)
        return True

    def ritz(self):
        """`(theta, s, estimates)`: Ritz values (ascending), vectors of `T`,
        and the residual norms the Arnoldi relation predicts."""
        m = self.m
        block = self.coeffs[:m, :m]
        theta, s = np.linalg.eigh(0.5 * (block + block.T))
        return theta, s, np.abs(self.coeffs[m, :m] @ s) if m < self.capacity \
            else np.zeros(m)

    def pairs(self, theta, s):
        """Unit Ritz vectors (device), Rayleigh quotients and residuals.

        Args:
            theta: Ritz values `[k]`.
            s: their eigenvectors of `T`, `[m, k]`.

        Returns:
            `(vectors, values [k], residuals [k])`: a list of `k` device
            tensors, and float64 NumPy numbers.
        """
        m, rows = self.m, len(self.basis)
        dtype, to_tensor = self.op.dtype, _backend.current().to_tensor
        vector_coeffs = np.zeros((s.shape[1], rows))
        vector_coeffs[:, :m] = s.T
        product_coeffs = (self.coeffs[:rows, :m] @ s).T
        vectors, values, residuals = [], [], []
        for i in range(s.shape[1]):  # one pair at a time: temporaries of two vectors
            # `y` and `H y` in one pass over the basis
            both = self.basis.combine(
                np.stack([vector_coeffs[i], product_coeffs[i]]), dtype)
            vector, value, residual = _compiled(
                _ritz_pair, both, to_tensor(theta[i], dtype))
            vectors.append(vector)
            values.append(float(value))
            residuals.append(float(residual))
        return vectors, np.array(values), np.array(residuals)

    def restart(self, s_keep):
        """Keeps the Ritz vectors `Q s_keep` and the next direction."""
        m, keep = self.m, s_keep.shape[1]
        combine = np.zeros((keep + 1, len(self.basis)))
        combine[:keep, :m] = s_keep.T
        combine[keep, m] = 1.0  # the pending next vector moves to row keep
        self.basis = self.basis.rebuilt(combine, self.op.dtype)
        self._current, self._previous = self.basis[keep], self.basis[keep - 1]
        coeffs = np.zeros_like(self.coeffs)
        coeffs[:keep, :keep] = s_keep.T @ self.coeffs[:m, :m] @ s_keep
        coeffs[keep, :keep] = self.coeffs[m, :m] @ s_keep
        self.coeffs, self.m = coeffs, keep


def _wanted(m, top_k, smallest):
    """Indices (into ascending Ritz values) of the wanted pairs."""
    wanted = list(range(m - 1, max(m - 1 - top_k, -1), -1))
    if smallest and 0 not in wanted:
        wanted.append(0)
    return wanted


def _kept(m, capacity, top_k, smallest):
    """Indices of the Ritz vectors a thick restart keeps: the wanted ends
    and about half the basis, so each cycle adds as many new directions."""
    wanted = top_k + int(smallest)
    keep = min(m - 1, max(wanted + 2, (capacity - 1) // 2))
    low = 1 + (keep - wanted) // 2 if smallest else 0
    return list(range(low)) + list(range(m - (keep - low), m))


def _lanczos(op, top_k, smallest, tol, max_steps, capacity, start, rng,
             norm_est=0.0, slack=None):
    """Thick-restart Lanczos for the extreme eigenpairs.

    Returns `(values, vectors, residuals, converged, norm_est)` for the
    wanted Ritz pairs (the `top_k` largest, then the smallest if
    `smallest`); `vectors` is a list of device tensors, `norm_est` the
    largest |Ritz value| seen (at least the given one). `slack`, given the
    wanted Ritz values, returns residuals to accept beyond `_thresholds`
    (`_complement_check`'s looser test).
    """

    def thresholds(values):
        limit = _thresholds(values, norm_est, op.dtype, tol)
        return limit if slack is None else np.maximum(limit, slack(values))

    n = getattr(op, "dimension", op.num_params)
    # Orthogonality lost to a tenth of `tol` (`ORTHOGONAL_ENOUGH` at most)
    # moves no eigenvalue by as much as its threshold.
    lanczos = _Lanczos(op, capacity, start, 0.1 * tol)
    first = op.count
    wanted_count = min(top_k + int(smallest), n)
    # A new direction below this share of ||T|| is an invariant subspace:
    # its coupling is dropped from the Arnoldi relation, so it must stay
    # below every pair's threshold (at `tol` relative to ||H||, a dropped
    # coupling made a reported residual 5.8e-6 where the explicit one was
    # 1.2e-2).
    floor = 0.1 * min(tol, ROUNDING_EPSILONS * _epsilon(op.dtype))
    while True:
        lanczos.step(floor, rng)
        theta, s, estimates = lanczos.ritz()
        norm_est = max(norm_est, abs(theta[0]), abs(theta[-1]))
        wanted = _wanted(lanczos.m, top_k, smallest)
        exhausted = op.count - first >= max_steps or lanczos.m >= n
        if exhausted or (len(wanted) >= wanted_count and np.all(
                estimates[wanted] <= thresholds(theta[wanted]))):
            # The check costs no HVP: it combines stored vectors.
            vectors, values, residuals = lanczos.pairs(
                theta[wanted], s[:, wanted]
            )
            norm_est = max(norm_est, np.max(np.abs(values)))
            ok = bool(np.all(residuals <= thresholds(values)))
            if ok or exhausted:
                return values, vectors, residuals, ok, norm_est
        if lanczos.m >= capacity - 1:
            lanczos.restart(
                s[:, _kept(lanczos.m, capacity, top_k, smallest)]
            )


# Above this many parameters `_orthonormal` runs Gram-Schmidt, below it one QR.
_QR_BELOW = 1 << 20


def _orthonormal(vectors):
    """An orthonormal basis of the span of a few device vectors, `[k, n]`.

    A QR of the `[n, k]` matrix (one op) for small `n`; from `_QR_BELOW`
    entries on, Gram-Schmidt, each vector twice, a few passes over the
    vectors (at 6.3 M parameters the QR took 0.58 s of CPU, this ~0.05 s;
    at 10 k the QR 1 ms, this 4 ms of eager ops).
    """
    if int(vectors[0].shape[0]) < _QR_BELOW:
        basis, _ = ops.qr(ops.transpose(ops.stack(vectors)))
        return ops.transpose(basis)
    rows = []
    for vector in vectors:
        for _ in range(2):
            for row in rows:
                vector = vector - _vdot(row, vector)[0] * row
        rows.append(vector / _norm(vector))
    return ops.stack(rows)


def _deflate(vector, locked):
    """`vector` minus its projection on the orthonormal rows of `locked`,
    twice (graph code)."""
    matvec = _backend.current().matvec
    for _ in range(2):
        vector = vector - matvec(locked, matvec(locked, vector), transpose=True)
    return vector


class _Deflated:
    """`P H P`, `P` the projector on the complement of locked unit vectors.

    The locked vectors are eigenvectors of this operator for the eigenvalue
    0, and its other eigenpairs are those of `H` on the complement (to the
    locked pairs' residuals squared). `dimension` is the complement's.
    """

    def __init__(self, op, locked):
        self.op = op
        self.num_params, self.dtype = op.num_params, op.dtype
        self.dimension = op.num_params - len(locked)
        # An orthonormal basis of their span: vectors orthogonal only to
        # rounding (power iteration's, float64 rounded to float32) would
        # leave `||H||` times their overlaps in every product.
        self._locked = _orthonormal(locked)

    @property
    def count(self):
        return self.op.count

    def project(self, vector):
        """`P v` for a flat device tensor (twice: rounding stays out)."""
        return _compiled(_deflate, vector, self._locked)

    def apply(self, vector):
        return self.project(self.op.apply(self.project(vector)))


# `_complement_check` resolves a Ritz value below its bound to this share of
# the distance (a skipped eigenvalue's Ritz value rises above it first).
_CHECK_SLACK = 0.1


def _complement_check(op, top, low, tol, budget, capacity, rng, norm_est,
                      hint=None):
    """Locks the converged pairs and looks for a skipped one in their complement.

    `top` is the list of the largest converged pairs `(value, device vector,
    residual)`, `low` the smallest one or `None`. Lanczos from a random
    vector orthogonal to all locked vectors runs on `P H P` until its
    largest (and smallest) Ritz pair is resolved: to `_CHECK_SLACK` of its
    distance from the bound (the smallest reported value plus its
    threshold; the reported minimum minus its threshold), or by the full
    test of `_thresholds` when it is not clear of the bound. A value beyond
    the bound is an eigenvalue the first run skipped. It is locked in turn
    (its residual for `H` from one explicit HVP), the reported pairs are
    chosen again among all locked ones, and a new pass runs, until a pass
    finds nothing. The first pass starts from `hint` (a previous check's
    vector, device) plus an equal share of the random vector, when given:
    an eigenvalue that rose past the reported ones since is usually that
    one, found at once. Returns `(top pairs, minimum pair or None,
    verified, norm_est, the last pass's top Ritz vector or None)`;
    `verified` is False if the budget ran out first.
    """
    n = op.num_params
    smallest = low is not None
    top_k = len(top)
    top = sorted(top, key=lambda p: -p[0])
    locked = top + ([low] if smallest else [])
    first = op.count
    checked = None
    while len(locked) < n:
        left = budget - (op.count - first)
        if left <= 0:
            return top, low, False, norm_est, checked
        deflated = _Deflated(op, [p[1] for p in locked])
        start = _random_vector(rng, n, op.dtype)
        if hint is not None:
            start = start / ops.norm(start) + hint / ops.norm(hint)
            hint = None
        start = deflated.project(start)
        high = top[-1][0] + _thresholds(top[-1][0], norm_est, op.dtype, tol)
        bounds = [high] + ([low[0] - _thresholds(
            low[0], norm_est, op.dtype, tol)] if smallest else [])

        def slack(values):
            # A pair whose value stands clear of its bound need only be
            # resolved to a tenth of the distance: enough to tell.
            return np.array([_CHECK_SLACK * max(0.0, (b - v) * sign)
                             for v, b, sign in zip(values, bounds, (1, -1))])

        values, vectors, residuals, ok, norm_est = _lanczos(
            deflated, 1, smallest, tol, left,
            min(capacity, deflated.dimension + 1), start, rng, norm_est,
            slack)
        if not ok:
            return top, low, False, norm_est, checked
        found = []
        if values[0] > high:
            found.append(0)
        if smallest and len(values) > 1 and values[-1] < bounds[1]:
            found.append(len(values) - 1)
        checked = vectors[0]
        if not found:
            return top, low, True, norm_est, checked
        for i in found:
            vector = vectors[i]
            residual = float(_norm(op.apply(vector) - values[i] * vector))
            pair = (float(values[i]), vector, residual)
            locked.append(pair)
            if i == 0:
                top = sorted(top + [pair], key=lambda p: -p[0])[:top_k]
            else:
                low = pair
    return top, low, True, norm_est, checked


def _lanczos_spectrum(hvp, top_k, smallest, tol, max_hvps, max_vectors,
                      init, rng, check_rng=None, hint=None):
    """Runs `_lanczos` and sorts its pairs as `Spectrum` wants them.

    Returns `(eigenvalues, eigenvectors, residuals, minimum, converged,
    check_vector)`, eigenvectors as float64 NumPy, `minimum` as in
    `_power_spectrum`.
    """
    n = hvp.num_params
    first = hvp.count
    wanted = top_k + int(smallest)
    steps = max_hvps or 200 + 20 * wanted
    capacity = min(n + 1, max_vectors or max(14, 2 * wanted + 8))
    if len(init) and np.linalg.norm(init.sum(axis=0)) >= 1e-8:
        start = hvp.to_tensor(init.sum(axis=0))
    else:  # cold, or e.g. v and -v: a random start
        start = _random_vector(rng, n, hvp.dtype)
    values, vectors, residuals, converged, norm_est = _lanczos(
        hvp, top_k, smallest, tol, steps, capacity, start, rng
    )
    pairs = list(zip(values, vectors, residuals))
    return _checked(hvp, pairs, top_k, smallest, tol, converged,
                    steps - (hvp.count - first), capacity, check_rng or rng,
                    norm_est, hint)


def _checked(hvp, pairs, top_k, smallest, tol, converged, budget, capacity,
             rng, norm_est, hint=None):
    """Runs `_complement_check` on converged pairs (the `top_k` largest
    then the smallest if `smallest`, vectors on the device) and returns
    `(eigenvalues, eigenvectors, residuals, minimum, converged,
    check_vector)` as `_power_spectrum` does, eigenvectors as float64
    NumPy; `hint`: a previous check vector (host) or `None`."""
    n = hvp.num_params
    count = min(top_k, n, len(pairs))
    top, low = pairs[:count], None
    if smallest:  # no pair of its own when the wanted ones cover the basis
        low = pairs[count] if len(pairs) > count else min(top, key=lambda p: p[0])
    checked = None
    if converged and len(top) + int(smallest) < n:
        top, low, converged, norm_est, checked = _complement_check(
            hvp, top, low, tol, budget, capacity, rng, norm_est,
            None if hint is None else hvp.to_tensor(hint))
    top = sorted(top, key=lambda p: -p[0])
    minimum = None if low is None else (float(low[0]), _host(low[1]),
                                        float(low[2]))
    # One vector at a time to the host: no second copy of all of them.
    eigenvectors = np.empty((count, n))
    for row, pair in enumerate(top):
        eigenvectors[row] = _backend.to_host(pair[1])
    values = np.array([p[0] for p in top], np.float64)
    residuals = np.array([p[2] for p in top], np.float64)
    thresholds = _thresholds(np.append(values, [] if low is None else low[0]),
                             norm_est, hvp.dtype, tol)
    converged = converged and bool(np.all(np.append(
        residuals, [] if low is None else low[2]) <= thresholds))
    return (values, eigenvectors, residuals, minimum, converged,
            None if checked is None else _host(checked))


def _host(vector):
    return _backend.to_host(vector)
