"""Writers: event files read back record by record, the in-memory writer, and write failures.

Failures are real where they can be (a full tmpfs, a removed directory) and
simulated where root ignores them (permissions): training never ends, one
warning per kind, and every record left on disk is whole.
"""

import errno
import glob
import json
import os
import shutil
import struct
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_file_loader
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import metadata as custom_scalar_metadata
from tensorboard.util import tensor_util

from gradmon.publish import writer as writer_module
from gradmon.publish.record import RecordWriter
from gradmon.publish.writer import (MemoryWriter, MetricWriter, SummaryWriter, WriteFailureWarning,
                            histogram_buckets, merge_layouts)

TAGS = [f"gradients/raw/norm/dense_{i}" for i in range(50)]


def read_records(path):
    """Every event of `path`, checking the TFRecord framing and CRCs of each record.

    TensorBoard's readers stop silently at a partial record; this fails on one.
    """
    with open(path, "rb") as f:
        data = f.read()
    records, pos = [], 0
    while pos < len(data):
        assert pos + 12 <= len(data), f"partial record header at byte {pos} of {path}"
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == masked_crc32c(header)
        end = pos + 12 + length
        assert end + 4 <= len(data), f"partial record at byte {pos} of {path}"
        assert struct.unpack("<I", data[end:end + 4])[0] == masked_crc32c(data[pos + 12:end])
        records.append(data[pos + 12:end])
        pos = end + 4
    # and TensorBoard's own loaders see the same records
    assert list(event_file_loader.RawEventFileLoader(path).Load()) == records
    assert len(list(event_file_loader.EventFileLoader(path).Load())) == len(records)
    return [event_pb2.Event.FromString(record) for record in records]


def event_files(logdir):
    return sorted(glob.glob(os.path.join(str(logdir), "events.out.tfevents.*")))


def read_dir(logdir):
    """`(scalars, histograms, descriptions, layouts)` from every event file of `logdir`."""
    scalars, histograms, descriptions, layouts = {}, {}, {}, []
    for path in event_files(logdir):
        for event in read_records(path):
            for value in event.summary.value:
                if value.HasField("metadata") and value.tag not in descriptions:
                    descriptions[value.tag] = value.metadata.summary_description
                if value.tag == custom_scalar_metadata.CONFIG_SUMMARY_TAG:
                    layouts.append(layout_pb2.Layout.FromString(value.tensor.string_val[0]))
                    continue
                array = tensor_util.make_ndarray(value.tensor)
                if array.dtype.kind not in "biuf":
                    continue  # text summaries (gradmon/config)
                if array.shape == ():
                    scalars.setdefault(value.tag, []).append((event.step, float(array)))
                else:
                    histograms.setdefault(value.tag, []).append((event.step, array))
    return scalars, histograms, descriptions, layouts


def scalar_steps(logdir, tag=TAGS[0]):
    return [step for step, _ in read_dir(logdir)[0].get(tag, [])]


def write_steps(writer, steps, tags=TAGS):
    for step in steps:
        writer.write_scalars(step, {tag: step + i / 8 for i, tag in enumerate(tags)})


def failure_warnings(records):
    return [w for w in records if issubclass(w.category, WriteFailureWarning)]


@pytest.fixture
def caught():
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        yield records


def chart(title, *regexes):
    return layout_pb2.Chart(title=title, multiline=layout_pb2.MultilineChartContent(tag=list(regexes)))


# ---------------------------------------------------------------- round trips


