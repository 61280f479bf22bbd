"""Vectors over the parameters, on the model's device: the Lanczos basis and its algebra.

`_Basis` holds orthonormal vectors as immutable device tensors in blocks;
projections, norms without underflow and the Lanczos update run as graph code,
one compiled function per basis layout (`_for_layout`); random probes are
seeded from a NumPy generator. Written in `keras.ops`, with the few products
whose form matters for speed or precision (`matvec`, `vdot`, `matmul`,
`add_n`), the compiling and the random draws from the backend's module
(`gradmon.backend.hvp`).
"""

import math

import numpy as np
from keras import ops

from gradmon.backend import hvp as _backend


def _random_vector(rng, n, dtype, rademacher=False):
    """A device vector seeded from `rng` (standard normal, or Rademacher).

    On TensorFlow a stateless op draws it on the device (it touches neither
    TensorFlow's global generator nor Keras' seed generators); on JAX and
    PyTorch it is drawn on the host and sent once.
    """
    return _backend.current().random_vector(rng, n, dtype, rademacher)


def _dot64(a, b):
    """`a.b` accumulated in float64 (a float32 sum over millions of terms
    loses digits), as a Python float."""
    return _backend.current().dot64(a, b)


class _Basis:
    """Orthonormal vectors as immutable device tensors, in blocks.

    Vectors are appended one by one and stacked into a `[block, n]` matrix
    every `block` appends, so projections are a few matrix-vector products
    and no tensor is ever written in place (a partly assigned `tf.Variable`
    switches to copy-on-read: every later read copied the whole basis, 0.3 s
    a step at 6.3 M parameters). Memory is the vectors plus, briefly, one
    block being stacked.
    """

    def __init__(self, block=4):
        self.block = block
        self.blocks, self.pending = [], []

    def __len__(self):
        return sum(int(b.shape[0]) for b in self.blocks) + len(self.pending)

    def __getitem__(self, index):
        for b in self.blocks:
            if index < b.shape[0]:
                return b[index]
            index -= int(b.shape[0])
        return self.pending[index]

    def append(self, vector):
        self.pending.append(vector)
        if len(self.pending) == self.block:
            self.blocks.append(ops.stack(self.pending))
            self.pending = []

    def combine(self, coefficients):
        """`coefficients @ basis` for a `[k, len(self)]` tensor, `[k, n]`."""
        parts = self.blocks + [p[None] for p in self.pending]
        starts = np.cumsum([0] + [int(b.shape[0]) for b in parts])
        matmul = _backend.current().matmul
        terms = (matmul(coefficients[:, a:z], b)
                 for a, z, b in zip(starts[:-1], starts[1:], parts))
        if coefficients.shape[0] == 1:
            return _backend.current().add_n(terms)  # one pass over narrow terms
        out = next(terms)
        for term in terms:  # wide terms one at a time: bounded memory
            out = out + term
        return out

    def rebuilt(self, coefficients):
        """A new `_Basis` of the rows `coefficients @ basis`, built a block
        at a time so the temporaries stay a block wide."""
        new = _Basis(self.block)
        for start in range(0, int(coefficients.shape[0]), self.block):
            rows = self.combine(coefficients[start:start + self.block])
            for i in range(int(rows.shape[0])):
                new.append(rows[i])
        return new

    def project_out(self, w):
        """`w` minus its projection on the basis, in two passes.

        Returns `(w, coefficients, ||w||)`, `coefficients` float64 NumPy.
        """
        w, h, norm = _for_layout(_two_passes, self.blocks, self.pending, w)
        return w, _backend.to_host(h), float(norm)


def _project(blocks, pending, w):
    """One classical Gram-Schmidt pass (graph code): `(w - Q^T h, h = Q w)`."""
    backend = _backend.current()
    h = ops.concatenate([backend.matvec(b, w) for b in blocks]
                        + [_vdot(p, w) for p in pending], 0)
    terms, start = [], 0
    for b in blocks:
        size = int(b.shape[0])
        terms.append(backend.matvec(b, h[start:start + size], transpose=True))
        start += size
    terms += [h[start + i] * p for i, p in enumerate(pending)]
    return w - backend.add_n(terms), h


def _vdot(a, b):
    """`[a.b]`, a vector of one entry (on TensorFlow a matrix product:
    tf.tensordot of two long vectors is single-threaded there)."""
    return _backend.current().vdot(a, b)


