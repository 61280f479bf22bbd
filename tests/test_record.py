"""gradmon's own TFRecord event files: checksums against TensorBoard's reference, files read
back exactly by gradmon's reader and TensorBoard's EventAccumulator, and the writer, the
reader and `gradmon summary` in a process where TensorFlow cannot be imported."""

import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
from tensorboard.util import tensor_util

from gradmon import tags
from gradmon.publish import record
from gradmon.publish.writer import SummaryWriter, histogram_buckets
from gradmon.summary import events

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RNG = np.random.default_rng(17)
CHUNKS = [bytes(RNG.integers(0, 256, size=n, dtype=np.uint8)) for n in (0, 1, 3, 4, 5, 8, 64, 1000, 4099)]


@pytest.fixture(params=["fast", "pure"])
def crc_path(request, monkeypatch):
    """Both CRC32C implementations: google-crc32c (where installed) and TensorBoard's."""
    if request.param == "fast" and not record.FAST:
        pytest.skip("google-crc32c (C extension) is not installed")
    monkeypatch.setattr(record, "FAST", request.param == "fast")
    return request.param


def test_checksums_match_tensorboards_reference(crc_path):
    expected = [masked_crc32c(c) for c in CHUNKS]
    assert [record.masked_crc32c(c) for c in CHUNKS] == expected
    assert record.mask(record.crc32c_many(CHUNKS)).tolist() == expected
    assert record.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value (RFC 3720)


def test_a_record_is_length_crc_data_crc(crc_path):
    data = CHUNKS[-2]
    framed = record.frame(data)
    header = struct.pack("<Q", len(data))
    assert framed == header + struct.pack("<I", masked_crc32c(header)) + data + \
        struct.pack("<I", masked_crc32c(data))


def test_record_writer_flushes_whole_records_and_raises_os_errors(tmp_path):
    path = str(tmp_path / "records")
    writer = record.RecordWriter(path)
    writer.write(CHUNKS[-1])
    writer.flush()  # on disk now: another reader sees the whole record
    records, damage = events._scan_records(open(path, "rb").read())
    assert [payload for _, payload in records] == [CHUNKS[-1]] and damage == []
    for chunk in CHUNKS[:3]:
        writer.write(chunk)
    writer.close()
    records, damage = events._scan_records(open(path, "rb").read())
    assert [payload for _, payload in records] == [CHUNKS[-1]] + CHUNKS[:3] and damage == []
    with pytest.raises(OSError):
        record.RecordWriter(str(tmp_path / "missing" / "records"))


def write_run(logdir):
    """Scalars (first by protobuf, then from the template), histograms and texts."""
    writer = SummaryWriter(logdir).open()
    values = {}
    for step in range(1, 6):
        mapping = {tags.global_norm(tags.RAW): 2.0 ** -step, tags.group_stat(tags.RAW, "norm", "d0"):
                   step * 1.5, tags.CLIP_RATIO: 1.0 / step}
        writer.write_scalars(step, mapping)
        for tag, value in mapping.items():
            values.setdefault(tag, []).append((step, float(np.float32(value))))
    buckets = histogram_buckets(-1.0, 3.0, [2, 0, 7, 1])
    writer.write_histograms(5, {tags.histogram(tags.RAW, "d0"): buckets})
    writer.write_texts(5, {tags.REPORT: "**fine**"})
    writer.close()
    return values, buckets


def test_files_read_back_exactly_by_gradmon_and_tensorboard(tmp_path):
    values, buckets = write_run(str(tmp_path))
    run = events.load_run(str(tmp_path))
    assert run.problems == []
    for tag, rows in values.items():
        steps, numbers = run[tag]
        assert list(zip(steps.tolist(), numbers.tolist())) == rows
    accumulator = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    accumulator.Reload()
    assert set(accumulator.Tags()["tensors"]) == set(values) | {tags.histogram(tags.RAW, "d0"), tags.REPORT}
    for tag, rows in values.items():
        read = [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in accumulator.Tensors(tag)]
        assert read == rows
        assert accumulator.SummaryMetadata(tag).summary_description == tags.describe(tag)
    (histogram,) = accumulator.Tensors(tags.histogram(tags.RAW, "d0"))
    np.testing.assert_array_equal(tensor_util.make_ndarray(histogram.tensor_proto), buckets)
    (text,) = accumulator.Tensors(tags.REPORT)
    assert tensor_util.make_ndarray(text.tensor_proto).item() == b"**fine**"


