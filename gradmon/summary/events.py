"""Reading TensorBoard event files without TensorFlow: the scalar series of a run.

Event files are TFRecord files; every record's checksums are verified (as
TensorFlow's reader does), a damaged region is skipped and reading goes on
after it, and what was lost is reported (`ReadProblem`), never silently
dropped. Used by `gradmon summary` (`gradmon.report`), which must start fast
and run where TensorFlow is not installed.
"""

import dataclasses
import glob
import os
import struct
import typing

import numpy as np

from gradmon import tags
from gradmon.publish import record


class NoGradmonLogs(ValueError):
    """The directory holds no event files written by `gradmon.GradientMonitor`."""


@dataclasses.dataclass(frozen=True)
class ReadProblem:
    """Damage found in an event file by `load_run`.

    `kind` is `"corrupt"` (bytes that fail their checksum: records were lost),
    `"incomplete"` (the file ends inside its last record: a write in
    progress or an interrupted run) or `"unreadable"` (an entry named like an
    event file that is not a readable file: a directory, a broken link, no
    permission; skipped, `reason` says why). `last_good_step` is the step of
    the last event read before `offset` in this file, `resumed_step` the first
    one read after the damaged bytes (`None`: nothing after them could be read).
    """

    path: str
    kind: str
    offset: int
    skipped_bytes: int
    last_good_step: typing.Optional[int]
    resumed_step: typing.Optional[int]
    reason: str = ""

    @property
    def message(self):
        if self.kind == "unreadable":
            return f"{self.path}: named like an event file but {self.reason}; skipped"
        where = (f"{self.path}: {'corrupted' if self.kind == 'corrupt' else 'incomplete last record'}"
                 f" at byte {self.offset}")
        good = ("no step before it" if self.last_good_step is None
                else f"last good step {self.last_good_step}")
        if self.kind == "incomplete":
            return (f"{where} ({self.skipped_bytes} bytes: a write in progress or an interrupted "
                    f"run); {good}")
        after = ("nothing after it could be read" if self.resumed_step is None
                 else f"reading resumed at step {self.resumed_step}")
        return f"{where} ({self.skipped_bytes} bytes fail their checksum); {good}; {after}"


@dataclasses.dataclass(frozen=True)
class Overlap:
    """Steps of one gradient series written by more than one event file.

    Two processes writing one log directory (or a run restarted over steps it
    had written) give one series whose steps come from several files; for a
    step written by both, the later file's value is kept. `name` is the
    observer's name (`None`: unnamed), `paths` the files (in name order),
    `steps` the number of steps both wrote, `first_step` / `last_step` their
    range.
    """

    name: typing.Optional[str]
    paths: typing.Tuple[str, ...]
    steps: int
    first_step: int
    last_step: int

    @property
    def message(self):
        who = "" if self.name is None else f" of `{self.name}`"
        files = ", ".join(self.paths)
        return (f"{self.steps} step(s){who} ({self.first_step}-{self.last_step}) were written by "
                f"{len(self.paths)} event files ({files}): two writers in one log directory, or a "
                "run restarted over its own steps; the later file's values are used")


class Run(dict):
    """What `load_run` returns: `{tag: (steps, values)}`, plus `problems` (a list of
    `ReadProblem`), `overlaps` (a list of `Overlap`), `config` and `configs`."""

    def __init__(self, series=(), problems=(), config=None, configs=None, overlaps=()):
        super().__init__(series)
        self.problems = list(problems)
        # the monitoring configuration each observer recorded (`tags.config(name)`), by name
        # (`None`: unnamed); a name without one recorded none (older runs, a file started
        # after its directory was removed)
        self.configs = dict(configs or {})
        if config is not None:
            self.configs[None] = dict(config)
        self.overlaps = list(overlaps)

    @property
    def config(self):
        """The configuration the unnamed observer recorded (`tags.CONFIG`), or {}."""
        return self.configs.get(None, {})


# -- reading: TFRecord event files, without TensorFlow ------------------------------


_HEADER = record.HEADER  # uint64 length, masked CRC of those 8 bytes
_FOOTER = record.FOOTER  # masked CRC of the data
_crc32c = record.crc32c
_crc32c_many = record.crc32c_many
_crc32c_rows = record.crc32c_rows
_masked = record.mask


def _stored_crc(data, offset):
    return struct.unpack_from("<I", data, offset)[0]


def _record_head_ok(data, offset):
    return int(_masked(_crc32c(data[offset:offset + 8]))) == _stored_crc(data, offset + 8)


