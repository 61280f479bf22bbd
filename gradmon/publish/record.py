"""The TFRecord file TensorBoard's event files are, written and checked without TensorFlow.

A record is `uint64 length`, the masked CRC32C of those 8 bytes, the data, and
the masked CRC32C of the data (all little-endian). The CRC32C (Castagnoli) comes
from `google-crc32c` when it is installed with its C extension (the `jax` and
`torch` extras install it; about 1 us for a step of 200 scalars) and from
TensorBoard's own pure-Python implementation otherwise (a few ms per 10 KB).
`SummaryWriter` writes through `RecordWriter`; `gradmon.summary.events` verifies
records with the same functions (`crc32c`, `mask`, `crc32c_many`, `crc32c_rows`).
"""

import array
import functools
import os
import struct

import numpy as np

try:
    import google_crc32c as _google_crc32c
except ImportError:  # pragma: no cover - depends on the environment
    _google_crc32c = None

# google-crc32c without its C extension falls back to pure Python: no faster than TensorBoard's
FAST = _google_crc32c is not None and getattr(_google_crc32c, "implementation", "") == "c"

HEADER = 12  # uint64 length, masked CRC of those 8 bytes
FOOTER = 4  # masked CRC of the data
_MASK_DELTA = 0xA282EAD8
_LENGTH = struct.Struct("<Q")
_CRC = struct.Struct("<I")


@functools.lru_cache(maxsize=1)
def _pure_crc32c():
    from tensorboard.compat.tensorflow_stub import pywrap_tensorflow

    return pywrap_tensorflow.crc32c


def crc32c(data):
    """The (unmasked) CRC32C of a bytes-like object."""
    if FAST:
        return _google_crc32c.value(bytes(data))
    return _pure_crc32c()(data)


def mask(crc):
    """TFRecord's masked form of unmasked CRCs (an int, or a uint32 array)."""
    if isinstance(crc, int):
        return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF
    crc = np.asarray(crc, dtype=np.uint64)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def masked_crc32c(data):
    """The masked CRC32C of `data`, as a record stores it."""
    return mask(crc32c(data))


def frame(data, crc=None):
    """`data` as one TFRecord: length, its masked CRC, the data, the data's masked CRC.

    Args:
        data: the record's bytes.
        crc: the unmasked CRC32C of `data` when known (`PatchedCrc`), else `None`.
    """
    crc = crc32c(data) if crc is None else crc
    return b"".join((_length_header(len(data)), data, _CRC.pack(mask(crc))))


@functools.lru_cache(maxsize=256)
def _length_header(length):
    """A record's first 12 bytes: its length and the length's masked CRC (events of one
    template all have the same few lengths)."""
    packed = _LENGTH.pack(length)
    return packed + _CRC.pack(masked_crc32c(packed))


@functools.lru_cache(maxsize=1)
def table():
    """The CRC32C byte table (reflected polynomial 0x82F63B78), TensorBoard's, as uint32."""
    from tensorboard.compat.tensorflow_stub import pywrap_tensorflow

    return np.array(pywrap_tensorflow.CRC_TABLE, dtype=np.uint32)


def crc32c_many(chunks):
    """The CRC32C of each bytes object of `chunks`, as a uint32 array.

    With `google-crc32c`, one call each. Without it, those of similar length are
    computed together by numpy: a reflected CRC started at 0xFFFFFFFF equals one
    started at 0 over the message with its first 4 bytes complemented, and leading
    zero bytes keep a zero register at 0, so messages right-aligned in a
    zero-padded matrix run through the byte table one column at a time.
    """
    if FAST:
        return np.fromiter((_google_crc32c.value(c) for c in chunks), dtype=np.uint32, count=len(chunks))
    out = np.zeros(len(chunks), dtype=np.uint32)
    lengths = np.array([len(c) for c in chunks], dtype=np.int64)
    for i in np.flatnonzero(lengths < 4):
        out[i] = crc32c(chunks[i])
    order = [i for i in np.argsort(lengths, kind="stable").tolist() if lengths[i] >= 4]
    start = 0
    while start < len(order):
        stop, limit = start, 2 * lengths[order[start]] + 64  # padding at most doubles the work
        while stop < len(order) and lengths[order[stop]] <= limit:
            stop += 1
        group = order[start:stop]
        width = int(lengths[group[-1]])
        matrix = np.zeros((len(group), width), dtype=np.uint8)
        for row, i in enumerate(group):
            matrix[row, width - len(chunks[i]):] = np.frombuffer(chunks[i], dtype=np.uint8)
        out[group] = crc32c_rows(matrix, width - lengths[group])
        start = stop
    return out


