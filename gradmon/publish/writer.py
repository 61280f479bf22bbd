"""Writes gradmon's numbers: one writer interface, an event-file and an in-memory backend.

As CLU's metric writers: `MetricWriter` declares `write_scalars(step,
mapping)`, `write_histograms(step, mapping)`, `write_layout(layout)`,
`flush()` and `close()`; `SummaryWriter` writes TensorBoard event files,
`MemoryWriter` keeps everything in lists for tests. Nothing here runs inside
a compiled step: writers take numbers on the host.

Per-group series (one layer's or variable's norms, ratios, curvature) go to a
run of their own, `<run>/<group>` (`assign_runs`, `tags.group_run`): TensorBoard
colours lines by run, so in a chart of every layer each layer has its colour
(the same in every chart) and the run selector shows, hides and filters layers.
Every writer keeps what it wrote (`written_run`), so the `gradmon summary`
report of the run so far can be written into the run itself (`write_report`).

`SummaryWriter` never ends training because of the disk. A full disk, a
removed directory or a file that can no longer be written gives one warning
(per kind of failure), the events are counted in `dropped`, and writing
resumes in a fresh event file when it can. Only `open()`, before the first
step, raises for a directory that cannot be written. The handling of the event
files themselves (a fresh file, flushing, failures) is `event_file.EventFiles`.
"""

import abc
import contextlib
import itertools
import os
import struct
import time

import numpy as np
from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.histogram import metadata as histogram_metadata
from tensorboard.plugins.scalar import summary_v2 as scalar_summary
from tensorboard.plugins.text import metadata as text_metadata
from tensorboard.util import tensor_util

from gradmon import tags
from gradmon.publish import record
from gradmon.publish.event_file import EventFiles, WriteFailureWarning  # noqa: F401 - public here
from gradmon._validation import check_log_dir, check_non_negative, check_non_negative_int, invalid, warn_once


