"""Benchmark of gradmon.hessian on two MLPs (CPU, a few minutes).

Run as `python benchmarks/hessian.py [--quick] [--scale]`. Prints one table:

- HVP cost: median time of one compiled HVP over one compiled gradient,
  for reverse-over-reverse and forward-over-reverse, measured interleaved in
  this process (the raw `tf.function`s, no host-side flattening).
- Accuracy and cost of the top-1 and top-5 eigenvalues from
  `spectrum(method="lanczos")`, from `spectrum(method="power")` and from
  PyHessian's protocol (power iteration from a random start with projection
  deflation, stopping when the eigenvalue changes by less than 1e-3
  relatively, at most 100 iterations; Yao et al. 2020), each against
  `scipy.sparse.linalg.eigsh` (ARPACK, `which="LA"`, tol 1e-10) on the same
  HVP in float64.
- Warm refresh: HVPs for top-1 after 100 SGD steps, cold vs warm-started
  from the previous eigenvector, to tol 1e-4 and to HessianMonitor's 1e-3,
  and with a budget of 5 HVPs.
- HessianMonitor cost: a 600-step `fit` (batch 32) with
  `HessianMonitor(every_n_steps=100, top_k=1)` on a 512-example probe over
  the same fit without it (median of paired repeats).

- First probe: in fresh processes (nothing traced), the CPU time of a
  `HessianMonitor`'s first probe over its third (warm, after a few training
  steps), and a second monitor's first probe on the same model over that
  warm probe: median and range of the per-process ratios (CPU time, so
  that other load on the machine counts less). A one-block Transformer
  (12k parameters, `top_k=2`, Adam: the preconditioned spectrum too) by
  default; `--first-probe mobilenet` adds MobileNetV2 with `per_layer=True`
  (minutes). `--first-probe [models]` prints only these rows.

- With `--scale` (a few minutes more, ~3 GB of memory): top-3 by
  `spectrum` on a 1024-2048-2048-10 tanh MLP (6.3 M parameters, 256
  examples) in a fresh process: wall time (operator build and trace
  included), HVPs, time of as many bare HVPs after it and the time of its
  own HVPs (the first, traced, counted as a bare one), peak RSS above the
  RSS of the built model, residuals over lambda_1.

No timing is asserted anywhere; numbers depend on the machine.

Models: a 64-128-10 tanh MLP on sklearn's digits (batch of 512 images; random
data of the same shape if scikit-learn is not installed) and
a 784-512-10 tanh MLP on random data (batch 512, 407k parameters; skipped
with `--quick`).
"""

import argparse
import os
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import scipy.sparse.linalg  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gradmon import hessian  # noqa: E402

REPEATS = 20
TRAIN_STEPS = 100


def digits_mlp():
    keras.utils.set_random_seed(0)
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # scikit-learn is optional: same shapes, random data
        rng = np.random.default_rng(0)
        x = rng.uniform(0.0, 1.0, (1797, 64)).astype("float32")
        y = rng.integers(0, 10, 1797).astype("int32")
        name = "random 64-128-10"
    else:
        digits = load_digits()
        x = (digits.data / 16.0).astype("float32")
        y = digits.target.astype("int32")
        name = "digits 64-128-10"
    model = keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(128, activation="tanh"),
        keras.layers.Dense(10),
    ])
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return name, model, (x[:512], y[:512]), (x, y)


