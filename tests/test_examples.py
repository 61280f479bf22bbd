"""Smoke tests of examples/: each runs tiny in a subprocess, exits 0 and writes gradmon's tags.

`examples/custom_loop.py` and `examples/wgan_gp.py` also run under JAX and PyTorch: this module
runs on every backend (the TensorFlow-only tests are marked), so the JAX and PyTorch suites run
them in their own TensorFlow-free environments; they write the tags TensorFlow writes, and
custom_loop's first logged step equals a NumPy computation of the gradient from the backend's own
initial weights (the penalty's double-backprop term included). From the TensorFlow suite,
`test_backend_in_subprocess` runs them under JAX and PyTorch (`helpers.runs_from_the_tensorflow_suite`:
skipped where an interpreter is absent, and under `make test`, which runs those suites itself).
"""

import importlib.util
import math
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
from helpers import finish_module_run, global_norm, read_events, runs_from_the_tensorflow_suite

from gradmon import tags

BACKEND = keras.backend.backend()
EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def run_example(name, *args):
    """`examples/<name>` run by this interpreter on the suite's backend; its stdout."""
    env = dict(os.environ, KERAS_BACKEND=BACKEND, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], cwd=EXAMPLES.parent, env=env,
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, f"{name} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def last(values):
    return values[max(values)]


def table_row(text, variable):
    """The cells of `variable`'s row in the first gradient-check table after `text`."""
    row = next(line for line in text.splitlines() if line.split()[:1] == [variable])
    return row.split()


@pytest.mark.tensorflow_only
def test_seed_1_custom_loss_gradient():
    """The correct manual gradient passes; the article's (summed over the examples, the 1/n of
    the mean missing) is flagged for w and b, its errors those numpy computes for the sum."""
    out = run_example("seed_1_custom_loss_gradient.py")  # exits 0 only if its own checks pass
    correct, article = out.split("The same check with the article's manual gradient")
    assert "correct manual gradient: passed" in correct
    assert [table_row(correct, v)[-1] for v in ("w", "b")] == ["ok", "ok"]
    assert "Gradients disagree for w, b:" in article and "flagged for w and b" in article
    # independent: the example's data, the gradient of the mean and the article's sum, by numpy
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 3))
    w = 0.5 * rng.standard_normal(3)
    s = 1.0 / (1.0 + np.exp(-(x @ w + 0.1)))
    mean = {"w": (s[:, None] * x).mean(axis=0), "b": np.array([s.mean()])}
    summed = {"w": (s[:, None] * x).sum(axis=0), "b": np.array([s.sum()])}
    for v in ("w", "b"):
        cells = table_row(article, v)
        abs_err, rel_err = float(cells[-3]), float(cells[-2])
        assert cells[-1] == "FAIL"
        assert abs_err == pytest.approx(np.max(np.abs(summed[v] - mean[v])), rel=5e-3)
        assert rel_err == pytest.approx(1 - 1 / 32, rel=5e-3)


@pytest.mark.tensorflow_only
def test_the_seed_recipes_errors_the_docs_name():
    """examples/README.md and the seed docstrings say why the article's recipes did not run;
    each named error is what TensorFlow / Keras raise (the article's text is not in the repo)."""
    import tensorflow as tf

    with pytest.raises(TypeError, match="abs_tolerance"):  # recipe 1: the argument is `atol`
        tf.debugging.assert_near(1.0, 1.0, abs_tolerance=1e-6)
    v = tf.Variable(1.0)
    with tf.GradientTape() as tape:  # recipe 3: one non-persistent tape, two gradients
        y = v * v
    tape.gradient(y, v)
    with pytest.raises(RuntimeError, match="non-persistent"):
        tape.gradient(y, v)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError)):  # recipe 3: tf.abs of a list
        tf.abs([tf.ones((2, 3)), tf.ones(3)])
    with pytest.raises(ValueError, match="same shape"):  # recipe 2: 10 outputs, 2-wide targets
        keras.losses.CategoricalCrossentropy()(tf.ones((4, 2)), tf.ones((4, 10)) / 10)


