"""gradmon summary: health reports of real runs, checked against the event files read independently."""

import argparse
import json
import math
import os
import shutil
import struct
import subprocess
import sys

import keras
import numpy as np
import pytest
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

import gradmon
from gradmon.summary import events, report
from gradmon import tags
from gradmon.measure import transforms as T
from gradmon.publish.writer import SummaryWriter
from helpers import read_events

pytestmark = pytest.mark.tensorflow_only  # needs TensorFlow: skipped whole under JAX/PyTorch (conftest.py)

RNG = np.random.default_rng(0)
X = RNG.normal(size=(64, 5)).astype(np.float32)
W = RNG.normal(size=(5, 1)).astype(np.float32)
Y = X @ W  # a linear regression target
STEPS = 48  # 6 epochs of 8 batches


def fit(model, logdir, lr, *, transform=None, extra_callbacks=(), y=Y, histogram_freq=0):
    m = gradmon.monitor(model, transform=transform, grouping="variable", stats="all")
    m.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    m.fit(X, y, batch_size=8, epochs=STEPS // 8, shuffle=False, verbose=0,
          callbacks=[gradmon.GradientMonitor(logdir, histogram_freq=histogram_freq), *extra_callbacks])
    return [v.path for v in m.trainable_variables]


def mlp():
    keras.utils.set_random_seed(1)
    return keras.Sequential([keras.Input((5,)), keras.layers.Dense(8, activation="tanh"),
                             keras.layers.Dense(1)])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: (logdir, variable paths)} of four real training runs."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    # Healthy: small lr; a clip threshold never reached; histograms and Keras' own summaries
    # in the same run.
    d = str(root / "healthy")
    out["healthy"] = d, fit(mlp(), d, 0.01, transform=T.clip_by_global_norm(1e6), histogram_freq=10,
                            extra_callbacks=[keras.callbacks.TensorBoard(d)])
    # Exploding: a deep linear net with a learning rate far past stability; norms reach inf, then NaN.
    keras.utils.set_random_seed(1)
    linear = keras.Sequential([keras.Input((5,)), keras.layers.Dense(8), keras.layers.Dense(1)])
    d = str(root / "exploding")
    out["exploding"] = d, fit(linear, d, 0.05, y=10 * Y)
    # Clipped at every step by a tiny global-norm threshold.
    d = str(root / "clipped")
    out["clipped"] = d, fit(mlp(), d, 0.01, transform=T.clip_by_global_norm(1e-4))
    # Three branches into one output: dead ReLUs (bias -100), a branch scaled by 1e-6, a live one.
    keras.utils.set_random_seed(1)
    inp = keras.Input((5,))
    dead = keras.layers.Dense(4, activation="relu", name="dead",
                              bias_initializer=keras.initializers.Constant(-100.0))(inp)
    faint = keras.layers.Rescaling(1e-6)(keras.layers.Dense(4, activation="tanh", name="faint")(inp))
    live = keras.layers.Dense(4, activation="tanh", name="live")(inp)
    head = keras.layers.Dense(1, name="head")(keras.layers.Concatenate()([dead, faint, live]))
    d = str(root / "dead")
    out["dead"] = d, fit(keras.Model(inp, head), d, 0.01)
    return out


# -- independent reference: the event files through tests/helpers.read_events ---------------


def events_of(logdir):
    return read_events(os.path.join(logdir, "train"))


def series(events, tag):
    steps = sorted(events[tag])
    return np.array(steps), np.array([events[tag][s] for s in steps])


def layers_of(paths):
    out = {}
    for p in paths:
        out.setdefault(p.rsplit("/", 1)[0], []).append(p)
    return out


def layer_norms(events, paths):
    """(steps, sqrt(sum of squared variable norms)) per step."""
    steps = sorted(events[tags.group_stat("raw", "norm", paths[0])])
    norms = np.array([[events[tags.group_stat("raw", "norm", p)][s] for s in steps] for p in paths])
    return np.array(steps), np.sqrt((norms**2).sum(axis=0))


def layer_update_ratio(events, paths, step):
    """||delta w_layer|| / ||w_layer|| with ||w_v|| = ||g_v|| / (||g_v|| / ||w_v||)."""
    w = np.array([events[tags.group_stat("raw", "norm", p)][step] / events[tags.grad_to_weight(p)][step]
                  for p in paths])
    u = np.array([events[tags.update_ratio(p)][step] for p in paths])
    return np.sqrt(np.sum((u * w) ** 2)) / np.sqrt(np.sum(w**2))


def table_rows(text):
    """{first column: other columns} of the layer table (up to the first blank line after it)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("layer "))
    rows = {}
    for line in lines[start + 1:]:
        if not line.strip():
            break
        cells = line.split()
        rows[cells[0]] = cells[1:]
    return rows


def as_number(cell):
    return float(cell.rstrip("%")) / 100 if cell.endswith("%") else float(cell)


def check_layer_rows(text, events, paths):
    """Every layer row's final norm, peak norm, peak step and update ratio, from the event files."""
    rows = table_rows(text)
    for layer, variables in layers_of(paths).items():
        steps, norms = layer_norms(events, variables)
        final, peak, peak_step, _, _, g2w, ratio, _ = rows[layer]
        assert as_number(final) == pytest.approx(norms[-1], rel=1e-3, abs=1e-30, nan_ok=True)
        assert as_number(peak) == pytest.approx(np.nanmax(norms), rel=1e-3, abs=1e-30)
        assert int(peak_step) == steps[np.nanargmax(norms)]
        if math.isfinite(norms[-1]) and norms[-1] > 0:
            expected = layer_update_ratio(events, variables, steps[-1])
            assert as_number(ratio) == pytest.approx(expected, rel=1e-3)
            w = [events[tags.group_stat("raw", "norm", p)][steps[-1]] / events[tags.grad_to_weight(p)][steps[-1]]
                 for p in variables]
            assert as_number(g2w) == pytest.approx(norms[-1] / np.linalg.norm(w), rel=1e-3)
    return rows


def kinds(rep):
    return sorted((f.kind, f.subject) for f in rep.flags)


# -- reports of real runs ----------------------------------------------------------------------


def test_healthy_run_has_no_flags_and_numbers_match_the_event_files(runs):
    logdir, paths = runs["healthy"]
    events = events_of(logdir)
    rep = report.health_report(report.load_run(logdir))
    assert rep.flags == []
    assert [l.name for l in rep.layers] == list(layers_of(paths))
    assert rep.summary.logged_steps == STEPS and rep.summary.last_step == STEPS
    steps, norm = series(events, tags.global_norm("raw"))
    assert rep.summary.early_median_norm == pytest.approx(np.median(norm[:5]), rel=1e-6)  # ceil(10% of 48)
    assert rep.summary.peak_norm == pytest.approx(norm.max(), rel=1e-6)
    for layer in rep.layers:
        _, norms = layer_norms(events, layer.variables)
        assert layer.final_norm == pytest.approx(norms[-1], rel=1e-6)
        assert layer.peak_norm == pytest.approx(norms.max(), rel=1e-6)
        assert layer.clipped_share == 0.0 and layer.nonfinite_steps == 0
        assert layer.tail_zero_fraction == 0.0
    assert rep.clipping_source == "layer"
    text = report.format_table(rep)
    rows = check_layer_rows(text, events, paths)
    assert rows["(global)"][:3] == [f"{norm[-1]:.4g}", f"{norm.max():.4g}", str(steps[norm.argmax()])]
    assert "flags: none" in text


def nan_poisoned_layers(events, paths):
    """The layers whose raw gradient norm is NaN/inf at every step of the tail (last 20 %)."""
    tail = math.ceil(0.2 * STEPS)
    return [layer for layer, names in layers_of(paths).items()
            if not np.isfinite(sum(series(events, tags.group_stat("raw", "norm", p))[1][-tail:] ** 2
                                   for p in names)).any()]


