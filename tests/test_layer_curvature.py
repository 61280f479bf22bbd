"""Per-layer curvature against explicit Hessian blocks.

The reference is independent of the code under test: the loss is written out
with TensorFlow ops from `model(x, training=False)`, the full Hessian is
`tape.jacobian` of the flat gradient (`helpers.explicit_hessian`), each
layer's block is sliced from it by the layer's variable sizes, and its top
eigenvalue comes from `numpy.linalg.eigvalsh` in float64.
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradmon
from gradmon.hessian import vectors as hessian_vectors
from gradmon import hessian, tags
from gradmon.hessian import per_layer as layer_curvature
from gradmon.tags import group_names
from helpers import bn_dropout_net, explicit_hessian, read_descriptions, read_events

pytestmark = pytest.mark.tensorflow_only  # needs TensorFlow: skipped whole under JAX/PyTorch (conftest.py)


def read_runs(logdir, reader=read_events):
    """`reader` merged over `logdir` and its runs below it (per-layer series have a run each)."""
    merged = {}
    for directory, _, _ in sorted(os.walk(logdir)):
        for tag, value in reader(directory).items():
            merged.setdefault(tag, value)
    return merged

RNG = np.random.default_rng(4)
X = RNG.normal(size=(32, 4)).astype(np.float32)
Y = RNG.normal(size=(32, 2)).astype(np.float32)


def mse(model, x, y):
    return tf.reduce_mean(tf.square(model(x, training=False) - y))


def mlp(optimizer="sgd"):
    """Three layers with kernel and bias (15 + 12 + 10 = 37 parameters); the middle one without bias."""
    keras.utils.set_random_seed(2)
    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(3, activation="tanh", name="first"),
        keras.layers.Dense(4, activation="tanh", use_bias=False, name="middle"),
        keras.layers.Dense(2, name="last"),
    ], name="mlp")
    model.compile(optimizer=optimizer, loss="mse")
    return model


def explicit_blocks(model, x, y):
    """{layer name: (top eigenvalue, its eigenvector)} of each layer's block of the explicit Hessian."""
    full = explicit_hessian(model, mse, x, y)
    out, start = {}, 0
    for layer in model.layers:
        size = sum(int(np.prod(v.shape)) for v in layer.trainable_variables)
        values, vectors = np.linalg.eigh(full[start:start + size, start:start + size])
        out[layer.name] = (values[-1], vectors[:, -1])
        start += size
    assert start == full.shape[0]  # the layers' variables tile model.trainable_variables in order
    return out


def by_layer(result):
    """Keys `<model>/<layer>` of gradmon (the per-layer gradient tags' names) by bare layer name."""
    return {name.rsplit("/", 1)[-1]: value for name, value in result.items()}


@pytest.mark.parametrize("hvp_mode", hessian.HVP_MODES)
def test_layer_spectrum_matches_explicit_blocks(hvp_mode):
    model = mlp()
    spectra = layer_curvature.layer_spectrum(model, (X, Y), tol=1e-6, seed=0, hvp_mode=hvp_mode)
    # the names are those of the per-layer gradient tags, in layer order
    assert list(spectra) == group_names(model.trainable_variables, "layer")[0]
    expected = explicit_blocks(model, X, Y)
    spectra = by_layer(spectra)
    assert list(spectra) == ["first", "middle", "last"]
    for name, (value, vector) in expected.items():
        spec = spectra[name]
        assert spec.eigenvalues[0] == pytest.approx(value, rel=1e-4), name
        assert spec.residuals[0] <= 1e-5 * abs(value)
        assert spec.converged
        # the block spans every variable of the layer: kernel and bias together
        assert abs(spec.eigenvectors[0] @ vector) == pytest.approx(1.0, abs=1e-3), name
    kernel_size = 4 * 3
    assert np.linalg.norm(expected["first"][1][kernel_size:]) > 1e-2  # the bias part matters
    # a block's top eigenvalue is at most the sharpness (Cauchy interlacing), and differs by layer
    sharpness = np.linalg.eigvalsh(explicit_hessian(model, mse, X, Y))[-1]
    assert max(v for v, _ in expected.values()) <= sharpness + 1e-9


