"""The event files of a `SummaryWriter`: opening, repairing and flushing them.

`EventFiles` is the part of `gradmon.publish.writer.SummaryWriter` that looks after one
run's event file: a fresh file starts with the header, the run's custom-scalars layout
and its configuration texts (a new file may be all that is left of a run); writes are
counted until flushed; a failed write or a removed file is warned of once per kind,
the lost events counted in `dropped`, and a fresh file is tried at most every
`retry_seconds`. Its state is attributes of the writer, set by `SummaryWriter.__init__`
(`_reset_file_state` and `_reset_failures` here).
"""

import atexit
import errno
import itertools
import logging
import os
import socket
import sys
import time
import warnings
import weakref

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.custom_scalar import metadata as custom_scalar_metadata
from tensorboard.plugins.text import metadata as text_metadata
from tensorboard.util import tensor_util

_logger = logging.getLogger(__name__)
# warnings are attributed to the first caller outside the writer's modules (e.g. a callback)
_WRITER_MODULES = frozenset((__name__, "gradmon.publish.writer"))


class WriteFailureWarning(RuntimeWarning):
    """An event file could not be written; training goes on without those summaries."""


def _failure_kind(error):
    """Groups write errors so that each kind is reported once."""
    code = getattr(error, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return "no space"
    if code == errno.ENOENT:
        return "missing"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission"
    return type(error).__name__


_open_runs = weakref.WeakSet()  # writers with an event file open: flushed at exit
_exiting = False


@atexit.register
def _flush_at_exit():
    """Hands what every open writer holds to the operating system; later writes flush at once."""
    global _exiting
    _exiting = True
    for writer in list(_open_runs):
        writer.flush()


class EventFiles:
    """The event-file handling of `SummaryWriter` (a base class; see the module docstring).

    Expects on the instance: `logdir`, `retry_seconds`, `max_retries`, `check_seconds`,
    `flush_seconds`, `dropped`, `path`, `_writer`, `_layout`, `_configs`, `_root`,
    `_batches`, `_flushed_at`, and on the class `_record_writer`
    (a `record.RecordWriter`-like factory); `flush()` flushes the whole run.
    """

    _file_counter = itertools.count()

    def _reset_file_state(self, header_records):
        self._header_records = header_records  # the file's first records: header, layout, configs
        self._pending = 0  # events written, not yet flushed
        self._unseen = 0  # records written since the file was last seen on disk
        self._next_check = time.monotonic() + self.check_seconds
        self._described = set()
        self._templates = {}

    def _reset_failures(self):
        self._failing = False
        self._stopped = False
        self._retries = 0
        self._failed_at = float("-inf")  # `retry_seconds` counts from here
        self._warned = set()

    def _start_file(self):
        """Opens a fresh event file holding the header (and the layout and the configuration
        texts so far); raises on failure."""
        os.makedirs(self.logdir, exist_ok=True)
        # zero-padded counter: TensorBoard reads a run's files in name order
        name = "events.out.tfevents.%010d.%s.%d.%06d.gradmon.v2" % (
            time.time(), socket.gethostname(), os.getpid(), next(self._file_counter))
        path = os.path.join(self.logdir, name)
        writer = self._record_writer(path)
        records = [event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString()]
        if self._layout is not None:  # a new file may be all that is left of the run
            records.append(self._layout_event())
        records += self._config_events()  # so may its configuration (`gradmon summary`)
        try:
            for data in records:
                writer.write(data)
            writer.flush()
        except OSError:
            self._writer, self.path = writer, path
            self._reset_file_state(len(records))
            self._release_file(failed=True)
            raise
        self._writer, self.path = writer, path
        _open_runs.add(self._root or self)
        self._reset_file_state(len(records))
        self._described.update(self._configs)  # described in this file's config events

    def _release_file(self, failed):
        """Closes the event file (flushing it); after a failure leaves only its whole,
        flushed records, the unflushed ones counted in `dropped`."""
        writer, path = self._writer, self.path
        self._writer = self.path = None
        before = writer.records
        try:
            writer.close()
        except OSError:
            failed = True
        self.dropped += self._pending - (writer.records - before)  # those not flushed whole
        self._pending = 0
        if not failed:
            return
        try:
            if writer.records <= self._header_records:
                os.remove(path)  # only a header: not worth a file per retry
            else:
                # appending after a partial record would make the rest unreadable
                os.truncate(path, writer.size)
        except OSError:
            pass  # e.g. the directory is gone: nothing is left to repair

    def _warn(self, kind, message):
        warned = (self._root or self)._warned  # a run's per-group runs warn as one
        if kind in warned:
            return
        warned.add(kind)
        # attribute the warning to the code that called the writer (e.g. a callback)
        level, frame = 1, sys._getframe()
        while frame.f_back is not None and frame.f_globals.get("__name__") in _WRITER_MODULES:
            frame, level = frame.f_back, level + 1
        warnings.warn(message, WriteFailureWarning, stacklevel=level)

    def _record_failure(self, error):
        """Reports a failed write or a failed attempt at a fresh file."""
        if self._failing:
            self._retries += 1
        self._failing = True
        self._failed_at = time.monotonic()
        self._warn(_failure_kind(error), (
            f"gradmon could not write TensorBoard summaries to {self.path or self.logdir!r}: "
            f"{error}. Training continues without them; a fresh event file in "
            f"{self.logdir!r} is tried at most every {self.retry_seconds:g} s "
            "(`SummaryWriter.dropped` counts the events lost)."))
        if self.max_retries is not None and self._retries >= self.max_retries:
            self._stopped = True
            self._warn("stopped", (
                f"gradmon stops writing TensorBoard summaries to {self.logdir!r} for the rest "
                f"of this run after {self._retries + 1} failures; last error: {error}"))

    def _file_present(self):
        """Whether the open event file is still on disk (looked at every `check_seconds`)."""
        now = time.monotonic()
        if now < self._next_check:
            return True
        self._next_check = now + self.check_seconds
        if os.path.exists(self.path):
            self._unseen = 0
            return True
        self.dropped += self._unseen  # they went to a file nobody can read
        self._record_failure(FileNotFoundError(
            errno.ENOENT, "the event file was removed while being written", self.path))
        self._release_file(failed=False)
        self._failed_at = float("-inf")  # the directory may be recreated at once
        return False

    def _ready(self):
        """Whether an event file is open, starting one if none is and it is time to try.

        Returns:
            `False` when the next event has to be dropped.
        """
        if self._writer is not None and self._file_present():
            return True
        if self._stopped or (self._failing and time.monotonic() - self._failed_at < self.retry_seconds):
            return False
        try:
            self._start_file()
        except OSError as error:
            self._record_failure(error)
            return False
        return True  # the failure is over once an event is written (`_append`)

    def _append(self, data, crc=None):
        """Writes one serialized event (`crc`: its CRC32C when known) to the open file,
        flushed later (`_wrote`); a failure drops it (and the unflushed ones) and ends the file."""
        try:
            if crc is None:
                self._writer.write(data)
            else:
                self._writer.write(data, crc)
        except OSError as error:
            self.dropped += 1
            self._record_failure(error)
            self._release_file(failed=True)
            return
        self._pending += 1
        self._unseen += 1

    def _flush_file(self):
        """Flushes this run's event file; a failure drops its unflushed events and ends it."""
        if self._writer is None or not self._pending:
            return
        before = self._writer.records
        try:
            self._writer.flush()
        except OSError as error:
            self.dropped += self._pending - (self._writer.records - before)  # those not flushed whole
            self._pending = 0
            self._record_failure(error)
            self._release_file(failed=True)
            return
        self._pending = 0
        if self._failing:
            _logger.info("gradmon writes TensorBoard summaries again, to %s (%d events dropped so far)",
                         self.path, self.dropped)
            self._failing = False
            self._retries = 0

    def _wrote(self):
        """After a write to the run: flushes every file of it if `flush_seconds` have passed
        (inside a `batch`: when it ends)."""
        if self._root is None and (_exiting or not self._batches and
                                   time.monotonic() - self._flushed_at >= self.flush_seconds):
            self.flush()

    def _event(self, step, values, wall_time=None):
        return event_pb2.Event(wall_time=time.time() if wall_time is None else wall_time, step=int(step),
                               summary=summary_pb2.Summary(value=values)).SerializeToString()

    def _config_events(self):
        """The configuration texts written so far, one event per step, each tag described."""
        by_step = {}
        for tag, (step, text, description) in self._configs.items():
            value = summary_pb2.Summary.Value(tag=tag, tensor=tensor_util.make_tensor_proto(text))
            value.metadata.CopyFrom(text_metadata.create_summary_metadata(
                display_name=None, description=description))
            by_step.setdefault(step, []).append(value)
        return [self._event(step, values) for step, values in by_step.items()]

    def _layout_event(self):
        # as tensorboard's `custom_scalar.summary.pb`, which builds a TF-flavoured proto
        value = summary_pb2.Summary.Value(
            tag=custom_scalar_metadata.CONFIG_SUMMARY_TAG,
            tensor=tensor_util.make_tensor_proto(self._layout.SerializeToString()),
            metadata=custom_scalar_metadata.create_summary_metadata())
        return self._event(0, [value])