def test_exploding_run_is_flagged_and_nonfinite_steps_counted(runs):
    logdir, paths = runs["exploding"]
    events = events_of(logdir)
    steps, counts = series(events, tags.nonfinite_total("raw"))
    bad = steps[counts > 0]
    assert 0 < len(bad) < STEPS  # the run starts finite and blows up
    rep = report.health_report(report.load_run(logdir))
    # and each layer whose weights the NaN reached is named as such (not dead, not vanishing)
    poisoned = nan_poisoned_layers(events, paths)
    assert poisoned and kinds(rep) == sorted([("exploding", "global")] + [("nonfinite", l) for l in poisoned])
    assert rep.summary.nonfinite_steps == len(bad)
    assert rep.summary.first_nonfinite_step == bad[0]
    _, norm = series(events, tags.global_norm("raw"))
    assert np.nanmax(norm) > 100 * np.median(norm[:5])
    for layer in rep.layers:
        per_step = sum(series(events, tags.group_stat("raw", "nonfinite", p))[1] for p in layer.variables)
        assert layer.nonfinite_steps == np.sum(per_step > 0)
    text = report.format_table(rep)
    rows = check_layer_rows(text, events, paths)
    assert rows["(global)"][4] == str(len(bad))
    assert "EXPLODING [global]" in text and f"first at step {bad[0]}" in text
    # Non-finite steps alone are enough, whatever the factor.
    strict = report.health_report(report.load_run(logdir), report.Thresholds(explode_factor=1e300))
    assert kinds(strict) == kinds(rep)


def test_persistent_clipping_is_flagged_with_the_share_from_the_clip_ratio(runs):
    logdir, paths = runs["clipped"]
    events = events_of(logdir)
    _, ratio = series(events, tags.CLIP_RATIO)
    rep = report.health_report(report.load_run(logdir))
    assert kinds(rep) == [("clipping", "global")]
    assert rep.summary.clipped_share == pytest.approx(np.mean(ratio < 1 - 1e-6)) == 1.0
    for layer in rep.layers:
        raw = sum(series(events, tags.group_stat("raw", "norm", p))[1] ** 2 for p in layer.variables)
        out = sum(series(events, tags.group_stat("transformed", "norm", p))[1] ** 2 for p in layer.variables)
        assert layer.clipped_share == pytest.approx(np.mean(np.sqrt(out) < np.sqrt(raw) * (1 - 1e-6)))
    text = report.format_table(rep)
    rows = check_layer_rows(text, events, paths)
    assert all(rows[layer][3] == "100%" for layer in layers_of(paths))
    # Clipped in 100% of the tail: flagged even when every tail step must be clipped.
    assert kinds(report.health_report(report.load_run(logdir), report.Thresholds(clip_share=1.0))) == [
        ("clipping", "global")]


def test_dead_and_vanishing_layers_are_flagged(runs):
    logdir, paths = runs["dead"]
    events = events_of(logdir)
    rep = report.health_report(report.load_run(logdir))
    assert kinds(rep) == [("dead", "dead"), ("vanishing", "faint")]
    _, dead_norm = layer_norms(events, layers_of(paths)["dead"])
    assert np.all(dead_norm == 0)
    finals = {layer: layer_norms(events, v)[1][-1] for layer, v in layers_of(paths).items()}
    assert finals["faint"] < 1e-3 * max(finals.values()) < finals["live"]
    text = report.format_table(rep)
    rows = check_layer_rows(text, events, paths)
    assert rows["dead"][7] == "100%" and rows["live"][7] == "0%"
    # The head's kernel sees the dead branch's zeros; its 12 + 1 entries weighted by size,
    # averaged over the last 10 steps (20% of 48).
    kernel, bias = (series(events, tags.group_stat("raw", "zero_fraction", p))[1][-10:]
                    for p in layers_of(paths)["head"])
    assert rows["head"][7] == f"{np.mean((12 * kernel + bias) / 13):.0%}" != "0%"
    # A stricter vanishing ratio no longer flags "faint".
    assert kinds(report.health_report(report.load_run(logdir), report.Thresholds(vanish_ratio=1e-9))) == [
        ("dead", "dead")]


