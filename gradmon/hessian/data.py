"""Probe data of the Hessian: checked once, held as tensors, split into chunks.

`prepare_data` turns a batch, a list of batches or a finite `tf.data.Dataset`
into a `ProbeData` (the batches and each one's share of the examples);
`_chunked` splits batches above `max_batch_size` examples so that an HVP's
memory is a chunk's; `_naming_data` and `_check_input_shapes` make data the
model cannot take fail as an invalid `data`, in Keras' wording.
"""

import typing
import warnings

import keras
from keras import ops, tree

from gradmon.backend import hvp as _backend


class ProbeData(typing.NamedTuple):
    """Probe data converted to tensors once, reusable by every operator.

    Attributes:
        batches: list of `(x, y, sample_weight)` tensor structures.
        weights: list of floats, each batch's share of the examples.
    """

    batches: list
    weights: list


def _invalid_data(expected, received):
    return ValueError(
        f"Invalid value for argument `data`. Expected {expected}. "
        f"Received: {received}"
    )


def _batch_size(x):
    leaves = tree.flatten(x)
    if not leaves or len(leaves[0].shape) == 0:
        raise _invalid_data(
            "batches whose inputs have a leading batch dimension",
            f"an input of shape {leaves[0].shape if leaves else None}",
        )
    return int(leaves[0].shape[0])


# A `tf.data.Dataset` of unknown cardinality (a generator's, possibly
# endless) is read up to this many examples; the rest is ignored, warned.
MAX_UNKNOWN_LENGTH_EXAMPLES = 8192


def _element_size(batch):
    leaves = [t for t in tree.flatten(batch) if t is not None]
    return int(leaves[0].shape[0]) if leaves and len(leaves[0].shape) else 1


def _bounded(data):
    """The batches of a dataset of unknown cardinality, at most
    `MAX_UNKNOWN_LENGTH_EXAMPLES` examples of them (warned if cut)."""
    batches, examples = [], 0
    iterator = iter(data)
    for batch in iterator:
        batches.append(batch)
        examples += _element_size(batch)
        if examples >= MAX_UNKNOWN_LENGTH_EXAMPLES:
            if next(iterator, None) is not None:
                warnings.warn(
                    "gradmon: argument `data` is a tf.data.Dataset of unknown "
                    "cardinality (a generator's, possibly endless): the "
                    f"Hessian probe uses its first {len(batches)} batches "
                    f"({examples} examples, the cap "
                    f"{MAX_UNKNOWN_LENGTH_EXAMPLES}) and ignores the rest. "
                    "Pass `data.take(n)` (known length) to choose the "
                    "probe yourself.", stacklevel=4,
                )
            break
    return batches


def _raw_batches(data):
    """The batches of `data` as a list, a dataset materialised once."""
    kind = _backend.current().dataset_kind(data)
    if kind == "infinite":
        raise _invalid_data(
            "a finite dataset (the Hessian is of the mean loss over all "
            "of it: bound it with `data.take(n)`)",
            f"data={data} with infinite cardinality",
        )
    # Materialised once so that every HVP sees the same batches, even
    # for a dataset that reshuffles on each iteration.
    if kind == "unknown":
        return _bounded(data)
    if kind == "finite":
        return list(data)
    if isinstance(data, list):
        return data
    if isinstance(data, tuple):
        return [data]
    raise _invalid_data(
        "a batch `(x, y)` or `(x, y, sample_weight)`, a list of such "
        "batches, or a `tf.data.Dataset`", f"data of type {type(data)}",
    )


def _check_finite(structure):
    for leaf in tree.flatten(structure):
        if leaf is not None and keras.backend.is_float_dtype(leaf.dtype) and not bool(
            ops.all(ops.isfinite(leaf))
        ):
            # A NaN in the probe would make every HVP NaN, silently.
            raise _invalid_data(
                "finite inputs, targets and sample weights",
                "a batch with NaN or infinite values",
            )


def prepare_data(data):
    """Checks probe data and converts it to tensors, once.

    Args:
        data: a batch `(x, y)` or `(x, y, sample_weight)`, a list of such
            batches, a finite `tf.data.Dataset` of them, or a `ProbeData`
            (returned as is). An infinite dataset is refused; one of unknown
            cardinality (e.g. `from_generator`) is read up to
            `MAX_UNKNOWN_LENGTH_EXAMPLES` examples, with a warning if more
            were left (bound it with `data.take(n)` to choose).

    Returns:
        A `ProbeData`, accepted as `data` by `make_hvp`, `spectrum`, `trace`
        and `density`.

    Raises:
        ValueError: naming `data`, for an unsupported type, an infinite
            dataset, no non-empty batch, a batch without targets `y`, or
            NaN/inf values.
    """
    if isinstance(data, ProbeData):
        return data
    raw = _raw_batches(data)
    if not raw:
        raise _invalid_data("at least one batch", f"data={data!r}")
    batches, sizes = [], []
    for batch in raw:
        if not isinstance(batch, (tuple, list)) or not 1 <= len(batch) <= 3:
            raise _invalid_data(
                "each batch to be a tuple `(x, y)` or `(x, y, sample_weight)`",
                f"a batch of type {type(batch)}",
            )
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(tuple(batch))
        if y is None:
            raise _invalid_data(
                "batches `(x, y)` with targets (the compiled loss needs them)",
                "a batch without `y`",
            )
        x, y, sample_weight = tree.map_structure(
            lambda t: None if t is None else ops.convert_to_tensor(t),
            (x, y, sample_weight),
        )
        _check_finite((x, y, sample_weight))
        size = _batch_size(x)
        if size == 0:
            continue
        batches.append((x, y, sample_weight))
        sizes.append(size)
    if not batches:
        raise _invalid_data(
            "at least one non-empty batch", "only empty batches"
        )
    total = float(sum(sizes))
    return ProbeData(batches, [s / total for s in sizes])


