"""A real TensorBoard server reads gradmon's run: tags, values at steps, descriptions, layout."""

import json
import os
import urllib.parse
import urllib.request

import keras
import numpy as np
import pytest

import gradmon
from gradmon import tags
from helpers import read_events, serve_tensorboard

pytestmark = pytest.mark.tensorflow_only  # needs TensorFlow: skipped whole under JAX/PyTorch (conftest.py)

RNG = np.random.default_rng(51)
X = RNG.normal(size=(40, 4)).astype(np.float32)
Y = RNG.normal(size=(40, 1)).astype(np.float32)


def get(port, path, **params):
    url = f"http://127.0.0.1:{port}{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def served_run(tmp_path_factory):
    logdir = str(tmp_path_factory.mktemp("tb"))
    keras.utils.set_random_seed(0)
    base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="tanh"), keras.layers.Dense(1)])
    model = gradmon.monitor(base, transform=gradmon.transforms.clip_by_global_norm(0.5),
                            penalties=[gradmon.penalties.WeightPenalty(l2=1e-3)], grouping="variable",
                            stats="all")
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    model.fit(X, Y, batch_size=8, epochs=2, verbose=0, callbacks=[
        gradmon.GradientMonitor(logdir, histogram_freq=5),
        gradmon.HessianMonitor(logdir, data=(X, Y), every_n_steps=5, top_k=2),
    ])
    def served(port):
        scalar_tags = get(port, "/data/plugin/scalars/tags").get("train", {})
        raw = get(port, "/data/plugin/scalars/scalars", run="train", tag=tags.global_norm("raw")) \
            if tags.global_norm("raw") in scalar_tags else []
        return tags.EDGE_OF_STABILITY in scalar_tags and len(raw) == 10

    with serve_tensorboard(logdir, served) as port:
        yield port, logdir, model


def test_scalars_with_descriptions_at_the_right_steps(served_run):
    port, logdir, model = served_run
    scalar_tags = get(port, "/data/plugin/scalars/tags")["train"]
    for tag in (tags.global_norm("raw"), tags.CLIP_RATIO, tags.penalty("weight"), tags.LOSS_TOTAL,
                tags.eigenvalue(1), tags.EDGE_OF_STABILITY):
        assert tag in scalar_tags
        assert scalar_tags[tag]["description"]  # TensorBoard shows it under the chart
    on_disk = read_events(os.path.join(logdir, "train"))
    served = get(port, "/data/plugin/scalars/scalars", run="train", tag=tags.global_norm("raw"))
    assert [row[1] for row in served] == list(range(1, 11))
    for _, step, value in served:
        assert value == pytest.approx(on_disk[tags.global_norm("raw")][step], rel=1e-6)
    eig = get(port, "/data/plugin/scalars/scalars", run="train", tag=tags.eigenvalue(1))
    assert [row[1] for row in eig] == [5, 10]


def test_histograms_and_custom_scalars_layout(served_run):
    port, _, model = served_run
    hist_tags = get(port, "/data/plugin/histograms/tags")["train"]
    assert tags.histogram("raw", model.trainable_variables[0].path) in hist_tags
    layout = get(port, "/data/plugin/custom_scalars/layout")
    titles = [c["title"] for c in layout["category"]]
    assert titles[:4] == ["Gradients", "Penalties", "Optimizer", "Curvature"]  # stats="all": cosines
    gradients = layout["category"][0]["chart"]
    assert gradients[0]["multiline"]["tag"] == ["^gradients/raw/global_norm$", "^gradients/transformed/global_norm$"]


# -- the layout selects issue 12's tags (no server: the regexes against the tag names) -------------


def test_layout_charts_select_every_new_tag():
    import re

    import tensorflow as tf

    from gradmon.publish.layout import build_layout, curvature_layout

    keras.utils.set_random_seed(0)
    net = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d"), keras.layers.Dense(1, name="e")])
    opt = gradmon.observe(keras.optimizers.Adam(0.01), stats="all", on_spike="warn",
                          transform=gradmon.transforms.zclip())
    opt.apply_gradients(zip([tf.ones_like(v) for v in net.trainable_variables], net.trainable_variables))
    rec = opt.gradmon.recorder
    hessian = [tags.eigenvalue(1), tags.preconditioned_eigenvalue(1), tags.preconditioned_eigenvalue(2),
               tags.preconditioned_residual(1), tags.EDGE_OF_STABILITY, tags.GD_EDGE_OF_STABILITY,
               tags.STABILITY_THRESHOLD, tags.GRADIENT_OVERLAP, tags.layer_eigenvalue("d"),
               tags.layer_residual("d")]
    charts = {}
    for layout in (build_layout(rec), curvature_layout(hessian)):
        charts.update({(c.title, ch.title): list(ch.multiline.tag) for c in layout.category for ch in c.chart})

    def charts_of(tag):
        return [key for key, regexes in charts.items() if any(re.search(r, tag) for r in regexes)]

    written = [t for ts in rec.tags.values() for t in ts]
    new = [t for t in written if t.startswith(("optimizer/", "gradients/spike/", "gradients/zclip/"))]
    d, e = rec.spec.groups  # the layers
    assert {tags.moment_norm("first_moment", d), tags.moment_norm("second_moment", e),
            tags.COSINE_UPDATE_GRADIENT, tags.COSINE_GRADIENT_FIRST_MOMENT, tags.SPIKE_ZSCORE,
            tags.SPIKE_COUNT, tags.zclip_threshold()} <= set(new)
    for tag in new + hessian + [tags.SPIKE_AT]:
        assert charts_of(tag), tag
    curvature = {title: regexes for (category, title), regexes in charts.items() if category == "Curvature"}
    pre = next(r for t, r in curvature.items() if "P^-1 H" in t)
    assert not any(re.search(r, tags.eigenvalue(1)) for r in pre)  # each chart its own series
    # the threshold (1e4) has a chart of its own, not beside the sharpness it bounds (~5)
    assert len(charts_of(tags.preconditioned_eigenvalue(1))) == 1
    assert charts_of(tags.STABILITY_THRESHOLD) != charts_of(tags.eigenvalue(1))
    spike_chart = charts_of(tags.SPIKE_ZSCORE)
    assert charts_of(tags.SPIKE_AT) == spike_chart and len(spike_chart) == 1
    assert charts_of(tags.SPIKE_COUNT) != spike_chart  # a count, not a z-score
    assert [title for _, title in charts_of(tags.layer_eigenvalue("d"))] == [
        "per-layer top eigenvalue of the Hessian block (curvature units)"]
    assert [title for _, title in charts_of(tags.moment_norm("first_moment", d))] == [
        "per-layer first moment norm (L2 of the optimizer's m)"]
    # without on_spike, no spike chart; without a trace or per-layer curvature, no such chart
    plain = gradmon.observe(keras.optimizers.SGD(0.1), stats=["cosines"])
    plain.apply_gradients(zip([tf.ones_like(v) for v in net.trainable_variables], net.trainable_variables))
    titles = [ch.title for c in build_layout(plain.gradmon.recorder).category for ch in c.chart]
    assert not any("spike" in t for t in titles) and any(t.startswith("cosines") for t in titles)
    curvature_titles = [ch.title for c in curvature_layout([tags.eigenvalue(1)]).category for ch in c.chart]
    assert curvature_titles == ["top Hessian eigenvalues (curvature: loss / weight^2)"]