def test_both_writers_record_the_same_numbers(tmp_path, monkeypatch):
    monkeypatch.setattr(writer_module.tags, "describe", lambda tag: f"about `{tag}`")
    memory, events = MemoryWriter().open(), SummaryWriter(str(tmp_path)).open()
    assert isinstance(memory, MetricWriter) and isinstance(events, MetricWriter)
    values = np.random.default_rng(0).normal(size=(6, 3)) * 10.0 ** np.arange(-20, 25, 15)
    buckets = histogram_buckets(-1.0, 2.0, [1, 0, 5])
    for w in (memory, events):
        for step in range(6):  # first write by protobuf, the rest from the patched bytes
            w.write_scalars(step, {"a": values[step, 0], "b/c": values[step, 1], "d": values[step, 2]})
        w.write_scalars(9, {"b/c": np.float32(-0.5), "e": 7})  # a second set of tags
        w.write_scalars(2**40, {"a": float("nan")})
        w.write_scalars(-3, {"a": float("inf")})
        w.write_histograms(4, {"h": buckets, "a": histogram_buckets(3.0, 3.0, [0, 2])})
        w.close()
    scalars, histograms, descriptions, _ = read_dir(tmp_path)
    expected_a = [(s, float(np.float32(values[s, 0]))) for s in range(6)]
    assert scalars["a"][:6] == expected_a
    assert scalars["a"][6][0] == 2**40 and np.isnan(scalars["a"][6][1])
    assert scalars["a"][7] == (-3, float("inf"))
    assert scalars["b/c"] == [(s, float(np.float32(values[s, 1]))) for s in range(6)] + [(9, -0.5)]
    assert scalars["e"] == [(9, 7.0)]
    np.testing.assert_array_equal(histograms["h"][0][1], [[-1, 0, 1], [0, 1, 0], [1, 2, 5]])
    np.testing.assert_array_equal(histograms["a"][0][1], [[3, 3, 0], [3, 3, 2]])
    # the in-memory writer keeps float64; the file float32
    assert [(s, float(np.float32(v))) for s, v in memory.scalars["a"][:6]] == expected_a
    assert memory.scalars["e"] == [(9, 7.0)] and memory.histograms["h"][0][0] == 4
    assert descriptions == {t: f"about `{t}`" for t in ("a", "b/c", "d", "e", "h")}
    assert descriptions == memory.descriptions
    assert memory.opened == 0


