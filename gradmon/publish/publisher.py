"""The host side of an observer: its `Schedule`, and reading, warning and writing.

Every `Observer` (the measuring side, at the optimizer's door) has one
`Publisher` (`observer.host`). It owns the observer's schedule (written into
the device's variables, `push`), reads the record rings back (`read`: lost
steps counted and warned of), the spike ring and the non-finite counter, and
writes snapshots, spikes, histograms, the layout, the configuration and the
health report through a writer: the observer's own (`observe(log_dir=...)`),
or the `GradientMonitor`'s that adopted it (`monitor`). Nothing here runs
inside a compiled step.
"""

import json
import sys
import time
import warnings

from gradmon import tags
from gradmon.publish import alerts
from gradmon.publish.schedule import Schedule

OWN_WRITER = object()  # `flush()`'s default: the observer's own writer
# flush() writes the health report at most this often; close() always
REPORT_EVERY_SECONDS = 60.0


class Publisher:
    """Schedules, reads back, warns and writes for one `Observer` (`observer.host`)."""

    def __init__(self, observer):
        self.observer = observer
        self.schedule = Schedule()
        self.writer = None  # `observe(log_dir=...)`'s own writer
        self.monitor = None  # the GradientMonitor writing for the observer, if any
        self.last_written = -1  # the latest step read (and so written, or deliberately not)
        self.reads = 0  # host reads of the measured steps (`read`)
        self.pending = []  # snapshots read from a retired recorder, not written yet
        self.spikes_seen = []  # (step, z) of the spikes read back so far
        self.nonfinite_warned = None  # (first, last) of the last run of steps warned of
        self._spike_count_read = 0
        self._spikes_written = -1  # the step of the last spike written
        self.nonfinite_reported = 0  # the device count of non-finite steps taken (saved with the model)
        self._headers = set()  # (writer id, recorder id) whose layout and config are written
        self._reported_at = float("-inf")

    # -- the schedule -------------------------------------------------------

    def set_schedule(self, every=None, log_at=None, hist_every=None):
        """Measures at steps divisible by `every` (0: never), at step `log_at`, and takes
        histograms every `hist_every` steps (0: never); written into the device at once."""
        self.schedule.set(every, log_at, hist_every)
        self.push()

    def push(self):
        """Writes the schedule into the device's variables (shared by the observer's recorders)."""
        rec = self.observer.recorder
        if rec is not None:
            every, log_at, hist_every = self.schedule.device_values()
            rec.host_assign(rec.every, every)  # (JAX: the trainer's state too)
            rec.host_assign(rec.log_at, log_at)
            rec.host_assign(rec.hist_every, hist_every)

    # -- reading ------------------------------------------------------------

    def read(self, count_lost=True):
        """Snapshots of the measured steps not yet read, oldest first (marks them read).

        Measured steps overwritten on the device before this read are warned of
        every time, with their count and steps (two device reads per recorder).

        Args:
            count_lost: warn of overwritten steps (`False`: only the latest was
                wanted, e.g. `update_freq="epoch"` over an epoch of unknown length).
        """
        snapshots, self.pending = self.pending, []
        for rec in self.observer.rings:
            snapshots += self._take(rec, count_lost)
        self.reads += 1
        snapshots.sort(key=lambda snapshot: snapshot.step)
        if snapshots:
            self.last_written = max(self.last_written, snapshots[-1].step)
        return snapshots

    def _take(self, rec, count_lost=True):
        snapshots, lost, between = rec.take(self.last_written)
        if lost and count_lost:
            every = self.schedule.every
            alerts.report_lost(lost, between, rec.rows, self.observer.buffer_steps, every,
                               self.reads == 0, self.schedule.due_steps(*between, lost), stacklevel=5)
        return snapshots

    def rewind(self, step):
        """The step axis goes back to `step` (an earlier state was loaded into this observer):
        the steps after it will be measured again, so what the device still holds of them (record
        rows, spikes) is forgotten and they are written when measured anew."""
        self.last_written = step
        for rec in self.observer.rings:
            rec.forget_after(step)
        self.spikes_seen = [(s, z) for s, z in self.spikes_seen if s <= step]
        self._spikes_written = min(self._spikes_written, step)
        if self.observer.spikes is not None and self.observer.recorder is not None:
            self.observer.spikes.forget_after(step, self.observer.recorder.host_assign)

    def retire(self, rec):
        """Stops reading `rec` (replaced for the same variables): its measured steps are kept for
        the next `flush`."""
        self.pending += self._take(rec)
        self.observer.rings.remove(rec)

    def adopt(self, old):
        """Takes over a replaced observer's unwritten snapshots."""
        self.pending += old.pending
        old.pending = []

    def read_spikes(self, report=True):
        """The spikes not read yet, `[(step, z), ...]` oldest first; warns naming their steps.

        Two device reads (the count and a small ring); also appended to `spikes_seen`.

        Args:
            report: warn of the new spikes. Defaults to `True`.
        """
        observer = self.observer
        if observer.spikes is None:
            return []
        count, held = observer.spikes.read()
        last = self.spikes_seen[-1][0] if self.spikes_seen else -1
        new = [(s, z) for s, z in held if s > last]
        if count - self._spike_count_read > len(new):
            alerts.report_lost_spikes(observer, count - self._spike_count_read - len(new),
                                      observer.spikes.rows)
        self._spike_count_read = count
        self.spikes_seen += new
        if new and report:
            alerts.report_spikes(observer, new, stacklevel=4)
        return new

    def spikes_counted(self, count):
        """The device's spike count was set (a loaded state): its spikes are not new ones."""
        self._spike_count_read = count

    def no_batch_size(self):
        """A step without a batch size for the spike detector (warned once)."""
        alerts.no_batch_size(self.observer)

    def check_outside_fit(self):
        """Warns once when the optimizer of the monitored model that owns the observer
        (`observer.fit_owner`) is applied outside the model's `fit` with nothing to write
        what is measured (no own writer, no `GradientMonitor`)."""
        owner = self.observer.fit_owner
        model = owner() if owner is not None else None
        if model is None or getattr(model, "_gradmon_fitting", 0) or self.writer is not None \
                or self.monitor is not None:
            return
        alerts.outside_fit(model, measured=True)

    def take_nonfinite(self):
        """`(count, first, last)` of the steps whose update was non-finite since the last call
        (counted on the device at every step, measured or not; loss-scale overflows left out),
        or `None` when there were none. One device read (two when there were some)."""
        rec = self.observer.recorder
        if rec is None:
            return None
        count, first, last = rec.read_nonfinite()
        new = count - self.nonfinite_reported
        if new <= 0:
            return None
        rec.nonfinite_reported(count, last)
        self.nonfinite_reported = count
        first = first if first >= 0 else last
        return min(new, last - first + 1), first, last  # no more steps than the range holds

    def stop_cause(self):
        """`(step, cause, policy)` of the step that stopped the updates (once `stopped`).

        The step is recorded on the device when it halts, measured or not; a
        spike is named with its z-score.
        """
        observer = self.observer
        step = int(observer.recorder.host_read(observer.recorder.halted_at))
        spiked = dict(self.spikes_seen + self.read_spikes(report=False))  # the stop names it
        if observer.on_spike == "stop" and (step in spiked or observer.on_nonfinite != "stop"):
            z = f" (z = {spiked[step]:.1f})" if step in spiked else ""  # unless the ring lost it
            return step, f"a gradient-norm spike{z}", "on_spike"
        return step, "non-finite gradients", "on_nonfinite"

    # -- writing ------------------------------------------------------------

    def flush(self, writer=OWN_WRITER, latest_only=False, histograms=True, report=True):
        """Writes the measured steps not yet written (idempotent); returns their snapshots.

        Args:
            writer: where to write; defaults to the writer of `observe(log_dir=...)`,
                or, once a `GradientMonitor` has adopted the observer (which closed that
                writer), to the monitor's (`GradientMonitor.flush_writer`). `None`: read and
                warn only, e.g. a non-chief worker.
            latest_only: write only the latest of them (`update_freq="epoch"`).
            histograms: also look for new histograms (two device reads).
            report: with the observer's own writer, also write the health report of the
                run so far (`gradmon.writer.write_report`) when steps were written.
                Defaults to `True`.
        """
        own = writer is OWN_WRITER
        writer = self.writer if own else writer
        if own and writer is None and self.monitor is not None:
            writer = self.monitor.flush_writer  # adopted by a GradientMonitor: its run
        read = snapshots = self.read(count_lost=not latest_only)
        if latest_only:
            snapshots = snapshots[-1:]
        self.read_spikes()
        observer = self.observer
        if writer is not None and observer.recorder is not None:
            with writer.batch():  # the batch's steps: each event file flushed once, at its end
                self._write(writer, snapshots, histograms and observer.histograms)
            if own and report and snapshots:
                self.report(writer, every_seconds=REPORT_EVERY_SECONDS)
        alerts.report_nonfinite(observer, self.take_nonfinite(), read, stacklevel=4)
        return snapshots

    def _write(self, writer, snapshots, histograms):
        """Writes the header, the snapshots and the new spikes in step order, and histograms."""
        self.write_header(writer)
        spiked = [(s, z) for s, z in self.spikes_seen if s > self._spikes_written]
        if spiked:
            self._spikes_written = spiked[-1][0]
        at = tags.prefixed(self.observer.name, tags.SPIKE_AT)
        for snapshot in snapshots:
            while spiked and spiked[0][0] <= snapshot.step:  # in step order
                writer.write_scalars(spiked[0][0], {at: spiked.pop(0)[1]})
            # each tag's description (its statistic's) travels with the write
            writer.write_scalars(snapshot.step, snapshot.values, snapshot.recorder.descriptions())
        for step, z in spiked:
            writer.write_scalars(step, {at: z})
        if histograms:
            self.write_histograms(writer)

    def write_histograms(self, writer):
        """Writes the latest histograms if they were not written yet (two device reads per recorder)."""
        for rec in self.observer.rings:
            latest = rec.read_histograms()
            if latest is None or latest[0] == rec.host_histogram:
                continue
            rec.host_histogram = latest[0]
            writer.write_histograms(latest[0], histogram_summaries(rec, latest[1]))

    def config_text(self):
        """The monitoring configuration as JSON (written once per run as `tags.CONFIG`)."""
        observer = self.observer
        return json.dumps({
            "grouping": observer.grouping, "stats": list(observer.selected),
            "custom_stats": [type(s).__name__ for s in observer.custom],
            "transform": None if observer.transform is None else repr(observer.transform),
            "on_nonfinite": observer.on_nonfinite, "name": observer.name,
            "on_spike": observer.on_spike, "spike_threshold": observer.spike_threshold,
        })

    def write_header(self, writer):
        """Writes the custom-scalars layout and the configuration once per recorder."""
        from gradmon.publish.layout import build_layout, group_runs

        # remembered per writer (a writer may serve several observers: one entry per observer)
        for rec in self.observer.rings:
            if (id(writer), id(rec)) in self._headers:
                continue
            writer.assign_runs(group_runs(rec))  # each layer a run: its own colour
            writer.write_layout(build_layout(rec))
            writer.write_texts(0, {tags.config(self.observer.name): self.config_text()})
            self._headers.add((id(writer), id(rec)))

    def report(self, writer, every_seconds=0.0):
        """The health report of the run so far (Text tab), and the per-layer charts of the layers
        it finds that matter (`gradmon.layout.write_focus`); at most once per `every_seconds`
        (a loop that flushes often does not judge its whole history at every flush)."""
        from gradmon.publish.layout import write_focus
        from gradmon.publish.writer import write_report

        now = time.monotonic()
        if now - self._reported_at < every_seconds:
            return
        self._reported_at = now
        write_focus(writer, self.observer.recorder, write_report(writer), self.observer.name)

    # -- the end ------------------------------------------------------------

    def close(self):
        """Writes what is left (and the health report) and releases the event file
        `observe(log_dir=...)` opened."""
        self.flush()
        if self.writer is not None and self.monitor is None:
            self.report(self.writer)  # unchanged since the last one: not written again
            self.writer.close()
            self.writer = None

    def finish(self, when="the end of the process"):
        """At exit (or when dropped): writes what was measured and not written (`close`), and
        warns when nothing had read the measured steps before (never raises)."""
        if self.monitor is None and self.writer is None:
            return
        try:
            if self.monitor is not None:
                self._finish_adopted(when)
                return
            observer = self.observer
            never_read, ran = self.reads == 0, observer.recorder is not None
            written = self.flush()
            self.close()
            if never_read and ran:
                warnings.warn(
                    f"gradmon: nothing wrote the measured steps of the optimizer "
                    f"{getattr(observer.optimizer, 'name', '')!r} (observe(log_dir=...)) before "
                    f"{when}: {len(written)} were written then (up to step {observer.step}). In "
                    "`model.fit` add `gradmon.GradientMonitor(log_dir)` to the callbacks; "
                    f"{alerts.in_a_loop_flush()} every at most "
                    f"{max(observer.min_rows, observer.buffer_steps)} measured steps (buffer_steps) "
                    f"and {alerts.loop_close()} at the end.", stacklevel=2)
        except Exception as error:  # never end the process with a traceback of ours
            sys.stderr.write(f"gradmon: the measured steps not written yet could not be written at "
                             f"{when}: {type(error).__name__}: {error}\n")

    def _finish_adopted(self, when):
        """`finish` for an observer a `GradientMonitor` writes for: the steps measured after its
        last `fit` (a custom loop that never called `flush()`) go to the monitor's run, warned of."""
        observer = self.observer
        if observer.recorder is None or getattr(self.monitor, "fitting_async", False):
            return
        if self.monitor.flush_writer is None:  # a worker that does not write
            return
        written = self.flush(report=False)
        if written:
            warnings.warn(
                f"gradmon: {len(written)} measured step{'s' if len(written) > 1 else ''} of the "
                f"optimizer {getattr(observer.optimizer, 'name', '')!r} after its last `fit` (up to "
                f"step {written[-1].step}) {'were' if len(written) > 1 else 'was'} written only at "
                f"{when}, to that fit's run: in a loop after `fit`, call `flush()` (`opt.flush()`, or "
                "`model.gradient_observer.flush()` for a monitored model) every at most "
                f"{max(observer.min_rows, observer.buffer_steps)} measured steps (buffer_steps).",
                stacklevel=2)


def histogram_summaries(rec, histograms):
    """`{tag: buckets}` for `Recorder.read_histograms()`' array."""
    from gradmon.publish.writer import histogram_buckets

    kinds = [tags.RAW, tags.TRANSFORMED] if rec.spec.has_transform else [tags.RAW]
    out = {}
    for k, kind in enumerate(kinds):
        for i, group in enumerate(rec.spec.groups):
            low, high, counts = histograms[k, i, 0], histograms[k, i, 1], histograms[k, i, 2:]
            out[tags.prefixed(rec.prefix, tags.histogram(kind, group))] = histogram_buckets(low, high, counts)
    return out
