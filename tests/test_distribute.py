"""Monitoring under tf.distribute, against a single-device run on the same global batch.

Each run is a subprocess (the CPU must be split into logical devices, or the
cluster configured, before TensorFlow initialises). A run fits small models,
one per case, for one or two steps with a `GradientMonitor` and prints JSON:
gradmon's statistics, the final weights, the event files written and the
number of elements passed to `ReplicaContext.all_reduce` while tracing (a
plain Keras case is the reference for the weights and the traffic).
"""

import glob
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

pytestmark = pytest.mark.tensorflow_only  # needs TensorFlow: skipped whole under JAX/PyTorch (conftest.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 120
BATCH, STEPS, REPLICAS, LR, MAX_NORM = 16, 2, 2, 0.1, 0.1
CASES = {
    "none": dict(steps=STEPS),
    "transform_clip": dict(steps=STEPS, transform=MAX_NORM),
    # one step: compared with the update computed by hand at the initial weights
    "optimizer_clip": dict(steps=1, global_clipnorm=MAX_NORM),
    # the other paths of the step: skip policy (a conditional update), noise scale, a
    # weight penalty, histograms
    "extras": dict(steps=STEPS, extras=True),
    # the spike detector (skip), zclip and the optimizer-state statistics: state kept per
    # replica from the all-reduced norm, a spike at step 30 past the 25 warm-up steps
    "spikes": dict(steps=32, spikes=True),
    # plain Keras, no gradmon: the reference for bit-identity and all-reduce traffic
    "plain": dict(steps=STEPS, plain=True),
}

SCRIPT = r'''
import contextlib, glob, json, os, sys
cfg = json.loads(sys.argv[1])
import tensorflow as tf
if cfg["mode"] == "mirrored":
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])
elif cfg["mode"] == "multiworker":
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
else:
    strategy = None
import keras
import numpy as np
import gradmon

if cfg["mode"] == "multiworker":
    # Keras 3.15's TensorFlowTrainer._maybe_symbolic_build reduces the whole (x, y) batch
    # with one strategy.reduce, which MultiWorkerMirroredStrategy rejects ("Attempt to
    # convert a value (PerReplica...) to a Tensor"); reduce leaf by leaf instead.
    from keras.src import tree
    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

    symbolic_build = TensorFlowTrainer._maybe_symbolic_build

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, it in iterator:
                data_batch = tree.map_structure(
                    lambda v: self.distribute_strategy.reduce("MEAN", v, axis=None), next(it))
                break
        return symbolic_build(self, data_batch=data_batch)

    TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build

    # It also reduces the step's scalar logs with strategy.reduce("MEAN", v, axis=0), which
    # fails on scalars ("Invalid reduction dimension 0 for input with 0 dimensions"); the
    # logs (loss) are not what is tested here, so take the first replica's.
    from keras.src.backend.tensorflow import trainer as tf_trainer

    reduce_per_replica = tf_trainer.reduce_per_replica
    tf_trainer.reduce_per_replica = lambda values, strategy, reduction: reduce_per_replica(
        values, strategy, "first" if reduction == "auto" else reduction)

ALL_REDUCED = {}  # case -> elements passed to ReplicaContext.all_reduce while tracing
_all_reduce = tf.distribute.ReplicaContext.all_reduce


def counting_all_reduce(self, reduce_op, value, options=None):
    elements = sum(int(np.prod(v.shape)) for v in tf.nest.flatten(value, expand_composites=False))
    ALL_REDUCED[CURRENT[0]] = ALL_REDUCED.get(CURRENT[0], 0) + elements
    return _all_reduce(self, reduce_op, value, options)


tf.distribute.ReplicaContext.all_reduce = counting_all_reduce
CURRENT = [None]

n = cfg["batch"] * max(case["steps"] for case in cfg["cases"].values())
# one generator each: the first rows are the same whatever the cases (and so n) of a run
x = np.random.default_rng(0).normal(size=(n, 6)).astype(np.float32)
y = np.random.default_rng(1).integers(0, 3, size=n)
loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def build():
    keras.utils.set_random_seed(0)
    # fixed names: the tags (variable paths) are compared between processes
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh", name="hidden"),
                             keras.layers.Dense(3, name="out")], name="net")


def run(name, case):
    log_dir = os.path.join(cfg["log_dir"], name)
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    with scope:
        model = build()
        transform = gradmon.transforms.clip_by_global_norm(case["transform"]) if "transform" in case else None
        extras = dict(on_nonfinite="skip", noise_scale=True,
                      penalties=[gradmon.penalties.WeightPenalty(l2=0.01)]) if "extras" in case else {}
        if "spikes" in case:
            extras = dict(on_spike="skip", stats="all")
            transform = gradmon.transforms.zclip()
        monitored = model if case.get("plain") else gradmon.monitor(model, transform=transform, **extras)
        optimizer = keras.optimizers.SGD(cfg["lr"], global_clipnorm=case.get("global_clipnorm"))
        monitored.compile(optimizer=optimizer, loss=loss_fn)
    callbacks = [] if case.get("plain") else [
        gradmon.GradientMonitor(log_dir, histogram_freq=1 if "extras" in case else 0)]
    CURRENT[0] = name
    initial = [v.numpy().tolist() for v in model.trainable_variables]
    steps = case["steps"]
    # Keras splits each global batch between the replicas (and, multi-worker, the workers)
    n = cfg["batch"] * steps
    weights = np.ones(n, np.float32)
    if "spikes" in case:  # batch 30's loss (and so its gradient) weighs 50 times more
        weights[cfg["batch"] * 29:cfg["batch"] * 30] = 50.0
    monitored.fit(x[:n], y[:n], sample_weight=weights, batch_size=cfg["batch"], epochs=1, shuffle=False,
                  verbose=0, callbacks=callbacks)
    out = {"initial_weights": initial, "all_reduced": ALL_REDUCED.get(name, 0),
           "num_params": int(sum(np.prod(v.shape) for v in model.trainable_variables))}
    if not case.get("plain"):
        snap = monitored.gradient_observer.recorder.read()[-1]
        out.update(step=snap.step, state_step=monitored.gradient_observer.step, values=snap.values,
                   spikes=monitored.gradient_observer.spikes_seen)
    out.update({
        "weights": [v.numpy().tolist() for v in model.trainable_variables],
        "event_files": sorted(glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"),
                                        recursive=True)),
    })
    return out


results = {name: run(name, case) for name, case in cfg["cases"].items()}
print("RESULT " + json.dumps(results))
'''


