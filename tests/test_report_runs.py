"""gradmon summary reads every run gradmon writes (issue 16, item 6): named optimizers, a run
resumed in a new file, several writers in one directory, damaged directory entries; tag
descriptions and group labels."""

import json
import os
import shutil
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradmon
from gradmon import __main__ as cli
from gradmon.summary import report
from gradmon import tags
from gradmon.publish.writer import SummaryWriter, WriteFailureWarning
from helpers import read_events

pytestmark = pytest.mark.tensorflow_only  # needs TensorFlow: skipped whole under JAX/PyTorch (conftest.py)

RNG = np.random.default_rng(4)
X = RNG.normal(size=(32, 4)).astype(np.float32)


def net(name, inputs, widths, seed):
    keras.utils.set_random_seed(seed)
    layers = [keras.layers.Dense(w, activation="tanh" if i < len(widths) - 1 else None, name=f"{name[0]}{i + 1}")
              for i, w in enumerate(widths)]
    return keras.Sequential([keras.Input((inputs,)), *layers], name=name)


def summary(argv, capsys):
    status = cli.main(["summary", *argv])
    out = capsys.readouterr()
    return status, out.out, out.err


def layer_norms_numpy(model, grads):
    """{layer label: ||(kernel, bias) gradient||} by numpy, the label without the model's name."""
    out = {}
    for v, g in zip(model.trainable_variables, grads):
        layer = v.path.rsplit("/", 1)[0].split("/", 1)[1]
        out[layer] = out.get(layer, 0.0) + float(np.sum(np.asarray(g, np.float64) ** 2))
    return {k: np.sqrt(v) for k, v in out.items()}


def test_named_optimizers_get_one_section_each_without_the_name_twice_in_tags(tmp_path, capsys):
    """The GAN of docs/guide/usage.md: two optimizers observed with `name=` in one run. Each gets its own
    section, with its layers as rows (its recorded grouping) and the last step's norms of
    the gradients the loop applied (numpy); the tags do not repeat the model's name."""
    critic, generator = net("critic", 4, [8, 1], seed=1), net("generator", 2, [8, 4], seed=2)
    d_opt = gradmon.observe(keras.optimizers.Adam(1e-3), log_dir=str(tmp_path), name="critic")
    g_opt = gradmon.observe(keras.optimizers.Adam(1e-3), log_dir=str(tmp_path), name="generator")
    z = tf.constant(RNG.normal(size=(32, 2)).astype(np.float32))
    for _ in range(6):  # eager: each step writes itself
        with tf.GradientTape() as tape:
            d_loss = tf.reduce_mean(critic(generator(z))) - tf.reduce_mean(critic(X))
        d_grads = tape.gradient(d_loss, critic.trainable_variables)
        d_opt.apply_gradients(zip(d_grads, critic.trainable_variables))
        with tf.GradientTape() as tape:
            g_loss = -tf.reduce_mean(critic(generator(z)))
        g_grads = tape.gradient(g_loss, generator.trainable_variables)
        g_opt.apply_gradients(zip(g_grads, generator.trainable_variables))
    d_opt.flush()
    g_opt.flush()

    events = read_events(tmp_path / "train")
    assert tags.prefixed("critic", tags.group_stat(tags.RAW, "norm", "c1")) in events, sorted(events)
    assert not [t for t in events if "/critic/" in t or "/generator/" in t], sorted(events)

    run = report.load_run(str(tmp_path))
    assert report.observer_names(run) == ["critic", "generator"]
    reps = report.health_reports(run)
    expected = {"critic": layer_norms_numpy(critic, d_grads),
                "generator": layer_norms_numpy(generator, g_grads)}
    for rep in reps:
        assert rep.grouping == "layer" and rep.grouping_source == "recorded"
        assert [l.name for l in rep.layers] == list(expected[rep.name])
        assert rep.summary.logged_steps == 6 and rep.overlaps == []
        for layer in rep.layers:
            assert layer.final_norm == pytest.approx(expected[rep.name][layer.name], rel=1e-5)
    with pytest.raises(ValueError, match="`name`"):
        report.health_report(run)  # which one? (health_reports: all)
    assert report.health_report(run, name="generator").name == "generator"

    status, out, _ = summary([str(tmp_path)], capsys)
    assert status == 0
    assert "health report of optimizer `critic`" in out and "health report of optimizer `generator`" in out
    status, out, _ = summary([str(tmp_path), "--json"], capsys)
    sections = json.loads(out)["sections"]
    assert [s["name"] for s in sections] == ["critic", "generator"]
    assert [l["name"] for l in sections[1]["layers"]] == ["g1", "g2"]
    pytest.importorskip("matplotlib")
    status, _, err = summary([str(tmp_path), "--png", str(tmp_path / "out" / "report.png")], capsys)
    assert status == 0
    for name in ("critic", "generator"):  # one picture per optimizer
        assert (tmp_path / "out" / f"report-{name}.png").read_bytes()[:4] == b"\x89PNG", err


