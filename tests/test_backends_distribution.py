"""gradmon under `keras.distribution` on JAX, and its refusal on PyTorch (docs/guide/distribution.md).

On JAX, `keras.distribution` shards the jitted train step: the gradient reaching the optimizer's
door (where gradmon measures) is the global one. The reference is a NumPy replay (float64, the
gradient of a two-layer tanh MLP written out by hand, SGD) of the same weights and batches:

- `DataParallel` over 2 devices (`steps_per_execution=2`): the logged raw and transformed norms,
  every per-layer statistic, update ratios and clip numbers equal the replay's to float32
  precision, and the weights end on the replay's; the compiled step holds the same all-reduces
  (instruction by instruction, shapes included) with and without gradmon: gradmon adds no
  collective.
- `ModelParallel` with both Dense kernels (and the first bias) split over the 2 devices: the norms,
  max_abs, rms and zero fractions of the sharded tensors equal the replay's.
- Two JAX processes (`keras.distribution.initialize`, CPU collectives over gloo), one device each,
  `DataParallel`: both see the replay's numbers, only process 0 writes event files.

Two host CPU devices need `XLA_FLAGS=--xla_force_host_platform_device_count=2` before JAX starts:
`test_two_devices_in_subprocess` runs this module in a fresh interpreter of the JAX environment
(`helpers.backend_python`) with that flag, from every suite (the JAX suite's own process has one
device; from TensorFlow and PyTorch not under `make test`, which runs the JAX suite itself).
On PyTorch, where Keras has no `keras.distribution`, an observed `fit` with one set raises
`NotImplementedError` saying so; a custom loop of two gloo processes with the Keras model in
`torch.nn.parallel.DistributedDataParallel` and a `gradmon.observe`d optimizer logs the replay's
numbers (rank 0 only: rank 1 writes nothing) and ends on its weights on both ranks.
"""

import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import gradmon  # noqa: E402
from helpers import (  # noqa: E402
    backend_env, backend_python, clip_global_norm, event_files, free_port, read_events, replay_tanh_mlp)

BACKEND = keras.backend.backend()
TWO_DEVICES = "--xla_force_host_platform_device_count=2"
LR, BATCH, STEPS, HIDDEN, CLIP = 0.1, 8, 4, 8, 0.5
LAYERS = ("dense", "dense_1")
GROUP_STATS = ("norm", "max_abs", "rms", "zero_fraction")
STATS = ["norm", "max_abs", "rms", "zero_fraction", "nonfinite", "update_ratio"]


def _devices():
    if BACKEND != "jax" or __name__ == "__main__":  # a process of test_only_process_0_writes: JAX
        return 0  # must not start before `keras.distribution.initialize`
    import jax

    return jax.device_count()


on_two_devices = pytest.mark.skipif(
    _devices() < 2, reason="needs 2 JAX devices: runs in test_two_devices_in_subprocess")


def _data():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(BATCH * STEPS, 4)).astype("float32")
    y = rng.normal(size=(BATCH * STEPS, 1)).astype("float32")
    x[:, 3] = 0.0  # a row of the first kernel's gradient is exactly zero (zero_fraction)
    weights = [rng.normal(size=(4, HIDDEN)).astype("float32"),
               0.1 * rng.normal(size=HIDDEN).astype("float32"),
               rng.normal(size=(HIDDEN, 1)).astype("float32"), 0.1 * rng.normal(size=1).astype("float32")]
    return x, y, weights


def _model(weights, observed=True, steps_per_execution=1):
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(HIDDEN, activation="tanh", name="dense")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1, name="dense_1")(hidden))
    model.set_weights(weights)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse", steps_per_execution=steps_per_execution)
    if observed:
        model = gradmon.monitor(model, transform=gradmon.transforms.clip_by_global_norm(CLIP), stats=STATS)
    return model


def _replay(weights, x, y):
    """Per step: the numbers gradmon logs, from the hand-written gradient clipped to CLIP; the
    final weights."""
    return replay_tanh_mlp(weights, x, y, LR, BATCH, STEPS, lambda g: clip_global_norm(g, CLIP),
                           GROUP_STATS, LAYERS)


def _assert_replayed(events, expected):
    assert min(row["gradients/clip/ratio"] for row in expected) < 0.9  # the clip acted
    for tag in expected[0]:
        assert tag in events, (tag, sorted(events))
        assert sorted(events[tag]) == list(range(1, STEPS + 1)), (tag, events[tag])
        got = [events[tag][step] for step in range(1, STEPS + 1)]
        np.testing.assert_allclose(got, [row[tag] for row in expected], rtol=2e-5, atol=1e-7, err_msg=tag)


