"""gradmon.measure.moments against numpy on the same tensors, on every Keras backend
(`tf.IndexedSlices`, TensorFlow's sparse gradients, only on TensorFlow)."""

import keras
import numpy as np
import pytest

from gradmon.measure import moments as stats


def tensor(array):
    return keras.ops.convert_to_tensor(array)


def numpy_of(x):
    return keras.ops.convert_to_numpy(x)


def numpy_row(g):
    g = np.asarray(g, dtype=np.float64)
    return [
        np.sqrt(np.sum(g**2)),
        np.max(np.abs(g)) if g.size else 0.0,
        np.sqrt(np.mean(g**2)),
        np.mean(g == 0),
        np.sum(~np.isfinite(g)),
    ]


def finalize_one(t):
    return numpy_of(stats.finalize(stats.grouped_moments([t], [0], 1)))[0]


@pytest.mark.parametrize("shape", [(7,), (3, 4), (2, 3, 5), ()])
def test_moments_match_numpy(shape):
    rng = np.random.default_rng(1)
    g = rng.normal(size=shape).astype(np.float32)
    if g.size > 2:
        g.flat[::3] = 0.0
    np.testing.assert_allclose(finalize_one(tensor(g)), numpy_row(g), rtol=1e-5, atol=1e-7)


def test_nonfinite_entries_are_counted_and_poison_the_norm():
    g = np.array([1.0, np.nan, np.inf, -2.0, 0.0], dtype=np.float32)
    row = finalize_one(tensor(g))
    assert np.isnan(row[0])
    assert row[4] == 2
    assert row[3] == pytest.approx(0.2)


@pytest.mark.tensorflow_only
def test_indexed_slices_with_repeated_indices_equal_the_dense_gradient():
    import tensorflow as tf

    rng = np.random.default_rng(2)
    values = rng.normal(size=(6, 4)).astype(np.float32)
    indices = np.array([3, 1, 3, 7, 1, 3])
    dense = np.zeros((10, 4), np.float32)
    np.add.at(dense, indices, values)
    slices = tf.IndexedSlices(tf.constant(values), tf.constant(indices), tf.constant([10, 4]))
    np.testing.assert_allclose(finalize_one(slices), numpy_row(dense), rtol=1e-5)
    assert float(stats.global_norm([slices])) == pytest.approx(np.linalg.norm(dense), rel=1e-6)


def test_group_moments_equal_stats_of_the_concatenation():
    rng = np.random.default_rng(3)
    tensors = [rng.normal(size=s).astype(np.float32) for s in [(4, 3), (3,), (5,), (2, 2)]]
    tensors[1][0] = 0.0
    ids = [0, 0, 1, 1]
    grouped = numpy_of(stats.finalize(stats.grouped_moments([tensor(t) for t in tensors], ids, 2)))
    for gid in (0, 1):
        flat = np.concatenate([t.ravel() for t, i in zip(tensors, ids) if i == gid])
        np.testing.assert_allclose(grouped[gid], numpy_row(flat), rtol=1e-5)


def test_global_norm_skips_none():
    a, b = np.ones((2, 2), np.float32), np.full((3,), 2.0, np.float32)
    expected = np.sqrt(np.sum(a**2) + np.sum(b**2))
    assert float(stats.global_norm([tensor(a), None, tensor(b)])) == pytest.approx(expected)
    assert float(stats.global_norm([None])) == 0.0


@pytest.mark.tensorflow_only
def test_moments_of_one_tensor_grouped_equal_numpy():
    """TensorFlow's per-tensor `moments` rows, combined by `group_moments`."""
    import tensorflow as tf

    rng = np.random.default_rng(3)
    tensors = [rng.normal(size=s).astype(np.float32) for s in [(4, 3), (3,), (5,), (2, 2)]]
    ids = [0, 1, 1, 0]
    rows = tf.stack([stats.moments(tf.constant(t)) for t in tensors])
    grouped = stats.finalize(stats.group_moments(rows, ids, 2)).numpy()
    for gid in (0, 1):
        flat = np.concatenate([t.ravel() for t, i in zip(tensors, ids) if i == gid])
        np.testing.assert_allclose(grouped[gid], numpy_row(flat), rtol=1e-5)


def test_grouped_squared_norms_and_nonfinite_counts():
    rng = np.random.default_rng(6)
    tensors = [rng.normal(size=(3, 2)).astype(np.float32), None, np.array([np.nan, 1.0, np.inf], np.float32)]
    got = numpy_of(stats.grouped_squared_norms([tensor(tensors[0]), None], [1, 0], 2))
    np.testing.assert_allclose(got, [0.0, np.sum(tensors[0].astype(np.float64) ** 2)], rtol=1e-6)
    assert float(stats.count_nonfinite([None if t is None else tensor(t) for t in tensors],
                                       tensor(np.float32(np.nan)))) == 2


@pytest.mark.tensorflow_only
def test_grouped_moments_mix_dense_sparse_and_none():
    import tensorflow as tf

    rng = np.random.default_rng(4)
    dense = [rng.normal(size=(3, 2)).astype(np.float32), np.zeros((4,), np.float32), rng.normal(size=(5,)).astype(np.float32)]
    values = rng.normal(size=(3, 2)).astype(np.float32)
    indices = np.array([0, 2, 0])
    sparse_dense = np.zeros((4, 2), np.float32)
    np.add.at(sparse_dense, indices, values)
    slices = tf.IndexedSlices(tf.constant(values), tf.constant(indices), tf.constant([4, 2]))
    tensors = [tf.constant(dense[0]), slices, None, tf.constant(dense[1]), tf.constant(dense[2])]
    ids = [0, 0, 1, 2, 2]
    got = stats.finalize(stats.grouped_moments(tensors, ids, 3)).numpy()
    np.testing.assert_allclose(got[0], numpy_row(np.concatenate([dense[0].ravel(), sparse_dense.ravel()])), rtol=1e-5)
    np.testing.assert_allclose(got[1], [0, 0, 0, 0, 0])
    np.testing.assert_allclose(got[2], numpy_row(np.concatenate([dense[1], dense[2]])), rtol=1e-5)