# A probe batch above this many examples is split into chunks of at most
# this many (`make_hvp(max_batch_size=)`): one 4,096-image batch peaked at
# 5.8 GB against 1.15 GB for the same examples in smaller batches.
DEFAULT_MAX_BATCH_SIZE = 1024


# Reductions under which a batch's loss is the mean of per-example terms
# (plus terms independent of the batch): the size-weighted mean of its
# chunks' losses is then the batch's loss, and its HVP the same.
_MEAN_REDUCTIONS = ("sum_over_batch_size", "mean")


def _layout(batch):
    """Shapes and dtypes of a batch's tensors (one eager check per layout)."""
    return tuple((None if t is None else (tuple(t.shape), _backend.dtype_name(t.dtype)))
                 for t in tree.flatten(batch))


def _shapes(structure):
    shapes = [None if t is None else tuple(t.shape)
              for t in tree.flatten(structure)]
    return shapes[0] if len(shapes) == 1 else shapes


class _naming_data:
    """Re-raises an error of the model or its loss on a probe batch as an
    invalid `data` (Keras' wording), with the shapes it received."""

    def __init__(self, batch):
        self.batch = batch

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if error is None or not isinstance(error, (
                ValueError, TypeError, KeyError, IndexError,
                *_backend.current().data_errors())):
            return False
        if str(error).startswith("Invalid value for argument `data`"):
            return False
        x, y, sw = self.batch
        received = f"a batch with x of shape {_shapes(x)}, y of shape {_shapes(y)}"
        if sw is not None:
            received += f", sample_weight of shape {_shapes(sw)}"
        raise _invalid_data(
            "batches the model and its compiled loss accept (the shapes "
            "`fit` takes)", f"{received}, on which the model's loss failed: "
            f"{type(error).__name__}: {str(error).strip()[:500]}",
        ) from error


def _check_input_shapes(model, batches):
    """Each batch's `x` against the model's declared input, when it has
    one (functional and Sequential models built from an `Input`); other
    mismatches fail the eager loss in `HessianVectorProduct`, as `data`."""
    try:
        inputs = list(getattr(model, "inputs", None) or [])
    except (AttributeError, ValueError, TypeError):  # a subclassed model: none declared
        inputs = []
    if len(inputs) != 1:  # several: their order against `x`'s is the model's business
        return
    expected = [tuple(t.shape) for t in inputs]
    for batch in batches:
        leaves = tree.flatten(batch[0])
        received = [tuple(t.shape) for t in leaves]
        ok = len(received) == len(expected) and all(
            len(r) == len(e) and all(a is None or a == b for a, b in zip(e[1:], r[1:]))
            for r, e in zip(received, expected))
        if not ok:
            raise _invalid_data(
                f"inputs x of shape {expected[0] if len(expected) == 1 else expected} "
                "(the model's `inputs`; the leading batch dimension free)",
                f"a batch with x of shape {received[0] if len(received) == 1 else received}",
            )


def _chunkable(model):
    """Whether every compiled loss averages over examples (see `_MEAN_REDUCTIONS`)."""
    compile_loss = getattr(model, "_compile_loss", None)
    if compile_loss is None:
        return False  # an own `compute_loss`: nothing says what it reduces
    user = getattr(compile_loss, "_user_loss", None)
    try:
        losses = [loss for loss in tree.flatten(user) if loss is not None]
    except (TypeError, ValueError):
        return False
    return all(getattr(loss, "reduction", "sum_over_batch_size") in _MEAN_REDUCTIONS
               or (isinstance(loss, str) or callable(loss)) and not hasattr(loss, "reduction")
               for loss in losses)


def _chunked(model, probe, max_batch_size):
    """`(batches, weights)` with every batch above `max_batch_size` examples
    split into chunks, each weighted by its share of the examples: the mean
    loss, and so every HVP, is unchanged for a loss that averages over
    examples. Others (a `"sum"` reduction, an own `compute_loss`) run whole,
    warned."""
    if all(_batch_size(x) <= max_batch_size for x, _, _ in probe.batches):
        return probe.batches, probe.weights
    if not _chunkable(model):
        warnings.warn(
            f"gradmon: a probe batch in argument `data` has more than "
            f"{max_batch_size} examples, and is not split (the model's loss "
            "is not known to be a mean over examples: a `'sum'` reduction or "
            "an own `compute_loss`); its HVP needs the memory of the whole "
            "batch. Pass smaller batches.", stacklevel=4,
        )
        return probe.batches, probe.weights
    batches, weights = [], []
    for batch, weight in zip(probe.batches, probe.weights):
        size = _batch_size(batch[0])
        for start in range(0, size, max_batch_size):
            stop = min(size, start + max_batch_size)
            batches.append(tree.map_structure(
                lambda t: None if t is None else t[start:stop], batch))
            weights.append(weight * (stop - start) / size)
    return batches, weights