def test_operators_reused_with_a_subset_of_layers_and_warm_starts():
    model = mlp()
    names = list(layer_curvature.layer_variables(model))
    operators = layer_curvature.layer_operators(model, (X, Y), layers=[names[2], names[0]])
    assert list(operators) == [names[0], names[2]]  # layer order
    assert [op.num_params for op in operators.values()] == [15, 10]
    cold = layer_curvature.layer_spectrum(operators, tol=1e-6, seed=1)
    warm = layer_curvature.layer_spectrum(operators, tol=1e-6, init_vectors=cold)
    expected = explicit_blocks(model, X, Y)
    for name in operators:
        assert warm[name].hvp_count < cold[name].hvp_count
        assert warm[name].eigenvalues[0] == pytest.approx(expected[name.rsplit("/", 1)[-1]][0], rel=1e-4)
    assert all(op.count == cold[n].hvp_count + warm[n].hvp_count for n, op in operators.items())
    assert all(op.trace_count == 1 for op in operators.values())


def test_block_hvp_is_a_smaller_graph_than_the_full_hvp():
    """Only the layer's variables are differentiated: the backward passes stop at the layer."""
    model = mlp()
    full = hessian.make_hvp(model, (X, Y))
    operators = layer_curvature.layer_operators(model, (X, Y))
    matmuls = {}  # the products are the cost of an MLP's HVP
    for name, op in [("full", full)] + list(operators.items()):
        op(np.ones(op.num_params))
        graph = op._products[0].graph
        matmuls[name] = sum(o.type == "MatMul" for o in graph.get_operations())
    first, middle, last = (matmuls[n] for n in operators)
    assert last < middle < first < matmuls["full"]
    # and the block HVP is the full HVP's block: H v restricted to the layer, for v inside the layer
    v = np.zeros(full.num_params)
    v[15:27] = RNG.normal(size=12)  # the middle layer's kernel
    middle_op = list(operators.values())[1]
    np.testing.assert_allclose(middle_op(v[15:27]), full(v)[15:27], rtol=1e-5, atol=1e-7)


def test_monitor_writes_per_layer_curvature(tmp_path):
    model = mlp()
    cb = gradmon.HessianMonitor(str(tmp_path), data=(X, Y), every_n_steps=4, tol=1e-6, per_layer=True,
                                gradient_overlap=False)
    model.fit(X, Y, batch_size=4, epochs=1, shuffle=False, verbose=0, callbacks=[cb])  # 8 steps
    logdir = os.path.join(str(tmp_path), "train")
    events = read_runs(logdir)
    expected = explicit_blocks(model, X, Y)  # the probe at step 8 saw the final weights
    names = group_names(model.trainable_variables, "layer")[0]
    for name in names:
        written = events[tags.layer_eigenvalue(name)]
        assert sorted(written) == [4, 8]
        assert written[8] == pytest.approx(expected[name.rsplit("/", 1)[-1]][0], rel=1e-4)
        assert events[tags.layer_residual(name)][8] <= 1e-5 * abs(written[8])
    assert tags.layer_eigenvalue(names[0]) == "hessian/layer/eigenvalue_1/mlp/first"
    descriptions = read_runs(logdir, read_descriptions)
    assert "layer `mlp/first`" in descriptions[tags.layer_eigenvalue(names[0])]
    assert descriptions[tags.layer_residual(names[0])]


def test_per_layer_is_opt_in(tmp_path):
    model = mlp()
    cb = gradmon.HessianMonitor(str(tmp_path), data=(X, Y), every_n_steps=1000)
    assert cb.per_layer is False
    cb.set_model(model)
    cb.on_train_begin()
    written = cb.probe(1)
    cb.on_train_end()
    assert written and not any(tag.startswith("hessian/layer/") for tag in written)


def test_each_layer_traced_once_and_every_hvp_counted(tmp_path, hvp_counter):
    """Two fits, two probes each: one operator per layer per fit, each layer's HVP traced once in all."""
    built, applied = hvp_counter
    model = mlp()  # SGD: no preconditioned spectrum, every HVP is a plain operator's
    cb = gradmon.HessianMonitor(str(tmp_path), data=(X, Y), every_n_steps=4, per_layer=True,
                                gradient_overlap=False)
    for _ in range(2):
        model.fit(X, Y, batch_size=4, epochs=1, shuffle=False, verbose=0, callbacks=[cb])
    assert len(built) == 2 * (1 + 3)
    assert [op.trace_count for op in built] == [1] * 8
    events = read_events(os.path.join(str(tmp_path), "train"))
    assert sorted(events[tags.HESSIAN_HVP_COUNT]) == [4, 8, 12, 16]
    assert sum(events[tags.HESSIAN_HVP_COUNT].values()) == len(applied) == sum(op.count for op in built)


def bn_dropout_model():
    model = bn_dropout_net(2)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    return model