def random_mlp():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2048, 784)).astype("float32")
    y = rng.integers(0, 10, 2048).astype("int32")
    model = keras.Sequential([
        keras.Input((784,)),
        keras.layers.Dense(512, activation="tanh"),
        keras.layers.Dense(10),
    ])
    model.compile(
        optimizer=keras.optimizers.SGD(0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return "random 784-512-10", model, (x[:512], y[:512]), (x, y)


def hvp_over_gradient(model, batch):
    """Median HVP time / median gradient time per mode, interleaved."""
    hvps = {m: hessian.make_hvp(model, batch, hvp_mode=m)
            for m in hessian.HVP_MODES}
    any_hvp = hvps[hessian.HVP_MODES[0]]
    x, y, sw = any_hvp._batches[0]
    vector = tf.random.normal([any_hvp.num_params], seed=0)
    def timed(fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        tf.nest.map_structure(lambda t: t.numpy(), out)  # wait for it
        return time.perf_counter() - start

    for hvp in hvps.values():  # trace outside the timings
        timed(hvp._grad_fn, x, y, sw)
        timed(hvp._hvp_fn, x, y, sw, vector)
    grad_times, hvp_times = [], {m: [] for m in hvps}
    for _ in range(REPEATS):
        grad_times.append(timed(any_hvp._grad_fn, x, y, sw))
        for mode, hvp in hvps.items():
            hvp_times[mode].append(timed(hvp._hvp_fn, x, y, sw, vector))
    grad = float(np.median(grad_times))
    return grad, {m: float(np.median(t)) / grad for m, t in hvp_times.items()}


def eigsh_reference(model, batch, k):
    hvp = hessian.make_hvp(model, batch)
    operator = scipy.sparse.linalg.LinearOperator(
        (hvp.num_params, hvp.num_params), matvec=hvp, dtype=np.float64
    )
    values = scipy.sparse.linalg.eigsh(
        operator, k=k, which="LA", tol=1e-10, return_eigenvectors=False,
        v0=np.random.default_rng(1).standard_normal(hvp.num_params),
    )
    return np.sort(values)[::-1], hvp.count


def pyhessian_power(model, batch, k, seed=0, tol=1e-3, max_iter=100):
    """PyHessian's `hessian.eigenvalues` loop, on our HVP."""
    hvp = hessian.make_hvp(model, batch)
    rng = np.random.default_rng(seed)
    values, vectors = [], []
    for _ in range(k):
        v = rng.standard_normal(hvp.num_params)
        v /= np.linalg.norm(v)
        value = None
        for _ in range(max_iter):
            for u in vectors:
                v = v - (u @ v) * u
            v /= np.linalg.norm(v)
            hv = hvp(v)
            new = float(hv @ v)
            v = hv / np.linalg.norm(hv)
            if value is not None and abs(value - new) / (abs(value) + 1e-6) < tol:
                value = new
                break
            value = new
        values.append(value)
        vectors.append(v)
    return np.array(values), hvp.count


def relative_error(values, reference):
    return float(np.max(np.abs(values - reference) / np.abs(reference)))


def train(model, full, steps, seed):
    x, y = full
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.choice(len(x), 64, replace=False)
        model.train_on_batch(x[idx], y[idx])


def run(builder):
    name, model, batch, full = builder()
    rows = []
    grad_s, ratios = hvp_over_gradient(model, batch)
    for mode, ratio in ratios.items():
        rows.append((name, f"HVP / gradient time ({mode})",
                     f"{ratio:.2f}x", f"grad {grad_s * 1e3:.1f} ms", ""))
    faster = min(ratios, key=ratios.get)
    slower = max(ratios, key=ratios.get)
    rows.append((name, "faster HVP mode", faster,
                 f"{ratios[slower] / ratios[faster]:.2f}x faster", ""))

    reference, ref_hvps = eigsh_reference(model, batch, 5)
    rows.append((name, "eigsh reference top-5",
                 np.array2string(reference, precision=5), "-",
                 str(ref_hvps)))
    for k in (1, 5):
        for method in ("lanczos", "power"):
            start = time.perf_counter()
            spec = hessian.spectrum(model, batch, top_k=k, method=method,
                                    seed=0)
            elapsed = time.perf_counter() - start
            rows.append((
                name, f"top-{k} {method} (tol 1e-4)",
                f"{spec.eigenvalues[0]:.5f}",
                f"{relative_error(spec.eigenvalues, reference[:k]):.1e}",
                f"{spec.hvp_count} ({elapsed:.1f} s)",
            ))
        values, count = pyhessian_power(model, batch, k)
        rows.append((
            name, f"top-{k} PyHessian protocol",
            f"{values[0]:.5f}",
            f"{relative_error(np.sort(values)[::-1], reference[:k]):.1e}",
            str(count),
        ))

    rows.extend(warm_refresh(name, model, batch, full))
    return rows


def warm_refresh(name, model, batch, full):
    """Rows: HVPs of a cold and a warm top-1 after 100 more SGD steps."""
    rows = []
    # First train a little past initialisation, take a spectrum, train
    # 100 more steps, refresh.
    train(model, full, TRAIN_STEPS, seed=1)
    before = hessian.spectrum(model, batch, top_k=1, seed=0)
    train(model, full, TRAIN_STEPS, seed=2)
    reference, _ = eigsh_reference(model, batch, 1)
    runs = []
    for tol in (1e-4, 1e-3):
        runs.append((f"cold, tol {tol:g}",
                     hessian.spectrum(model, batch, top_k=1, seed=3, tol=tol)))
        runs.append((f"warm, tol {tol:g}",
                     hessian.spectrum(model, batch, top_k=1, tol=tol, init_vectors=before)))
    with warnings.catch_warnings():  # the small budgets do not converge
        warnings.simplefilter("ignore", UserWarning)
        runs.append(("cold, 5-HVP budget",
                     hessian.spectrum(model, batch, top_k=1, max_hvps=5, seed=3)))
        runs.append(("warm, 5-HVP budget",
                     hessian.spectrum(model, batch, top_k=1, max_hvps=5, init_vectors=before)))
    for label, spec in runs:
        rows.append((
            name, f"top-1 after {TRAIN_STEPS} steps, {label}",
            f"{spec.eigenvalues[0]:.5f}",
            f"{relative_error(spec.eigenvalues, reference):.1e}",
            f"{spec.hvp_count} (residual/lambda "
            f"{spec.residuals[0] / spec.eigenvalues[0]:.0e})",
        ))
    return rows


def monitor_overhead(repeats=5, steps=600):
    """Median ratios: fit time with `HessianMonitor(every_n_steps=100, top_k=1)` / without.

    Same model, data and number of steps (batch 32 on the digits training
    split; probe = 512 validation-sized examples), paired repeats; the first
    fit of each configuration (tracing) is not timed. Under SGD (the plain
    spectrum only) and under Adam, where the monitor also computes the
    preconditioned spectrum by default (and `preconditioned=False` does not).
    """
    import tempfile

    import gradmon

    rows = []
    for optimizer in ("sgd", "adam"):
        name, model, batch, full = digits_mlp()
        if optimizer == "adam":
            model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=model.loss)
        x, y = full
        n = steps * 32
        reps = int(np.ceil(n / len(x)))
        x, y = np.concatenate([x] * reps)[:n], np.concatenate([y] * reps)[:n]
        configs = {"plain": None, "default": {}}
        if optimizer == "adam":
            configs["preconditioned=False"] = {"preconditioned": False}
        ratios = {c: [] for c in configs if c != "plain"}
        with tempfile.TemporaryDirectory() as logdir:
            def fit(kwargs):
                callbacks = [] if kwargs is None else [gradmon.HessianMonitor(
                    logdir, data=batch, every_n_steps=100, top_k=1, **kwargs)]
                start = time.perf_counter()
                model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=callbacks)
                return time.perf_counter() - start

            for kwargs in configs.values():
                fit(kwargs)
            for _ in range(repeats):
                plain = fit(None)
                for config in ratios:
                    ratios[config].append(fit(configs[config]) / plain)
        for config, values in ratios.items():
            rows.append((name, f"{optimizer}: fit {steps} steps with HessianMonitor(every 100, top-1, "
                         f"{config}) / without", f"{np.median(values):.3f}x",
                         f"median of {repeats} paired", ""))
    return rows


def _rss_mb():
    """Current resident set size of this process, MB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def scale_child():
    """Top-3 on the 6.3 M-parameter MLP; prints one JSON line (fresh process)."""
    import json
    import resource

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 1024)).astype("float32")
    y = rng.integers(0, 10, 256).astype("int32")
    model = keras.Sequential([keras.Input((1024,))] + [
        keras.layers.Dense(2048, activation="tanh") for _ in range(2)
    ] + [keras.layers.Dense(10)])
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model_rss = _rss_mb()
    op = hessian.make_hvp(model, (x, y))
    apply, hvp_seconds, hvp_cpu = op.apply, [], []

    def timed_apply(vector):  # eager CPU calls are synchronous
        begin, cpu = time.perf_counter(), time.process_time()
        out = apply(vector)
        hvp_seconds.append(time.perf_counter() - begin)
        hvp_cpu.append(time.process_time() - cpu)
        return out

    op.apply = timed_apply
    start, cpu = time.perf_counter(), time.process_time()
    spec = hessian.spectrum(op, top_k=3, seed=0)  # traces the HVP too
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    vector = tf.random.normal([op.num_params], seed=1)
    start = time.perf_counter()
    for _ in range(spec.hvp_count):
        out = apply(vector)
    out.numpy()
    bare = time.perf_counter() - start
    print(json.dumps({
        "params": op.num_params, "seconds": elapsed, "hvps": spec.hvp_count, "bare_seconds": bare,
        "hvp_seconds_inside": sum(hvp_seconds[1:]) + bare / spec.hvp_count,  # first call traced
        # CPU time (all threads): the load of a shared machine counts less than in wall time
        "cpu_seconds": cpu, "hvp_cpu_inside": sum(hvp_cpu[1:]) * spec.hvp_count / (spec.hvp_count - 1),
        "model_rss_mb": model_rss, "peak_rss_mb": peak, "eigenvalues": spec.eigenvalues.tolist(),
        "relative_residuals": (spec.residuals / abs(spec.eigenvalues[0])).tolist(),
        "converged": spec.converged,
    }))


def scale_rows():
    """Runs `scale_child` in a fresh process (peak RSS is per process)."""
    import json
    import subprocess

    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--scale-child"],
                         check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    name = f"1024-2048-2048-10 tanh ({r['params'] / 1e6:.1f} M params, 256 ex.)"
    return [
        (name, "top-3 spectrum: wall time / as many bare HVPs",
         f"{r['seconds']:.1f} s / {r['bare_seconds']:.1f} s",
         f"{r['seconds'] / r['bare_seconds']:.2f}x", str(r["hvps"])),
        (name, "top-3 spectrum: wall time / its own HVPs' time",
         f"{r['seconds']:.1f} s / {r['hvp_seconds_inside']:.1f} s",
         f"{r['seconds'] / r['hvp_seconds_inside']:.2f}x (same moments: load-independent)", ""),
        (name, "top-3 spectrum: CPU time / its own HVPs' CPU time",
         f"{r['cpu_seconds']:.1f} s / {r['hvp_cpu_inside']:.1f} s",
         f"{r['cpu_seconds'] / r['hvp_cpu_inside']:.2f}x (first HVP, traced, as the others)", ""),
        (name, "top-3 eigenvalues, max residual / lambda_1",
         np.array2string(np.array(r["eigenvalues"]), precision=5),
         f"{max(r['relative_residuals']):.1e} (converged {r['converged']})", ""),
        (name, "peak RSS above the built model's",
         f"{r['peak_rss_mb'] - r['model_rss_mb']:.0f} MB",
         f"model {r['model_rss_mb']:.0f} MB, peak {r['peak_rss_mb']:.0f} MB", ""),
    ]


def _transformer_probe_setup():
    """A one-block Transformer encoder (12k parameters), trained one epoch with Adam, and its probe."""
    layers = keras.layers
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 30, (512, 20)).astype("int32")
    y = rng.integers(0, 4, 512).astype("int32")
    inputs = keras.Input((20,), dtype="int32")
    h = layers.Embedding(30, 32)(inputs)
    h = layers.LayerNormalization()(h + layers.MultiHeadAttention(2, 16)(h, h))
    h = layers.LayerNormalization()(h + layers.Dense(32)(layers.Dense(96, activation="relu")(h)))
    model = keras.Model(inputs, layers.Dense(4)(layers.GlobalAveragePooling1D()(h)))
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    return "Transformer (12k params), HessianMonitor(top_k=2)", model, (x[:256], y[:256]), \
        (x, y), {"top_k": 2}


def _mobilenet_probe_setup():
    """MobileNetV2 (alpha 0.35, 32x32, weights=None, 105 layers), one Adam step, a 16-example probe."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 4, 64).astype("int32")
    model = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=4)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=False))
    model.fit(x[:16], y[:16], batch_size=16, epochs=1, verbose=0)
    return "MobileNetV2 0.35 32x32, HessianMonitor(per_layer=True, top_k=1)", model, (x[:16], y[:16]), \
        (x[:16], y[:16]), {"top_k": 1, "per_layer": True, "preconditioned": False,
                           "gradient_overlap": False}