BLOCKED = textwrap.dedent("""
    import importlib.abc, sys

    class NoTensorFlow(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "tensorflow" or name.startswith("tensorflow."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
            return None

    sys.meta_path.insert(0, NoTensorFlow())
""")


def test_writing_reading_and_the_summary_command_without_tensorflow(tmp_path):
    script = BLOCKED + textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.join(ROOT, "tests")!r})
        import numpy as np
        from gradmon.publish.writer import SummaryWriter
        from gradmon.summary import events
        from gradmon.__main__ import main
        import test_record
        values, buckets = test_record.write_run({str(tmp_path)!r})
        run = events.load_run({str(tmp_path)!r})
        assert all(list(zip(run[t][0].tolist(), run[t][1].tolist())) == rows for t, rows in values.items())
        from tensorboard.backend.event_processing import event_accumulator
        accumulator = event_accumulator.EventAccumulator({str(tmp_path)!r}, size_guidance={{"tensors": 0}})
        accumulator.Reload()
        assert len(accumulator.Tensors("gradients/raw/global_norm")) == 5
        assert main(["summary", {str(tmp_path)!r}, "--json"]) == 0
        assert not any(m == "tensorflow" or m.startswith("tensorflow.") for m in sys.modules)
        try:
            import tensorflow
        except ImportError:
            print("TensorFlow blocked")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith("TensorFlow blocked")
    assert '"last_step": 5' in result.stdout


def test_patched_checksums_equal_the_whole_records(crc_path):
    """A body changing only at some bytes (a step of scalars patched into its template)."""
    rng = np.random.default_rng(5)
    body = bytes(rng.integers(0, 256, size=700, dtype=np.uint8))
    many = np.concatenate([np.arange(60 * i + 50, 60 * i + 54) for i in range(11)] + [[699]])
    few = np.array([3, 4, 5, 6, 300, 301, 302, 303])  # below record._FEW: summed in Python
    for positions, prefix_length in [(p, n) for p in (many, few) for n in (0, 1, 11, 19)]:
        patched = record.PatchedCrc(body, positions)
        prefix = bytes(rng.integers(0, 256, size=prefix_length, dtype=np.uint8))
        changed = rng.integers(0, 256, size=len(positions), dtype=np.uint8)
        whole = np.frombuffer(body, dtype=np.uint8).copy()
        whole[positions] = changed
        assert patched.crc(prefix, changed) == record.crc32c(prefix + whole.tobytes())
        assert record.mask(patched.crc(prefix, changed)) == masked_crc32c(prefix + whole.tobytes())
    assert record.PatchedCrc(body, []).crc(b"ab", np.zeros(0, np.uint8)) == record.crc32c(b"ab" + body)


def test_every_record_of_a_written_run_checks_out(tmp_path, crc_path):
    write_run(str(tmp_path))
    (path,) = [os.path.join(str(tmp_path), name) for name in os.listdir(str(tmp_path))]
    data = open(path, "rb").read()
    position, count = 0, 0
    while position < len(data):
        header = data[position:position + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[position + 8:position + 12])[0] == masked_crc32c(header)
        payload = data[position + 12:position + 12 + length]
        assert struct.unpack("<I", data[position + 12 + length:position + 16 + length])[0] == \
            masked_crc32c(payload)
        position, count = position + 16 + length, count + 1
    assert count == 1 + 5 + 2  # the header, five steps (four from the template), histogram, text
