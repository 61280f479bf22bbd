"""gradmon's run in a real TensorBoard, looked at in headless Chromium.

Skipped when no Chromium is installed (CI); locally: `apt-get install -y chromium`.
A real `tensorboard` serves a small run on 127.0.0.1; Chromium, driven through
the DevTools protocol over a pipe (no extra package), loads the custom-scalars
page and reads each chart card's series: every chart shows data, and in each
per-layer chart the layers have different colours (TensorBoard colours by run:
gradmon writes each layer into a run of its own). The Text tab shows the health
report. Everything is bounded: the server and the browser are stopped in `finally`.
"""

import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request

import keras
import numpy as np
import pytest

import gradmon
from gradmon import tags
from helpers import serve_tensorboard

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)
pytestmark = [pytest.mark.tensorflow_only,  # needs TensorFlow: skipped whole under JAX/PyTorch (conftest.py)
              pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium)")]


class DevTools:
    """A minimal Chrome DevTools protocol client over `--remote-debugging-pipe` (fds 3 and 4)."""

    def __init__(self, chromium, url, timeout=120):
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        self._profile = tempfile.mkdtemp(prefix="gradmon-chromium-")
        # Chromium reads fd 3 and writes fd 4: the pipe ends moved there in the child (via
        # fds >= 10, so that neither overwrites the other); close_fds spares 3 and 4
        def wire():
            read_end = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10)
            write_end = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)

        self.process = subprocess.Popen(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={self._profile}", "--window-size=1400,4000", "--remote-debugging-pipe",
             "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=wire, pass_fds=(3, 4), close_fds=True)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer, self._id, self.deadline = b"", 0, time.time() + timeout
        targets = self.call("Target.getTargets")["targetInfos"]
        page = next(t["targetId"] for t in targets if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", targetId=page, flatten=True)["sessionId"]
        self.call("Page.enable", session=True)
        self.call("Page.navigate", session=True, url=url)

    def call(self, method, session=False, **params):
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                if time.time() > self.deadline:
                    raise TimeoutError(f"no answer from Chromium to {method}")
                chunk = os.read(self._from_browser, 1 << 16)
                if not chunk:
                    raise RuntimeError("Chromium closed the DevTools pipe")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self._id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer["result"]

    def evaluate(self, expression):
        result = self.call("Runtime.evaluate", session=True, expression=expression,
                           returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")

    def close(self):
        try:
            self.process.terminate()
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        for fd in (self._to_browser, self._from_browser):
            os.close(fd)
        shutil.rmtree(self._profile, ignore_errors=True)


# Every element in the page, shadow roots included; the chart cards' series, data and colours.
_CARDS = """
(() => {
  const all = [];
  const walk = (root) => {
    for (const el of root.querySelectorAll('*')) {
      all.push(el);
      if (el.shadowRoot) walk(el.shadowRoot);
    }
  };
  walk(document);
  return all.filter(el => el.localName === 'tf-custom-scalar-multi-line-chart-card').map(card => {
    const names = card._seriesNames || [];
    return {
      title: card.title,
      series: names.map(name => ({
        name: name,
        points: (card._nameToDataSeries[name].getData() || []).length,
        color: card._colorScale.scale(name),
      })),
    };
  });
})()
"""

_TEXT = """
(() => {
  const texts = [];
  const walk = (root) => {
    for (const el of root.querySelectorAll('*')) {
      if (el.shadowRoot) walk(el.shadowRoot);
    }
    if (root.body) texts.push(root.body.innerText); else if (root.host) texts.push(root.textContent);
  };
  walk(document);
  return texts.join('\\n');
})()
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    log_dir = str(tmp_path_factory.mktemp("browser"))
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 6)).astype("float32")
    y = rng.normal(size=(48, 1)).astype("float32")
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh", name="first"),
                              keras.layers.Dense(8, activation="tanh", name="middle"),
                              keras.layers.Dense(1, name="last")], name="net")
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[
        gradmon.GradientMonitor(log_dir),
        gradmon.HessianMonitor(log_dir, data=(x[:16], y[:16]), every_n_steps=3, per_layer=True)])
    def report_served(port):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/text/tags", timeout=5) as r:
            return tags.REPORT in json.loads(r.read()).get("train", [])

    with serve_tensorboard(log_dir, report_served) as port:
        yield port


def _poll(browser, expression, done, timeout=60):
    deadline = time.time() + timeout
    while True:
        value = browser.evaluate(expression)
        if done(value) or time.time() > deadline:
            return value
        time.sleep(1)


def test_every_chart_has_data_and_layers_have_their_colours(served):
    browser = DevTools(CHROMIUM, f"http://127.0.0.1:{served}/#custom_scalars")
    try:
        # runs load one by one: wait until every chart has its series (3 layers per per-layer chart)
        cards = _poll(browser, _CARDS, lambda cards: bool(cards) and all(
            c["series"] and all(s["points"] for s in c["series"])
            and (len(c["series"]) == 3 or not c["title"].startswith("per-layer")) for c in cards))
    finally:
        browser.close()
    assert len(cards) >= 8, [c["title"] for c in cards]
    for card in cards:
        assert card["series"] and all(s["points"] > 0 for s in card["series"]), card
    per_layer = [c for c in cards if c["title"].startswith("per-layer")]
    assert len(per_layer) >= 3  # raw norms, update ratio, the Hessian block's top eigenvalue
    for card in per_layer:
        colors = [s["color"] for s in card["series"]]
        assert len(colors) == 3 and len(set(colors)) == 3, card  # 3 layers, 3 colours


def test_the_text_tab_shows_the_health_report(served):
    browser = DevTools(CHROMIUM, f"http://127.0.0.1:{served}/#text")
    try:
        text = _poll(browser, _TEXT, lambda t: "gradmon health report" in (t or ""))
    finally:
        browser.close()
    assert "gradmon health report: steps 1-12" in text
    assert "Worst layers" in text and "net/first" in text