def _record_at(data, offset):
    """The payload of an intact record starting at `offset`, else `None` (plain Python)."""
    if offset + _HEADER + _FOOTER > len(data) or not _record_head_ok(data, offset):
        return None
    (length,) = struct.unpack_from("<Q", data, offset)
    end = offset + _HEADER + length
    if end + _FOOTER > len(data):
        return None
    payload = data[offset + _HEADER:end]
    if int(_masked(_crc32c(payload))) != _stored_crc(data, end):
        return None
    return payload


def _resync(data, start):
    """The first offset >= `start` where an intact record begins, or `None`.

    Offsets are sifted in bulk (a length that fits in the file, then the
    length's checksum, for every offset of a 1 MiB window at once) before the
    payload's checksum is computed: a long run of garbage or zeros costs
    milliseconds, not one Python call per byte.
    """
    last = len(data) - _HEADER - _FOOTER
    array = np.frombuffer(data, dtype=np.uint8)
    chunk = 1 << 20
    for begin in range(start, last + 1, chunk):
        stop = min(begin + chunk, last + 1)
        windows = np.lib.stride_tricks.sliding_window_view(array[begin:stop + _HEADER - 1], _HEADER)
        heads = np.ascontiguousarray(windows)
        lengths = heads[:, :8].copy().view("<u8")[:, 0]
        room = (len(data) - _HEADER - _FOOTER - np.arange(begin, stop)).astype(np.uint64)
        candidates = np.flatnonzero(lengths <= room)
        if not len(candidates):
            continue
        stored = heads[candidates, 8:].copy().view("<u4")[:, 0]
        sums = _masked(_crc32c_rows(heads[candidates, :8], np.zeros(len(candidates), np.int64)))
        for offset in (begin + candidates[sums == stored]).tolist():
            if _record_at(data, offset) is not None:
                return offset
    return None


def _header_sums(array, offsets):
    """`(computed, stored)` masked checksums of the length fields at `offsets`."""
    offsets = np.asarray(offsets, dtype=np.int64)
    heads = array[offsets[:, None] + np.arange(_HEADER)]
    stored = np.ascontiguousarray(heads[:, 8:]).view("<u4")[:, 0]
    return _masked(_crc32c_rows(heads[:, :8], np.zeros(len(offsets), np.int64))), stored


_BATCH = 4096  # records framed before their lengths are verified


def _scan_records(data):
    """`(records, damage)`: `[(offset, payload)]` of the intact records, and
    `[(kind, offset, skipped_bytes, resume_offset or None)]`.

    Records are framed optimistically a batch at a time, then the batch's
    length and payload checksums are verified at once; after a bad length the
    reader searches for the next intact record, so one damaged region loses
    only the records inside it.
    """
    records, damage = [], []
    array = np.frombuffer(data, dtype=np.uint8)
    position, size = 0, len(data)
    while position < size:
        offsets, lengths, end = [], [], position
        while end + _HEADER <= size and len(offsets) < _BATCH:
            (length,) = struct.unpack_from("<Q", data, end)
            if end + _HEADER + length + _FOOTER > size:
                break
            offsets.append(end)
            lengths.append(length)
            end += _HEADER + length + _FOOTER
        intact = len(offsets)
        if offsets:
            computed, stored = _header_sums(array, offsets)
            bad = np.flatnonzero(computed != stored)
            intact = int(bad[0]) if len(bad) else len(offsets)
        payloads = [data[o + _HEADER:o + _HEADER + n] for o, n in zip(offsets[:intact], lengths)]
        sums = _masked(_crc32c_many(payloads))
        for o, n, payload, crc in zip(offsets, lengths, payloads, sums.tolist()):
            if crc == _stored_crc(data, o + _HEADER + n):
                records.append((o, payload))
            else:  # an intact length: skip just this record
                damage.append(("corrupt", o, _HEADER + n + _FOOTER, o + _HEADER + n + _FOOTER))
        if intact < len(offsets):
            bad_at = offsets[intact]
        elif len(offsets) == _BATCH:
            position = end
            continue
        elif end < size:
            bad_at = end
            head_ok = end + _HEADER <= size and _record_head_ok(data, end)
            if end + _HEADER > size or head_ok:  # cut short inside its last record
                resume = _resync(data, end + 1) if head_ok else None
                if resume is None:
                    damage.append(("incomplete", end, size - end, None))
                    break
        else:
            break
        resume = _resync(data, bad_at + 1)
        damage.append(("corrupt", bad_at, (size if resume is None else resume) - bad_at, resume))
        if resume is None:
            break
        position = resume
    return records, _merged(damage)