FIRST_PROBE_SETUPS = {"transformer": _transformer_probe_setup, "mobilenet": _mobilenet_probe_setup}


def first_probe_child(kind):
    """Probe times of two `HessianMonitor`s on one model (fresh process: nothing traced before);
    prints one JSON line: CPU and wall seconds of each probe, the second monitor's too."""
    import json
    import tempfile

    import gradmon

    tf.config.threading.set_intra_op_parallelism_threads(1)  # CPU time ~ the work, under load too
    tf.config.threading.set_inter_op_parallelism_threads(1)
    name, model, probe, full, kwargs = FIRST_PROBE_SETUPS[kind]()
    out = {"name": name, "monitors": []}
    with tempfile.TemporaryDirectory() as logdir, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for probes in (3, 2):
            monitor = gradmon.HessianMonitor(logdir, data=probe, **kwargs)
            monitor.set_model(model)
            monitor.on_train_begin()
            times = []
            for step in range(probes):
                cpu, wall = time.process_time(), time.perf_counter()
                scalars = monitor.probe(100 * (step + 1))
                times.append((time.process_time() - cpu, time.perf_counter() - wall,
                              int(scalars["hessian/hvp_count"])))
                model.fit(full[0][:32], full[1][:32], batch_size=16, epochs=1, verbose=0)  # weights move
            monitor.on_train_end()
            out["monitors"].append(times)
    print(json.dumps(out))