def test_descriptions_are_written_once_per_tag_and_file(tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(writer_module.tags, "describe", lambda tag: asked.append(tag) or "d")
    w = SummaryWriter(str(tmp_path)).open()
    write_steps(w, range(3), TAGS[:2])
    write_steps(w, range(3, 5), TAGS[1:3])  # a new set of tags, one of them known
    w.close()
    assert asked == TAGS[:3]
    (path,) = event_files(tmp_path)
    with_metadata = [[v.tag for v in e.summary.value if v.HasField("metadata")] for e in read_records(path)]
    assert with_metadata == [[], TAGS[:2], [], [], [TAGS[2]], []]


def test_descriptions_travel_with_the_write(tmp_path, monkeypatch):
    """Given descriptions win over `tags.describe`, in this run, a per-layer run, a
    histogram, a text, and again in a fresh file (the configuration's at its start)."""
    monkeypatch.setattr(SummaryWriter, "_record_writer", FlakyRecords)
    monkeypatch.setattr(writer_module.tags, "describe", lambda tag: f"default `{tag}`")
    given = {"a": "mine: a", "layer/n": "mine: layer", "h": "mine: h", "gradmon/config": "mine: config"}
    memory, events = MemoryWriter(), SummaryWriter(str(tmp_path), retry_seconds=0).open()
    for w in (memory, events):
        w.assign_runs({"layer/n": "layer"})
        w.write_texts(0, {"gradmon/config": "{}"}, given)
        w.write_scalars(1, {"a": 1.0, "b": 2.0, "layer/n": 3.0}, given)
        w.write_scalars(2, {"a": 1.5, "b": 2.5, "layer/n": 3.5}, {"a": "too late"})
        w.write_histograms(2, {"h": histogram_buckets(0.0, 1.0, [1, 2])}, given)
    expected = {"gradmon/config": "mine: config", "a": "mine: a", "b": "default `b`", "layer/n": "mine: layer",
                "h": "mine: h"}
    assert memory.descriptions == expected
    own, _, descriptions, _ = read_dir(tmp_path)
    layer = read_dir(tmp_path / "layer")[2]
    assert {**descriptions, **layer} == expected and set(layer) == {"layer/n"}
    monkeypatch.setattr(FlakyRecords, "broken", True)
    with pytest.warns(WriteFailureWarning):
        events.write_scalars(3, {"a": 1.0, "b": 2.0})
    monkeypatch.setattr(FlakyRecords, "broken", False)
    events.write_scalars(4, {"a": 1.0, "b": 2.0}, {"a": "mine again: a"})
    events.close()
    fresh = read_records(event_files(tmp_path)[1])
    described = {v.tag: v.metadata.summary_description for e in fresh for v in e.summary.value
                 if v.HasField("metadata")}
    assert described == {"gradmon/config": "mine: config", "a": "mine again: a", "b": "default `b`"}


def test_an_empty_mapping_writes_nothing(tmp_path):
    w = SummaryWriter(str(tmp_path)).open()
    w.write_scalars(1, {})
    w.write_histograms(1, {})
    w.close()
    assert len(read_records(event_files(tmp_path)[0])) == 1  # the file header only


def test_histograms_must_be_buckets(tmp_path):
    for w in (MemoryWriter(), SummaryWriter(str(tmp_path))):
        with pytest.raises(ValueError, match=r"Expected an array of shape \[k, 3\]"):
            w.write_histograms(0, {"h": np.zeros((4, 2))})


class CountedRecords(RecordWriter):
    """A real record writer counting its writes to the operating system."""

    writes = 0

    def _write_bytes(self, view):
        CountedRecords.writes += 1
        return super()._write_bytes(view)


@pytest.mark.parametrize("flush_seconds", [0, 3600])
def test_a_run_and_its_per_layer_runs_are_flushed_together(tmp_path, monkeypatch, flush_seconds):
    """One write to the OS per file and flush: at every step with `flush_seconds=0`; with a long
    `flush_seconds` at the first step, then nothing until `flush()`, which flushes every file."""
    monkeypatch.setattr(SummaryWriter, "_record_writer", CountedRecords)
    monkeypatch.setattr(CountedRecords, "writes", 0)
    layers = [f"layer_{i}" for i in range(5)]
    w = SummaryWriter(str(tmp_path), flush_seconds=flush_seconds).open()
    w.assign_runs({f"norm/{layer}": layer for layer in layers})
    step_tags = ["global"] + [f"norm/{layer}" for layer in layers]
    write_steps(w, [0], step_tags)
    headers = 1 + len(layers)  # each file's header is flushed when the file is made
    assert CountedRecords.writes == headers + 6
    write_steps(w, range(1, 4), step_tags)
    on_disk = [scalar_steps(tmp_path, "global")] + [scalar_steps(tmp_path / layer, f"norm/{layer}")
                                                   for layer in layers]
    if flush_seconds:
        assert CountedRecords.writes == headers + 6 and on_disk == [[0]] * 6
    else:
        assert CountedRecords.writes == headers + 6 * 4 and on_disk == [[0, 1, 2, 3]] * 6
    w.flush()
    assert CountedRecords.writes == headers + 6 * (2 if flush_seconds else 4)
    assert scalar_steps(tmp_path, "global") == [0, 1, 2, 3]
    assert all(scalar_steps(tmp_path / layer, f"norm/{layer}") == [0, 1, 2, 3] for layer in layers)
    write_steps(w, [4], step_tags)
    w.close()  # flushes what is left
    assert all(scalar_steps(tmp_path / layer, f"norm/{layer}") == [0, 1, 2, 3, 4] for layer in layers)
    assert w.dropped == 0


def test_a_batch_of_steps_is_flushed_once_per_file_at_its_end(tmp_path, monkeypatch):
    monkeypatch.setattr(SummaryWriter, "_record_writer", CountedRecords)
    monkeypatch.setattr(CountedRecords, "writes", 0)
    layers = [f"layer_{i}" for i in range(5)]
    w = SummaryWriter(str(tmp_path)).open()  # flush_seconds=0: outside a batch, every write
    w.assign_runs({f"norm/{layer}": layer for layer in layers})
    step_tags = ["global"] + [f"norm/{layer}" for layer in layers]
    headers = 1 + len(layers)
    with pytest.raises(KeyboardInterrupt), w.batch() as same:
        assert same is w
        with w.batch():  # nested: flushed with the outer one
            write_steps(w, range(3), step_tags)
        write_steps(w, [3], step_tags)
        assert CountedRecords.writes == headers and scalar_steps(tmp_path, "global") == []
        raise KeyboardInterrupt  # an interrupted batch is flushed all the same
    assert CountedRecords.writes == headers + 6
    assert all(scalar_steps(tmp_path / layer, f"norm/{layer}") == [0, 1, 2, 3] for layer in layers)
    write_steps(w, [4], step_tags)  # outside a batch: flushed at once
    assert CountedRecords.writes == headers + 12 and scalar_steps(tmp_path, "global") == [0, 1, 2, 3, 4]
    with MemoryWriter().batch() as memory:  # every writer has batches
        memory.write_scalars(0, {"a": 1.0})
    assert memory.scalars == {"a": [(0, 1.0)]}
    w.close()


def test_gradient_monitor_flushes_each_file_once_per_batch_of_steps(tmp_path, monkeypatch):
    """Every step logged, per-layer runs: each event file is flushed once per batch of steps the
    monitor reads back (its ring), not once per step; every step is in the files after `fit`."""
    import gradmon

    monkeypatch.setattr(SummaryWriter, "_record_writer", CountedRecords)
    monkeypatch.setattr(CountedRecords, "writes", 0)
    keras.utils.set_random_seed(6)
    x = np.random.default_rng(6).normal(size=(128, 4)).astype(np.float32)
    model = gradmon.monitor(keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, activation="tanh"),
                                              keras.layers.Dense(1)]))
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse", steps_per_execution=16)
    model.fit(x, x[:, :1], batch_size=4, epochs=1, verbose=0,
              callbacks=[gradmon.GradientMonitor(str(tmp_path), update_freq=1)])
    runs = sorted(os.path.dirname(p) for p in glob.glob(str(tmp_path / "train" / "**" / "events.out.*"),
                                                         recursive=True))
    assert len(runs) == 3  # the run and its two layers'
    for run in runs:
        tag = "gradients/raw/global_norm" if run.endswith("train") else next(iter(read_dir(run)[0]))
        assert scalar_steps(run, tag) == list(range(1, 33))
    assert CountedRecords.writes < 3 * 32 / 2  # a flush per file and step would be 96 and more