def _merged(damage):
    """Damage regions that touch one another, as one (the later resume wins)."""
    out = []
    for kind, offset, skipped, resume in sorted(damage, key=lambda d: d[1]):
        if out and out[-1][0] == kind == "corrupt" and offset <= out[-1][1] + out[-1][2]:
            _, first, length, _ = out[-1]
            out[-1] = (kind, first, max(length, offset + skipped - first), resume)
        else:
            out.append((kind, offset, skipped, resume))
    return out


def run_directory(logdir):
    """`logdir/train` when it exists (a `GradientMonitor(log_dir)` root), else `logdir`."""
    train = os.path.join(str(logdir), "train")
    return train if os.path.isdir(train) else str(logdir)


def load_run(logdir):
    """Reads the scalar series of a run's event files.

    Every record's checksums are verified (as TensorFlow's reader does). A
    damaged region is skipped and reading goes on after it; what was lost is
    reported in the result's `problems` (`ReadProblem`), not silently dropped.
    TensorFlow is not imported.

    Args:
        logdir: the `log_dir` given to `gradmon.GradientMonitor`, or its
            `train` subdirectory.

    Returns:
        A `Run`: `{tag: (steps, values)}`, int64 and float64 numpy arrays
        sorted by step, for every scalar summary in the event files (non-scalar
        summaries such as histograms are skipped). When a step was written more
        than once, the last value written wins (files in name order, which is
        creation order); `run.overlaps` lists the steps of a gradient series
        that several files wrote (`Overlap`: two writers in one directory).
        `run.problems` lists the damage found, entries named like event files
        that are not readable files (directories, broken links) included.
        `run.configs` holds each observer's recorded configuration by name
        (`None`: unnamed; read from any file of the run), `run.config` the
        unnamed one's.

    Raises:
        NoGradmonLogs: when the directory holds no readable event files.
    """
    directory = run_directory(logdir)
    values, problems, configs = {}, [], {}
    written = {}  # {name: [(path, steps of its global raw norm)]}: for overlapping writers
    read_any = False
    for path in _event_paths(directory):
        data, reason = _read_file(path)
        if data is None:
            problems.append(ReadProblem(path=path, kind="unreadable", offset=0, skipped_bytes=0,
                                        last_good_step=None, resumed_step=None, reason=reason))
            continue
        read_any = True
        read, damage, norms = _read_events(data, values, configs)
        for name, steps in norms.items():
            written.setdefault(name, []).append((path, steps))
        problems += _damage_problems(path, damage, read)
    if not read_any:
        raise NoGradmonLogs(
            f"No readable event files in {directory!r}: "
            + "; ".join(p.message for p in problems)
            + ". Expected the `log_dir` of a gradmon.GradientMonitor run (event files under LOGDIR/train)."
        )
    out = Run(problems=problems, configs=configs, overlaps=_overlaps(written))
    for tag, by_step in values.items():
        steps = np.array(sorted(by_step), dtype=np.int64)
        out[tag] = (steps, np.array([by_step[s] for s in steps], dtype=np.float64))
    return out


def _event_paths(directory):
    """The event files of a run directory: its own (name order), then its per-group runs'.

    Raises:
        NoGradmonLogs: when `directory` is not a directory or holds no event files.
    """
    if not os.path.isdir(directory):
        raise NoGradmonLogs(
            f"{directory!r} is not a directory. Expected the `log_dir` of a "
            "gradmon.GradientMonitor run (event files under LOGDIR/train)."
        )
    paths = sorted(glob.glob(os.path.join(glob.escape(directory), "events.out.tfevents.*")))
    # per-group series live in runs of their own below it (`train/<group>`: a colour per layer),
    # read in the order their files were made (time, then gradmon's counter): the model's order
    paths += sorted(glob.glob(os.path.join(glob.escape(directory), "*", "**", "events.out.tfevents.*"),
                              recursive=True), key=lambda p: (os.path.basename(p), p))
    if not paths:
        raise NoGradmonLogs(
            f"No event files in {directory!r}. Expected the `log_dir` of a "
            "gradmon.GradientMonitor run (event files under LOGDIR/train)."
        )
    return paths