def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env["TF_ENABLE_ONEDNN_OPTS"] = "0"
    env.update(extra)
    return env


def _start(tmp_path, mode, log_dir, cases, **env):
    cfg = dict(mode=mode, log_dir=str(log_dir), cases=cases, batch=BATCH, replicas=REPLICAS, lr=LR)
    script = tmp_path / "run_distributed.py"
    script.write_text(SCRIPT)
    return subprocess.Popen([sys.executable, str(script), json.dumps(cfg)], cwd=str(tmp_path),
                            env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(process):
    try:
        out, err = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"distributed run timed out after {TIMEOUT_S}s:\n{err[-3000:]}")
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert process.returncode == 0 and lines, f"run failed (rc={process.returncode}):\n{err[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def mirrored_runs(tmp_path_factory):
    """(single-device, MirroredStrategy) results for every case, the two runs in parallel."""
    tmp = tmp_path_factory.mktemp("mirrored")
    (tmp / "single").mkdir()
    (tmp / "mirrored").mkdir()
    single = _start(tmp / "single", "single", tmp / "single" / "logs", CASES)
    mirrored = _start(tmp / "mirrored", "mirrored", tmp / "mirrored" / "logs", CASES)
    return _result(single), _result(mirrored)


GRADIENT_TAGS = ("gradients/raw/", "gradients/transformed/", "gradients/clip/", "gradients/grad_to_weight/",
                 "gradients/update_ratio/", "gradients/no_gradient", "gradients/skipped_steps")