@pytest.mark.parametrize("ending", ["return", "raise"])
def test_nothing_written_is_lost_at_exit(tmp_path, ending):
    """A process that never closes its writer (or dies of an exception) leaves every step on disk."""
    script = (
        "from gradmon.publish.writer import SummaryWriter\n"
        f"w = SummaryWriter({str(tmp_path)!r}, flush_seconds=3600).open()\n"
        "w.assign_runs({'norm/a': 'a'})\n"
        "for step in range(6):\n"
        "    w.write_scalars(step, {'global': step, 'norm/a': -step})\n"
        + ("raise RuntimeError('training failed')\n" if ending == "raise" else ""))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": root})
    assert (result.returncode != 0) == (ending == "raise"), result.stderr
    assert scalar_steps(tmp_path, "global") == list(range(6))
    assert read_dir(tmp_path / "a")[0]["norm/a"] == [(s, -float(s)) for s in range(6)]


# ---------------------------------------------------------------- layouts


def test_merge_layouts_unites_categories_and_charts_by_title():
    first = layout_pb2.Layout(category=[
        layout_pb2.Category(title="Gradients", chart=[chart("norm", "^a$"), chart("clip", "^c$")])])
    second = layout_pb2.Layout(category=[
        layout_pb2.Category(title="Curvature", chart=[chart("top", "^e")]),
        layout_pb2.Category(title="Gradients", chart=[chart("clip", "^c2$"), chart("snr", "^s")])])
    first_bytes = first.SerializeToString()
    merged = merge_layouts(merge_layouts(None, first), second)
    assert first.SerializeToString() == first_bytes  # arguments untouched
    titles = [(c.title, [(ch.title, list(ch.multiline.tag)) for ch in c.chart]) for c in merged.category]
    assert titles == [("Gradients", [("norm", ["^a$"]), ("clip", ["^c2$"]), ("snr", ["^s"])]),
                      ("Curvature", [("top", ["^e"])])]
    assert merge_layouts(merged, merged) == merged
    with pytest.raises(ValueError, match="Expected a tensorboard.plugins.custom_scalar"):
        merge_layouts(None, {"Gradients": []})


def test_monitors_sharing_a_writer_add_to_one_layout(tmp_path):
    gradients = layout_pb2.Layout(category=[layout_pb2.Category(title="Gradients", chart=[chart("n", "^a")])])
    curvature = layout_pb2.Layout(category=[layout_pb2.Category(title="Curvature", chart=[chart("t", "^h")])])
    memory, events = MemoryWriter(), SummaryWriter(str(tmp_path)).open()
    for w in (memory, events):
        w.write_layout(gradients)
        w.write_custom_scalar_layout(curvature)  # the older name
    events.close()
    layouts = read_dir(tmp_path)[3]
    assert [[c.title for c in layout.category] for layout in layouts] == [["Gradients"],
                                                                          ["Gradients", "Curvature"]]
    assert layouts[-1] == memory.layout == memory.layouts[-1]