def _fit(model, x, y, log_dir, batch_size=BATCH):
    model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0,
              callbacks=[gradmon.GradientMonitor(log_dir, update_freq=1)])


@pytest.fixture
def distributed():
    """Sets a distribution for the test; unset after it."""
    def set_it(distribution):
        keras.distribution.set_distribution(distribution)
        return distribution

    yield set_it
    keras.distribution.set_distribution(None)


def _collectives(model, distribution, x, y):
    """The collective instructions of the compiled train step (its HLO text), with their shapes."""
    import jax

    state = model._get_jax_state(trainable_variables=True, non_trainable_variables=True,
                                 optimizer_variables=True, metrics_variables=True)
    batch = [jax.device_put(a, distribution.get_data_layout(a.shape).backend_layout) for a in (x, y)]
    text = jax.jit(model.train_step).lower(state, tuple(batch)).compile().as_text()
    found = re.findall(r"= (.*?) (all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)"
                       r"(?:-start)?\(", text)
    # each instruction: its kind and the shapes it reduces (a tuple's order is the compiler's)
    return sorted((kind, sorted(re.findall(r"\w+\[[\d,]*\]", shapes))) for shapes, kind in found)


@on_two_devices
def test_data_parallel_logs_the_numbers_of_a_numpy_replay_and_adds_no_collective(tmp_path, distributed):
    """The statistics of the global gradient; the compiled step holds the same all-reduce (the
    one of `jax.grad`) with and without gradmon: its statistics run on the reduced gradient."""
    import jax

    distribution = distributed(keras.distribution.DataParallel(devices=jax.devices()[:2]))
    x, y, weights = _data()
    model = _model(weights, steps_per_execution=2)  # each step of an execution logged
    kernel = model.trainable_variables[0].value
    assert len(kernel.sharding.device_set) == 2  # the weights live on both devices
    _fit(model, x, y, str(tmp_path))
    expected, final = _replay(weights, x, y)
    _assert_replayed(read_events(str(tmp_path)), expected)
    for got, want in zip(model.get_weights(), final):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    plain = _model(weights, observed=False)
    plain.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    without = _collectives(plain, distribution, x[:BATCH], y[:BATCH])
    assert [kind for kind, _ in without] == ["all-reduce"], without
    assert _collectives(model, distribution, x[:BATCH], y[:BATCH]) == without