def crc32c_rows(matrix, first):
    """The CRC32C of each row of a uint8 matrix (changed in place), the message of row i
    starting at column `first[i]` (zeros before it; at least 4 bytes from it on)."""
    byte_table = table()
    rows = np.arange(len(matrix))
    for k in range(4):  # the 0xFFFFFFFF start, as complemented leading bytes
        matrix[rows, first + k] ^= 0xFF
    crc = np.zeros(len(matrix), dtype=np.uint32)
    for column in np.ascontiguousarray(matrix.T):
        crc = byte_table[(crc ^ column) & 0xFF] ^ (crc >> 8)
    return crc ^ np.uint32(0xFFFFFFFF)


_ALL_ONES = 0xFFFFFFFF


def _register(register, data):
    """The CRC32C shift register after `data`, from `register` (no final complement)."""
    if FAST:
        return _google_crc32c.extend(register ^ _ALL_ONES, bytes(data)) ^ _ALL_ONES
    from tensorboard.compat.tensorflow_stub import pywrap_tensorflow

    return pywrap_tensorflow.crc_update(register ^ _ALL_ONES, data) ^ _ALL_ONES


_FEW = 16


@functools.lru_cache(maxsize=256)
def _prefix_register(prefix):
    """The register after an event's prefix (time, step, summary length): the same for every
    per-layer run's event of a step of the same length, so computed once."""
    return _register(_ALL_ONES, prefix)


class _ZeroBytes:
    """`Z_n`, the effect of `n` zero bytes on a CRC32C register (linear over GF(2)), as four
    256-entry tables, one per byte of the register; built from `Z_1`, `Z_2`, `Z_4`, ..."""

    _powers = []  # Z_1, Z_2, Z_4, ... of each one-bit register (shared: they never change)

    def __init__(self):
        if not self._powers:
            ones = np.left_shift(np.uint32(1), np.arange(32, dtype=np.uint32))
            self._powers.append(table()[ones & 0xFF] ^ (ones >> 8))
        self._lanes = {}

    @staticmethod
    def _tabulate(images):
        """The four byte-lane tables of the linear map sending bit i to `images[i]`."""
        bits = ((np.arange(256)[:, None] >> np.arange(8)) & 1).astype(bool)
        return [np.bitwise_xor.reduce(np.where(bits, images[8 * j:8 * j + 8], np.uint32(0)), axis=1)
                .astype(np.uint32) for j in range(4)]

    @staticmethod
    def _map(lanes, registers):
        return lanes[0][registers & 0xFF] ^ lanes[1][(registers >> 8) & 0xFF] \
            ^ lanes[2][(registers >> 16) & 0xFF] ^ lanes[3][registers >> 24]

    def lanes(self, n):
        if n not in self._lanes:
            images = np.left_shift(np.uint32(1), np.arange(32, dtype=np.uint32))
            j = 0
            while n >> j:
                while len(self._powers) <= j:  # Z_2m = Z_m o Z_m
                    last = self._powers[-1]
                    self._powers.append(self._map(self._tabulate(last), last))
                if (n >> j) & 1:
                    images = self._map(self._tabulate(self._powers[j]), images)
                j += 1
            self._lanes[n] = self._tabulate(images)
        return self._lanes[n]

    def apply(self, n, registers):
        return registers if n == 0 else self._map(self.lanes(n), registers)


def _words(values):
    """A flat `array.array` of uint32 (indexing gives Python ints without a numpy call)."""
    code = "I" if array.array("I").itemsize == 4 else "L"
    return array.array(code, np.asarray(values, dtype=np.uint32).astype(
        np.dtype(code).newbyteorder("=")).tobytes())


@functools.lru_cache(maxsize=64)
def _zero_lanes(size):
    """`Z_size`'s four byte-lane tables, flat (lane j at 256 j): shared by the templates of
    one body length (a model's per-layer runs)."""
    return _words(np.concatenate(_ZeroBytes().lanes(size)))