# ---------------------------------------------------------------- directories


def test_shared_gives_one_writer_per_directory(tmp_path):
    a = SummaryWriter.shared(str(tmp_path / "run" / "train"))
    assert SummaryWriter.shared(str(tmp_path / "run" / "." / "train")) is a
    assert SummaryWriter.shared(tmp_path / "run", "train") is a
    assert SummaryWriter.shared(str(tmp_path / "run" / "validation")) is not a


@pytest.mark.parametrize("logdir", ["", "  ", None, 3])
def test_log_dir_must_be_a_non_empty_path(logdir):
    with pytest.raises(ValueError, match="Invalid value for argument `log_dir`. Expected a non-empty"):
        SummaryWriter(logdir)
    with pytest.raises(ValueError, match="`log_dir`"):
        SummaryWriter.shared(logdir, "train")  # never `/train`


@pytest.mark.parametrize("run", ["", "..", "../x", "/train", "a//b", 3])
def test_run_stays_inside_log_dir(tmp_path, run):
    with pytest.raises(ValueError, match="Invalid value for argument `run`"):
        SummaryWriter.shared(str(tmp_path), run)


def test_open_on_an_unwritable_directory_raises_naming_log_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    w = SummaryWriter(str(blocker / "train"))
    with pytest.raises(ValueError, match="argument `log_dir`. Expected a writable directory"):
        w.open()
    assert not os.path.isdir(str(blocker))


def test_open_creates_the_file_and_close_keeps_it(tmp_path):
    w = SummaryWriter(str(tmp_path / "new" / "train")).open()
    w.open()
    (path,) = event_files(tmp_path / "new" / "train")
    assert w.path == path
    w.close()
    assert w.path == path  # one user left
    w.close()
    assert w.path is None and [e.file_version for e in read_records(path)] == ["brain.Event:2"]


# ---------------------------------------------------------------- failures


@pytest.fixture
def long_descriptions(monkeypatch):
    """Descriptions long enough that a first write never fits in a page freed by cutting a file back."""
    monkeypatch.setattr(writer_module.tags, "describe", lambda tag: f"What `{tag}` means. " * 6)