@pytest.mark.tensorflow_only
def test_seed_2_clipping(tmp_path):
    out = run_example("seed_2_clipping.py", "--log-dir", str(tmp_path), "--epochs", "1")
    assert "clip ratio" in out and f"tensorboard --logdir {tmp_path}" in out
    events = read_events(tmp_path / "train")
    expected = [
        tags.CLIP_RATIO, tags.CLIP_FRACTION,
        tags.clip_fraction_of("clip_by_value"), tags.clip_fraction_of("clip_by_global_norm"),
        tags.global_norm(tags.RAW), tags.global_norm(tags.TRANSFORMED),
    ]
    assert not [t for t in expected if t not in events], sorted(events)
    for kind in (tags.RAW, tags.TRANSFORMED):  # per layer or variable (gradmon's grouping)
        assert any(t.startswith(tags.histogram(kind, "digits_mlp/hidden")) for t in events), sorted(events)
    assert len(events[tags.CLIP_RATIO]) == 45  # one epoch of 1437 training examples, batch 32
    assert all(0 < r <= 1 + 1e-6 for r in events[tags.CLIP_RATIO].values())
    for member in ("clip_by_value", "clip_by_global_norm"):
        fractions = events[tags.clip_fraction_of(member)].values()
        assert all(0 <= f <= 1 for f in fractions) and max(fractions) > 0, member


@pytest.mark.tensorflow_only
def test_seed_3_gradient_penalty(tmp_path):
    out = run_example("seed_3_gradient_penalty.py", "--log-dir", str(tmp_path), "--epochs", "1")
    assert "loss/total" in out
    events = read_events(tmp_path / "train")
    expected = [tags.LOSS_DATA, tags.LOSS_TOTAL]
    for name in ("grad_norm", "weight"):
        expected += [tags.penalty(name), tags.penalty_share(name), tags.penalty_grad_norm(name)]
    assert not [t for t in expected if t not in events], sorted(events)
    data, total = last(events[tags.LOSS_DATA]), last(events[tags.LOSS_TOTAL])
    penalties = last(events[tags.penalty("grad_norm")]) + last(events[tags.penalty("weight")])
    assert total == pytest.approx(data + penalties, rel=1e-5)
    assert 0 < last(events[tags.penalty_share("grad_norm")]) < 1
    assert last(events[tags.penalty_grad_norm("grad_norm")]) > 0


def test_wgan_gp(tmp_path):
    """TensorFlow's `fit` with a custom train_step; JAX's jitted and PyTorch's eager loops write
    the same tags at the same steps, with the same relations between them."""
    out = run_example("wgan_gp.py", "--log-dir", str(tmp_path), "--epochs", "1", "--steps", "4",
                      "--update-freq", "1")
    assert "finite: True" in out
    events = read_events(tmp_path / "train")  # both optimizers in one run, tags prefixed
    critic, generator = (lambda t: tags.prefixed("critic", t)), (lambda t: tags.prefixed("generator", t))
    critic_steps = list(range(1, 21))  # 4 generator steps x 5 critic updates, each observed
    expected = {
        critic(tags.global_norm(tags.RAW)): critic_steps,
        generator(tags.global_norm(tags.RAW)): [1, 2, 3, 4],
        generator(tags.global_norm(tags.TRANSFORMED)): [1, 2, 3, 4],
        generator(tags.CLIP_RATIO): [1, 2, 3, 4],
        generator(tags.CLIP_FRACTION): [1, 2, 3, 4],
        "generator/loss": [1, 2, 3, 4],
        # the train step's own numbers, at the critic's step (its last update of each step)
        "critic/wasserstein": [5, 10, 15, 20],
        critic(tags.penalty("wgan_gp")): [5, 10, 15, 20],
        "critic/loss": [5, 10, 15, 20],
    }
    # the output layer's gradient norm, per layer or per variable as gradmon's grouping defaults
    for prefix, steps in ((critic, critic_steps), (generator, [1, 2, 3, 4])):
        # the model is named like its optimizer: the label leaves the name out (critic/.../norm/out;
        # before issue 16 it repeated it: critic/.../norm/critic/out)
        start = prefix(tags.group_stat(tags.RAW, "norm", "out"))
        norms = [t for t in events if t.startswith(start)]
        assert norms, sorted(events)
        assert sorted(events[norms[0]]) == steps, norms[0]
    missing = [t for t in expected if t not in events]
    assert not missing, (missing, sorted(events))
    for tag, steps in expected.items():
        assert sorted(events[tag]) == steps, tag
        assert all(math.isfinite(v) for v in events[tag].values()), tag
    assert not [t for t in events if t.startswith("gradients/")]  # nothing unprefixed
    assert critic(tags.CLIP_RATIO) not in events  # only the generator's observer clips
    for step in range(1, 5):
        raw = events[generator(tags.global_norm(tags.RAW))][step]
        clipped = events[generator(tags.global_norm(tags.TRANSFORMED))][step]
        assert clipped == pytest.approx(min(raw, 1.0), rel=1e-5)
        assert events[generator(tags.CLIP_RATIO)][step] == pytest.approx(clipped / raw, rel=1e-5)
    for step in (5, 10, 15, 20):
        expected_loss = events[critic(tags.penalty("wgan_gp"))][step] - events["critic/wasserstein"][step]
        assert events["critic/loss"][step] == pytest.approx(expected_loss, rel=1e-5, abs=1e-6)
    assert all(v >= 0 for v in events[critic(tags.penalty("wgan_gp"))].values())
    # `gradmon summary` reads the run: one section per optimizer, its layers as rows
    from gradmon.summary import report
    reps = report.health_reports(report.load_run(str(tmp_path)))
    assert [(r.name, r.summary.logged_steps) for r in reps] == [("critic", 20), ("generator", 4)]
    for rep in reps:
        assert [l.name for l in rep.layers] == ["hidden_1", "hidden_2", "out"], rep.name
        norms = events[tags.prefixed(rep.name, tags.group_stat(tags.RAW, "norm", "out"))]
        assert rep.layers[-1].final_norm == pytest.approx(norms[max(norms)])