def write(directory, rows, config=None, name=None):
    """A gradmon event file through gradmon's own writer: `rows = {step: {tag: value}}`; its path."""
    writer = SummaryWriter(str(directory)).open()
    if config is not None:
        writer.write_texts(0, {tags.config(name): json.dumps(config)})
    for step, mapping in sorted(rows.items()):
        writer.write_scalars(step, mapping)
    path = writer.path
    writer.close()
    return path


def layer_rows(steps, labels, prefix=None, scale=1.0):
    """Per-step rows of a two-layer run: layer norms 1 and 2 (times `scale`), the global norm."""
    rows = {}
    for step in steps:
        norms = {label: scale * (i + 1) * (1 + 0.01 * step) for i, label in enumerate(labels)}
        row = {tags.prefixed(prefix, tags.group_stat(tags.RAW, "norm", label)): v for label, v in norms.items()}
        row[tags.prefixed(prefix, tags.global_norm(tags.RAW))] = float(np.sqrt(sum(v * v for v in norms.values())))
        rows[step] = row
    return rows


def test_a_run_written_before_the_name_was_left_out_of_its_labels_is_read(tmp_path):
    """Named runs written before: `critic/gradients/raw/norm/critic/c1`."""
    rows = layer_rows(range(1, 11), ["critic/c1", "critic/c2"], prefix="critic")
    write(tmp_path, rows)
    rep = report.health_report(report.load_run(str(tmp_path)))
    assert rep.name == "critic" and [l.name for l in rep.layers] == ["critic/c1", "critic/c2"]
    assert rep.layers[1].final_norm == pytest.approx(2 * 1.1, rel=1e-6)