def test_curvature_trend_and_edge_of_stability_flag(runs, tmp_path):
    logdir = str(tmp_path / "eos")
    shutil.copytree(runs["healthy"][0], logdir)
    eigen = [2.0, 3.0, 5.0, 8.0, 9.0, 12.0, 13.0, 14.0]
    eos = [0.5, 0.7, 0.9, 1.0, 1.05, 1.2, 1.3, 1.4]
    writer = SummaryWriter(os.path.join(logdir, "train"))
    for i, (lam, edge) in enumerate(zip(eigen, eos)):
        writer.write_scalars(5 * (i + 1), {tags.eigenvalue(1): lam,
                                           tags.EDGE_OF_STABILITY: edge})
    writer.close()
    run = report.load_run(logdir)
    rep = report.health_report(run)
    c = rep.curvature
    assert (c.probes, c.first_step, c.last_step) == (8, 5, 40)
    assert (c.eigenvalue.first, c.eigenvalue.last, c.eigenvalue.max) == (2.0, 14.0, 14.0)
    assert (c.edge_of_stability.first, c.edge_of_stability.last) == pytest.approx((0.5, 1.4))
    assert kinds(rep) == [("edge_of_stability", "global")]  # last 2 of 8 probes above 1.1
    # Over the last half of the probes, 1.05 is not past the edge.
    assert report.health_report(run, report.Thresholds(tail_fraction=0.5)).flags == []
    text = report.format_table(rep)
    assert "curvature: 8 Hessian probe(s), steps 5-40" in text
    assert text.split("lr*lambda_1/2")[1].split()[:3] == ["0.5", "1.4", "1.4"]
    png = tmp_path / "eos.png"
    report.plot(run, rep, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_load_run_accepts_the_run_dir_or_its_parent_and_keeps_only_scalars(runs):
    logdir, paths = runs["healthy"]
    run = report.load_run(logdir)
    assert set(report.load_run(os.path.join(logdir, "train"))) == set(run)
    events = events_of(logdir)
    steps, values = run[tags.group_stat("raw", "norm", paths[0])]
    assert steps.tolist() == list(range(1, STEPS + 1))
    by_step = events[tags.group_stat("raw", "norm", paths[0])]
    np.testing.assert_array_equal(values, [by_step[s] for s in steps])
    assert "epoch_loss" in run  # Keras' TensorBoard scalars are read too
    assert not any(t.startswith(tags.histogram("raw", "")) for t in run)  # histograms are not scalars


def test_load_run_last_value_wins(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    writer.write_scalars(1, {tags.global_norm("raw"): 1.0})
    writer.write_scalars(2, {tags.global_norm("raw"): 2.0})
    writer.write_scalars(1, {tags.global_norm("raw"): 3.0})  # a resumed run rewrites step 1
    writer.close()
    steps, values = report.load_run(str(tmp_path))[tags.global_norm("raw")]
    assert steps.tolist() == [1, 2] and values.tolist() == [3.0, 2.0]


def test_grouping_layer_makes_each_logged_group_a_row(runs):
    _, paths = runs["healthy"]
    rep = report.health_report(report.load_run(runs["healthy"][0]), grouping="layer")
    assert [l.variables for l in rep.layers] == [[p] for p in paths]


# -- command line --------------------------------------------------------------------------------


def summary(argv):
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    return report.run_command(parser.parse_args(argv))


def test_cli_json_parses_and_png_is_written(runs, tmp_path, capsys):
    logdir, paths = runs["exploding"]
    png = tmp_path / "exploding.png"
    assert summary([logdir, "--json", "--png", str(png)]) == 0
    out = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    events = events_of(logdir)
    assert [f["kind"] for f in out["flags"]] == ["exploding"] + ["nonfinite"] * len(
        nan_poisoned_layers(events, paths)) and out["flags"][0]["explanation"]
    _, counts = series(events, tags.nonfinite_total("raw"))
    assert out["summary"]["nonfinite_steps"] == np.sum(counts > 0)
    assert out["summary"]["final_norm"] == "nan" and out["summary"]["peak_norm"] == "inf"
    assert [l["name"] for l in out["layers"]] == list(layers_of(paths))
    data = png.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_table_and_thresholds(runs, capsys):
    logdir, _ = runs["clipped"]
    assert summary([logdir]) == 0
    assert "CLIPPING [global]" in capsys.readouterr().out
    assert summary([logdir, "--clip-share", "1.0", "--tail-fraction", "0.1"]) == 0
    assert "CLIPPING" in capsys.readouterr().out
    assert summary([logdir, "--clip-share", "0"]) == 2
    assert "Invalid value for argument `clip_share`" in capsys.readouterr().err


def test_cli_without_gradmon_logs_exits_2(tmp_path, capsys):
    assert summary([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "missing" in err and "not a directory" in err
    assert summary([str(tmp_path)]) == 2
    assert "No event files" in capsys.readouterr().err
    writer = SummaryWriter(str(tmp_path / "train"))  # a run with someone else's scalars only
    writer.write_scalars(1, {"epoch_loss": 1.0})
    writer.close()
    assert summary([str(tmp_path)]) == 2
    assert "No gradmon statistics" in capsys.readouterr().err


def test_png_without_matplotlib_says_how_to_install(runs, tmp_path, monkeypatch, capsys):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    logdir, _ = runs["healthy"]
    with pytest.raises(ImportError, match="gradmon summary --png needs matplotlib: pip install matplotlib"):
        report.plot(report.load_run(logdir), report.health_report(report.load_run(logdir)), "x.png")
    assert summary([logdir, "--png", str(tmp_path / "x.png")]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("kwargs", [dict(explode_factor=0), dict(vanish_ratio=-1.0),
                                    dict(tail_fraction=1.5), dict(clip_share=float("nan"))])
def test_thresholds_reject_invalid_values(kwargs):
    (name, value), = kwargs.items()
    with pytest.raises(ValueError, match=rf"`{name}`.*Received: {name}="):
        report.Thresholds(**kwargs)


# -- hand-built event files ----------------------------------------------------------------------
# Written here record by record (TFRecord framing with tensorboard's own pure-Python CRC32C, float32
# scalars as TensorFlow writes them), so that each judgement is checked on numbers chosen for it.


def _record(payload):
    header = struct.pack("<Q", len(payload))
    return (header + struct.pack("<I", masked_crc32c(header)) + payload
            + struct.pack("<I", masked_crc32c(payload)))


def write_events(directory, rows, name="events.out.tfevents.0000000001.test"):
    """Writes `[(step, {tag: value})]`, one event per row; returns `[(offset, step)]` of the records."""
    os.makedirs(directory, exist_ok=True)
    data, offsets = _record(event_pb2.Event(file_version="brain.Event:2").SerializeToString()), []
    for step, mapping in rows:
        values = [summary_pb2.Summary.Value(tag=tag, tensor=tensor_pb2.TensorProto(
            dtype=types_pb2.DT_FLOAT, tensor_shape=tensor_shape_pb2.TensorShapeProto(),
            float_val=[value])) for tag, value in mapping.items()]
        offsets.append((len(data), step))
        data += _record(event_pb2.Event(step=step, summary=summary_pb2.Summary(value=values))
                        .SerializeToString())
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.write(data)
    return path, offsets


def f32(x):
    return np.asarray(x, dtype=np.float32).astype(np.float64)


def variable_rows(steps, variables, *, g2w=True, update=True, zeros=None):
    """`{step: {tag: value}}` from `variables = {path: (norm[t], weight_norm[t], update_ratio[t], size)}`.

    A zero weight norm gives NaN ratios (as the monitor writes them); the global norm is the
    root sum of squares of the variables' norms.
    """
    rows = {int(s): {} for s in steps}
    for i, step in enumerate(steps):
        row = rows[int(step)]
        row[tags.global_norm("raw")] = float(np.sqrt(sum(v[0][i] ** 2 for v in variables.values())))
        row[tags.nonfinite_total("raw")] = 0.0
        for path, (norm, weight, ratio, size) in variables.items():
            row[tags.group_stat("raw", "norm", path)] = norm[i]
            row[tags.group_stat("raw", "rms", path)] = norm[i] / np.sqrt(size)
            row[tags.group_stat("raw", "nonfinite", path)] = 0.0
            row[tags.group_stat("raw", "zero_fraction", path)] = 0.0 if zeros is None else zeros.get(path, 0.0)
            if g2w:
                row[tags.grad_to_weight(path)] = norm[i] / weight[i] if weight[i] > 0 else float("nan")
            if update:
                row[tags.update_ratio(path)] = ratio[i] if weight[i] > 0 else float("nan")
    return rows


def run_of(tmp_path, rows, name="run"):
    directory = str(tmp_path / name)
    write_events(directory, sorted(rows.items()))
    return directory


def transformer_at_init(steps=30, seed=0):
    """Per-variable series shaped like a Transformer block's first Adam steps (measured on
    `keras.layers.MultiHeadAttention` + FFN under gradmon.monitor): query/key gradients 1e-3
    to 1e-5 of the value projection's, every layer's update ratio near 1.5e-3."""
    rng = np.random.default_rng(seed)
    scales = {  # layer: (gradient norm, weight norm, update ratio)
        "embed": (2.0, 3.4, 7.9e-3), "attn/query": (1.6e-3, 8.0, 1.4e-3),
        "attn/key": (1.2e-4, 8.0, 1.4e-3), "attn/value": (8.0, 8.0, 1.9e-3),
        "attn/attention_output": (7.6, 8.0, 1.9e-3), "ffn1": (0.36, 9.3, 2.3e-3),
        "ffn2": (0.9, 9.2, 2.0e-3), "head": (0.88, 3.9, 1.6e-3)}
    variables = {}
    for layer, (g, w, u) in scales.items():
        jitter = lambda: np.exp(rng.normal(0, 0.1, steps))
        if layer == "embed":
            variables["embed/embeddings"] = (g * jitter(), np.full(steps, w), u * jitter(), 200 * 64)
            continue
        variables[f"{layer}/kernel"] = (g * jitter(), np.full(steps, w), u * jitter(), 64 * 64)
        bias_w = np.r_[0.0, 0.01 * np.arange(1, steps)]  # zero-initialised, then moving
        variables[f"{layer}/bias"] = (0.1 * g * jitter(), bias_w, 0.5 * jitter(), 64)
    return variables


def expected_layer_update(variables, names, tail):
    """Numpy reference: ||delta w|| / ||w|| of a layer per step over variables with w > 0,
    median over the last `tail` steps."""
    u = np.array([f32(np.where(variables[n][1] > 0, variables[n][2], np.nan)) for n in names])
    g = np.array([f32(variables[n][0]) for n in names])
    g2w = np.array([f32(np.where(variables[n][1] > 0, variables[n][0] / np.where(variables[n][1] > 0, variables[n][1], 1), np.nan)) for n in names])
    w = np.where(np.isfinite(g2w), g / g2w, 0.0)
    with np.errstate(invalid="ignore"):
        per_step = np.sqrt(np.nansum((u * w) ** 2, axis=0)) / np.sqrt(np.sum(w**2, axis=0))
    return float(np.median(per_step[-tail:]))


def test_transformer_at_init_under_adam_is_judged_by_update_ratios(tmp_path):
    variables = transformer_at_init()
    steps = np.arange(1, 31)
    rep = report.health_report(report.load_run(run_of(tmp_path, variable_rows(steps, variables))))
    assert rep.flags == [] and rep.notes == []
    layers = {l.name: l for l in rep.layers}
    for name in ("attn/query", "attn/key", "head"):
        names = [f"{name}/kernel", f"{name}/bias"]
        assert layers[name].tail_update_ratio == pytest.approx(
            expected_layer_update(variables, names, tail=6), rel=1e-5)
    # The gradient norms alone would call query and key vanishing ...
    finals = {l: np.sqrt(sum(f32(v[0])[-1] ** 2 for p, v in variables.items() if p.startswith(l + "/")))
              for l in layers}
    assert finals["attn/key"] < finals["attn/query"] < 1e-3 * max(finals.values())
    # ... and that is what a run without update ratios gets, with the evidence named.
    no_ratios = report.health_report(report.load_run(
        run_of(tmp_path, variable_rows(steps, variables, update=False), "no_ratios")))
    assert kinds(no_ratios) == [("vanishing", "attn/key"), ("vanishing", "attn/query")]
    assert all("evidence: raw gradient norms (no update ratios logged)" in f.detail for f in no_ratios.flags)
    rows = table_rows(report.format_table(no_ratios))
    assert all(row[6] == "-" and row[5] != "-" for name, row in rows.items() if name != "(global)")
    assert [f.subject for f in no_ratios.flags] == ["attn/key", "attn/query"]  # worst first
    # A layer whose updates really stall is still caught, on update ratios.
    stalled = dict(variables)
    norm, weight, ratio, size = stalled["ffn1/kernel"]
    stalled["ffn1/kernel"] = (norm, weight, ratio * 1e-5, size)
    stalled["ffn1/bias"] = (stalled["ffn1/bias"][0], np.full(30, 0.0), ratio, 64)  # undefined throughout
    rep = report.health_report(report.load_run(run_of(tmp_path, variable_rows(steps, stalled), "stalled")))
    assert kinds(rep) == [("vanishing", "ffn1")]
    reference = np.median([l.tail_update_ratio for l in rep.layers])
    assert rep.flags[0].detail.endswith("evidence: update ratios")
    assert f"{reference:.4g}" in rep.flags[0].detail


def mixed_precision_rows(old_style, genuine_nan_at=None, steps=40):
    """A float16 warm-up: the LossScaleOptimizer overflows at steps 1-4 and 30 (scale 32768 halved
    to 2048, doubled to 4096 at step 29, halved back). New runs count the overflows in
    `gradients/overflow_steps` and write no gradient statistics at those steps; old runs wrote NaN/inf
    norms there (and `gradients/skipped_steps`)."""
    rng = np.random.default_rng(3)
    overflow = {1, 2, 3, 4, 30}
    scale, rows, count = 32768.0, {}, 0
    for step in range(1, steps + 1):
        if step in overflow:
            scale /= 2
            count += 1
        if step == 29:
            scale *= 2
        row = {tags.LOSS_SCALE: scale, tags.SKIPPED_STEPS: float(count)}
        if not old_style:
            row[tags.OVERFLOW_STEPS] = float(count)
        bad = step in overflow or step == genuine_nan_at
        if bad and not old_style and step != genuine_nan_at:
            rows[step] = row  # only the counters
            continue
        norm = float("nan") if bad else float(rng.uniform(0.5, 2.0))
        row.update({tags.global_norm("raw"): norm, tags.nonfinite_total("raw"): 12.0 if bad else 0.0,
                    tags.group_stat("raw", "norm", "dense/kernel"): norm,
                    tags.group_stat("raw", "nonfinite", "dense/kernel"): 12.0 if bad else 0.0})
        rows[step] = row
    return rows


@pytest.mark.parametrize("old_style", [False, True], ids=["overflow_steps", "loss_scale_only"])
def test_loss_scale_overflows_are_not_explosions(tmp_path, old_style):
    rows = mixed_precision_rows(old_style)
    rep = report.health_report(report.load_run(run_of(tmp_path, rows)))
    assert rep.flags == []
    assert kinds(type("R", (), {"flags": rep.notes})) == [("loss_scale_overflow", "global")]
    assert rep.summary.overflow_steps == 5 and rep.summary.nonfinite_steps == 0
    assert rep.summary.excluded_steps == ([1, 2, 3, 4, 30] if old_style else [])
    finite = [r[tags.global_norm("raw")] for _, r in sorted(rows.items())
              if tags.global_norm("raw") in r and np.isfinite(r[tags.global_norm("raw")])]
    assert len(finite) == 35
    assert rep.summary.early_median_norm == pytest.approx(np.median(f32(finite[:4])), rel=1e-6)  # ceil(3.5)
    assert rep.summary.peak_norm == pytest.approx(np.max(f32(finite)), rel=1e-6)
    assert rep.summary.final_loss_scale == 2048.0
    text = report.format_table(rep)
    assert "nan" not in text and "EXPLODING" not in text and "learning rate" not in text
    assert "LOSS_SCALE_OVERFLOW" in text and "loss scale 16384 -> 2048" in text


@pytest.mark.parametrize("old_style", [False, True], ids=["overflow_steps", "loss_scale_only"])
def test_nan_without_an_overflow_is_still_an_explosion(tmp_path, old_style):
    rep = report.health_report(report.load_run(run_of(tmp_path, mixed_precision_rows(old_style, 35))))
    assert kinds(rep) == [("exploding", "global")]
    assert rep.summary.nonfinite_steps == 1 and rep.summary.first_nonfinite_step == 35
    assert "1 step(s) with NaN/inf gradients, first at step 35" in rep.flags[0].detail


def test_loss_scale_below_one_is_an_explosion(tmp_path):
    rows = mixed_precision_rows(old_style=False)
    for step in range(31, 41):
        rows[step][tags.LOSS_SCALE] = 2.0 ** -(step - 30)
    rep = report.health_report(report.load_run(run_of(tmp_path, rows)))
    assert kinds(rep) == [("exploding", "global")]
    assert f"loss scale fell to {2.0 ** -10:.4g} (< 1)" in rep.flags[0].detail


def test_partly_dead_layers_get_a_note_dead_ones_a_flag_embeddings_neither(tmp_path):
    steps = np.arange(1, 21)
    ones = np.ones(20)
    variables = {"relu/kernel": (ones, ones, ones * 1e-3, 64), "relu/bias": (ones, ones, ones * 1e-3, 8),
                 "dead/kernel": (ones, ones, ones * 1e-3, 64), "embed/embeddings": (ones, ones, ones * 1e-3, 1000),
                 "ok/kernel": (ones, ones, ones * 1e-3, 16)}
    zeros = {"relu/kernel": 0.7, "relu/bias": 0.6, "dead/kernel": 0.995, "embed/embeddings": 0.97}
    rep = report.health_report(report.load_run(run_of(tmp_path, variable_rows(steps, variables, zeros=zeros))))
    assert kinds(rep) == [("dead", "dead")]
    assert [(n.kind, n.subject) for n in rep.notes] == [("inactive", "relu")]
    relu = (64 * f32(0.7) + 8 * f32(0.6)) / 72  # weighted by size, (norm / rms)^2
    assert f"mostly inactive: {relu:.1%} of gradient entries" in rep.notes[0].detail
    layers = {l.name: l for l in rep.layers}
    assert layers["relu"].tail_zero_fraction == pytest.approx(relu, rel=1e-4)
    assert layers["embed"].tail_zero_fraction == pytest.approx(f32(0.97)) and not layers["embed"].zeros_judged
    text = report.format_table(rep)
    assert "notes:\n  INACTIVE [relu]" in text and "[embed]" not in text
    # The thresholds move the line.
    rep = report.health_report(report.load_run(str(tmp_path / "run")),
                               report.Thresholds(inactive_zero_fraction=0.75, dead_zero_fraction=0.5))
    assert kinds(rep) == [("dead", "dead"), ("dead", "relu")] and rep.notes == []


def test_long_lists_name_the_worst_and_count_the_rest(tmp_path, capsys):
    steps = np.arange(1, 11)
    rows = {}
    for i, step in enumerate(steps):
        row = {tags.global_norm("raw"): 10.0, tags.CLIP_RATIO: 0.5}
        for j in range(100):
            row[tags.group_stat("raw", "norm", f"layer{j:03d}/kernel")] = 1.0
            row[tags.group_stat("transformed", "norm", f"layer{j:03d}/kernel")] = 1.0 if (j, i) == (7, 9) else 0.5
        for j in range(12):  # no update ratios: judged on norms, the smallest first
            row[tags.group_stat("raw", "norm", f"tiny{j:02d}/kernel")] = 10.0 ** -(4 + (j * 7) % 12)
            row[tags.group_stat("transformed", "norm", f"tiny{j:02d}/kernel")] = 10.0 ** -(4 + (j * 7) % 12)
        rows[int(step)] = row
    logdir = run_of(tmp_path, rows)
    rep = report.health_report(report.load_run(logdir))
    clipping = [f for f in rep.flags if f.kind == "clipping"][0]
    # layer007 is clipped in half of the tail of 2 steps; every other one in all: 007 comes last.
    assert len(clipping.layers) == 100 and clipping.layers[-1] == "layer007"
    assert summary([logdir]) == 0
    text = capsys.readouterr().out
    line = next(l for l in text.splitlines() if "CLIPPING" in l)
    assert line.endswith("layers clipped that often: layer000, layer001, layer002, layer003, layer004 "
                         "... and 95 more")
    vanishing = [l for l in text.splitlines() if l.startswith("  VANISHING")]
    order = np.argsort([(j * 7) % 12 for j in range(12)])[::-1]  # smallest norm first
    assert [l.split("[")[1].split("]")[0] for l in vanishing] == [f"tiny{j:02d}" for j in order[:5]]
    assert "  ... and 7 more VANISHING layers (all of them in --json)" in text
    assert summary([logdir, "--max-listed", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert sum(f["kind"] == "vanishing" for f in out["flags"]) == 12
    assert summary([logdir, "--max-listed", "0"]) == 2
    assert "Invalid value for argument `max_listed`" in capsys.readouterr().err


@pytest.mark.parametrize("style", ["nan", "zero"], ids=["nan_ratio", "older_gradmon_zero"])
def test_ratios_of_a_zero_weight_are_undefined(tmp_path, capsys, style):
    """A zero-initialised bias: the new monitor writes NaN ratios, older gradmon wrote 0.0."""
    undefined = float("nan") if style == "nan" else 0.0
    rows = {}
    for step in (1, 2, 3):
        rows[step] = {tags.global_norm("raw"): 3.0,
                      tags.group_stat("raw", "norm", "dense/kernel"): 2.0,
                      tags.grad_to_weight("dense/kernel"): 0.5, tags.update_ratio("dense/kernel"): 0.01,
                      tags.group_stat("raw", "norm", "dense/bias"): 1.5,
                      tags.grad_to_weight("dense/bias"): undefined, tags.update_ratio("dense/bias"): undefined,
                      tags.group_stat("raw", "norm", "norm/beta"): 0.5,
                      tags.grad_to_weight("norm/beta"): undefined, tags.update_ratio("norm/beta"): undefined,
                      tags.group_stat("raw", "norm", "plain/kernel"): 1.0}
    logdir = run_of(tmp_path, rows)
    rep = report.health_report(report.load_run(logdir))
    layers = {l.name: l for l in rep.layers}
    # dense: ||g|| over both variables / ||w|| of the kernel alone (4 = 2 / 0.5); the update
    # ratio of the kernel alone, the bias's being undefined.
    assert layers["dense"].final_grad_to_weight == pytest.approx(np.hypot(2.0, 1.5) / 4.0)
    assert layers["dense"].final_update_ratio == pytest.approx(f32(0.01))
    assert layers["norm"].final_grad_to_weight is None and layers["norm"].final_update_ratio is None
    assert layers["norm"].update_ratio_logged and layers["norm"].grad_to_weight_logged
    assert not layers["plain"].update_ratio_logged and not layers["plain"].grad_to_weight_logged
    assert summary([logdir]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert rows["norm"][5:7] == ["undefined", "undefined"] and rows["plain"][5:7] == ["-", "-"]
    assert rows["dense"][6] == f"{f32(0.01):.4g}"
    assert summary([logdir, "--json"]) == 0
    out = {l["name"]: l for l in json.loads(capsys.readouterr().out)["layers"]}
    assert out["norm"]["final_update_ratio"] is None and out["norm"]["final_grad_to_weight"] is None
    # Undefined ratios are not non-finite gradients.
    assert rep.flags == [] and rep.summary.nonfinite_steps == 0


# -- damaged event files -------------------------------------------------------------------------


def steps_rows(n=150):
    rng = np.random.default_rng(5)
    return [(step, {tags.global_norm("raw"): float(rng.uniform(1, 2)),
                    tags.group_stat("raw", "norm", "dense/kernel"): 1.0}) for step in range(1, n + 1)]


def test_crc32c_matches_tensorboards_reference():
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 256, size=n, dtype=np.uint8).tobytes()
              for n in (0, 1, 3, 4, 5, 8, 8, 17, 100, 257, 1000, 5000, 12)]
    expected = [masked_crc32c(c) for c in chunks]
    assert events._masked(events._crc32c_many(chunks)).tolist() == expected
    assert [int(events._masked(events._crc32c(c))) for c in chunks] == expected


@pytest.mark.parametrize("where", ["payload", "length"])
def test_corrupted_file_is_reported_with_its_last_good_step_and_read_past(tmp_path, capsys, where):
    path, offsets = write_events(str(tmp_path / "train"), steps_rows())
    offset, step = offsets[50]
    assert step == 51
    data = bytearray(open(path, "rb").read())
    data[offset + (20 if where == "payload" else 2)] ^= 0x5A  # a flipped byte in step 51's record
    open(path, "wb").write(bytes(data))
    run = report.load_run(str(tmp_path))
    steps, _ = run[tags.global_norm("raw")]
    assert steps.tolist() == [s for s in range(1, 151) if s != 51]  # only the damaged record is lost
    (problem,) = run.problems
    assert (problem.path, problem.kind, problem.offset) == (path, "corrupt", offset)
    assert (problem.last_good_step, problem.resumed_step) == (50, 52)
    assert problem.skipped_bytes == offsets[51][0] - offset
    assert summary([str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert f"warning: {path}: corrupted at byte {offset}" in captured.err
    assert "last good step 50; reading resumed at step 52" in captured.err
    assert captured.out.startswith(f"WARNING: {path}: corrupted")
    assert summary([str(tmp_path), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["read_problems"][0]["last_good_step"] == 50


def test_garbage_to_the_end_and_a_cut_last_record(tmp_path, capsys):
    path, offsets = write_events(str(tmp_path / "train"), steps_rows())
    data = open(path, "rb").read()
    offset = offsets[100][0]
    open(path, "wb").write(data[:offset] + bytes(range(256)) * 40)  # steps 101-150 overwritten
    run = report.load_run(str(tmp_path))
    assert run[tags.global_norm("raw")][0].tolist() == list(range(1, 101))
    (problem,) = run.problems
    assert (problem.kind, problem.last_good_step, problem.resumed_step) == ("corrupt", 100, None)
    assert "nothing after it could be read" in problem.message
    assert summary([str(tmp_path)]) == 1
    capsys.readouterr()
    # A run being written (or killed mid-write) ends inside a record: a warning, exit status 0.
    open(path, "wb").write(data[:offsets[-1][0] + 30])
    run = report.load_run(str(tmp_path))
    assert run[tags.global_norm("raw")][0].tolist() == list(range(1, 150))
    (problem,) = run.problems
    assert (problem.kind, problem.last_good_step, problem.skipped_bytes) == ("incomplete", 149, 30)
    assert summary([str(tmp_path)]) == 0
    assert "incomplete last record" in capsys.readouterr().err


# -- PNG, imports ---------------------------------------------------------------------------------


def test_png_into_a_missing_directory_is_created_and_an_unwritable_path_is_an_error(tmp_path, capsys):
    logdir = run_of(tmp_path, dict(steps_rows(20)))
    png = tmp_path / "new" / "deeper" / "report.png"
    assert summary([logdir, "--png", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "afile").write_text("")
    assert summary([logdir, "--png", str(tmp_path / "afile" / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "Invalid value for argument `png`. Expected a writable file path." in err
    assert "Traceback" not in err


def test_report_and_summary_do_not_import_tensorflow(tmp_path):
    logdir = run_of(tmp_path, dict(steps_rows(20)))
    code = ("import sys, gradmon, gradmon.summary, gradmon.summary.report\n"
            "gradmon.report.health_report\n"  # the lazy alias
            "assert 'tensorflow' not in sys.modules, 'import gradmon.summary.report imported tensorflow'\n"
            "from gradmon.__main__ import main\n"
            f"rc = main(['summary', {logdir!r}])\n"
            "assert 'tensorflow' not in sys.modules, 'gradmon summary imported tensorflow'\n"
            "sys.exit(rc)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "flags: none" in done.stdout


def test_skipped_nan_steps_of_an_old_run_without_loss_scale_say_what_is_unknown(tmp_path):
    rows = mixed_precision_rows(old_style=True)
    for row in rows.values():
        del row[tags.LOSS_SCALE]
    rep = report.health_report(report.load_run(run_of(tmp_path, rows)))
    assert kinds(rep) == [("exploding", "global")]  # the evidence to tell them apart is missing
    assert rep.summary.nonfinite_steps == 5 and rep.notes == []
    assert "all of them skipped (`gradients/skipped_steps`)" in rep.flags[0].detail
    # A NaN step that was applied gets no such hint.
    rows[35][tags.global_norm("raw")] = float("nan")
    rows[35][tags.nonfinite_total("raw")] = 3.0
    rep = report.health_report(report.load_run(run_of(tmp_path, rows, "applied")))
    assert rep.summary.nonfinite_steps == 6 and "all of them skipped" not in rep.flags[0].detail


def test_the_global_nonfinite_column_counts_the_unlogged_updates_the_flag_counts(tmp_path):
    """Logged every 5 steps; non-finite updates at the unlogged steps 2, 4 and 7 (the device
    counter `gradients/nonfinite_steps`, cumulative, written with each logged step) made the
    first layer's weights NaN: its ratios are NaN from then on and its gradient is ReLU(NaN) = 0,
    while every logged gradient is finite. The (global) row's non-finite cell counts those 3
    updates, as the exploding flag does; a layer's cell counts its logged steps (0)."""
    nan_updates = [2, 4, 7]
    steps = np.arange(5, 45, 5)
    n = len(steps)
    variables = {"dense/kernel": (np.zeros(n), np.full(n, np.nan), np.zeros(n), 40),
                 "dense/bias": (np.zeros(n), np.full(n, np.nan), np.zeros(n), 8),
                 "dense_1/kernel": (np.full(n, 1.0), np.full(n, 2.0), np.full(n, 1e-3), 8),
                 "dense_1/bias": (np.full(n, 0.1), np.full(n, 0.5), np.full(n, 1e-3), 1)}
    rows = variable_rows(steps, variables)
    for step, row in rows.items():
        row[tags.NONFINITE_STEPS] = float(sum(s <= step for s in nan_updates))
    rep = report.health_report(report.load_run(run_of(tmp_path, rows)))
    assert kinds(rep) == [("exploding", "global"), ("nonfinite", "dense")]
    assert rep.summary.nonfinite_steps == 0 and rep.summary.nonfinite_updates == len(nan_updates)
    text = report.format_table(rep)
    cells = table_rows(text)
    assert cells["(global)"][4] == str(len(nan_updates))  # read 0 before
    assert cells["dense"][4] == cells["dense_1"][4] == "0"
    assert f"{len(nan_updates)} update(s) with NaN/inf values" in text
    assert f"`{tags.NONFINITE_STEPS}`: {len(nan_updates)} update(s), 0 at logged steps" in text


def test_zeros_written_into_a_record_are_one_damaged_region(tmp_path):
    """A crash can leave a block of zeros inside a file: the record it splits and the zeros
    are one region, reading resumes at the next record."""
    path, offsets = write_events(str(tmp_path / "train"), steps_rows())
    data = open(path, "rb").read()
    offset = offsets[50][0]
    open(path, "wb").write(data[:offset + 30] + bytes(1 << 16) + data[offset + 30:])
    run = report.load_run(str(tmp_path))
    assert run[tags.global_norm("raw")][0].tolist() == [s for s in range(1, 151) if s != 51]
    (problem,) = run.problems
    assert (problem.offset, problem.last_good_step, problem.resumed_step) == (offset, 50, 52)
    assert problem.skipped_bytes == offsets[51][0] - offset + (1 << 16)


# -- a real Transformer block -----------------------------------------------------------------------


def transformer_block(vocab=200, seq=16, width=64):
    keras.utils.set_random_seed(0)
    inp = keras.Input((seq,), dtype="int32")
    x = keras.layers.Embedding(vocab, width, name="embed")(inp)
    x = keras.layers.LayerNormalization(name="ln1")(
        x + keras.layers.MultiHeadAttention(num_heads=4, key_dim=16, name="attn")(x, x))
    ffn = keras.layers.Dense(width, name="ffn2")(keras.layers.Dense(2 * width, activation="relu", name="ffn1")(x))
    x = keras.layers.GlobalAveragePooling1D()(keras.layers.LayerNormalization(name="ln2")(x + ffn))
    return keras.Model(inp, keras.layers.Dense(10, name="head", dtype="float32")(x))


@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
def test_transformer_block_at_init_under_adam_raises_no_flag(tmp_path, policy):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 200, size=(32 * 20, 16)).astype("int32")
    y = (x[:, 0] % 10).astype("int64")
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = gradmon.monitor(transformer_block(), grouping="variable", stats="all")
        model.compile(optimizer=keras.optimizers.Adam(1e-3),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x, y, batch_size=32, epochs=1, verbose=0,
                  callbacks=[gradmon.GradientMonitor(str(tmp_path))])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    events = events_of(str(tmp_path))
    rep = report.health_report(report.load_run(str(tmp_path)))
    assert rep.flags == [], report.format_table(rep)
    # What makes it a test: by gradient norms, query and key would be vanishing.
    norms = {}
    for tag, by_step in events.items():
        if tag.startswith("gradients/raw/norm/"):
            layer = tag[len("gradients/raw/norm/"):].rsplit("/", 1)[0]
            norms[layer] = norms.get(layer, 0.0) + by_step[max(by_step)] ** 2
    largest = max(np.sqrt(v) for v in norms.values())
    assert np.sqrt(norms["attn/key"]) < 1e-3 * largest
    assert "attn/key" in [l.name for l in rep.layers]
    if policy == "mixed_float16":
        overflows = events[tags.OVERFLOW_STEPS]
        assert rep.summary.overflow_steps == overflows[max(overflows)] >= 1  # the scale starts too high
        assert [n.kind for n in rep.notes] == ["loss_scale_overflow"]


def test_the_default_grouping_is_read_back_from_the_run(tmp_path):
    """A run monitored with the defaults (per-layer groups) records its configuration; the
    report makes each logged layer a row, without being told."""
    keras.utils.set_random_seed(3)
    base = keras.Sequential([keras.Input((5,)), keras.layers.Dense(8, activation="tanh", name="a"),
                             keras.layers.Dense(4, activation="tanh", name="b"), keras.layers.Dense(1, name="c")])
    base.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    base.fit(X, Y, batch_size=8, epochs=2, verbose=0, callbacks=[gradmon.GradientMonitor(str(tmp_path))])
    run = report.load_run(str(tmp_path))
    assert run.config["grouping"] == "layer" and run.config["stats"] == ["norm", "update_ratio"]
    rep = report.health_report(run)
    layers = [v.path.rsplit("/", 1)[0] for v in base.trainable_variables[::2]]
    assert [row.name for row in rep.layers] == layers
    norms = run[tags.group_stat(tags.RAW, "norm", layers[0])][1]
    assert rep.layers[0].final_norm == pytest.approx(norms[-1])


# -- issue 12: the optimizer's own edge of stability, spikes, optimizer state -------------------


def curvature_run(tmp_path, hessian, extra=None, steps=40, name="run"):
    """A healthy two-variable run with `hessian = {tag: [values at probe steps 5, 10, ...]}`
    and `extra = {step: {tag: value}}` merged in."""
    s = np.arange(1, steps + 1)
    rows = variable_rows(s, {"d/kernel": (np.ones(steps), np.full(steps, 2.0), np.full(steps, 1e-3), 8),
                             "d/bias": (np.ones(steps), np.full(steps, 1.0), np.full(steps, 1e-3), 2)})
    for tag, values in hessian.items():
        for i, value in enumerate(values):
            rows[5 * (i + 1)][tag] = value
    for step, mapping in (extra or {}).items():
        rows.setdefault(step, {}).update(mapping)
    return run_of(tmp_path, rows, name)


def adam_probes(ratios, lr=1e-3, beta_1=0.9):
    """Hessian tags as HessianMonitor writes them for Adam: lambda_1(P^-1 H) = ratio x 38/lr,
    lambda_1(H) tiny (lr * lambda_1 / 2 = 0.002)."""
    threshold = (2 + 2 * beta_1) / ((1 - beta_1) * lr)
    ratios = np.asarray(ratios, dtype=np.float64)
    return {tags.eigenvalue(1): [4.0] * len(ratios), tags.GD_EDGE_OF_STABILITY: [4.0 * lr / 2] * len(ratios),
            tags.preconditioned_eigenvalue(1): list(ratios * threshold),
            tags.STABILITY_THRESHOLD: [threshold] * len(ratios),
            tags.EDGE_OF_STABILITY: list(ratios)}


def notes_of(rep):
    return sorted((f.kind, f.subject) for f in rep.notes)


def test_adam_at_its_edge_of_stability_is_noted_from_the_preconditioned_sharpness(tmp_path, capsys):
    # the measurement: the ratio climbs to ~1 and oscillates at 0.62-0.95 after
    ratios = [0.2, 0.4, 0.6, 0.8, 0.94, 0.62, 0.95, 0.7]
    logdir = curvature_run(tmp_path, adam_probes(ratios))
    rep = report.health_report(report.load_run(logdir))
    c = rep.curvature
    assert c.edge_of_stability_meaning == "optimizer"
    assert c.gd_edge_of_stability.last == pytest.approx(0.002)
    assert c.preconditioned_eigenvalue.last == pytest.approx(0.7 * 38000, rel=1e-6)
    assert c.stability_threshold.last == pytest.approx(38000)
    assert c.edge_of_stability_on == "lambda_1(P^-1 H)"
    assert kinds(rep) == []  # 0.002 (lr * lambda_1 / 2) is not what judges Adam, nor is 0.95 "over"
    assert notes_of(rep) == [("at_edge_of_stability", "global")]
    tail = f32(ratios[-2:])  # the last 20 % of 8 probes
    note = rep.notes[0].detail
    assert note.startswith("lambda_1(P^-1 H) / the optimizer's threshold between "
                           f"{tail.min():.4g} and {tail.max():.4g}")
    assert f"(median {np.median(tail):.4g})" in note
    # configurable: the edge counted from 0.96 on, nothing to note
    assert report.health_report(report.load_run(logdir),
                                report.Thresholds(at_edge_of_stability=0.96)).notes == []
    assert summary([logdir]) == 0
    text = capsys.readouterr().out
    assert text.split("lambda_1(P^-1 H)")[1].split()[:3] == [f"{f32(0.2 * 38000):.4g}",
                                                              f"{f32(0.7 * 38000):.4g}",
                                                              f"{f32(0.95 * 38000):.4g}"]
    assert "edge of stability: lambda_1(P^-1 H) / the optimizer's own threshold (1 = at the edge)" in text
    assert "AT_EDGE_OF_STABILITY [global]" in text
    assert summary([logdir, "--at-edge-of-stability", "0.96"]) == 0
    assert "AT_EDGE_OF_STABILITY" not in capsys.readouterr().out
    assert summary([logdir, "--at-edge-of-stability", "-1"]) == 2
    assert "Invalid value for argument `at_edge_of_stability`" in capsys.readouterr().err


def test_over_the_optimizers_edge_is_flagged(tmp_path):
    ratios = [0.5, 0.9, 1.0, 1.05, 1.2, 1.3, 1.25, 1.4]
    rep = report.health_report(report.load_run(curvature_run(tmp_path, adam_probes(ratios))))
    assert kinds(rep) == [("edge_of_stability", "global")] and rep.notes == []
    assert rep.flags[0].detail == ("lambda_1(P^-1 H) / the optimizer's threshold between 1.25 and 1.4 "
                                   "at the last 2 Hessian probes (over the edge above 1.1)")


def test_one_probe_over_the_edge_is_named_as_one_value(tmp_path):
    """Two probes: the last 20 % is the last probe alone, named as its value (it read "between
    1.268 and 1.268 at the last 1 Hessian probe(s)")."""
    rep = report.health_report(report.load_run(curvature_run(tmp_path, adam_probes([1.553, 1.268]))))
    assert kinds(rep) == [("edge_of_stability", "global")]
    assert rep.flags[0].detail == (f"lambda_1(P^-1 H) / the optimizer's threshold {f32(1.268):.4g} "
                                   "at the last Hessian probe (over the edge above 1.1)")


def test_sgd_edge_is_judged_on_the_raw_sharpness(tmp_path):
    """SGD: no preconditioner; the ratio is lambda_1 / (2/lr), equal to lr * lambda_1 / 2."""
    lr, eig = 0.1, np.array([10.0, 15, 20, 22, 24, 25, 23, 24])
    probes = {tags.eigenvalue(1): list(eig), tags.GD_EDGE_OF_STABILITY: list(eig * lr / 2),
              tags.STABILITY_THRESHOLD: [2 / lr] * 8, tags.EDGE_OF_STABILITY: list(eig / (2 / lr))}
    rep = report.health_report(report.load_run(curvature_run(tmp_path, probes)))
    assert kinds(rep) == [("edge_of_stability", "global")]
    assert rep.flags[0].detail.startswith("lambda_1(H) / the optimizer's threshold between 1.15 and 1.2 ")


def test_a_large_gd_ratio_under_adam_far_from_its_own_edge_is_not_flagged(tmp_path):
    probes = adam_probes([0.01] * 8)
    probes[tags.GD_EDGE_OF_STABILITY] = [1.5] * 8  # plain GD would diverge; Adam does not
    rep = report.health_report(report.load_run(curvature_run(tmp_path, probes)))
    assert kinds(rep) == [] and rep.notes == []


def test_without_a_known_threshold_nothing_is_judged(tmp_path, capsys):
    probes = {tags.eigenvalue(1): [30.0] * 8, tags.GD_EDGE_OF_STABILITY: [1.5] * 8}
    logdir = curvature_run(tmp_path, probes)
    rep = report.health_report(report.load_run(logdir))
    assert rep.curvature.edge_of_stability is None and rep.curvature.edge_of_stability_meaning == "optimizer"
    assert kinds(rep) == [] and rep.notes == []
    assert summary([logdir]) == 0
    assert "edge of stability: no threshold known for this optimizer (none written)" in capsys.readouterr().out


def test_an_older_run_means_lr_lambda_over_2_and_is_judged_as_before_and_says_so(tmp_path, capsys):
    eos = [0.5, 0.7, 0.9, 1.0, 1.05, 1.2, 1.3, 1.4]
    logdir = curvature_run(tmp_path, {tags.eigenvalue(1): [2.0] * 8, tags.EDGE_OF_STABILITY: eos})
    rep = report.health_report(report.load_run(logdir))
    assert rep.curvature.edge_of_stability_meaning == "gradient_descent" and rep.curvature.edge_of_stability_on is None
    assert kinds(rep) == [("edge_of_stability", "global")]
    assert rep.flags[0].detail.startswith("lr * lambda_1 / 2 between 1.3 and 1.4 at the last 2 Hessian probes "
                                          "(threshold 1.1); an older run")
    # no "at the edge" note for the old meaning (judged as before): 0.95 at the tail says nothing new
    calm = curvature_run(tmp_path, {tags.eigenvalue(1): [2.0] * 8, tags.EDGE_OF_STABILITY: [0.95] * 8},
                         name="calm")
    assert report.health_report(report.load_run(calm)).notes == []
    assert summary([logdir]) == 0
    text = capsys.readouterr().out
    assert "its `hessian/edge_of_stability` is lr * lambda_1 / 2 (plain gradient descent's edge)" in text
    assert text.split("lr*lambda_1/2")[1].split()[:3] == ["0.5", "1.4", "1.4"]


def test_spikes_are_listed_with_their_steps_largest_first_in_text_and_json(tmp_path, capsys):
    spikes = {7: 8.5, 13: 12.0, 21: 6.25, 22: 30.0, 25: 7.0, 31: 9.0, 33: 6.5}
    extra = {step: {tags.SPIKE_AT: z} for step, z in spikes.items()}
    for step in range(1, 41):  # the count, on every logged step
        extra.setdefault(step, {})[tags.SPIKE_COUNT] = float(sum(s <= step for s in spikes))
    logdir = curvature_run(tmp_path, {}, extra)
    rep = report.health_report(report.load_run(logdir))
    order = sorted(spikes, key=lambda s: -spikes[s])
    assert rep.spikes.count == 7
    assert rep.spikes.steps == order and rep.spikes.zscores == [spikes[s] for s in order]
    assert notes_of(rep) == [("spikes", "global")] and kinds(rep) == []
    assert summary([logdir]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("  SPIKES"))
    assert line == ("  SPIKES [global] 7 gradient-norm spike(s), largest first: step 22 (z 30), "
                    "13 (z 12), 31 (z 9), 7 (z 8.5), 25 (z 7) ... and 2 more")
    assert summary([logdir, "--max-listed", "2"]) == 0  # as long as the other lists
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("  SPIKES"))
    assert line.endswith("step 22 (z 30), 13 (z 12) ... and 5 more")
    assert summary([logdir, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["spikes"] == {"count": 7, "steps": order, "zscores": [spikes[s] for s in order]}


def test_spike_count_beyond_the_written_spikes_is_said(tmp_path):
    extra = {10: {tags.SPIKE_AT: 9.0}, 40: {tags.SPIKE_COUNT: 3.0}}
    rep = report.health_report(report.load_run(curvature_run(tmp_path, {}, extra)))
    assert rep.spikes.count == 3 and rep.spikes.steps == [10]
    assert rep.notes[0].detail.endswith("; 2 without their step in the event files")


def test_no_spike_tags_no_spikes_and_a_zero_count_no_note(tmp_path):
    assert report.health_report(report.load_run(curvature_run(tmp_path, {}))).spikes is None
    rep = report.health_report(report.load_run(curvature_run(
        tmp_path, {}, {s: {tags.SPIKE_COUNT: 0.0} for s in range(1, 41)}, name="zero")))
    assert rep.spikes.count == 0 and rep.notes == []


def test_optimizer_cosines_are_shown_as_tail_medians(tmp_path, capsys):
    rng = np.random.default_rng(3)
    up, gm = rng.uniform(-1, 1, 40), rng.uniform(-1, 1, 40)
    up[-2] = np.nan  # a skipped step: undefined
    extra = {s: {tags.COSINE_UPDATE_GRADIENT: up[s - 1], tags.COSINE_GRADIENT_FIRST_MOMENT: gm[s - 1]}
             for s in range(1, 41)}
    logdir = curvature_run(tmp_path, {}, extra)
    rep = report.health_report(report.load_run(logdir))
    assert rep.optimizer.cosine_update_gradient == pytest.approx(np.nanmedian(f32(up[-8:])))
    assert rep.optimizer.cosine_gradient_first_moment == pytest.approx(np.median(f32(gm[-8:])))
    assert kinds(rep) == [] and rep.notes == []
    assert summary([logdir]) == 0
    assert (f"cos(update, -gradient) {np.nanmedian(f32(up[-8:])):.4g}, cos(gradient, first moment) "
            f"{np.median(f32(gm[-8:])):.4g}") in capsys.readouterr().out


def test_per_layer_curvature_and_new_tags_are_shown_and_drawn(tmp_path, capsys):
    probes = adam_probes([0.3] * 8)
    probes.update({tags.GRADIENT_OVERLAP: [0.9] * 7 + [0.8], tags.layer_eigenvalue("d"): [3.0] * 8,
                   tags.layer_eigenvalue("e"): [7.0] * 7 + [5.0]})
    logdir = curvature_run(tmp_path, probes)
    run = report.load_run(logdir)
    rep = report.health_report(run)
    assert rep.curvature.layer_eigenvalues == {"e": 5.0, "d": 3.0}
    assert rep.curvature.gradient_overlap.last == pytest.approx(0.8)
    assert summary([logdir, "--png", str(tmp_path / "c.png")]) == 0
    text = capsys.readouterr().out
    assert "per-layer top eigenvalue (last probe, largest first): e 5, d 3" in text
    assert text.split("gradient overlap")[1].split()[:3] == ["0.9", "0.8", "0.9"]
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_spikes_of_a_real_custom_loop_are_reported_at_the_steps_they_happened(tmp_path):
    """observe(on_spike="warn"), logged every 5th step; norms 50x at steps 40 and 52 (after the
    25-step warm-up): both reported with their own steps, z-scores as written in the events."""
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    net = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    logdir = str(tmp_path / "spiky")
    opt = gradmon.observe(keras.optimizers.SGD(1e-3), log_dir=logdir, on_spike="warn", update_freq=5)
    rng = np.random.default_rng(0)
    with pytest.warns(UserWarning, match="gradient-norm spike at step 40"):
        for step in range(1, 61):
            scale = 50.0 if step in (40, 52) else 1.0
            opt.apply_gradients(zip([tf.constant((scale * (1 + 0.05 * rng.normal(size=v.shape))).astype("float32"))
                                     for v in net.trainable_variables], net.trainable_variables))
    opt.gradmon.close()
    written = events_of(logdir)[tags.SPIKE_AT]
    rep = report.health_report(report.load_run(logdir))
    assert rep.spikes.count == 2 and sorted(rep.spikes.steps) == [40, 52] == sorted(written)
    assert rep.spikes.zscores == [written[s] for s in rep.spikes.steps]
    assert rep.spikes.zscores[0] >= rep.spikes.zscores[1] > 6
    assert notes_of(rep) == [("spikes", "global")]


def test_a_real_adam_run_with_hessian_probes_is_judged_on_its_own_edge(tmp_path):
    """What HessianMonitor writes for Adam reaches the report: the ratio is lambda_1(P^-1 H) over
    (2 + 2 beta_1) / ((1 - beta_1) lr), not lr * lambda_1 / 2."""
    lr, beta_1 = 0.01, 0.9
    logdir = str(tmp_path / "adam")
    m = gradmon.monitor(mlp())
    m.compile(optimizer=keras.optimizers.Adam(lr, beta_1=beta_1), loss="mse")
    m.fit(X, Y, batch_size=16, epochs=4, shuffle=False, verbose=0,
          callbacks=[gradmon.GradientMonitor(logdir),
                     gradmon.HessianMonitor(logdir, data=(X, Y), every_n_steps=8, seed=0)])
    events = events_of(logdir)
    rep = report.health_report(report.load_run(logdir))
    c = rep.curvature
    assert c.edge_of_stability_meaning == "optimizer" and c.probes == 2
    threshold = (2 + 2 * beta_1) / ((1 - beta_1) * lr)
    pre = events[tags.preconditioned_eigenvalue(1)]
    assert c.stability_threshold.last == pytest.approx(threshold, rel=1e-6)
    assert c.edge_of_stability.last == pytest.approx(pre[16] / threshold, rel=1e-5)
    assert c.gd_edge_of_stability.last == pytest.approx(events[tags.eigenvalue(1)][16] * lr / 2, rel=1e-5)
    assert c.edge_of_stability_on == "lambda_1(P^-1 H)"