@pytest.fixture
def small_fs(tmp_path):
    """A 64 KiB tmpfs (root only), unmounted afterwards."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {result.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=True)


def test_a_full_disk_warns_once_and_keeps_whole_records(small_fs, long_descriptions, caught):
    filler = small_fs / "filler"
    filler.write_bytes(b"x" * 24576)
    w = SummaryWriter(str(small_fs / "train"), retry_seconds=3600).open()
    write_steps(w, range(60))  # ~2.3 KB per step: full after ~20 steps
    (path,) = event_files(small_fs / "train")
    written = scalar_steps(small_fs / "train")
    assert 5 < len(written) < 60 and written == list(range(len(written)))
    assert w.dropped == 60 - len(written)
    (warning,) = failure_warnings(caught)
    assert path in str(warning.message) and "No space left on device" in str(warning.message)

    filler.unlink()  # free space: the next write after `retry_seconds` starts a new file
    write_steps(w, range(60, 63))
    assert w.dropped == 63 - len(written)  # not yet time to retry
    w.retry_seconds = 0
    write_steps(w, range(63, 66))
    w.close()
    assert len(event_files(small_fs / "train")) == 2
    assert scalar_steps(small_fs / "train") == written + [63, 64, 65]
    assert w.dropped == 63 - len(written) and len(failure_warnings(caught)) == 1


def test_a_full_disk_under_batched_flushes_keeps_every_whole_record_that_fit(small_fs, long_descriptions,
                                                                             caught):
    filler = small_fs / "filler"
    filler.write_bytes(b"x" * 24576)
    w = SummaryWriter(str(small_fs / "train"), retry_seconds=3600, flush_seconds=3600).open()
    write_steps(w, range(60))  # all held until close: one write of ~130 KB into ~40 KB of room
    assert failure_warnings(caught) == []
    w.close()
    written = scalar_steps(small_fs / "train")  # every record read is whole (read_records)
    assert 5 < len(written) < 60 and written == list(range(len(written)))
    assert w.dropped == 60 - len(written)
    (warning,) = failure_warnings(caught)
    assert "No space left on device" in str(warning.message)


def test_open_on_a_full_disk_raises_before_training(small_fs):
    with open(str(small_fs / "filler"), "wb", buffering=0) as f, pytest.raises(OSError):
        while True:
            f.write(b"x" * 4096)
    with pytest.raises(ValueError, match="argument `log_dir`. Expected a writable directory.*No space"):
        SummaryWriter(str(small_fs / "train")).open()
    assert event_files(small_fs / "train") == []


def test_retries_on_a_full_disk_leave_no_empty_files(small_fs, long_descriptions, caught):
    w = SummaryWriter(str(small_fs), retry_seconds=0).open()
    write_steps(w, range(60))
    w.close()
    written = scalar_steps(small_fs)
    assert written == sorted(written) and w.dropped == 60 - len(written)
    assert len(failure_warnings(caught)) == 1
    for path in event_files(small_fs):  # each failed retry removed its header-only file
        assert len(read_records(path)) > 1


def test_writing_stops_for_good_after_max_retries(small_fs, long_descriptions, caught):
    w = SummaryWriter(str(small_fs), retry_seconds=0, max_retries=2).open()
    write_steps(w, range(60))
    messages = [str(m.message) for m in failure_warnings(caught)]
    assert len(messages) == 2 and "stops writing" in messages[1] and "3 failures" in messages[1]
    written = scalar_steps(small_fs)
    for path in event_files(small_fs):
        os.remove(path)  # plenty of space now, but the writer has given up
    write_steps(w, range(60, 70))
    assert event_files(small_fs) == [] and w.dropped == 70 - len(written)
    w.close()
    w.open()  # a new run tries again
    write_steps(w, [70])
    w.close()
    assert scalar_steps(small_fs) == [70]


def test_a_removed_directory_is_recreated(tmp_path, caught):
    logdir = tmp_path / "logs" / "train"
    w = SummaryWriter(str(logdir), check_seconds=0).open()
    write_steps(w, range(5))
    shutil.rmtree(str(tmp_path / "logs"))
    write_steps(w, range(5, 8))
    w.close()
    assert scalar_steps(logdir) == [5, 6, 7]
    assert w.dropped == 1  # step 4, written after the file was last seen, went with it
    (warning,) = failure_warnings(caught)
    assert "was removed" in str(warning.message) and str(logdir) in str(warning.message)
    assert warning.filename == __file__  # points at the writer's caller


def test_a_fresh_file_after_the_directory_was_removed_holds_the_configuration(tmp_path, caught):
    from gradmon.summary import events
    from gradmon import tags

    logdir = tmp_path / "logs" / "train"
    w = SummaryWriter(str(logdir), check_seconds=0).open()
    config = {"grouping": "layer", "stats": ["norm"], "name": None}
    critic = {"grouping": "variable", "stats": ["rms"], "name": "critic"}
    w.write_texts(0, {tags.config(): json.dumps(config), tags.config("critic"): json.dumps(critic)})
    write_steps(w, range(3))
    shutil.rmtree(str(tmp_path / "logs"))
    write_steps(w, range(3, 6))
    w.close()
    assert len(event_files(logdir)) == 1  # the new file: all that is left of the run
    run = events.load_run(str(logdir))
    # before: the new file held the header and the steps only (configs == {})
    assert run.configs == {None: config, "critic": critic}


class FlakyRecords(RecordWriter):
    """A real record writer that can be made to fail, optionally after writing part of a record."""

    broken = False
    partial = False

    def _write_bytes(self, view):
        if FlakyRecords.broken:
            if FlakyRecords.partial:
                os.write(self._fd, view[:7])  # what a write cut short leaves behind
            raise PermissionError(errno.EACCES, "Permission denied", self.path)
        return super()._write_bytes(view)


@pytest.mark.parametrize("partial", [False, True])
def test_a_file_that_cannot_be_written_warns_once_and_resumes(tmp_path, monkeypatch, caught, partial):
    monkeypatch.setattr(SummaryWriter, "_record_writer", FlakyRecords)
    monkeypatch.setattr(FlakyRecords, "partial", partial)
    w = SummaryWriter(str(tmp_path), retry_seconds=0).open()
    write_steps(w, range(5))
    monkeypatch.setattr(FlakyRecords, "broken", True)
    write_steps(w, range(5, 10))  # every retry fails too
    w.open()  # a monitor joining the run does not end it
    w.close()
    (first,) = event_files(tmp_path)  # failed retries left no files behind
    assert scalar_steps(tmp_path) == [0, 1, 2, 3, 4]  # the partial record was cut off
    monkeypatch.setattr(FlakyRecords, "broken", False)
    write_steps(w, range(10, 12))
    w.close()
    assert scalar_steps(tmp_path) == [0, 1, 2, 3, 4, 10, 11] and w.dropped == 5
    assert len(event_files(tmp_path)) == 2 and event_files(tmp_path)[0] == first
    (warning,) = failure_warnings(caught)
    assert "Permission denied" in str(warning.message) and first in str(warning.message)


def test_a_fresh_file_repeats_the_descriptions_and_layout(tmp_path, monkeypatch):
    monkeypatch.setattr(SummaryWriter, "_record_writer", FlakyRecords)
    monkeypatch.setattr(writer_module.tags, "describe", lambda tag: "described")
    layout = layout_pb2.Layout(category=[layout_pb2.Category(title="Gradients", chart=[chart("n", "^a")])])
    w = SummaryWriter(str(tmp_path), retry_seconds=0).open()
    w.write_layout(layout)
    write_steps(w, range(3), TAGS[:2])
    monkeypatch.setattr(FlakyRecords, "broken", True)
    with pytest.warns(WriteFailureWarning):
        write_steps(w, [3], TAGS[:2])
    monkeypatch.setattr(FlakyRecords, "broken", False)
    write_steps(w, [4, 5], TAGS[:2])
    w.close()
    second = read_records(event_files(tmp_path)[1])
    assert layout_pb2.Layout.FromString(second[1].summary.value[0].tensor.string_val[0]) == layout
    assert [v.metadata.summary_description for v in second[2].summary.value] == ["described"] * 2
    assert [e.step for e in second[2:]] == [4, 5]


class WriteEveryBatch(keras.callbacks.Callback):
    """50 scalars per batch through the shared writer, as gradmon's monitors do."""

    def __init__(self, logdir):
        super().__init__()
        self.writer = SummaryWriter.shared(logdir)

    def on_train_begin(self, logs=None):
        self.writer.open()
        self.step = 0

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        self.writer.write_scalars(self.step, {tag: logs["loss"] * (i + 1) for i, tag in enumerate(TAGS)})

    def on_train_end(self, logs=None):
        self.writer.close()


