"""gradmon summary: health reports of real runs, checked against the event files read independently."""

import argparse
import json
import math
import os
import shutil
import sys

import keras
import numpy as np
import pytest

import gradmon
from gradmon import report, tags
from gradmon import transforms as T
from gradmon.writer import SummaryWriter
from helpers import read_events

RNG = np.random.default_rng(0)
X = RNG.normal(size=(64, 5)).astype(np.float32)
W = RNG.normal(size=(5, 1)).astype(np.float32)
Y = X @ W  # a linear regression target
STEPS = 48  # 6 epochs of 8 batches


def fit(model, logdir, lr, *, transform=None, extra_callbacks=(), y=Y, histogram_freq=0):
    m = gradmon.monitor(model, transform=transform)
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


def test_exploding_run_is_flagged_and_nonfinite_steps_counted(runs):
    logdir, paths = runs["exploding"]
    events = events_of(logdir)
    steps, counts = series(events, tags.nonfinite_total("raw"))
    bad = steps[counts > 0]
    assert 0 < len(bad) < STEPS  # the run starts finite and blows up
    rep = report.health_report(report.load_run(logdir))
    assert kinds(rep) == [("exploding", "global")]
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
    assert kinds(strict) == [("exploding", "global")]


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
    assert [f["kind"] for f in out["flags"]] == ["exploding"] and out["flags"][0]["explanation"]
    events = events_of(logdir)
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