@pytest.mark.tensorflow_only
def test_edge_of_stability(tmp_path):
    out = run_example("edge_of_stability.py", "--log-dir", str(tmp_path), "--steps", "40",
                      "--probe-every", "10")
    assert "the edge of stability is lambda_1 = 2/lr = 10.00" in out
    events = read_events(tmp_path / "train")
    for tag in (tags.EDGE_OF_STABILITY, tags.eigenvalue(1), tags.global_norm(tags.RAW)):
        assert sorted(events.get(tag, {})) == [10, 20, 30, 40], (tag, sorted(events))
    for step, ratio in events[tags.EDGE_OF_STABILITY].items():  # lambda_1 * lr / 2, lr = 0.2
        assert ratio == pytest.approx(events[tags.eigenvalue(1)][step] * 0.1, rel=1e-5)
        assert 0.5 < ratio < 1.5  # starts near the edge (the initial sharpness is ~9.9)


@pytest.mark.tensorflow_only
def test_adam_edge_of_stability(tmp_path):
    out = run_example("adam_edge_of_stability.py", "--log-dir", str(tmp_path), "--steps", "30",
                      "--probe-every", "10", "--examples", "200")
    assert "Adam's edge of stability is lambda_1(P^-1 H) = (2 + 2 beta_1) / ((1 - beta_1) lr) = 38000" in out
    events = read_events(tmp_path / "train")
    for tag in (tags.EDGE_OF_STABILITY, tags.GD_EDGE_OF_STABILITY, tags.STABILITY_THRESHOLD,
                tags.eigenvalue(1), tags.preconditioned_eigenvalue(1), tags.GRADIENT_OVERLAP):
        assert sorted(events.get(tag, {})) == [10, 20, 30], (tag, sorted(events))
    for step in (10, 20, 30):  # lr = 1e-3: Adam's threshold is 38 / lr on lambda_1(P^-1 H)
        assert events[tags.STABILITY_THRESHOLD][step] == pytest.approx(38000.0, rel=1e-6)
        pre, plain = events[tags.preconditioned_eigenvalue(1)][step], events[tags.eigenvalue(1)][step]
        assert events[tags.EDGE_OF_STABILITY][step] == pytest.approx(pre / 38000.0, rel=1e-5)
        assert events[tags.GD_EDGE_OF_STABILITY][step] == pytest.approx(plain * 5e-4, rel=1e-5)
        # Adam's P is far below 1 (sqrt(v) ~ |g| << 1): the preconditioned sharpness is the larger
        assert pre > 100 * plain and events[tags.GD_EDGE_OF_STABILITY][step] < 0.01


def load_example(name):
    """The example as a module (its helpers: data, batches, model), without running main()."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def first_step_gradients(example, seed, batch_size, penalty_weight=None):
    """The gradient the example's first step applies, recomputed here with plain tapes (float64 out)."""
    import tensorflow as tf

    x, y = example.load_data()
    xb, yb = next(example.batches(x, y, batch_size, 1, seed))
    model = example.build_model(seed)
    loss_fn = keras.losses.CategoricalCrossentropy(from_logits=True)
    variables = model.trainable_variables
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            loss = loss_fn(yb, model(xb, training=True))
        grads = inner.gradient(loss, variables)
        if penalty_weight is not None:
            loss = loss + penalty_weight * tf.linalg.global_norm(grads)
    if penalty_weight is not None:
        grads = outer.gradient(loss, variables)
    return model, [g.numpy().astype(np.float64) for g in grads]


