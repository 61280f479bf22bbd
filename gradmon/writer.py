"""Writes TensorBoard event files from numbers on the host.

One writer interface (as in CLU's metric writers): `write_scalars(step,
mapping)`, `write_histograms(step, mapping)`, `close()`. Summaries
are built as protobufs directly (no TF ops), so writing many scalars per
step costs microseconds, and nothing here ever runs inside a compiled step.
Each tag's description (from `gradmon.tags.describe`) is written with its
first value, which is where TensorBoard reads it from.
"""

import itertools
import os
import socket
import time

import numpy as np
import tensorflow as tf
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
from tensorboard.plugins.custom_scalar import metadata as custom_scalar_metadata
from tensorboard.plugins.histogram import metadata as histogram_metadata
from tensorboard.plugins.scalar import metadata as scalar_metadata

from gradmon import tags

_SCALAR_SHAPE = tensor_shape_pb2.TensorShapeProto()


def _scalar_tensor(value):
    return tensor_pb2.TensorProto(
        dtype=types_pb2.DT_FLOAT, tensor_shape=_SCALAR_SHAPE, float_val=[float(value)]
    )


def _histogram_tensor(buckets):
    buckets = np.asarray(buckets, dtype=np.float64)
    shape = tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=n) for n in buckets.shape]
    )
    return tensor_pb2.TensorProto(
        dtype=types_pb2.DT_DOUBLE, tensor_shape=shape, double_val=buckets.ravel().tolist()
    )


def histogram_buckets(low, high, counts):
    """`[k, 3]` rows `(left, right, count)` in TensorBoard's histogram layout.

    As TensorBoard's own `histogram_pb`: equal-width buckets over `[low, high]`;
    when `low == high` every edge is `low` and the last bucket holds all counts.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if high > low:
        edges = np.linspace(low, high, len(counts) + 1)
        left, right = edges[:-1], edges[1:]
    else:
        left = right = np.full(len(counts), low, dtype=np.float64)
    return np.stack([left, right, counts], axis=1)


class SummaryWriter:
    """An event-file writer for one run directory (created on first write).

    Every write is flushed to the file at once (a few microseconds): an
    exception or a KeyboardInterrupt inside `fit` leaves an event file
    holding everything written until then. Callbacks share one writer per
    directory (`SummaryWriter.shared`): TensorBoard follows only the newest
    event file of a run while it is being written (unless started with
    `--reload_multifile=true`), so gradmon keeps its summaries in one file.

    Args:
        logdir: directory of the event file, e.g. `<log_dir>/train`.
    """

    _shared = {}
    _file_counter = itertools.count()

    def __init__(self, logdir):
        self.logdir = logdir
        self._writer = None
        self._users = 0
        self._described = set()
        self._scalar_events = {}

    @classmethod
    def shared(cls, logdir):
        """The writer every gradmon callback of this process uses for `logdir`."""
        key = os.path.abspath(logdir)
        if key not in cls._shared:
            cls._shared[key] = cls(logdir)
        return cls._shared[key]

    def open(self):
        """Creates the directory and the event file now (raises if it cannot); pairs with `close`."""
        self._ensure_file()
        self._users += 1
        return self

    def _ensure_file(self):
        if self._writer is None:
            try:
                os.makedirs(self.logdir, exist_ok=True)
                name = "events.out.tfevents.%010d.%s.%d.%d.gradmon.v2" % (
                    time.time(), socket.gethostname(), os.getpid(), next(self._file_counter))
                # Event files are TFRecord files; TF's writer computes the CRCs in C++
                # (tensorboard's pure-Python CRC32C costs ~0.8 ms per step).
                self._writer = tf.io.TFRecordWriter(os.path.join(self.logdir, name))
                self._write_event(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
            except (OSError, tf.errors.OpError) as error:
                raise ValueError(
                    "Invalid value for argument `log_dir`. Expected a writable "
                    f"directory. Received: log_dir={self.logdir!r} ({error})"
                ) from error

    def _metadata(self, tag, plugin):
        if tag in self._described:
            return None
        self._described.add(tag)
        return plugin.create_summary_metadata(display_name=None, description=tags.describe(tag))

    def _write(self, step, values):
        if not values:
            return
        self._ensure_file()
        self._write_event(event_pb2.Event(
            wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)))

    def _write_event(self, event):
        self._writer.write(event.SerializeToString())
        self._writer.flush()

    def write_scalars(self, step, mapping):
        """Writes `{tag: number}` at `step`."""
        self._ensure_file()
        tags_key = tuple(mapping)
        event = self._scalar_events.get(tags_key)
        if event is None or any(tag not in self._described for tag in tags_key):
            # first time for this set of tags: a fresh event, with descriptions
            self._write(step, self._described_values(mapping, _scalar_tensor, scalar_metadata))
            # later steps refill a cached event in place: building ~50 protobuf
            # messages per step would cost more than the statistics themselves
            self._scalar_events[tags_key] = event_pb2.Event(summary=summary_pb2.Summary(value=[
                summary_pb2.Summary.Value(tag=tag, tensor=_scalar_tensor(0.0)) for tag in tags_key]))
            return
        for slot, value in zip(event.summary.value, mapping.values()):
            slot.tensor.float_val[0] = value
        event.step = int(step)
        event.wall_time = time.time()
        self._write_event(event)

    def write_histograms(self, step, mapping):
        """Writes `{tag: [k, 3] buckets}` (see `histogram_buckets`) at `step`."""
        self._write(step, self._described_values(mapping, _histogram_tensor, histogram_metadata))

    def _described_values(self, mapping, make_tensor, plugin):
        """Summary values for `{tag: data}`, with metadata on each tag's first write."""
        values = []
        for tag, data in mapping.items():
            v = summary_pb2.Summary.Value(tag=tag, tensor=make_tensor(data))
            metadata = self._metadata(tag, plugin)
            if metadata is not None:
                v.metadata.CopyFrom(metadata)
            values.append(v)
        return values

    def write_custom_scalar_layout(self, layout):
        """Writes a custom-scalars `Layout` proto (TensorBoard reads the latest per run)."""
        tensor = tensor_pb2.TensorProto(
            dtype=types_pb2.DT_STRING, tensor_shape=_SCALAR_SHAPE,
            string_val=[layout.SerializeToString()])
        value = summary_pb2.Summary.Value(
            tag=custom_scalar_metadata.CONFIG_SUMMARY_TAG, tensor=tensor,
            metadata=custom_scalar_metadata.create_summary_metadata())
        self._write(0, [value])

    def close(self):
        """Releases one `open`; the file is closed when no user is left."""
        self._users = max(self._users - 1, 0)
        if self._users == 0 and self._writer is not None:
            self._writer.close()
            self._writer = None
            self._described = set()
            self._scalar_events = {}