def _assert_same_stats(ours, reference):
    tags = sorted(t for t in reference["values"] if t.startswith(GRADIENT_TAGS))
    assert tags and sorted(t for t in ours["values"] if t.startswith(GRADIENT_TAGS)) == tags
    for tag in tags:
        assert ours["values"][tag] == pytest.approx(reference["values"][tag], rel=1e-5, abs=1e-7, nan_ok=True), tag
    for a, b in zip(ours["weights"], reference["weights"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["none", "transform_clip"])
def test_mirrored_statistics_equal_single_device(mirrored_runs, case):
    single, mirrored = (r[case] for r in mirrored_runs)
    # one step counter per model, not per replica
    assert mirrored["step"] == mirrored["state_step"] == single["step"] == STEPS
    _assert_same_stats(mirrored, single)
    if case == "transform_clip":
        # gradmon's transform clips the all-reduced gradient: the global norm is MAX_NORM
        values = mirrored["values"]
        assert values["gradients/raw/global_norm"] > MAX_NORM
        assert values["gradients/transformed/global_norm"] == pytest.approx(MAX_NORM, rel=1e-5)
        assert values["gradients/clip/fraction"] == 1.0


def test_mirrored_one_all_reduce_and_bit_identical_weights(mirrored_runs):
    """A monitored step all-reduces the gradient once, as plain training does, and trains
    bit for bit as plain training (no transform)."""
    mirrored = mirrored_runs[1]
    plain, observed = mirrored["plain"], mirrored["none"]
    assert plain["all_reduced"] > 0
    assert observed["all_reduced"] == plain["all_reduced"]
    for a, b in zip(plain["weights"], observed["weights"]):
        np.testing.assert_array_equal(a, b)
    for case in ("transform_clip", "optimizer_clip", "extras"):
        # small all-reduces of scalars (Keras' metrics) aside, no second gradient all-reduce
        assert mirrored[case]["all_reduced"] < plain["all_reduced"] + plain["num_params"], case


def test_mirrored_optimizer_clipping_acts_on_the_global_gradient(mirrored_runs):
    """Observed, a Keras optimizer's own clipping acts on the all-reduced gradient, as on one
    device (plain Keras clips each replica's share before the sum)."""
    single, mirrored = (r["optimizer_clip"] for r in mirrored_runs)
    _assert_same_stats(mirrored, single)
    assert mirrored["values"]["gradients/transformed/global_norm"] == pytest.approx(MAX_NORM, rel=1e-5)
    assert mirrored["values"]["gradients/raw/global_norm"] > MAX_NORM


def test_mirrored_skip_policy_noise_scale_penalty_and_histograms(mirrored_runs):
    single, mirrored = (r["extras"] for r in mirrored_runs)
    _assert_same_stats(mirrored, single)
    # a weight penalty does not depend on the batch: the same on every replica
    for tag in ("penalties/weight", "penalties/weight/grad_norm"):
        assert mirrored["values"][tag] == pytest.approx(single["values"][tag], rel=1e-5)
    # the noise scale is the first replica's estimate (its shard): finite, not compared
    assert all(np.isfinite(v) for t, v in mirrored["values"].items() if t.startswith("gradients/noise_scale"))
    assert mirrored["values"]["gradients/skipped_steps"] == 0


def test_mirrored_spikes_zclip_and_optimizer_state_equal_single_device(mirrored_runs):
    single, mirrored = (r["spikes"] for r in mirrored_runs)
    _assert_same_stats(mirrored, single)
    assert [s for s, _ in single["spikes"]] == [s for s, _ in mirrored["spikes"]] == [30]
    assert mirrored["spikes"][0][1] == pytest.approx(single["spikes"][0][1], rel=1e-4)
    for tag in ("gradients/spike/zscore", "gradients/spike/count", "gradients/zclip/threshold",
                "optimizer/cosine/update_gradient"):
        assert np.isfinite(single["values"][tag]), tag
        assert mirrored["values"][tag] == pytest.approx(single["values"][tag], rel=1e-4), tag


def _run_dir(files):
    """The run directory (`train`) of gradmon's event files: the per-layer runs lie below it."""
    return os.path.dirname(min(files, key=lambda f: f.count(os.sep)))


def _events(log_dir):
    files = sorted(glob.glob(os.path.join(str(log_dir), "**", "events.out.tfevents.*gradmon*"),
                             recursive=True))
    counts = {}
    for path in files:
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                counts[(value.tag, event.step)] = counts.get((value.tag, event.step), 0) + 1
    return files, counts


def test_mirrored_summaries_are_written_once(mirrored_runs):
    single, mirrored = (r["none"] for r in mirrored_runs)
    for run in (mirrored, single):  # one file per run: train, and one per layer (its colour)
        assert len(run["event_files"]) == len({os.path.dirname(f) for f in run["event_files"]}) > 1
    files, counts = _events(_run_dir(mirrored["event_files"]))
    _, single_counts = _events(_run_dir(single["event_files"]))
    assert len(files) == len(mirrored["event_files"])
    assert set(counts) == set(single_counts)
    # step 0 holds only the custom-scalars layout
    assert {step for tag, step in counts if tag.startswith("gradients/")} == set(range(1, STEPS + 1))
    assert set(counts.values()) == {1}


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_multi_worker_statistics_equal_single_device_and_only_the_chief_writes(
        tmp_path, mirrored_runs):
    single = mirrored_runs[0]
    cases = {name: CASES[name] for name in ("none", "transform_clip", "plain")}
    cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(2)]}
    workers = []
    for index in range(2):
        (tmp_path / f"worker{index}").mkdir()
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        workers.append(_start(tmp_path / f"worker{index}", "multiworker",
                              tmp_path / f"worker{index}" / "logs", cases, TF_CONFIG=tf_config))
    try:
        results = [_result(w) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    chief, other = results
    for a, b in zip(chief["plain"]["weights"], chief["none"]["weights"]):
        np.testing.assert_array_equal(a, b)
    assert chief["none"]["all_reduced"] == chief["plain"]["all_reduced"] > 0
    for name in ("none", "transform_clip"):
        _assert_same_stats(chief[name], single[name])
        assert chief[name]["step"] == chief[name]["state_step"] == STEPS
        # every worker holds the same (all-reduced) numbers and weights
        _assert_same_stats(other[name], chief[name])
        files = chief[name]["event_files"]
        assert len(files) == len({os.path.dirname(f) for f in files})  # one per run (train, layers)
        assert other[name]["event_files"] == []
        files, counts = _events(tmp_path / "worker0" / "logs" / name)
        assert set(counts.values()) == {1}
    assert not glob.glob(str(tmp_path / "worker1" / "**" / "events.out.tfevents.*"), recursive=True)