def first_probe_rows(kinds=("transformer",), repeats=3):
    """First probe over a warm probe (the same monitor's last), CPU time, from `repeats` fresh
    processes: median and range; the second monitor's first probe too."""
    import json
    import subprocess

    rows = []
    for kind in kinds:
        runs = []
        for _ in range(repeats):
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--first-probe-child", kind],
                                 check=True, capture_output=True, text=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
        name = runs[0]["name"]
        first = [r["monitors"][0][0] for r in runs]
        warm = [r["monitors"][0][-1] for r in runs]
        second = [r["monitors"][1][0] for r in runs]
        for label, probes in (("first probe", first), ("a new monitor's first probe", second)):
            ratios = [p[0] / w[0] for p, w in zip(probes, warm)]
            rows.append((name, f"{label} / warm probe (CPU time)", f"{np.median(ratios):.2f}x",
                         f"range {min(ratios):.2f}-{max(ratios):.2f}x over {repeats} processes; "
                         f"{np.median([p[0] for p in probes]):.2f} s vs {np.median([w[0] for w in warm]):.2f} s "
                         f"CPU, wall {np.median([p[1] for p in probes]):.1f} s vs "
                         f"{np.median([w[1] for w in warm]):.1f} s",
                         f"{probes[0][2]} vs {warm[0][2]}"))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="digits model only")
    parser.add_argument("--scale", action="store_true",
                        help="also the 6.3 M-parameter MLP (minutes, ~3 GB)")
    parser.add_argument("--first-probe", nargs="*", choices=sorted(FIRST_PROBE_SETUPS),
                        help="only the first-probe rows (fresh processes) of these models "
                             "(default: transformer; mobilenet takes minutes)")
    parser.add_argument("--scale-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--first-probe-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scale_child:
        return scale_child()
    if args.first_probe_child:
        return first_probe_child(args.first_probe_child)
    builders = [digits_mlp] if args.quick else [digits_mlp, random_mlp]
    rows = []
    if args.first_probe is not None:
        builders = []
    for builder in builders:
        rows.extend(run(builder))
    if args.first_probe is None:
        rows.extend(monitor_overhead())
    rows.extend(first_probe_rows(tuple(args.first_probe or ("transformer",))))
    if args.scale:
        rows.extend(scale_rows())
    header = ("model", "quantity", "value", "rel. err / note", "HVPs")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(5)]
    line = " | ".join(h.ljust(w) for h, w in zip(header, widths))
    print(line)
    print("-" * len(line))
    for row in rows:
        print(" | ".join(str(c).ljust(w) for c, w in zip(row, widths)))


if __name__ == "__main__":
    main()
