"""A real TensorBoard server reads gradmon's run: tags, values at steps, descriptions, layout."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import keras
import numpy as np
import pytest

import gradmon
from gradmon import tags
from helpers import read_events

RNG = np.random.default_rng(51)
X = RNG.normal(size=(40, 4)).astype(np.float32)
Y = RNG.normal(size=(40, 1)).astype(np.float32)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", logdir, "--host", "127.0.0.1",
         "--port", str(port), "--reload_interval", "1", "--load_fast", "false"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 90
        while True:
            try:
                scalar_tags = get(port, "/data/plugin/scalars/tags").get("train", {})
                served = get(port, "/data/plugin/scalars/scalars", run="train", tag=tags.global_norm("raw")) \
                    if tags.global_norm("raw") in scalar_tags else []
                if tags.EDGE_OF_STABILITY in scalar_tags and len(served) == 10:
                    break
            except OSError:
                pass
            if time.time() > deadline or server.poll() is not None:
                pytest.fail("tensorboard did not serve the run in 90 s")
            time.sleep(0.5)
        yield port, logdir, model
    finally:
        server.terminate()
        server.wait(timeout=20)


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
    assert titles[:3] == ["Gradients", "Penalties", "Curvature"]
    gradients = layout["category"][0]["chart"]
    assert gradients[0]["multiline"]["tag"] == ["^gradients/raw/global_norm$", "^gradients/transformed/global_norm$"]