def test_per_layer_probing_changes_nothing(tmp_path):
    """Weights, BatchNorm statistics, Dropout's RNG state and Adam's slots end as without the probe."""
    finals = []
    for with_probe in (False, True):
        model = bn_dropout_model()
        keras.utils.set_random_seed(9)
        callbacks = [gradmon.HessianMonitor(str(tmp_path), data=(X, Y), every_n_steps=2,
                                            per_layer=True)] if with_probe else []
        model.fit(X, Y, batch_size=8, epochs=2, verbose=0, callbacks=callbacks)
        finals.append([v.numpy() for v in model.variables] + [v.numpy() for v in model.optimizer.variables])
    assert any("seed_generator" in v.path for v in model.variables)
    assert len(finals[0]) == len(finals[1])
    for a, b in zip(*finals):
        np.testing.assert_array_equal(a, b)
    events = read_runs(os.path.join(str(tmp_path), "train"))
    bn = [t for t in events if t.startswith(tags.LAYER_EIGENVALUE_PREFIX) and "batch_normalization" in t]
    assert len(bn) == 1 and len(events[bn[0]]) == 4  # gamma and beta: one block, probed at steps 2..8


@pytest.mark.parametrize("per_layer", ["yes", 1, [], [3], None])
def test_bad_per_layer(tmp_path, per_layer):
    with pytest.raises(ValueError, match=r"Invalid value for argument `per_layer`\..*Received: per_layer="):
        gradmon.HessianMonitor(str(tmp_path), data=(X, Y), per_layer=per_layer)


def test_unknown_layer_fails_before_training(tmp_path):
    model = mlp()
    cb = gradmon.HessianMonitor(str(tmp_path), data=(X, Y), per_layer=["mlp/nope"])
    with pytest.raises(ValueError, match=r"argument `per_layer`.*mlp/first.*Received: "
                                         r"per_layer=\('mlp/nope',\)"):
        model.fit(X, Y, verbose=0, callbacks=[cb])
    assert int(model.optimizer.iterations) == 0


def test_bad_layer_spectrum_arguments():
    model = mlp()
    with pytest.raises(ValueError, match=r"argument `layers`.*Received: layers=\['first'\]"):
        layer_curvature.layer_spectrum(model, (X, Y), layers=["first"])  # names are <model>/<layer>
    with pytest.raises(ValueError, match=r"argument `data`.*Received: data=None"):
        layer_curvature.layer_spectrum(model)
    operators = layer_curvature.layer_operators(model, (X, Y))
    with pytest.raises(ValueError, match=r"argument `data`"):
        layer_curvature.layer_spectrum(operators, (X, Y))
    with pytest.raises(ValueError, match=r"argument `init_vectors`"):
        layer_curvature.layer_spectrum(operators, init_vectors=[1.0])
    with pytest.raises(ValueError, match=r"argument `top_k`"):
        layer_curvature.layer_spectrum(operators, top_k=11)  # the last layer has 10 parameters
    model.trainable = False
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match=r"argument `model`. Expected a model with trainable variables"):
        layer_curvature.layer_operators(model, (X, Y))


def test_bad_block_variables():
    model, other = mlp(), mlp()
    for variables in ([], [other.trainable_variables[0]], model.trainable_variables[:1] * 2, "first"):
        with pytest.raises(ValueError, match=r"Invalid value for argument `variables`\..*Received: variables="):
            hessian.make_hvp(model, (X, Y), variables=variables)


def test_monitor_per_layer_list_probes_only_those_layers(tmp_path):
    model = mlp()
    cb = gradmon.HessianMonitor(str(tmp_path), data=(X, Y), every_n_steps=1000, tol=1e-6, per_layer=["mlp/last"])
    cb.set_model(model)
    cb.on_train_begin()
    written = cb.probe(1)
    cb.on_train_end()
    assert sorted(t for t in written if t.startswith("hessian/layer/")) == [
        tags.layer_eigenvalue("mlp/last"), tags.layer_residual("mlp/last")]
    assert written[tags.layer_eigenvalue("mlp/last")] == pytest.approx(explicit_blocks(model, X, Y)["last"][0],
                                                                      rel=1e-4)