@pytest.mark.tensorflow_only
def test_custom_loop(tmp_path):
    steps, flush_every, batch_size, seed = 20, 5, 64, 0
    out = run_example("custom_loop.py", "--log-dir", str(tmp_path), "--steps", str(steps),
                      "--flush-every", str(flush_every), "--batch-size", str(batch_size))
    assert "clip_by_global_norm" in out and f"tensorboard --logdir {tmp_path}" in out
    runs = {name: read_events(tmp_path / name / "train")
            for name in ("eager", "tf_function", "clipping", "penalty")}
    raw_norm = tags.global_norm(tags.RAW)
    every_step = list(range(1, steps + 1))
    flushed = list(range(flush_every, steps + 1, flush_every))
    for name, events in runs.items():
        assert sorted(events[raw_norm]) == every_step, name  # flush() lost no step
        assert all(math.isfinite(v) for v in events[raw_norm].values()), name
        assert sorted(events[tags.LOSS_DATA]) == flushed, name

    # Recipe 1: step 1's logged norms equal a plain-tape recomputation; eager == tf.function.
    example = load_example("custom_loop")
    model, grads = first_step_gradients(example, seed, batch_size)
    for name in ("eager", "tf_function"):
        events = runs[name]
        assert events[raw_norm][1] == pytest.approx(global_norm(grads), rel=1e-5), name
        for v, g in zip(model.trainable_variables, grads):
            assert events[tags.group_stat(tags.RAW, "norm", v.path)][1] == pytest.approx(
                np.linalg.norm(g), rel=1e-5), (name, v.path)
    for step in every_step:
        assert runs["eager"][raw_norm][step] == pytest.approx(runs["tf_function"][raw_norm][step], rel=1e-4)

    # Recipe 2: the clips acted and are logged; the clipped norm never exceeds 0.5.
    assert runs["clipping"][raw_norm][1] == pytest.approx(global_norm(grads), rel=1e-5)
    assert_clipped(runs["clipping"], steps, flush_every)

    # Recipe 3: the applied gradient includes the penalty's double-backprop term.
    penalty = runs["penalty"]
    _, penalized = first_step_gradients(example, seed, batch_size, penalty_weight=0.05)
    assert penalty[raw_norm][1] == pytest.approx(global_norm(penalized), rel=1e-5)
    assert global_norm(penalized) != pytest.approx(global_norm(grads), rel=1e-3)
    assert_penalty_totals(penalty, flushed)


def assert_clipped(clipping, steps, flush_every):
    """custom_loop's clipping run: the clips' numbers at every step, the clipped norm never above
    the example's 0.5 and the ratio clipped / raw; both clips acted; the raw and clipped
    histograms every 2 * flush_every steps (the example's histogram_freq)."""
    raw_norm, every_step = tags.global_norm(tags.RAW), list(range(1, steps + 1))
    for tag in (tags.CLIP_RATIO, tags.CLIP_FRACTION, tags.global_norm(tags.TRANSFORMED),
                tags.clip_fraction_of("clip_by_value"), tags.clip_fraction_of("clip_by_global_norm")):
        assert sorted(clipping[tag]) == every_step, tag
    for step in every_step:
        raw, clipped = clipping[raw_norm][step], clipping[tags.global_norm(tags.TRANSFORMED)][step]
        assert clipped <= 0.5 * (1 + 1e-5)
        assert clipping[tags.CLIP_RATIO][step] == pytest.approx(clipped / raw, rel=1e-5)
    assert max(clipping[tags.clip_fraction_of("clip_by_value")].values()) > 0
    assert max(clipping[tags.clip_fraction_of("clip_by_global_norm")].values()) == 1
    for kind in (tags.RAW, tags.TRANSFORMED):  # per layer or variable (gradmon's grouping)
        hist = [t for t in clipping if t.startswith(tags.histogram(kind, "digits_mlp/hidden"))]
        assert hist, sorted(clipping)
        every = 2 * flush_every
        assert sorted(clipping[hist[0]]) == list(range(every, steps + 1, every)), hist[0]


def assert_penalty_totals(penalty, flushed):
    """custom_loop's penalty run: at each flushed step the total loss is the data loss plus the
    penalty, whose share lies strictly between 0 and 1."""
    for step in flushed:
        total = penalty[tags.LOSS_DATA][step] + penalty[tags.penalty("grad_norm")][step]
        assert penalty[tags.LOSS_TOTAL][step] == pytest.approx(total, rel=1e-5)
        assert 0 < penalty[tags.penalty_share("grad_norm")][step] < 1