# -- the health report in the Text tab ---------------------------------------------------------


def test_markdown_report_names_flags_worst_layers_spikes_and_skipped_steps():
    """A constructed run: the global norm explodes at step 40, layer `b` barely moves, spikes
    at steps 12 and 30, updates refused at steps 20 and 40 (the counter rises there)."""
    from gradmon.summary import report
    from gradmon.summary.events import Run

    steps = np.arange(1, 41)
    norm = np.ones(40)
    norm[-1] = 1e4  # 10000 x the early median: exploding
    series = {tags.global_norm("raw"): (steps, norm)}
    for layer, scale in (("net/a", 1.0), ("net/b", 1e-6)):
        series[tags.group_stat("raw", "norm", layer + "/kernel")] = (steps, norm * scale)
    series[tags.SKIPPED_STEPS] = (steps, np.where(steps >= 40, 2.0, np.where(steps >= 20, 1.0, 0.0)))
    series[tags.SPIKE_COUNT] = (steps, np.where(steps >= 30, 2.0, np.where(steps >= 12, 1.0, 0.0)))
    series[tags.SPIKE_AT] = (np.array([12, 30]), np.array([7.5, 9.0]))
    run = Run(series)
    judged = report.health_report(run)
    text = report.format_markdown(judged, run=run)
    assert text.startswith("### gradmon health report: steps 1-40 (40 logged)")
    assert "**EXPLODING** [global]" in text and "**VANISHING** [net/b]" in text
    worst = text[text.index("#### Worst layers"):text.index("#### Spikes")]
    assert "| net/b | VANISHING" in worst
    spikes = text[text.index("#### Spikes and skipped updates"):text.index("#### The full report")]
    assert "step 30 (z 9)" in spikes and "12 (z 7.5)" in spikes
    assert "at logged steps: 20, 40" in spikes
    assert report.format_table(judged) in text  # the command line's text, whole


def test_the_report_is_written_at_each_epoch_end():
    from gradmon.publish.writer import MemoryWriter

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="tanh", name="h"),
                              keras.layers.Dense(1, name="o")])
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    writer = MemoryWriter()
    model.fit(X, Y, batch_size=8, epochs=2, verbose=0, callbacks=[gradmon.GradientMonitor(writer=writer)])
    texts = writer.texts[tags.REPORT]
    assert [step for step, _ in texts] == [5, 10]  # the end of fit writes nothing new
    assert texts[0][1].startswith("### gradmon health report: steps 1-5 (5 logged)")
    assert texts[1][1].startswith("### gradmon health report: steps 1-10 (10 logged)")
    # each layer's series in its run, the same run for every statistic of the layer
    runs = {tag: run for tag, run in writer.runs.items() if tag.startswith("gradients/raw/norm/")}
    assert sorted(runs.values()) == sorted(tags.group_run(t[len("gradients/raw/norm/"):]) for t in runs)
    assert len(set(runs.values())) == 2


def test_curvature_of_many_layers_shows_the_largest_and_smallest():
    from gradmon.publish.layout import FOCUS_LIMIT, chart_tags, curvature_layout

    written = {tags.layer_eigenvalue(f"net/l{i}"): float(i) for i in range(FOCUS_LIMIT + 4)}
    written[tags.eigenvalue(1)] = 20.0
    layout = curvature_layout(written)
    charts = chart_tags(layout, list(written))
    focus = next(sel for (c, t), sel in charts.items() if c == "Curvature" and "layers that matter" in t)
    largest = [tags.layer_eigenvalue(f"net/l{i}") for i in (FOCUS_LIMIT + 3, FOCUS_LIMIT + 2, FOCUS_LIMIT + 1)]
    smallest = [tags.layer_eigenvalue(f"net/l{i}") for i in (0, 1)]
    assert sorted(focus) == sorted(largest + smallest)
    every = next(sel for (c, t), sel in charts.items() if c == "Curvature: all layers")
    assert len(every) == FOCUS_LIMIT + 4
    assert [c.closed for c in layout.category] == [False, True]