def test_tiny_blocks_are_measured_not_lost_to_underflow():
    """Blocks of ~1e-20 (deep layers at initialisation): float32 squares underflow; eigenvalues stay exact."""
    model = mlp()
    reference = explicit_blocks(model, X, Y)  # of the unscaled loss
    scale = 1e-20
    model.compile(optimizer="sgd", loss=lambda y, p: scale * tf.reduce_mean(tf.square(p - y)))
    spectra = by_layer(layer_curvature.layer_spectrum(model, (X, Y), tol=1e-6, seed=0))
    for name, (value, _) in reference.items():
        assert spectra[name].eigenvalues[0] == pytest.approx(scale * value, rel=1e-4), name
        assert 0 < spectra[name].residuals[0] <= 1e-5 * scale * value  # a residual, not an underflowed 0
    full = hessian.spectrum(model, (X, Y), tol=1e-6, seed=0)
    sharpness = np.linalg.eigvalsh(explicit_hessian(model, mse, X, Y))[-1]  # unscaled
    assert full.eigenvalues[0] == pytest.approx(scale * sharpness, rel=1e-4)


def test_lanczos_graph_functions_are_shared_by_layers_of_any_size(monkeypatch):
    """The layers' vector lengths differ; the Lanczos step's graph functions are traced once for all."""
    monkeypatch.setattr(hessian_vectors, "_LAYOUT_FUNCTIONS", {})  # none traced by earlier tests
    model = mlp()
    first, middle, _ = layer_curvature.layer_operators(model, (X, Y)).values()
    assert first.num_params != middle.num_params
    with pytest.warns(UserWarning, match="did not reach"):
        hessian.spectrum(first, tol=1e-9, max_hvps=6, seed=0)
    traced = len(hessian_vectors._LAYOUT_FUNCTIONS)
    with pytest.warns(UserWarning, match="did not reach"):
        hessian.spectrum(middle, tol=1e-9, max_hvps=6, seed=0)  # the same basis layouts, another length
    assert len(hessian_vectors._LAYOUT_FUNCTIONS) == traced


def deep_mlp(depth):
    """`depth` tanh layers of width 3 on 4 inputs, then a linear head: more layers than segments."""
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((4,))] + [
        keras.layers.Dense(3, activation="tanh", name=f"hidden{i}") for i in range(depth)
    ] + [keras.layers.Dense(2, name="head")], name=f"deep{depth}")
    model.compile(optimizer="sgd", loss="mse")
    return model


@pytest.mark.parametrize("hvp_mode", hessian.HVP_MODES)
def test_layers_sharing_a_traced_hvp_match_explicit_blocks(hvp_mode):
    """Per-layer curvature traces `LAYER_SEGMENTS` HVPs per model whatever its depth (one per layer
    was ~75 s at MobileNetV2's first probe); each layer's block, a product of its run's HVP on an
    embedded vector, is still its own diagonal block of the explicit Hessian."""
    traces = []
    for depth in (5, 9):
        model = deep_mlp(depth)
        operators = layer_curvature.layer_operators(model, (X, Y), hvp_mode=hvp_mode)
        assert len(operators) == depth + 1
        spectra = by_layer(layer_curvature.layer_spectrum(operators, tol=1e-6, seed=0))
        for name, (value, vector) in explicit_blocks(model, X, Y).items():
            assert spectra[name].eigenvalues[0] == pytest.approx(value, rel=1e-4, abs=1e-6), name
        from gradmon.hessian import operator as hessian_operator

        traces.append(sum(d.trace_count for d in hessian_operator._FUNCTION_CACHE[model].values()))
    assert traces == [layer_curvature.LAYER_SEGMENTS] * 2


def test_a_block_inside_a_wider_traced_block_is_its_own_block():
    """Scattered entries (a block whose variables are not adjacent in the wider one): products and
    gradient equal those of the block's own operator."""
    from gradmon.hessian.operator import HessianVectorProduct

    model = mlp()
    kernel0, bias0, kernel1, kernel2, bias2 = model.trainable_variables
    block = [kernel0, kernel2]
    own = hessian.make_hvp(model, (X, Y), variables=block)
    embedded = HessianVectorProduct(model, (X, Y), variables=block, _within=[kernel0, bias0, kernel1, kernel2])
    assert embedded._embedding is not None and embedded._embedding._range is None  # scattered
    v = np.random.default_rng(0).normal(size=own.num_params)
    np.testing.assert_allclose(embedded(v), own(v), rtol=1e-5, atol=1e-7)
    full = explicit_hessian(model, mse, X, Y)
    index = np.r_[0:12, 27:35]  # kernel0 (4x3), kernel2 (4x2) in the flat order
    np.testing.assert_allclose(embedded(v), full[np.ix_(index, index)] @ v, rtol=1e-4, atol=1e-6)
    loss, grad = embedded.gradient()
    np.testing.assert_allclose(grad, own.gradient()[1], rtol=1e-6)