# -- custom_loop.py on JAX and PyTorch ---------------------------------------------------------

CUSTOM_LOOP_RUNS = {"jax": ("eager", "jit", "clipping", "penalty"), "torch": ("eager", "clipping", "penalty")}


def numpy_gradients(w, x, y):
    """d mean(cross-entropy(softmax(tanh(x W1 + b1) W2 + b2), y)) / d(W1, b1, W2, b2), by hand."""
    w1, b1, w2, b2 = w
    h = np.tanh(x @ w1 + b1)
    z = h @ w2 + b2
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    dz = (p - y) / len(x)
    dh = (dz @ w2.T) * (1.0 - h ** 2)
    return [x.T @ dh, dh.sum(0), h.T @ dz, dz.sum(0)]


def numpy_penalized_gradients(w, x, y, weight, eps=1e-4):
    """The gradient of loss + weight * ||grad loss||: g + weight * H g / ||g||, the Hessian-vector
    product by central differences of the hand-written gradient (float64)."""
    g = numpy_gradients(w, x, y)
    u = [a / global_norm(g) for a in g]
    plus = numpy_gradients([a + eps * b for a, b in zip(w, u)], x, y)
    minus = numpy_gradients([a - eps * b for a, b in zip(w, u)], x, y)
    return [a + weight * (p - m) / (2 * eps) for a, p, m in zip(g, plus, minus)]


@pytest.mark.skipif(BACKEND == "tensorflow", reason="test_custom_loop is TensorFlow's")
def test_custom_loop_on_jax_and_torch(tmp_path):
    steps, flush_every, batch_size = 10, 5, 64
    out = run_example("custom_loop.py", "--log-dir", str(tmp_path / "runs"), "--steps", str(steps),
                      "--flush-every", str(flush_every))
    assert "clip_by_global_norm" in out
    runs = {name: read_events(tmp_path / "runs" / name / "train") for name in CUSTOM_LOOP_RUNS[BACKEND]}
    raw_norm = tags.global_norm(tags.RAW)
    every_step = list(range(1, steps + 1))
    for name, events in runs.items():
        assert sorted(events[raw_norm]) == every_step, name
        assert sorted(events[tags.LOSS_DATA]) == [5, 10], name

    # step 1 against NumPy, from the backend's own initial weights and the example's first batch
    example = load_example("custom_loop")
    x, y = example.load_data()
    xb, yb = (np.asarray(a, np.float64) for a in next(example.batches(x, y, batch_size, 1, 0)))
    w = [np.asarray(a, np.float64) for a in example.build_model(0).get_weights()]  # seeded initializers
    grads = numpy_gradients(w, xb, yb)
    paths = ["digits_mlp/hidden/kernel", "digits_mlp/hidden/bias", "digits_mlp/logits/kernel",
             "digits_mlp/logits/bias"]
    for name in ("eager", "jit", "clipping"):
        if name in runs:
            assert runs[name][raw_norm][1] == pytest.approx(global_norm(grads), rel=1e-5), name
    for path, g in zip(paths, grads):
        assert runs["eager"][tags.group_stat(tags.RAW, "norm", path)][1] == pytest.approx(
            np.linalg.norm(g), rel=1e-5), path
    if "jit" in runs:  # the functional loop measures what the stateful one does
        for step in every_step:
            assert runs["jit"][raw_norm][step] == pytest.approx(runs["eager"][raw_norm][step], rel=1e-4)

    assert_clipped(runs["clipping"], steps, flush_every)

    penalty = runs["penalty"]
    penalized = numpy_penalized_gradients(w, xb, yb, 0.05)
    assert penalty[raw_norm][1] == pytest.approx(global_norm(penalized), rel=1e-4)
    assert global_norm(penalized) != pytest.approx(global_norm(grads), rel=1e-3)
    assert_penalty_totals(penalty, [5, 10])


@pytest.fixture(scope="module")
def subprocess_runs():
    """This module under JAX and under PyTorch (`helpers.runs_from_the_tensorflow_suite`)."""
    yield from runs_from_the_tensorflow_suite(os.path.abspath(__file__), ["-k", "not subprocess"])


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_backend_in_subprocess(subprocess_runs, backend):
    output = finish_module_run(subprocess_runs, backend, timeout=600)  # each example in its own process
    assert "2 passed" in output.strip().splitlines()[-1], output[-2000:]  # wgan_gp and custom_loop