@on_two_devices
def test_model_parallel_norms_of_sharded_tensors(tmp_path, distributed):
    import jax

    mesh = keras.distribution.DeviceMesh((1, 2), ["batch", "model"], devices=jax.devices()[:2])
    layout = keras.distribution.LayoutMap(mesh)
    layout["dense/kernel"] = (None, "model")
    layout["dense/bias"] = ("model",)
    layout["dense_1/kernel"] = ("model", None)
    distributed(keras.distribution.ModelParallel(layout_map=layout, batch_dim_name="batch"))
    x, y, weights = _data()
    model = _model(weights)
    halves = [(4, HIDDEN // 2), (HIDDEN // 2,), (HIDDEN // 2, 1)]
    for variable, shard in zip(model.trainable_variables[:3], halves):
        shards = variable.value.addressable_shards
        assert [s.data.shape for s in shards] == [shard, shard], variable.path  # split, not copied
    _fit(model, x, y, str(tmp_path))
    expected, final = _replay(weights, x, y)
    _assert_replayed(read_events(str(tmp_path)), expected)
    for got, want in zip(model.get_weights(), final):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _process(process_id, port, log_dir):
    """One of two JAX processes training together (`python this_file process ID PORT LOG_DIR`)."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    keras.distribution.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    distribution = keras.distribution.DataParallel(devices=jax.devices())
    distribution.auto_shard_dataset = False  # each process is given its half of every batch here
    keras.distribution.set_distribution(distribution)
    x, y, weights = _data()
    half = BATCH // 2  # a global batch is process 0's half followed by process 1's
    mine = np.concatenate([np.arange(s * BATCH + process_id * half, s * BATCH + (process_id + 1) * half)
                           for s in range(STEPS)])
    model = _model(weights)
    _fit(model, x[mine], y[mine], os.path.join(log_dir, str(process_id)), batch_size=half)
    expected, final = _replay(weights, x, y)
    observer = model._gradmon_observer
    assert observer.step == STEPS
    for got, want in zip(model.get_weights(), final):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    print(f"process {jax.process_index()} of {jax.process_count()}: {jax.device_count()} devices, done")


@on_two_devices
def test_only_process_0_writes(tmp_path):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one device per process
    outputs = _two_processes("process", tmp_path, env)
    for i, output in enumerate(outputs):
        assert f"process {i} of 2: 2 devices, done" in output, output[-4000:]
    x, y, weights = _data()
    _assert_replayed(read_events(str(tmp_path / "0")), _replay(weights, x, y)[0])
    assert os.path.isdir(tmp_path / "0" / "train")
    assert not os.path.exists(tmp_path / "1") or not event_files(str(tmp_path / "1" / "train"))


def _torch_process(rank, port, log_dir):
    """One of two PyTorch processes of a DDP custom loop (`python this_file torch-process RANK PORT
    LOG_DIR`): the Keras model wrapped in `DistributedDataParallel`, which averages the gradients
    during `backward`; the observed Keras optimizer then sees the global gradient."""
    import torch
    import torch.distributed

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=2)
    try:
        x, y, weights = _data()
        model = _model(weights, observed=False)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = gradmon.observe(keras.optimizers.SGD(LR), log_dir=os.path.join(log_dir, str(rank)),
                              transform=gradmon.transforms.clip_by_global_norm(CLIP), stats=STATS)
        half = BATCH // 2  # each rank trains on its half of every batch
        for step in range(STEPS):
            rows = slice(step * BATCH + rank * half, step * BATCH + (rank + 1) * half)
            pred = ddp(torch.from_numpy(x[rows]))
            loss = torch.mean(torch.square(pred - torch.from_numpy(y[rows])))
            model.zero_grad()
            loss.backward()
            with torch.no_grad():
                opt.apply([v.value.grad for v in model.trainable_variables], model.trainable_variables)
        opt.gradmon.close()
        for got, want in zip(model.get_weights(), _replay(weights, x, y)[1]):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        print(f"rank {torch.distributed.get_rank()} of {torch.distributed.get_world_size()}: done")
    finally:
        torch.distributed.destroy_process_group()


def _two_processes(mode, tmp_path, env):
    port = free_port()
    runs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), mode, str(i), str(port),
                              str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True) for i in range(2)]
    try:
        outputs = [run.communicate(timeout=240)[0] for run in runs]
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
                run.wait()
    for run, output in zip(runs, outputs):
        assert run.returncode == 0, output[-4000:]
    return outputs


@pytest.mark.skipif(BACKEND != "torch", reason="PyTorch's DistributedDataParallel")
def test_torch_ddp_custom_loop_logs_the_numbers_of_a_numpy_replay(tmp_path):
    outputs = _two_processes("torch-process", tmp_path, dict(os.environ))
    for i, output in enumerate(outputs):
        assert f"rank {i} of 2: done" in output, output[-4000:]
    x, y, weights = _data()
    _assert_replayed(read_events(str(tmp_path / "0" / "train")), _replay(weights, x, y)[0])
    assert not os.path.exists(tmp_path / "1") or not event_files(str(tmp_path / "1" / "train"))


@pytest.mark.skipif(BACKEND != "torch", reason="Keras implements keras.distribution for JAX only")
def test_keras_distribution_on_torch_is_refused(tmp_path, distributed):
    distributed(keras.distribution.DataParallel(devices=["cpu:0"]))
    x, y, weights = _data()
    model = _model(weights)
    with pytest.raises(NotImplementedError, match=r"keras.distribution is not supported on the 'torch' "
                       r"backend.*Received: keras.distribution.distribution\(\)=<DataParallel"):
        _fit(model, x, y, str(tmp_path))
    assert not model._gradmon_observer.step  # refused before the first step


def test_two_devices_in_subprocess():
    if _devices() >= 2:
        pytest.skip("this process has 2 JAX devices: the tests above ran here")
    if BACKEND != "jax" and os.environ.get("GRADMON_EVERY_BACKEND") == "1":
        pytest.skip("make test runs this module in its JAX suite")
    python = backend_python("jax")
    env = dict(backend_env("jax"), XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + TWO_DEVICES).strip())
    run = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "not subprocess",
                          os.path.abspath(__file__)], cwd=os.path.dirname(HERE), env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-5000:]
    assert re.search(r"\b3 passed", run.stdout.strip().splitlines()[-1]), run.stdout[-2000:]


if __name__ == "__main__" and sys.argv[1:2] == ["process"]:
    _process(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
if __name__ == "__main__" and sys.argv[1:2] == ["torch-process"]:
    _torch_process(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