def _read_events(data, values, configs):
    """Reads one event file's bytes into `values` (`{tag: {step: number}}`) and `configs`.

    Returns:
        `(read, damage, norms)`: the `(offset, step)` of every event read, the damaged
        regions (`_scan_records`' tuples, corrupt events added) and `{name: steps}` of the
        global raw norm in this file.
    """
    from tensorboard.compat.proto import event_pb2, types_pb2

    float32 = types_pb2.DT_FLOAT
    records, damage = _scan_records(data)
    read = []  # (offset, step) of the events read
    norms = {}  # {name: steps} of the global raw norm in this file
    for offset, payload in records:
        try:
            event = event_pb2.Event.FromString(payload)
        except Exception:  # pragma: no cover - a checksummed record that is not an Event
            damage.append(("corrupt", offset, len(payload), None))
            continue
        read.append((offset, int(event.step)))
        if not event.HasField("summary"):
            continue
        step = int(event.step)
        for value in event.summary.value:
            tensor = value.tensor
            floats = tensor.float_val
            if len(floats) == 1 and tensor.dtype == float32 and not tensor.tensor_shape.dim:
                number = floats[0]  # the common case, inline: a float32 scalar
            else:
                number = _scalar(value, types_pb2)
            if number is not None:
                values.setdefault(value.tag, {})[step] = number
                if value.tag.endswith(_GLOBAL_NORM):
                    name = _name_of(value.tag, _GLOBAL_NORM)
                    if name is not False:
                        norms.setdefault(name, set()).add(step)
            elif tensor.string_val and value.tag.endswith(tags.CONFIG):
                name = _name_of(value.tag, tags.CONFIG)
                config = _config(tensor.string_val[0]) if name is not False else {}
                if config:  # any file of the run that recorded it
                    configs[name] = config
    return read, damage, norms


def _damage_problems(path, damage, read):
    """A `ReadProblem` per damaged region of a file, with the steps read around it."""
    problems = []
    for kind, offset, skipped, resume in sorted(damage, key=lambda d: d[1]):
        before = [step for o, step in read if o < offset]
        after = [step for o, step in read if resume is not None and o >= resume]
        problems.append(ReadProblem(
            path=path, kind=kind, offset=offset, skipped_bytes=skipped,
            last_good_step=before[-1] if before else None,
            resumed_step=after[0] if after else None))
    return problems


_GLOBAL_NORM = tags.global_norm(tags.RAW)


def _name_of(tag, base):
    """The observer name of a tag `name/base` (`None` for `base` itself), or False for another tag."""
    if tag == base:
        return None
    name = tag[:-len(base) - 1]
    return name if name and tag[-len(base) - 1] == "/" else False


def _read_file(path):
    """`(bytes, None)`, or `(None, why)` for an entry that is not a readable file."""
    if os.path.islink(path) and not os.path.exists(path):
        return None, f"is a broken link (to {os.readlink(path)!r})"
    if os.path.isdir(path):
        return None, "is a directory"
    try:
        with open(path, "rb") as f:
            return f.read(), None
    except OSError as error:
        return None, f"cannot be read ({error.strerror or error})"


def _overlaps(written):
    """`Overlap`s of the files that wrote the same steps of a global raw norm."""
    out = []
    for name, files in written.items():
        for i, (first, a) in enumerate(files):
            for second, b in files[i + 1:]:
                common = a & b
                if common:
                    out.append(Overlap(name=name, paths=(first, second), steps=len(common),
                                       first_step=min(common), last_step=max(common)))
    return out


def _config(raw):
    """The JSON configuration of `tags.CONFIG`, or {} if it cannot be read."""
    import json

    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _scalar(value, types_pb2):
    """A scalar summary's number, or `None` for anything else (histograms, layouts, text)."""
    kind = value.WhichOneof("value")
    if kind == "simple_value":
        return float(value.simple_value)
    if kind != "tensor":
        return None
    tensor = value.tensor
    if tensor.tensor_shape.dim or tensor.dtype == types_pb2.DT_STRING:
        return None
    if tensor.dtype == types_pb2.DT_FLOAT and len(tensor.float_val) == 1:
        return float(tensor.float_val[0])
    if tensor.dtype == types_pb2.DT_DOUBLE and len(tensor.double_val) == 1:
        return float(tensor.double_val[0])
    from tensorboard.util import tensor_util  # other encodings (tensor_content, ints, half)

    try:
        return float(tensor_util.make_ndarray(tensor))
    except (TypeError, ValueError):
        return None


def observer_names(run):
    """The observers whose gradient statistics `run` holds, in name order: `None` for the
    unnamed one (tags `gradients/...`), a name for one observed with `name=` (tags
    `name/gradients/...`)."""
    names = {_name_of(tag, _GLOBAL_NORM) for tag in run if tag.endswith(_GLOBAL_NORM)}
    names.discard(False)
    return sorted(names, key=lambda n: (n is not None, n or ""))


def is_gradmon_run(run):
    """Whether a `load_run` result holds gradmon's gradient statistics (of any observer)."""
    return bool(observer_names(run))
