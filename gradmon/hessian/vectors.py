"""Vectors over the parameters, on the model's device: the Lanczos basis and its algebra.

`_Basis` holds orthonormal vectors as immutable device tensors in blocks;
projections, norms without underflow and the Lanczos update run as graph code,
one compiled function for bases of any size up to a few blocks (`_for_layout`); random probes are
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

    def combine(self, coefficients, dtype):
        """`coefficients @ basis` for a float64 NumPy `[k, len(self)]`, `[k, n]` in `dtype`.

        The coefficients are cut per part on the host (eager slicing of a
        tensor is Python-heavy); up to two rows sum all parts' products in
        one pass, wider ones add them one at a time (bounded memory).
        """
        parts = self.parts()
        starts = np.cumsum([0] + [int(b.shape[0]) for b in parts])
        backend = _backend.current()
        terms = (backend.matmul(backend.to_tensor(coefficients[:, a:z], dtype), b)
                 for a, z, b in zip(starts[:-1], starts[1:], parts))
        if coefficients.shape[0] <= 2:
            return backend.add_n(terms)
        out = next(terms)
        for term in terms:
            out = out + term
        return out

    def rebuilt(self, coefficients, dtype):
        """A new `_Basis` of the rows `coefficients @ basis` (float64 NumPy
        coefficients, vectors in `dtype`), built a block
        at a time so the temporaries stay a block wide; each product is
        kept as a block (the last one possibly narrower), not cut into
        rows and stacked again (two more passes over it: at 6.3 M
        parameters a thick restart took 0.28 s of CPU, a third of it
        that)."""
        new = _Basis(self.block)
        for start in range(0, coefficients.shape[0], self.block):
            new.blocks.append(self.combine(coefficients[start:start + self.block], dtype))
        return new

    def project_out(self, w):
        """`w` minus its projection on the basis, in two passes.

        Returns `(w, coefficients, ||w||)`, `coefficients` float64 NumPy.
        """
        w, h, norm = _for_layout(_two_passes, self, w)
        return w, _backend.to_host(h), float(norm)

    def parts(self):
        """The blocks, then each pending vector as a `[1, n]` block."""
        return self.blocks + [ops.expand_dims(p, 0) for p in self.pending]


def _coefficients(parts, w):
    """`Q w`, one product per part (graph code): the first half of a
    classical Gram-Schmidt pass, one read of the basis."""
    backend = _backend.current()
    return [backend.matvec(part, w) for part in parts]


def _corrected(parts, filled, w, coefficients):
    """`w - Q^T h` for `h` given per part (graph code): the second half.

    `parts` are `[rows, n]` blocks of `Q`, the first `filled` of them
    holding its rows and the others empty (`[0, n]`, the padding of
    `_for_layout`): their products are empty, and the sum of the
    corrections takes only the filled ones (a switch on `filled`), so the
    padding costs no pass over `w`.
    """
    backend = _backend.current()

    def first(count):
        return lambda: backend.add_n([
            backend.matvec(part, c, transpose=True)
            for part, c in zip(parts[:count], coefficients[:count])])

    return w - backend.switch(filled - 1, [first(k) for k in range(1, len(parts) + 1)])


def _project(parts, filled, w):
    """One classical Gram-Schmidt pass (graph code): `(w - Q^T h, h = Q w)`."""
    coefficients = _coefficients(parts, w)
    return _corrected(parts, filled, w, coefficients), ops.concatenate(coefficients, 0)


# One compiled function per number of basis parts (blocks and pending
# vectors, any number of rows each), padded with empty parts to a few sizes
# on a backend that traces (`PADDED_LAYOUTS`): on TensorFlow a probe's Lanczos
# runs one traced function (two with a random restart) for any vector length
# and any basis of up to `_SLOTS` parts (a capacity of 18 vectors, the
# default for `top_k` up to 5), shared by every operator, spectrum and
# `HessianMonitor` of the process. One function per exact layout was 9
# traces in a top-2 probe of a 12k-parameter Transformer; the 14 layouts of
# a 14-vector basis took 3.9 s of CPU to trace and call first (with
# AutoGraph), the one padded function 0.7-0.9 s. The padding costs ~10 % of
# a Lanczos step's own time at 2 M parameters (36 vs 33 ms for 1-3 vectors).
_LAYOUT_FUNCTIONS = {}
_SLOTS = 6


def _slots(count):
    """The padded number of parts: `_SLOTS`, doubled until `count` fits."""
    slots = _SLOTS
    while slots < count:
        slots *= 2
    return slots


_EMPTY = {}


def _empty(n, dtype):
    """A `[0, n]` tensor: a padding part."""
    key = (n, _backend.dtype_name(dtype))
    if key not in _EMPTY:
        if len(_EMPTY) > 256:  # many operators' lengths: keep the dict small
            _EMPTY.clear()
        _EMPTY[key] = ops.zeros((0, n), dtype=key[1])
    return _EMPTY[key]


def _for_layout(fn, basis, w, *args):
    """Runs the compiled `fn(parts, filled, w, *args)` for `basis`'s parts.

    Each number of parts gets a function of its own, compiled once (on
    TensorFlow a concrete function for any vector length and rows per
    part, called directly: a fifth less call overhead, which matters for
    small models).
    """
    backend = _backend.current()
    parts = basis.parts()
    filled = len(parts)
    if backend.PADDED_LAYOUTS:
        n = int(w.shape[0])
        parts = parts + [_empty(n, w.dtype)] * (_slots(filled) - filled)
    key = (fn.__name__, len(parts), _backend.dtype_name(w.dtype))
    if key not in _LAYOUT_FUNCTIONS:
        _LAYOUT_FUNCTIONS[key] = backend.compile_layout(fn, (parts, filled, w, *args))
    return _LAYOUT_FUNCTIONS[key](parts, backend.layout_count(filled), w, *args)


_COMPILED = {}


def _compiled(fn, *args):
    """`fn(*args)`, compiled once per function and dtype for arguments of
    any shape (`compile_layout`: on TensorFlow one concrete function, a
    single call instead of a dozen eager ops; on JAX and PyTorch `fn`
    itself). For the small graph functions a probe calls at every
    deflated product and Ritz pair."""
    backend = _backend.current()
    key = (fn.__name__, _backend.dtype_name(args[0].dtype))
    if key not in _COMPILED:
        _COMPILED[key] = backend.compile_layout(fn, args)
    return _COMPILED[key](*args)


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


def _vdot(a, b):
    """`[a.b]`, a vector of one entry (on TensorFlow a matrix product:
    tf.tensordot of two long vectors is single-threaded there)."""
    return _backend.current().vdot(a, b)


def _two_passes(parts, filled, w):
    w, first = _project(parts, filled, w)
    w, second = _project(parts, filled, w)
    return w, first + second, _norm(w)


# `_lanczos_update` leaves out the correction of a full pass when every
# coefficient `q_j . w` is below this share of `||w||`: the new vector is
# then orthogonal to every stored one to this level, measured (the
# coefficients are computed every step), well inside semi-orthogonality
# (sqrt(eps), 3.5e-4 in float32), which keeps the projected matrix's
# eigenvalues those of the operator to rounding (H. D. Simon, "The Lanczos
# algorithm with partial reorthogonalization", Math. Comp. 42, 1984). At
# 6.3 M parameters the correction is half of a step's basis traffic.
ORTHOGONAL_ENOUGH = 1e-5


def _lanczos_update(parts, filled, w, q, previous, coupling, orthogonal_enough):
    """Orthogonalises `w = H q` against the basis, in one graph call.

    The local recurrence first (`alpha q` and the known `coupling` to the
    previous vector), then one full pass, which removes only rounding-level
    components (folding the local terms into that pass instead leaves the
    dot-product errors of the large `H q`, ~eps ||H q||, along every
    vector: measured, it stalled residuals near 3e-4 ||H||). The pass's
    coefficients `h = Q w` are always computed; its correction `w - Q^T h`
    runs only when one of them exceeds `orthogonal_enough ||w||` (a
    scalar tensor, at most `ORTHOGONAL_ENOUGH`; else `h`
    is returned as zeros: the Arnoldi relation below stays exact, and the
    new vector is orthogonal to the basis to that level). A second pass
    runs only when the first removed most of what was left ("twice is
    enough": Parlett, The Symmetric Eigenvalue Problem, 1980, sec. 6.9).
    Returns `(w, h, alpha, ||w||)` where `h` sums the applied passes, so
    `H q = alpha q + coupling previous + Q^T h + w` to rounding. Graph code
    (see `_for_layout`).
    """
    alpha = _vdot(q, w)[0]
    w = w - alpha * q - coupling * previous
    coefficients = _coefficients(parts, w)
    h = ops.concatenate(coefficients, 0)
    before = _norm(w)
    level = orthogonal_enough * before
    cond = _backend.current().cond

    def full():
        w1 = _corrected(parts, filled, w, coefficients)
        norm = _norm(w1)

        def again():
            w2, h2 = _project(parts, filled, w1)
            return w2, h + h2, _norm(w2)

        # ||w before the pass||^2 = norm^2 + ||h||^2 for an orthonormal basis, so
        # norm < ||w before|| / sqrt(2) is norm < ||h|| (no squares to underflow).
        return cond(norm < _norm(h), again, lambda: (w1, h, norm))

    w, h, norm = cond(ops.max(ops.abs(h)) > level, full, lambda: (w, ops.zeros_like(h), before))
    return w, h, alpha, norm


def _ritz_pair(both, theta):
    """A unit Ritz vector, its Rayleigh quotient and residual, on the device
    (graph code, see `_compiled`).

    `both` stacks a Ritz vector `y` and its product `H y` (combinations of
    stored vectors); `theta` is its Ritz value, so the quotient is computed
    as a small correction to it.
    """
    y, hy = both[0], both[1]
    yy = ops.sum(y * y)
    quotient = theta + ops.sum(y * (hy - theta * y)) / yy
    residual = _norm(hy - quotient * y) / ops.sqrt(yy)
    return y / ops.sqrt(yy), quotient, residual