def test_fit_on_a_full_disk_finishes_and_trains(small_fs, caught):
    keras.utils.set_random_seed(3)
    x = np.random.default_rng(3).normal(size=(160, 4)).astype(np.float32)
    y = x @ np.array([[1.0], [-2.0], [0.5], [3.0]], np.float32)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    before = model.get_weights()[0].copy()
    callback = WriteEveryBatch(str(small_fs / "train"))
    callback.writer.retry_seconds = 3600  # however slow the machine, no retry within the run
    history = model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[callback])
    assert callback.step == 40
    assert not np.allclose(model.get_weights()[0], before)
    assert history.history["loss"][0] < float(np.mean(y**2))
    assert len(failure_warnings(caught)) == 1
    written = scalar_steps(small_fs / "train")
    assert written == list(range(1, len(written) + 1)) and len(written) < 40
    assert callback.writer.dropped == 40 - len(written)


def test_gradient_monitor_on_a_full_disk_finishes_training_as_without_it(small_fs, caught):
    """GradientMonitor itself (every statistic, every step) on a 64 KiB filesystem: `fit`
    finishes with the weights of a fit without it, and one warning says what was lost."""
    import gradmon

    x = np.random.default_rng(4).normal(size=(160, 4)).astype(np.float32)
    y = x @ np.array([[1.0], [-2.0], [0.5], [3.0]], np.float32)
    weights = []
    for monitored in (False, True):
        keras.utils.set_random_seed(4)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"),
                                  keras.layers.Dense(1)])
        if monitored:
            model = gradmon.monitor(model, stats="all", grouping="variable")
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
        callbacks = [gradmon.GradientMonitor(str(small_fs), histogram_freq=1)] if monitored else []
        model.fit(x, y, batch_size=4, epochs=3, shuffle=False, verbose=0, callbacks=callbacks)
        weights.append(model.get_weights())
    for a, b in zip(*weights):
        np.testing.assert_array_equal(a, b)
    assert len(failure_warnings(caught)) == 1
    written = scalar_steps(small_fs / "train", "gradients/raw/global_norm")
    assert 0 < len(written) < 120 and written == list(range(1, len(written) + 1))
