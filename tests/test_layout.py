"""The custom-scalars layout matches what a run recorded (no browser: regexes against the tags written).

Three runs: the demo (an MLP with every statistic, a clip chain, a penalty, the
noise scale, a Hessian monitor with trace), a small Transformer with
`HessianMonitor(top_k=2)` (no trace, no per-layer curvature) and MobileNetV2
(about 100 layers, one step). In each, every chart selects at least one
written tag, every written scalar is in a chart, per-layer series of a chart lie
in runs of their own (TensorBoard's colours), and the health report is in the
Text tab, equal to what the command line makes of the event files.
"""

import os
import re

import keras
import numpy as np
import pytest

import gradmon
from gradmon.summary import events, report
from gradmon.publish import layout
from gradmon import tags
from gradmon.publish.writer import SummaryWriter

pytestmark = pytest.mark.tensorflow_only  # needs TensorFlow: skipped whole under JAX/PyTorch (conftest.py)

def _layout_and_written(log_dir):
    writer = SummaryWriter.shared(log_dir, "train")
    written = writer.written_run()
    return writer, writer._layout, written


def _check_run(log_dir):
    """The checks every run passes; returns `(writer, layout, written, charts, judged)`."""
    writer, lay, written = _layout_and_written(log_dir)
    charts = layout.chart_tags(lay, list(written))
    empty = [key for key, selected in charts.items() if not selected]
    assert not empty, f"charts without data: {empty}"
    charted = {t for selected in charts.values() for t in selected}
    assert {t for t in written if t.startswith("hessian/")} - charted == set()  # every probe number
    # per-layer charts: one run per series, so TensorBoard gives each its colour
    for (category, title), selected in charts.items():
        if "per-layer" in title:
            runs = [writer.runs.get(t) for t in selected]
            assert None not in runs and len(set(runs)) == len(runs), (title, runs)
    # no chart mixes the stability threshold with the sharpness it bounds (1e4 vs 5 on one axis)
    for selected in charts.values():
        assert not ({tags.STABILITY_THRESHOLD} & set(selected) and
                    {tags.eigenvalue(1), tags.preconditioned_eigenvalue(1)} & set(selected))
    # the files hold the same series (the per-layer runs included): the report reads them
    on_disk = events.load_run(log_dir)
    assert set(written) <= set(on_disk)
    for tag in written:
        np.testing.assert_array_equal(on_disk[tag][0], written[tag][0])
        np.testing.assert_allclose(on_disk[tag][1], written[tag][1], rtol=0, atol=0)
    # the Text tab's report is the command line's judgement of the event files
    text = writer._reported[tags.REPORT][1]
    judged = report.health_reports(on_disk)[0] if hasattr(report, "health_reports") \
        else report.health_report(on_disk)
    assert text == report.format_markdown(judged, run=report.observer_run(on_disk, None)
                                          if hasattr(report, "observer_run") else on_disk)
    return writer, lay, written, charts, judged


def _demo_run(log_dir):
    """`gradmon.demo.run`'s monitoring (same model, transform, penalty, noise scale, statistics,
    histograms, Hessian monitor with a trace; the density is a histogram, no chart) on 64 digits:
    4 steps, not 360."""
    from gradmon import demo

    keras.utils.set_random_seed(0)
    x, y, x_val, y_val = demo.load_digits_split(0)
    model = demo.build_model()
    model.fit(x[:64], y[:64], batch_size=16, epochs=1, verbose=0, callbacks=[
        gradmon.GradientMonitor(log_dir, histogram_freq=2),
        gradmon.HessianMonitor(log_dir, data=(x_val[:32], y_val[:32]), every_n_steps=2, top_k=3,
                               trace=True, trace_samples=4)])


def test_demo_layout(tmp_path):
    log_dir = str(tmp_path / "demo")
    _demo_run(log_dir)
    writer, lay, written, charts, judged = _check_run(log_dir)
    titles = [title for _, title in charts]
    assert any("trace" in t for t in titles) and not any("per-layer top eigenvalue" in t for t in titles)
    # the demo's 6 variables: every one in the per-layer chart, each its own run
    raw = next(sel for (c, t), sel in charts.items() if t.startswith("per-layer raw gradient norm"))
    assert len(raw) == 6 and len({writer.runs[t] for t in raw}) == 6
    assert all(not c.closed for c in lay.category)  # a small model: nothing hidden
    # quantities of different scale apart: the noise scale's parts, the step counters
    for pair in ((tags.NOISE_SCALE, tags.NOISE_TRACE_COV), (tags.NOISE_GRAD_SQ, tags.NOISE_TRACE_COV),
                 (tags.SKIPPED_STEPS, tags.nonfinite_total(tags.RAW))):
        assert not any(set(pair) <= set(sel) for sel in charts.values()), pair


def _transformer():
    tokens = keras.Input((6,), dtype="int32")
    x = keras.layers.Embedding(20, 8, name="embed")(tokens)
    attended = keras.layers.MultiHeadAttention(2, 4, name="attention")(x, x)
    x = keras.layers.LayerNormalization(name="norm")(x + attended)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(tokens, keras.layers.Dense(3, name="head")(x), name="tiny_transformer")


def test_transformer_layout_without_per_layer_or_trace(tmp_path):
    log_dir = str(tmp_path / "transformer")
    keras.utils.set_random_seed(1)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 20, size=(16, 6)).astype("int32")
    y = rng.integers(0, 3, size=(16,))
    model = _transformer()
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[
        gradmon.GradientMonitor(log_dir),
        gradmon.HessianMonitor(log_dir, data=(x[:8], y[:8]), every_n_steps=2, top_k=2)])
    writer, lay, written, charts, judged = _check_run(log_dir)
    curvature = [t for c, t in charts if c.startswith("Curvature")]
    assert curvature and not any("per-layer" in t or "trace" in t for t in curvature)
    assert any("stability threshold" in t for t in curvature)  # Adam: its threshold, alone


def test_mobilenet_shows_the_layers_that_matter(tmp_path):
    import tensorflow as tf

    log_dir = str(tmp_path / "mobilenet")
    keras.utils.set_random_seed(2)
    model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=4)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 4, size=(2,))
    # one eager step of a custom loop (nothing traced: seconds, not a minute); close() writes
    # the report and the layout of the layers it finds that matter, as GradientMonitor at an epoch end
    opt = gradmon.observe(keras.optimizers.SGD(0.01), log_dir=log_dir)
    with tf.GradientTape() as tape:
        loss = keras.losses.sparse_categorical_crossentropy(y, model(x, training=True))
    opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
    opt.gradmon.close()
    writer, lay, written, charts, judged = _check_run(log_dir)
    groups = opt.gradmon.recorder.spec.groups
    assert len(groups) > 100
    prefix = tags.group_stat(tags.RAW, "norm", "")
    focus = next(sel for (c, t), sel in charts.items() if c == "Gradients" and "raw gradient norm" in t)
    every = next(sel for (c, t), sel in charts.items() if c == "Gradients: all layers" and "raw" in t)
    assert 0 < len(focus) <= layout.FOCUS_LIMIT and len(every) == len(groups)
    closed = {c.title: c.closed for c in lay.category}
    assert closed["Gradients: all layers"] and not closed["Gradients"]
    # the focus is the report's: the largest and smallest final norms are among the shown layers
    finals = {l.name: l.final_norm for l in judged.layers}
    shown = {t[len(prefix):] for t in focus}
    assert max(finals, key=finals.get) in shown and min(finals, key=finals.get) in shown
    assert len({writer.runs[t] for t in every}) == len(groups)
