"""Transforms against numpy re-implementations of the published rules, on every backend.

Run on any backend (`KERAS_BACKEND=jax|torch python -m pytest tests/test_transforms.py`): the
transforms are called on `keras.ops` tensors, eagerly and compiled (`tf.function` on TensorFlow,
`jax.jit` on JAX; PyTorch runs them eagerly, as its door does). `tf.IndexedSlices` are TensorFlow's.
"""

import keras
import numpy as np
import pytest

from gradmon.measure import transforms as T

BACKEND = keras.backend.backend()
RNG = np.random.default_rng(0)
GRADS = [RNG.normal(scale=s, size=shape).astype(np.float32)
         for s, shape in [(2.0, (5, 4)), (0.1, (4,)), (3.0, (3, 3, 2, 6)), (0.5, (6,))]]
PARAMS = [RNG.normal(size=g.shape).astype(np.float32) for g in GRADS]
PARAMS[1][:] = 0.0  # a zero-initialised bias: AGC's eps floor matters


def tensors(arrays):
    return [keras.ops.convert_to_tensor(a) for a in arrays]


def numpy(tensor):
    return keras.ops.convert_to_numpy(tensor)


def compiled(fn):
    """`fn` compiled the way the backend's train step is (PyTorch: as it is)."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.function(fn)
    if BACKEND == "jax":
        import jax

        return jax.jit(fn)
    return fn


def run(transform, compile_it):
    fn = compiled(transform) if compile_it else transform
    out, fractions = fn(tensors(GRADS), tensors(PARAMS))
    return [numpy(o) for o in out], {k: float(numpy(v)) for k, v in fractions.items()}


def np_unitwise_norm(x):
    if x.ndim <= 1:
        return np.sqrt(np.sum(x.astype(np.float64) ** 2))
    return np.sqrt(np.sum(x.astype(np.float64) ** 2, axis=tuple(range(x.ndim - 1)), keepdims=True))


def np_reference(name, arg):
    """(expected grads, expected fraction) computed with numpy."""
    g64 = [g.astype(np.float64) for g in GRADS]
    if name == "clip_by_value":
        out = [np.clip(g, -arg, arg) for g in g64]
        frac = sum(np.sum(np.abs(g) > arg) for g in g64) / sum(g.size for g in g64)
    elif name == "clip_by_norm":
        norms = [np.linalg.norm(g) for g in g64]
        out = [g * min(1.0, arg / n) for g, n in zip(g64, norms)]
        frac = np.mean([n > arg for n in norms])
    elif name == "clip_by_global_norm":
        n = np.sqrt(sum(np.sum(g**2) for g in g64))
        out = [g * min(1.0, arg / n) for g in g64]
        frac = float(n > arg)
    elif name == "adaptive_clip":
        out, clipped, units = [], 0, 0
        for g, p in zip(g64, PARAMS):
            bound = arg * np.maximum(np_unitwise_norm(p), 1e-3)
            gn = np_unitwise_norm(g)
            trig = gn > bound
            out.append(np.where(trig, g * bound / np.maximum(gn, 1e-6), g))
            clipped += np.sum(trig)
            units += np.size(gn)
        frac = clipped / units
    return out, frac


@pytest.mark.parametrize("compile_it", [False, True])
@pytest.mark.parametrize("name,arg", [
    ("clip_by_value", 1.0), ("clip_by_norm", 3.0), ("clip_by_global_norm", 5.0),
    ("clip_by_global_norm", 1e4), ("adaptive_clip", 2.0)])
def test_transform_matches_numpy(name, arg, compile_it):
    out, fractions = run(getattr(T, name)(arg), compile_it)
    expected, frac = np_reference(name, arg)
    for o, e in zip(out, expected):
        np.testing.assert_allclose(o, e, rtol=1e-5, atol=1e-7)
    assert fractions == {name: pytest.approx(frac, rel=1e-6)}
    assert 0.0 < frac < 1.0 or name == "clip_by_global_norm"


def test_clipping_bounds_hold_and_clipping_twice_equals_once():
    for t, check in [
        (T.clip_by_norm(1.5), lambda out: all(np.linalg.norm(o) <= 1.5 * (1 + 1e-6) for o in out)),
        (T.clip_by_global_norm(2.0),
         lambda out: np.sqrt(sum(np.sum(o.astype(np.float64) ** 2) for o in out)) <= 2.0 * (1 + 1e-6)),
        (T.clip_by_value(0.3), lambda out: all(np.max(np.abs(o)) <= 0.3 for o in out)),
    ]:
        once, _ = t(tensors(GRADS), PARAMS)
        assert check([numpy(o) for o in once])
        twice, _ = t(once, PARAMS)
        for a, b in zip(once, twice):
            np.testing.assert_allclose(numpy(a), numpy(b), rtol=1e-6)


def test_chain_composes_and_reports_each_member():
    t = T.chain(T.clip_by_value(1.0), T.clip_by_global_norm(2.0), T.clip_by_value(0.5))
    out, fractions = run(t, compile_it=True)  # a dict out of jax.jit has its keys sorted
    names = ["clip_by_value", "clip_by_global_norm", "clip_by_value_2"]
    assert t.fraction_names() == names and sorted(fractions) == sorted(names)
    assert list(t(tensors(GRADS), PARAMS)[1]) == names  # in the members' order
    g = [np.clip(x.astype(np.float64), -1, 1) for x in GRADS]
    n = np.sqrt(sum(np.sum(x**2) for x in g))
    g = [x * min(1, 2.0 / n) for x in g]
    g = [np.clip(x, -0.5, 0.5) for x in g]
    for o, e in zip(out, g):
        np.testing.assert_allclose(o, e, rtol=1e-5, atol=1e-7)


def test_none_gradients_pass_through():
    for t in [T.clip_by_value(1.0), T.clip_by_norm(1.0), T.clip_by_global_norm(1.0), T.adaptive_clip(0.1)]:
        out, _ = t([None, keras.ops.convert_to_tensor(GRADS[0])], [PARAMS[1], PARAMS[0]])
        assert out[0] is None and out[1].shape == GRADS[0].shape


@pytest.mark.tensorflow_only
def test_indexed_slices_are_clipped_without_densifying():
    import tensorflow as tf

    slices = tf.IndexedSlices(tf.constant([[3.0, 4.0], [3.0, 4.0]]), tf.constant([1, 1]), tf.constant([5, 2]))
    out, frac = T.clip_by_norm(5.0)([slices], [tf.zeros([5, 2])])
    assert isinstance(out[0], tf.IndexedSlices)
    # dense gradient row 1 = [6, 8], norm 10 -> scaled by 1/2
    np.testing.assert_allclose(tf.convert_to_tensor(out[0]).numpy()[1], [3.0, 4.0], rtol=1e-6)
    assert float(frac["clip_by_norm"]) == 1.0


@pytest.mark.parametrize("factory,arg", [
    (T.clip_by_value, "limit"), (T.clip_by_norm, "max_norm"),
    (T.clip_by_global_norm, "max_norm"), (T.adaptive_clip, "clip_factor")])
@pytest.mark.parametrize("bad", [-1.0, 0, float("nan"), "1", None])
def test_invalid_arguments_name_the_argument(factory, arg, bad):
    with pytest.raises(ValueError, match=rf"`{arg}`.*Received: {arg}={bad!r}"):
        factory(bad)


def test_non_callable_transform_is_rejected():
    with pytest.raises(ValueError, match="Received: transforms=42"):
        T.chain(T.clip_by_value(1.0), 42)
    with pytest.raises(ValueError, match="`transform`.*Received: transform='clip'"):
        T.as_transform("clip")


def test_serialization_round_trip():
    t = T.chain(T.clip_by_value(5.0), T.adaptive_clip(0.01, eps=1e-2), T.clip_by_global_norm(1.0))
    back = T.deserialize(T.serialize(t))
    assert T.serialize(back) == T.serialize(t)
    with pytest.raises(ValueError, match="config"):
        T.deserialize({"class_name": "nope", "config": {}})


def test_from_optimizer_mirrors_keras_clipping():
    assert T.from_optimizer(keras.optimizers.SGD()) is None
    assert T.serialize(T.from_optimizer(keras.optimizers.SGD(clipnorm=2.0))) == T.serialize(T.clip_by_norm(2.0))
    assert T.serialize(T.from_optimizer(keras.optimizers.Adam(global_clipnorm=1.0))) == T.serialize(
        T.clip_by_global_norm(1.0))
    assert T.serialize(T.from_optimizer(keras.optimizers.SGD(clipvalue=0.5))) == T.serialize(T.clip_by_value(0.5))


def halve_large(grads, params):
    """A user transform written in `keras.ops`: halves the entries above 1 in absolute value."""
    return [keras.ops.where(keras.ops.abs(g) > 1.0, g * 0.5, g) for g in grads]


@pytest.mark.parametrize("compile_it", [False, True])
def test_a_keras_ops_callable_reports_its_share_of_changed_entries(compile_it):
    out, fractions = run(T.as_transform(halve_large), compile_it)
    over = [np.abs(g) > 1.0 for g in GRADS]
    for o, g, h in zip(out, GRADS, over):
        np.testing.assert_array_equal(o, np.where(h, g * 0.5, g))
    share = sum(h.sum() for h in over) / sum(g.size for g in GRADS)
    assert fractions == {"halve_large": pytest.approx(share, rel=1e-6)} and 0 < share < 1