# One compiled function per basis layout (number and sizes of blocks, pending
# vectors): on TensorFlow each is traced once, for any vector length (the
# per-layer operators of a model have as many lengths as layers: per-length
# traces cost as much as their HVPs' own), where one function would retrace
# at every new layout and warn of frequent retracing.
_LAYOUT_FUNCTIONS = {}


def _for_layout(fn, blocks, pending, w, *args):
    """Runs the compiled `fn` of this basis layout.

    Each layout gets a function of its own, compiled once (on TensorFlow a
    concrete function for any vector length, called directly: a fifth less
    call overhead, which matters for small models).
    """
    key = (fn.__name__, tuple(int(b.shape[0]) for b in blocks), len(pending),
           _backend.dtype_name(w.dtype))
    if key not in _LAYOUT_FUNCTIONS:
        _LAYOUT_FUNCTIONS[key] = _backend.current().compile_layout(
            fn, (blocks, pending, w, *args))
    return _LAYOUT_FUNCTIONS[key](blocks, pending, w, *args)


def _norm(w):
    """`||w||` without underflow (graph code).

    A float32 sum of squares loses entries below ~1e-19 (their squares are
    subnormal): a tiny operator (a deep layer's Hessian block at
    initialisation, ~1e-20) then gave non-unit Lanczos vectors, a wrong
    eigenvalue and a residual of 0. Below the threshold the norm is
    recomputed on `w / max|w|`; above it a single norm.
    """
    norm = ops.norm(w)
    dtype = _backend.dtype_name(w.dtype)
    # bfloat16 (no np.finfo) has float32's exponent range
    info = np.finfo({"float16": np.float16, "float64": np.float64}.get(dtype, np.float32))
    threshold = ops.convert_to_tensor(math.sqrt(info.tiny) / info.eps, dtype=dtype)

    def rescaled():
        scale = ops.max(ops.abs(w))
        safe = ops.where(scale > 0, scale, ops.ones_like(scale))
        return safe * ops.norm(w / safe)

    return _backend.current().cond(norm < threshold, rescaled, lambda: norm)


def _two_passes(blocks, pending, w):
    w, first = _project(blocks, pending, w)
    w, second = _project(blocks, pending, w)
    return w, first + second, _norm(w)


def _lanczos_update(blocks, pending, w, q, previous, coupling):
    """Orthogonalises `w = H q` against the basis, in one graph call.

    The local recurrence first (`alpha q` and the known `coupling` to the
    previous vector), then one full pass, which removes only rounding-level
    components (folding the local terms into that pass instead leaves the
    dot-product errors of the large `H q`, ~eps ||H q||, along every
    vector: measured, it stalled residuals near 3e-4 ||H||). A second pass
    runs only when the first removed most of what was left ("twice is
    enough": Parlett, The Symmetric Eigenvalue Problem, 1980, sec. 6.9).
    Returns `(w, h, alpha, ||w||)` where `h` sums the full passes, so
    `H q = alpha q + coupling previous + Q^T h + w` to rounding. Graph code
    (see `_for_layout`).
    """
    alpha = _vdot(q, w)[0]
    w = w - alpha * q - coupling * previous
    w, h = _project(blocks, pending, w)
    norm = _norm(w)

    def again():
        w2, h2 = _project(blocks, pending, w)
        return w2, h + h2, _norm(w2)

    # ||w before the pass||^2 = norm^2 + ||h||^2 for an orthonormal basis, so
    # norm < ||w before|| / sqrt(2) is norm < ||h|| (no squares to underflow).
    w, h, norm = _backend.current().cond(norm < _norm(h), again, lambda: (w, h, norm))
    return w, h, alpha, norm


def _ritz_pair(y, hy, theta):
    """A unit Ritz vector, its Rayleigh quotient and residual, on the device.

    `y` is a Ritz vector and `hy` its product `H y` (both combinations of
    stored vectors); `theta` is its Ritz value, so the quotient is computed
    as a small correction to it.
    """
    yy = ops.sum(y * y)
    theta = ops.convert_to_tensor(theta, dtype=_backend.dtype_name(y.dtype))
    quotient = theta + ops.sum(y * (hy - theta * y)) / yy
    residual = _norm(hy - quotient * y) / ops.sqrt(yy)
    return y / ops.sqrt(yy), quotient, residual