def histogram_buckets(low, high, counts):
    """`[k, 3]` rows `(left, right, count)` in TensorBoard's histogram layout.

    As TensorBoard's own `histogram_pb`: equal-width buckets over `[low, high]`;
    when `low == high` every edge is `low` and the last bucket holds all counts.

    Args:
        low: left edge of the first bucket.
        high: right edge of the last bucket.
        counts: `k` bucket counts.

    Returns:
        A float64 array of shape `[k, 3]`.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if high > low:
        edges = np.linspace(low, high, len(counts) + 1)
        left, right = edges[:-1], edges[1:]
    else:
        left = right = np.full(len(counts), low, dtype=np.float64)
    return np.stack([left, right, counts], axis=1)


def merge_layouts(current, new):
    """The union of two custom-scalars layouts, categories and charts matched by title.

    TensorBoard shows only the latest layout of a run, so monitors sharing a
    run directory each add their categories to what is there. A chart of
    `new` replaces the chart of the same title in the same category.

    Args:
        current: a `layout_pb2.Layout`, or `None`.
        new: a `layout_pb2.Layout`.

    Returns:
        A new `layout_pb2.Layout`; the arguments are not modified.
    """
    if not isinstance(new, layout_pb2.Layout):
        raise invalid("layout", "a tensorboard.plugins.custom_scalar.layout_pb2.Layout", new)
    merged = layout_pb2.Layout()
    if current is not None:
        merged.CopyFrom(current)
    merged.version = max(merged.version, new.version)
    for category in new.category:
        target = next((c for c in merged.category if c.title == category.title), None)
        if target is None:
            merged.category.add().CopyFrom(category)
            continue
        target.closed = category.closed
        for chart in category.chart:
            same = next((c for c in target.chart if c.title == chart.title), None)
            (same if same is not None else target.chart.add()).CopyFrom(chart)
    return merged


def describe(tag, descriptions=None):
    """A tag's description: the one given with the write (`descriptions`), else
    `gradmon.tags.describe(tag)`."""
    text = descriptions.get(tag) if descriptions else None
    return tags.describe(tag) if text is None else text


def _check_buckets(tag, buckets):
    buckets = np.asarray(buckets, dtype=np.float64)
    if buckets.ndim != 2 or buckets.shape[1] != 3:
        raise invalid(f"histograms[{tag!r}]", "an array of shape [k, 3] (see histogram_buckets)",
                      buckets.shape)
    return buckets


class _History:
    """The scalars a writer wrote, kept compactly (one float32 row per write, as written)."""

    def __init__(self):
        self.blocks = {}  # {tag names: ([sequence number], [step], [float32 row])}
        self.texts = {}  # {tag: latest text}
        self._sequence = itertools.count()

    def add(self, step, mapping):
        names = tuple(mapping)
        block = self.blocks.setdefault(names, ([], [], []))
        block[0].append(next(self._sequence))
        block[1].append(int(step))
        block[2].append(np.fromiter(mapping.values(), dtype="<f4", count=len(names)))

    def run(self, runs=None):
        """A `gradmon.events.Run` as `events.load_run` would read it: sorted by step, the value
        written last winning at a step written twice, each observer's configuration; tags in
        the order the files give them (this run's, then each of `runs`' by name)."""
        from gradmon.summary import events

        runs = runs or {}
        parts = {}
        for names, (sequence, steps, rows) in self.blocks.items():
            matrix = np.stack(rows).astype(np.float64)
            for j, tag in enumerate(names):
                parts.setdefault(tag, []).append((sequence, steps, matrix[:, j]))
        series = {}
        first = {tag: min(p[0][0] for p in pieces) for tag, pieces in parts.items()}
        began = {}  # each run's first write: when its event file was made
        for tag in parts:
            if tag in runs:
                began[runs[tag]] = min(began.get(runs[tag], first[tag]), first[tag])
        # as `load_run` reads the files: this run's, then the runs' in the order their files were made
        for tag in sorted(parts, key=lambda t: (t in runs, began.get(runs.get(t), -1), first[t])):
            pieces = parts[tag]
            sequence = np.concatenate([np.asarray(p[0], np.int64) for p in pieces])
            steps = np.concatenate([np.asarray(p[1], np.int64) for p in pieces])
            values = np.concatenate([p[2] for p in pieces])
            order = np.lexsort((sequence, steps))
            steps, values = steps[order], values[order]
            last = np.append(steps[1:] != steps[:-1], True)
            series[tag] = (steps[last], values[last])
        configs = {}
        for tag, text in self.texts.items():
            if tag == tags.CONFIG or tag.endswith("/" + tags.CONFIG):
                config = events._config(text.encode("utf-8"))
                if config:
                    configs[tag[:-len(tags.CONFIG)].rstrip("/") or None] = config
        run = events.Run(series, config=configs.pop(None, None))
        if configs and hasattr(run, "configs"):
            run.configs.update(configs)
        return run


def write_report(writer, max_listed=5):
    """Writes the `gradmon summary` report of what `writer` wrote so far as Markdown (Text tab).

    One text per observer (`tags.report(name)`), at the report's last step, judged by
    `gradmon.report` as the command line judges the event files. A report that cannot be made
    is warned of once and never ends training.

    Args:
        writer: a `MetricWriter`.
        max_listed: at most this many layers named per kind of finding. Defaults to `5`.

    Returns:
        The `HealthReport`s written (empty when the writer holds no gradient statistics).
    """
    from gradmon.summary import events, report

    try:
        run = writer.written_run()
        if not events.is_gradmon_run(run):
            return []
        reports = report.health_reports(run) if hasattr(report, "health_reports") \
            else [report.health_report(run)]
        texts = {}
        for one in reports:
            name = getattr(one, "name", None)
            tag = tags.report(name)
            mine = report.observer_run(run, name) if hasattr(report, "observer_run") else run
            text = report.format_markdown(one, max_listed=max_listed, run=mine)
            if writer._reported.get(tag) != (one.summary.last_step, text):
                writer._reported[tag] = (one.summary.last_step, text)
                texts.setdefault(one.summary.last_step, {})[tag] = text
        for step, mapping in texts.items():
            writer.write_texts(step, mapping)
        return reports
    except Exception as error:  # noqa: BLE001 - a report must never end a run
        warn_once(("health-report", id(writer), type(error).__name__),
                  f"gradmon could not write the health report into TensorBoard ({type(error).__name__}: "
                  f"{error}); training goes on, `gradmon summary` reads the run afterwards (warned once).")
        return []


class MetricWriter(abc.ABC):
    """What gradmon's callbacks write through (CLU's `MetricWriter`).

    `open()` and `close()` pair up around a run; `write_custom_scalar_layout`
    is the older name of `write_layout`. `assign_runs` sends tags to runs of
    their own; `written_run` returns what was written, as `events.load_run` reads it.
    """

    @property
    def _reported(self):  # what `write_report` wrote last, by tag
        if "_reported_texts" not in self.__dict__:
            self._reported_texts = {}
        return self._reported_texts

    def assign_runs(self, mapping):
        """Writes some tags into runs of their own (subdirectories of this run).

        Args:
            mapping: `{tag: run}`, `run` a relative path (`tags.group_run`), or
                `None` for this run.
        """
        runs = self.__dict__.setdefault("runs", {})
        for tag, run in mapping.items():
            if run:
                runs[tag] = run
            else:
                runs.pop(tag, None)

    def written_run(self):
        """What was written so far, as a `gradmon.events.Run` (what `load_run` reads)."""
        return self._history().run(getattr(self, "runs", None))

    def _history(self):
        if "_written" not in self.__dict__:
            self._written = _History()
        return self._written

    def open(self):
        """Prepares for writing; returns `self`. Pairs with `close`."""
        return self

    @abc.abstractmethod
    def write_scalars(self, step, mapping, descriptions=None):
        """Writes numbers at one step.

        Args:
            step: the training step (an integer).
            mapping: `{tag: number}`.
            descriptions: `{tag: Markdown}`, the descriptions of (some of) the tags of
                `mapping`, e.g. a recorder's (`Recorder.descriptions()`, a statistic's
                own); the others are described by `gradmon.tags.describe`. A tag's
                description goes with its first value (in each event file). Defaults to
                `None`.
        """

    @abc.abstractmethod
    def write_histograms(self, step, mapping, descriptions=None):
        """Writes histograms at one step.

        Args:
            step: the training step (an integer).
            mapping: `{tag: [k, 3] buckets}` (see `histogram_buckets`).
            descriptions: as for `write_scalars`.
        """

    @abc.abstractmethod
    def write_layout(self, layout):
        """Adds a custom-scalars layout to the run's layout (see `merge_layouts`).

        Args:
            layout: a `tensorboard.plugins.custom_scalar.layout_pb2.Layout`.
        """

    def write_custom_scalar_layout(self, layout):
        """Same as `write_layout`."""
        return self.write_layout(layout)

    @abc.abstractmethod
    def write_texts(self, step, mapping, descriptions=None):
        """Writes Markdown texts (TensorBoard's Text tab) at one step.

        Args:
            step: the training step (an integer).
            mapping: `{tag: str}`.
            descriptions: as for `write_scalars`.
        """

    @contextlib.contextmanager
    def batch(self):
        """Writes inside are flushed together when it ends (exception or not): one flush per
        event file for a batch of logged steps. Nests; yields the writer."""
        yield self

    def flush(self):
        """Makes everything written so far durable (a no-op where nothing is buffered)."""

    def close(self):
        """Ends one `open`."""


class MemoryWriter(MetricWriter):
    """Keeps what is written in memory, for tests.

    Attributes:
        scalars: `{tag: [(step, float), ...]}` in write order.
        histograms: `{tag: [(step, [k, 3] array), ...]}`.
        descriptions: `{tag: description}` as written with each tag's first value (the
            one given with the write, else `gradmon.tags.describe(tag)`).
        layout: the merged custom-scalars layout, or `None`.
        layouts: every merged layout written, in order.
        texts: `{tag: [(step, str), ...]}`.
        opened: number of `open` calls not yet closed.
        runs: `{tag: run}` given to `assign_runs` (tags not in it: this run).
    """

    def __init__(self):
        self.scalars = {}
        self.histograms = {}
        self.descriptions = {}
        self.layout = None
        self.layouts = []
        self.texts = {}
        self.opened = 0
        self.runs = {}

    def open(self):
        self.opened += 1
        return self

    def _describe(self, tag, descriptions):
        if tag not in self.descriptions:
            self.descriptions[tag] = describe(tag, descriptions)

    def write_scalars(self, step, mapping, descriptions=None):
        if mapping:
            self._history().add(step, mapping)
        for tag, value in mapping.items():
            self._describe(tag, descriptions)
            self.scalars.setdefault(tag, []).append((int(step), float(value)))

    def write_histograms(self, step, mapping, descriptions=None):
        for tag, buckets in mapping.items():
            buckets = _check_buckets(tag, buckets)
            self._describe(tag, descriptions)
            self.histograms.setdefault(tag, []).append((int(step), buckets.copy()))

    def write_layout(self, layout):
        self.layout = merge_layouts(self.layout, layout)
        self.layouts.append(self.layout)

    def write_texts(self, step, mapping, descriptions=None):
        for tag, text in mapping.items():
            self._describe(tag, descriptions)
            self.texts.setdefault(tag, []).append((int(step), str(text)))
            self._history().texts[tag] = str(text)

    def close(self):
        self.opened = max(self.opened - 1, 0)


_SCALAR_SHAPE = tensor_shape_pb2.TensorShapeProto()
_DOUBLE = struct.Struct("<d")
# A float32 whose bytes (0xff 0xfe 0xfd 0x7e) no tag, length or dtype field ends
# with, so the serialization check in `_ScalarTemplate` cannot pass by chance.
_MARKER = np.frombuffer(b"\xff\xfe\xfd\x7e", "<f4")[0]


def _varint(value):
    """Protobuf base-128 varint of an int64 (negative numbers as 10 bytes, as protobuf does)."""
    value &= 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class _ScalarTemplate:
    """A serialized `Summary` of fixed tags whose float32 values are patched in place.

    Building ~50 protobuf messages per step, or even refilling cached ones,
    costs more than the statistics themselves; here a step costs one numpy
    scatter into the serialized bytes. The summary carries no metadata: the
    first write of each tag (with its description) goes through protobuf.
    """

    def __init__(self, tag_names):
        pieces, positions, offset = [], [], 0
        for tag in tag_names:
            value = summary_pb2.Summary.Value(tag=tag, tensor=tensor_pb2.TensorProto(
                dtype=types_pb2.DT_FLOAT, tensor_shape=_SCALAR_SHAPE, float_val=[_MARKER]))
            data = value.SerializeToString()
            # the packed float is the last field of the last field (field order is
            # ascending on the wire); checked, not assumed
            if not data.endswith(_MARKER.tobytes()):
                raise ValueError(f"unexpected serialization of a scalar summary: {data!r}")
            piece = b"\x0a" + _varint(len(data)) + data  # Summary.value, field 1
            offset += len(piece)
            positions.append(offset - 4)
            pieces.append(piece)
        self._bytes = np.frombuffer(b"".join(pieces), np.uint8).copy()
        self._index = (np.asarray(positions)[:, None] + np.arange(4)).ravel()
        self._summary_key = b"\x2a" + _varint(self._bytes.size)  # Event.summary, field 5
        self._count = len(positions)
        # without a fast CRC32C, the record's checksum from the changed bytes alone
        self._crc = None if record.FAST else record.PatchedCrc(self._bytes, self._index)

    def event(self, step, values, wall_time=None):
        """A serialized `Event` and its CRC32C.

        Args:
            step: the event's step.
            values: the numbers, in the order of the template's tags.
            wall_time: the event's time stamp (seconds); `None`: now.

        Returns:
            `(bytes, crc)`: the `Event`, stamped with the current time, and its
            unmasked CRC32C (`None`: left to the record writer).
        """
        floats = np.fromiter(values, dtype="<f4", count=self._count).view(np.uint8)
        self._bytes[self._index] = floats
        stamp = time.time() if wall_time is None else wall_time
        prefix = b"".join((b"\x09", _DOUBLE.pack(stamp), b"\x10", _varint(int(step)),
                           self._summary_key))
        crc = None if self._crc is None else self._crc.crc(prefix, floats)
        return prefix + self._bytes.tobytes(), crc


class SummaryWriter(MetricWriter, EventFiles):
    """TensorBoard event files for one run directory.

    Writes are handed to the operating system together, every event file of the
    run (its per-layer runs included) at once: by default at the end of every
    write, inside a `batch()` (a batch of logged steps) when it ends; with
    `flush_seconds` after a write when that long has passed since the last flush;
    and always at `flush()`, `close()` and interpreter exit. An
    exception or a KeyboardInterrupt inside `fit` leaves event files holding
    everything written until then; only a process killed outright loses the
    writes of its last `flush_seconds`. Callbacks share one writer per directory
    (`SummaryWriter.shared`): TensorBoard follows only the newest event file
    of a run while it is being written (unless started with
    `--reload_multifile=true`), so gradmon keeps its summaries in one file.

    `open()` raises if the directory cannot be written. Later failures (disk
    full, directory removed, file no longer writable) warn once per kind, count
    the lost events in `dropped` and never raise: the file is cut back to its
    last whole record, and on a later write (at most every `retry_seconds`) a
    fresh event file is started in `logdir`, recreating it if needed.

    Args:
        logdir: directory of the event files, e.g. `<log_dir>/train`.
        retry_seconds: least time between a failure and the next attempt at a
            fresh event file. Defaults to `10.0`.
        max_retries: failed attempts at a fresh file after which the writer
            stops for the rest of the run (said once); `None` never stops.
            Defaults to `None`.
        check_seconds: how often the event file is looked for on disk: a file
            removed while open takes writes without any error. Defaults to `1.0`.
        flush_seconds: the longest a write waits for the next flush while
            writing goes on: one flush per file costs a system call (105
            per-layer runs flushed at every logged step: ~0.4 ms, see
            `benchmarks/writer.py`); a reader in another process sees the
            writes that late. Defaults to `0.0`: every write is flushed at once.

    Attributes:
        dropped: events not written since this writer was made. Events written
            to a file that is then found removed count from the last time the
            file was seen.
        path: the event file being written, or `None`.
    """

    _shared = {}
    # gradmon's own TFRecord writer, on every backend (no TensorFlow). Tests replace
    # it to simulate a failing file.
    _record_writer = staticmethod(record.RecordWriter)

    def __init__(self, logdir, retry_seconds=10.0, max_retries=None, check_seconds=1.0,
                 flush_seconds=0.0):
        self.logdir = check_log_dir(logdir)
        self.flush_seconds = check_non_negative("flush_seconds", flush_seconds)
        self._flushed_at = float("-inf")
        self._batches = 0  # open `batch()` blocks
        self.retry_seconds = check_non_negative("retry_seconds", retry_seconds)
        self.max_retries = None if max_retries is None else check_non_negative_int(
            "max_retries", max_retries)
        self.check_seconds = check_non_negative("check_seconds", check_seconds)
        self.dropped = 0
        self.path = None
        self._writer = None
        self._users = 0
        self._layout = None
        self._configs = {}  # {config tag: (step, text, description)}: repeated in every new event file
        self.runs = {}  # {tag: run}: tags written into runs of their own (`assign_runs`)
        self._children = {}  # {run: SummaryWriter of logdir/run}
        self._partitions = {}  # {tag names: (own indices, {run: indices})}
        self._root = None  # the writer of the parent run, for a child
        self._reset_file_state(0)
        self._reset_failures()

    @classmethod
    def shared(cls, logdir, run=None):
        """The writer every gradmon callback of this process uses for a directory.

        Args:
            logdir: the run directory, or the log directory when `run` is given.
            run: a subdirectory of `logdir` (e.g. `"train"`), so that an empty
                `logdir` is refused rather than read as the root. Defaults to `None`.

        Returns:
            The `SummaryWriter` of `logdir/run`, made on first use.
        """
        logdir = check_log_dir(logdir)
        if run is not None:
            parts = str(run).replace("\\", "/").split("/")
            if not isinstance(run, str) or os.path.isabs(run) or any(p in ("", ".", "..") for p in parts):
                raise invalid("run", "a relative subdirectory such as 'train'", run)
            logdir = os.path.join(logdir, run)
        key = os.path.abspath(logdir)
        if key not in cls._shared:
            cls._shared[key] = cls(logdir)
        return cls._shared[key]

    def open(self):
        """Starts an event file now unless one is open; pairs with `close`.

        Returns:
            `self`.

        Raises:
            ValueError: naming `log_dir`, if no run is under way and the
                directory or file cannot be written (during a run a failing
                writer only warns).
        """
        if self._writer is None and self._users == 0:
            self._reset_failures()
            try:
                self._start_file()
            except OSError as error:
                message = invalid("log_dir", "a writable directory", self.logdir)
                raise ValueError(f"{message} ({error})") from error
        self._users += 1
        return self

    @contextlib.contextmanager
    def batch(self):
        """Writes inside are flushed together when it ends (exception or not), every file of
        the run (per-layer runs included) once, whatever `flush_seconds`. Nests."""
        self._batches += 1
        try:
            yield self
        finally:
            self._batches -= 1
            if not self._batches:
                self.flush()

    def _description(self, tag, descriptions):
        """The tag's description (`describe`) on its first write to this file, else `None`."""
        if tag in self._described:
            return None
        self._described.add(tag)
        return describe(tag, descriptions)

    def _scalar_value(self, tag, value, descriptions):
        description = self._description(tag, descriptions)
        (summary_value,) = scalar_summary.scalar_pb(tag, value, description=description).value
        if description is None:
            summary_value.ClearField("metadata")  # TensorBoard keeps a tag's first metadata
        return summary_value

    def assign_runs(self, mapping):
        super().assign_runs(mapping)
        self._partitions = {}

    def _split(self, names):
        """`(own indices, {run: indices})` of a tuple of tags, or `None` when all are this run's."""
        by_run, own = {}, []
        for i, tag in enumerate(names):
            run = self.runs.get(tag)
            (by_run.setdefault(run, []) if run else own).append(i)
        return (own, by_run) if by_run else None

    def _child(self, run):
        """The writer of the run `logdir/run` (its event file opened on its first write)."""
        child = self._children.get(run)
        if child is None:
            child = SummaryWriter(os.path.join(self.logdir, run), self.retry_seconds,
                                  self.max_retries, self.check_seconds)
            child._root = self
            self._children[run] = child
        return child

    def write_scalars(self, step, mapping, descriptions=None):
        """Writes `{tag: number}` at `step` as one event, numbers as float32; never raises for I/O.

        Tags given to `assign_runs` go to their own runs, one event each. A tag's
        description (`descriptions`, see `MetricWriter.write_scalars`) goes with its first
        value in each event file."""
        self._write_scalars(step, mapping, descriptions)
        self._wrote()

    def _write_scalars(self, step, mapping, descriptions, wall_time=None):
        if not mapping:
            return
        if wall_time is None:
            wall_time = time.time()  # one time stamp for the step's events in every run
        if self._root is None:
            self._history().add(step, mapping)
        if self.runs:
            names = tuple(mapping)
            if names not in self._partitions:
                self._partitions[names] = self._split(names)
            split = self._partitions[names]
            if split is not None:
                own, by_run = split
                values = list(mapping.values())
                for run, indices in by_run.items():
                    self._child(run)._write_scalars(step, {names[i]: values[i] for i in indices},
                                                    descriptions, wall_time)
                mapping = {names[i]: values[i] for i in own}
                if not mapping:
                    return
        if not self._ready():
            self.dropped += 1
            return
        tag_names = tuple(mapping)
        template = self._templates.get(tag_names)
        if template:
            self._append(*template.event(step, mapping.values(), wall_time))
            return
        # first time for these tags in this file: protobuf, with descriptions
        self._append(self._event(step, [self._scalar_value(t, v, descriptions)
                                        for t, v in mapping.items()], wall_time))
        if template is None:
            try:
                self._templates[tag_names] = _ScalarTemplate(tag_names)
            except ValueError:
                self._templates[tag_names] = False  # protobuf serialized unexpectedly: stay on it

    def write_histograms(self, step, mapping, descriptions=None):
        """Writes `{tag: [k, 3] buckets}` at `step` as one event; never raises for I/O."""
        checked = {tag: _check_buckets(tag, buckets) for tag, buckets in mapping.items()}
        self._write_tensors(step, {tag: tensor_util.make_tensor_proto(b, dtype=np.float64)
                                   for tag, b in checked.items()}, histogram_metadata, descriptions)
        self._wrote()

    def write_texts(self, step, mapping, descriptions=None):
        """Writes `{tag: Markdown text}` at `step` (TensorBoard's Text tab); never raises for I/O.

        A configuration text (`tags.config(name)`) is also written again at the start of
        every later event file of this writer (e.g. after the directory was removed)."""
        for tag, text in mapping.items():
            self._history().texts[tag] = str(text)
            if tag.endswith(tags.CONFIG):
                self._configs[tag] = (int(step), str(text), describe(tag, descriptions))
        self._write_tensors(step, {tag: tensor_util.make_tensor_proto(str(text))
                                   for tag, text in mapping.items()}, text_metadata, descriptions)
        self._wrote()

    def _write_tensors(self, step, tensors, plugin, descriptions):
        """`{tag: TensorProto}` as one event, each tag's `plugin` metadata on its first write."""
        if not tensors:
            return
        if not self._ready():
            self.dropped += 1
            return
        values = []
        for tag, tensor in tensors.items():
            value = summary_pb2.Summary.Value(tag=tag, tensor=tensor)
            description = self._description(tag, descriptions)
            if description is not None:
                value.metadata.CopyFrom(plugin.create_summary_metadata(
                    display_name=None, description=description))
            values.append(value)
        self._append(self._event(step, values))

    def write_layout(self, layout):
        """Merges `layout` into the run's custom-scalars layout and writes the result.

        Args:
            layout: a `layout_pb2.Layout`; see `merge_layouts`.
        """
        ready = self._ready()  # before merging: a fresh file starts with the merged layout
        self._layout = merge_layouts(self._layout, layout)
        if not ready:
            self.dropped += 1
            return
        self._append(self._layout_event())
        self._wrote()

    def flush(self):
        """Hands everything written so far to the operating system, every event file of the
        run (its per-layer runs included) at once; never raises for I/O."""
        for child in self._children.values():
            child._flush_file()
        self._flush_file()
        self._flushed_at = time.monotonic()

    def close(self):
        """Ends one `open`; the file is closed when no user is left."""
        self._users = max(self._users - 1, 0)
        if self._users == 0:
            self.flush()  # a failure is warned of, and what was lost counted, as for any write
            for child in self._children.values():
                if child._writer is not None:
                    child._release_file(failed=False)
                child._reset_failures()
            if self._writer is not None:
                self._release_file(failed=False)
            self._reset_failures()  # the next `open` is a new run, with its own warnings