class PatchedCrc:
    """The CRC32C of `prefix + body` where `body` changes only at some byte positions,
    in microseconds without a fast CRC (a step of 200 scalars: ~15 KB).

    The CRC's shift register is linear over GF(2) in the initial register and the
    bytes: after the body it is `Z(s) ^ R(body with zeros at the positions) ^ the
    sum over positions p of Z_k(table[byte_p])`, `s` the register after the (short)
    prefix, `Z` the effect of the body's length in zero bytes on a register and
    `Z_k` that of the `k` bytes after `p`. Those are tabulated once (256 entries per
    changing byte, 4 KB per float), so a step costs the prefix in Python and one
    numpy gather.

    Args:
        body: the bytes after the prefix (those at `positions` are ignored).
        positions: the indices into `body` of the bytes that change.
    """

    def __init__(self, body, positions):
        body = np.frombuffer(bytes(body), dtype=np.uint8).copy()
        positions = np.asarray(positions, dtype=np.int64)
        body[positions] = 0
        size = len(body)
        self._base = _register(0, body.tobytes())
        after = size - 1 - positions  # bytes after each changing one
        wanted = np.unique(after).tolist()
        zeros = _ZeroBytes()
        recorded, state, at = {}, table(), 0  # Z_k(table) for each wanted k, in ascending order
        for k in wanted:
            state = zeros.apply(k - at, state)
            recorded[k], at = state, k
        self._tables = np.stack([recorded[k] for k in after.tolist()]) if len(after) else \
            np.zeros((0, 256), np.uint32)
        self._rows = np.arange(len(positions))
        # a few changing bytes (a per-layer run's two scalars): Python indexing beats a numpy
        # gather; flat uint32 arrays (not lists of ints) keep a hundred templates in cache
        self._flat = _words(self._tables.ravel()) if len(positions) <= _FEW else None
        self._offsets = list(range(0, 256 * len(positions), 256))
        self._lanes = _zero_lanes(size)

    def crc(self, prefix, changed):
        """The unmasked CRC32C of `prefix + body`, `changed` (uint8) the bytes at the positions."""
        s = _prefix_register(prefix)
        lanes = self._lanes
        register = lanes[s & 0xFF] ^ lanes[256 + ((s >> 8) & 0xFF)] ^ lanes[512 + ((s >> 16) & 0xFF)] \
            ^ lanes[768 + (s >> 24)] ^ self._base
        if self._flat is not None:
            flat = self._flat
            for offset, byte in zip(self._offsets, changed.tolist()):
                register ^= flat[offset + byte]
        elif len(self._rows):
            register ^= int(np.bitwise_xor.reduce(self._tables[self._rows, changed]))
        return register ^ _ALL_ONES


class RecordWriter:
    """Appends TFRecords to a new file (what `tf.io.TFRecordWriter` does, without TensorFlow).

    `write` keeps a record in memory; `flush` hands every kept record to the
    operating system in one write (it survives the process ending; no `fsync`,
    as TensorFlow's writer); `close` flushes and closes. Failures raise `OSError`
    (e.g. `ENOSPC`, `ENOENT`, `EACCES`) from the open or a flush; records not
    flushed whole are then forgotten, and `size` / `records` say what is on disk
    whole: a writer that goes on cuts the file back to `size` first.

    Args:
        path: the file, created (or truncated) now.

    Attributes:
        size: bytes of the whole records flushed so far.
        records: number of whole records flushed so far.
    """

    def __init__(self, path):
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        self._buffer = []
        self.size = 0
        self.records = 0

    def write(self, data, crc=None):
        """Keeps `data` (bytes) as one record until the next `flush`; `crc`: its CRC32C
        when known (see `frame`)."""
        self._buffer.append(frame(data, crc))

    def _write_bytes(self, view):
        """One `os.write`; returns the number of bytes written (tests make it fail)."""
        return os.write(self._fd, view)

    def flush(self):
        """Writes the kept records; on failure counts the whole ones that made it."""
        if not self._buffer:
            return
        buffer, self._buffer = self._buffer, []
        data = buffer[0] if len(buffer) == 1 else b"".join(buffer)
        view, written = memoryview(data), 0
        try:
            while written < len(data):
                written += self._write_bytes(view[written:])
        finally:
            whole = 0
            for framed in buffer:
                if whole + len(framed) > written:
                    break
                whole += len(framed)
                self.records += 1
            self.size += whole

    def close(self):
        """Flushes and closes the file (closed even when the flush fails)."""
        try:
            self.flush()
        finally:
            os.close(self._fd)