def test_a_file_started_after_its_directory_was_removed_keeps_its_layers(tmp_path):
    """The log directory removed mid-run: the writer starts a new file, which holds
    `gradmon/config` again; where a run's files hold none (as such a file did before), the
    report infers the per-layer grouping from the tags instead of pooling every layer of
    `sequential/...` into one row."""
    keras.utils.set_random_seed(0)
    y = X.sum(axis=1, keepdims=True)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"),
                              keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    logdir = str(tmp_path / "run")

    class Remove(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                shutil.rmtree(logdir)

    writer = SummaryWriter(os.path.join(logdir, "train"), check_seconds=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", WriteFailureWarning)  # the removal is warned of
        model.fit(X, y, batch_size=8, epochs=3, verbose=0,
                  callbacks=[gradmon.GradientMonitor(writer=writer), Remove()])
    run = report.load_run(logdir)
    assert run.config["grouping"] == "layer"  # the new file holds the configuration again
    run.configs.clear()  # as what the issue saw: a new file without it
    rep = report.health_report(run)
    layers = [v.path.rsplit("/", 1)[0] for v in model.trainable_variables[::2]]
    assert [l.name for l in rep.layers] == layers  # was one row, `sequential`
    assert (rep.grouping, rep.grouping_source) == ("layer", "inferred")
    events = read_events(os.path.join(logdir, "train"))
    for layer in rep.layers:
        norms = events[tags.group_stat(tags.RAW, "norm", layer.name)]
        assert layer.final_norm == pytest.approx(norms[max(norms)])
    assert 'inferred from its tags: grouping="layer"' in report.format_table(rep)


@pytest.mark.parametrize("labels, expected", [
    (["model/dense/kernel", "model/dense/bias", "model/dense_1/kernel", "model/dense_1/bias"], "variable"),
    (["model/dense", "model/dense_1", "model/mha/query"], "layer"),
    (["block/attn/query/kernel", "block/norm/gamma", "block/custom/w"], "variable"),
    (["dense", "dense_1"], "layer"),  # no `/`: the same rows either way
])
def test_infer_grouping(labels, expected):
    assert report.infer_grouping(labels) == expected


def test_the_configuration_is_read_from_any_file_of_the_run(tmp_path):
    """Resumed in a new file: the first file recorded `grouping="variable"`, the second none."""
    labels = ["net/a/w", "net/a/b", "net/c/w"]
    write(tmp_path, layer_rows(range(1, 6), labels, prefix="critic"), config={"grouping": "variable"},
          name="critic")
    write(tmp_path, layer_rows(range(6, 11), labels, prefix="critic"))
    rep = report.health_report(report.load_run(str(tmp_path)))
    assert (rep.grouping, rep.grouping_source) == ("variable", "recorded")  # inference says layer
    assert [l.name for l in rep.layers] == ["net/a", "net/c"]
    assert rep.overlaps == []


def test_two_writers_in_one_directory_are_warned_with_their_files(tmp_path, capsys):
    """Two processes writing one log directory (here two writers, as two processes have):
    the report names both files and the steps both wrote; the later file's values are used."""
    labels = ["model/a", "model/b"]
    first = write(tmp_path, layer_rows(range(1, 21), labels, scale=1.0))
    second = write(tmp_path, layer_rows(range(1, 21), labels, scale=3.0))
    assert sorted([first, second]) == [first, second]
    rep = report.health_report(report.load_run(str(tmp_path)))
    assert len(rep.overlaps) == 1
    o = rep.overlaps[0]
    assert (o.paths, o.steps, o.first_step, o.last_step) == ((first, second), 20, 1, 20)
    assert rep.layers[1].final_norm == pytest.approx(3 * 2 * 1.2, rel=1e-6)  # the later file's
    status, out, err = summary([str(tmp_path)], capsys)
    assert status == 0
    for text in (out, err):
        warning = next(line for line in text.splitlines() if "were written by 2 event files" in line)
        assert first in warning and second in warning and "20 step(s) (1-20)" in warning
    status, out, _ = summary([str(tmp_path), "--json"], capsys)
    (overlap,) = json.loads(out)["overlaps"]
    assert overlap["paths"] == [first, second] and overlap["steps"] == 20


def test_a_run_restarted_over_its_last_steps_is_warned_of_those_steps(tmp_path):
    labels = ["model/a", "model/b"]
    write(tmp_path, layer_rows(range(1, 13), labels))
    write(tmp_path, layer_rows(range(9, 21), labels))  # resumed from a checkpoint at step 8
    (o,) = report.health_report(report.load_run(str(tmp_path))).overlaps
    assert (o.steps, o.first_step, o.last_step) == (4, 9, 12)


def test_two_named_optimizers_in_two_files_are_no_overlap(tmp_path):
    """Each optimizer's own series: the critic's steps 1-5 in one file, the generator's in another."""
    write(tmp_path, layer_rows(range(1, 6), ["a"], prefix="critic"))
    write(tmp_path, layer_rows(range(1, 6), ["b"], prefix="generator"))
    reps = report.health_reports(report.load_run(str(tmp_path)))
    assert [r.name for r in reps] == ["critic", "generator"]
    assert all(r.overlaps == [] for r in reps)


def test_a_directory_or_a_broken_link_named_like_an_event_file_is_named_not_a_crash(tmp_path, capsys):
    write(tmp_path, layer_rows(range(1, 11), ["model/a", "model/b"]))
    directory = tmp_path / "events.out.tfevents.1000000000.host.1.000000.gradmon.v2"
    directory.mkdir()
    link = tmp_path / "events.out.tfevents.1000000001.host.2.000000.gradmon.v2"
    os.symlink(tmp_path / "gone", link)
    run = report.load_run(str(tmp_path))
    assert sorted((p.path, p.kind) for p in run.problems) == [(str(directory), "unreadable"),
                                                               (str(link), "unreadable")]
    status, out, err = summary([str(tmp_path)], capsys)
    assert status == report.EXIT_DAMAGED  # the report, and the damage named
    assert "gradmon health report: steps 1-10" in out
    for text in (out, err):
        assert f"{directory}: named like an event file but is a directory; skipped" in text
        assert f"{link}: named like an event file but is a broken link" in text
    only_damage = tmp_path / "empty"
    only_damage.mkdir()
    os.symlink(tmp_path / "gone", only_damage / "events.out.tfevents.1.x")
    status, out, err = summary([str(only_damage)], capsys)
    assert status == report.EXIT_ERROR and out == ""
    assert "No readable event files" in err and "events.out.tfevents.1.x" in err and "Traceback" not in err


def test_tag_descriptions_use_english_ordinals():
    expected = {1: "1st", 2: "2nd", 3: "3rd", 4: "4th", 11: "11th", 12: "12th", 13: "13th",
                21: "21st", 22: "22nd", 23: "23rd", 101: "101st", 111: "111th"}
    for i, word in expected.items():
        assert tags.describe(tags.eigenvalue(i)).startswith(f"{word} largest (algebraic) eigenvalue")
        assert tags.describe(tags.preconditioned_eigenvalue(i)).startswith(f"{word} largest eigenvalue of P^-1 H")
    assert not any("-th" in tags.describe(tags.eigenvalue(i)) for i in range(1, 30))


def test_an_unnamed_and_a_named_optimizer_in_one_run(tmp_path, capsys):
    """`health_report(run)` is the unnamed optimizer's; the CLI shows both, unnamed first."""
    rows = layer_rows(range(1, 6), ["model/a"])
    for step, row in layer_rows(range(1, 6), ["b"], prefix="critic", scale=5.0).items():
        rows[step].update(row)
    write(tmp_path, rows)
    run = report.load_run(str(tmp_path))
    assert report.observer_names(run) == [None, "critic"]
    rep = report.health_report(run)
    assert rep.name is None and [l.name for l in rep.layers] == ["model/a"]
    assert [l.name for l in report.health_report(run, name="critic").layers] == ["b"]
    status, out, _ = summary([str(tmp_path)], capsys)
    assert status == 0 and out.index("gradmon health report: steps 1-5") < out.index("optimizer `critic`")
